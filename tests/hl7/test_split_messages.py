"""Files of several messages: one per MSH, whatever the line ends, in an HL7 batch envelope or not."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.hl7.er7 import split_messages

SEGMENT = st.sampled_from(["PID|||1", "PV1||I", "OBX|1|ST|X||v", "NTE|||note", "ZBE|1"])
MESSAGE = st.builds(
    lambda n, body: "\r".join([f"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|{n}|P|2.5", *body]),
    st.integers(0, 999),
    st.lists(SEGMENT, max_size=4),
)


@given(st.lists(MESSAGE, min_size=1, max_size=5), st.sampled_from(["\r", "\n", "\r\n"]), st.booleans())
def test_every_message_comes_back_whole_envelope_or_not(messages: list[str], end: str, batch: bool) -> None:
    body = [*messages]
    if batch:  # FHS/BHS ... BTS/FTS: the batch protocol's envelope, not a message's segments
        body = ["FHS|^~\\&|A|B", "BHS|^~\\&|A|B", *messages, f"BTS|{len(messages)}", "FTS|1"]
    data = end.join(line for m in body for line in m.split("\r")) + end
    assert split_messages(data.encode()) == [(m + "\r").encode() for m in messages]
