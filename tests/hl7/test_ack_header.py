"""The ACK's header is addressed from the request's header: swapped sender/receiver, echoes, MSA-2.

build_ack reads the split MSH directly (it runs once per message); these properties pin it to
what the path API says, repetitions and components included.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.errors import AckCode, MissingField
from gateway.hl7.ack import build_ack
from gateway.hl7.er7 import Message

_TEXT = st.text(alphabet="ABCXYZ019 .-", min_size=0, max_size=6)
# A field value as a sender may write it: components and repetitions, raw.
_FIELD = st.lists(st.lists(_TEXT, min_size=1, max_size=3).map("^".join), min_size=1, max_size=3).map("~".join)


def _request(fields: dict[int, str]) -> Message:
    msh = ["MSH", "|", "^~\\&"] + [""] * 17  # index n is MSH-n
    msh[9] = "ADT^A01^ADT_A01"
    msh[10] = fields.pop(10, "CTRL1") or "CTRL1"
    for n, value in fields.items():
        msh[n] = value
    while len(msh) > 12 and msh[-1] == "":
        msh.pop()
    text = "|".join([msh[0], *msh[2:]]) + "\rPID|1||123^^^H^PI\r"
    return Message.parse(text)


@settings(max_examples=200, deadline=None)
@given(
    msh3=_FIELD,
    msh4=_FIELD,
    msh5=_FIELD,
    msh6=_FIELD,
    msh10=st.text(alphabet="ABC0123456789", min_size=1, max_size=12),
    msh11=_FIELD,
    msh12=_FIELD,
    msh17=_FIELD,
)
def test_ack_header_echoes_the_first_repetition_of_each_field(
    msh3: str, msh4: str, msh5: str, msh6: str, msh10: str, msh11: str, msh12: str, msh17: str
) -> None:
    fields = {3: msh3, 4: msh4, 5: msh5, 6: msh6, 10: msh10, 11: msh11, 12: msh12, 17: msh17}
    req = _request(dict(fields))
    ack = Message.decode(build_ack(req, AckCode.AA, sending_application="GW", now=1_700_000_000.0))
    assert ack.get_raw("MSH-3") == (req.get_raw("MSH-5") or "GW")
    assert ack.get_raw("MSH-4") == req.get_raw("MSH-6")
    assert ack.get_raw("MSH-5") == req.get_raw("MSH-3")
    assert ack.get_raw("MSH-6") == req.get_raw("MSH-4")
    assert ack.get_raw("MSH-11") == (req.get_raw("MSH-11") or "P")
    assert ack.get_raw("MSH-12") == (req.get_raw("MSH-12") or "2.5")
    assert ack.get_raw("MSH-17") == req.get_raw("MSH-17")
    assert ack.get_raw("MSA-1") == "AA"
    assert ack.get_raw("MSA-2") == req.get_raw("MSH-10") == msh10
    assert ack.get_raw("MSH-9") == "ACK^A01^ACK"


def test_ack_echoes_msh18_and_is_encoded_in_it() -> None:
    text = "MSH|^~\\&|LAB|H1|GW|H2|20240101||ADT^A08|C9|P|2.5|||||FRA|8859/1~UNICODE UTF-8\rPID|1||1^^^H\r"
    req = Message.decode(text.encode("latin-1"))
    err = MissingField("PID-5 is empty: é", location="PID-5")
    raw = build_ack(req, AckCode.AE, err, now=1_700_000_000.0)
    ack = Message.decode(raw)
    assert ack.get_raw("MSH-18") == "8859/1"  # the first repetition names the charset
    assert ack.charset == "8859/1"
    assert "é".encode("latin-1") in raw
    assert ack.get_raw("MSH-17") == "FRA"
    assert ack.get_raw("MSA-2") == "C9"
    assert ack.get_raw("ERR-3.1") == "101"
    assert ack.get_raw("ERR-2") == "PID^1^5^1"
