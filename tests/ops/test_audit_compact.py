"""The audit trail's fast paths hold to the general ones: same stored bytes, same ids contract, same link."""

from __future__ import annotations

import base64
import os
import pickle
import re
import threading
import time

import orjson
from hypothesis import given
from hypothesis import strategies as st

from gateway.core import ids as ids_module
from gateway.core.envelope import HL7_V2, Envelope
from gateway.core.ids import new_id
from gateway.core.protocols import StageRecord, WorkItem
from gateway.core.status import Status
from gateway.engine.link import dumps
from gateway.store.audit import message_received_event, receipt_bytes
from gateway.store.messages.sql import delivery_trace

_COLUMNS = (
    "seq",
    "id",
    "channel",
    "source",
    "received_at",
    "status",
    "sender",
    "control_id",
    "message_type",
    "peer",
)
text = st.text(max_size=20)


@given(
    mid=text,
    channel=text,
    source=text,
    received_at=st.floats(min_value=0, max_value=4_000_000_000, allow_nan=False),
    status=st.sampled_from(["RECEIVED", "SENT", "ERROR", "DEAD", "FILTERED"]),
    sender=st.none() | text,
    control_id=text,
    message_type=text,
    peer=st.none() | text | st.just("10.0.0.1:2575") | st.just(":9"),
    rid=text,
)
def test_receipt_bytes_are_the_generic_serialization(
    mid: str,
    channel: str,
    source: str,
    received_at: float,
    status: str,
    sender: str | None,
    control_id: str,
    message_type: str,
    peer: str | None,
    rid: str,
) -> None:
    row = (7, mid, channel, source, received_at, status, sender, control_id, message_type, peer)
    generic = {**message_received_event(dict(zip(_COLUMNS, row, strict=True))), "id": rid}
    assert receipt_bytes(row, rid) == orjson.dumps(generic, option=orjson.OPT_SORT_KEYS)


def test_ids_keep_their_layout_order_and_uniqueness() -> None:
    ids = [new_id() for _ in range(5000)]
    assert all(re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{26}", i) for i in ids)
    assert len(set(ids)) == len(ids)
    # string order is time order, at millisecond resolution
    assert new_id(1_700_000_000.0) < new_id(1_700_000_000.5) < new_id(1_800_000_000.0)
    assert new_id(1_700_000_000.0)[:9] == new_id(1_700_000_000.0)[:9]  # 45 of the 48 time bits


@given(ms=st.integers(min_value=0, max_value=(1 << 48) - 1), rand=st.binary(min_size=10, max_size=10))
def test_ids_are_written_as_before(ms: int, rand: bytes) -> None:
    # the layout ids had from the start: base32hex of the 16 bytes, mapped onto Crockford's alphabet
    crockford = bytes.maketrans(b"0123456789ABCDEFGHIJKLMNOPQRSTUV", b"0123456789ABCDEFGHJKMNPQRSTVWXYZ")
    expected = base64.b32hexencode(ms.to_bytes(6, "big") + rand)[:26].translate(crockford).decode()
    assert ids_module.encode(ms, rand) == expected


def test_ids_are_unique_across_threads_and_forked_processes() -> None:
    new_id()  # the parent holds a partly used block of random bytes when it forks
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports the ids it makes, then leaves at once
        os.close(read)
        os.write(write, "\n".join(new_id() for _ in range(300)).encode())
        os._exit(0)
    os.close(write)
    parent = [new_id() for _ in range(300)]
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    child = b"".join(chunks).decode().split("\n")
    assert len(child) == 300 and not set(child) & set(parent)
    made: list[list[str]] = [[] for _ in range(4)]
    threads = [
        threading.Thread(target=lambda out=out: out.extend(new_id() for _ in range(2000))) for out in made
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({i for out in made for i in out}) == 8000


def test_link_pickling_rebuilds_the_records_exactly() -> None:
    env = Envelope(
        id=new_id(),
        channel="adt",
        source="mllp-in",
        raw=b"MSH|^~\\&|A|B\r",
        content_type=HL7_V2,
        sender="A^B",
        control_id="C1",
        message_type="ADT^A01",
        partition_key="p",
        received_at=time.time(),
        trace_id="t",
        charset="UNICODE UTF-8",
        peer="127.0.0.1:1",
        status=Status.FILTERED,
        dedupe=False,
    )
    item = WorkItem(1, env, Status.QUEUED, b"x", ("file", "mllp"), {"file": 2}, checked=True)
    stage = StageRecord("transform", Status.TRANSFORMED, b"y", "text/plain", {"k": [1, 2]})
    trace = delivery_trace(env.id, stage, ["file", "mllp"], sent=True, now=1.5)
    msgs = [("offer", "adt", item), ("trace", trace), ("outcome", env.id)]
    back = pickle.loads(dumps(msgs))  # noqa: S301 - our own bytes
    assert back[0] == msgs[0] and back[2] == msgs[2]
    assert back[0][2].envelope.status is Status.FILTERED
    got = back[1][1]
    assert (got.message_id, got.stages, got.deliveries, got.status, got.first_try) == (
        env.id,
        trace.stages,
        {"file": ("SENT", 1, 1.5, None, True), "mllp": ("SENT", 1, 1.5, None, True)},
        ("SENT", 1.5, None),
        False,  # the transform carries a payload: it is not folded
    )
