"""Defect 7: an oversize frame is answered AR whatever its size, never with a connection reset.

The AR leaves as soon as the frame passes the limit; the rest of the frame is then read and dropped up
to its end block (nothing of it kept), so that a sender still writing it reads the AR; the connection
is closed after that, and the server keeps serving others. The 200 MB case is in
bench/bench_mllp_hostile.py; here the frame's rest is written after the AR has arrived, which on the
code that closed right after the AR always met a reset.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from connectors.mllp.client import MllpClient
from connectors.mllp.framing import FrameDecoder, Oversize, frame
from gateway.hl7.ack import parse_ack
from tests.conftest import GatewayFactory, mllp_port
from tests.messages import adt
from tests.mllp.hostile import SB, mllp_source, raw_sender, source_config
from tests.waiting import until

LIMIT = 65_536  # the shared test config's max_frame_bytes


def _send_oversize_then_its_rest(port: int, head: bytes, rest: bytes) -> tuple[bytes, bytes]:
    """A blocking sender: write the head (past the limit), read the answer, then write the rest of the
    frame and read until the server closes. Returns (answer, what came after it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(head)
        decoder = FrameDecoder(1 << 20)
        answers: list[bytes | Oversize] = []
        while not answers:
            data = sock.recv(65536)
            assert data, "closed before answering"
            answers = decoder.feed(data)
        answer = answers[0]
        assert isinstance(answer, bytes)
        sock.sendall(rest)  # on the code that closed after the AR: ConnectionResetError / BrokenPipeError
        after = b""
        while data := sock.recv(65536):
            after += data
        return answer, after


async def test_an_oversize_frame_still_being_written_gets_its_ar_then_a_clean_close(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = await start_gateway()
    src = mllp_source(gw)
    head = SB + adt("HUGE1") + b"X" * (2 * LIMIT)
    rest = b"Y" * (4 * 1024 * 1024) + b"\x1c\r"
    answer, after = await asyncio.to_thread(_send_oversize_then_its_rest, mllp_port(gw), head, rest)
    assert parse_ack(answer) == ("AR", "HUGE1", "100")
    assert after == b""  # a clean end of stream, not a reset
    # Journaled first, from the frame's beginning only.
    await gw.store.flush()
    rows = await gw.store.list_messages(
        status="ERROR", control_id=None, channel="source:hospital", limit=5, before_seq=None
    )
    assert len(rows) == 1
    stored = await gw.store.get_message(str(rows[0]["id"]), with_payloads=True)
    assert stored is not None
    assert stored["raw"].startswith(adt("HUGE1")) and len(stored["raw"]) <= 4096
    # The server keeps serving others, and held nothing of the dropped bytes.
    client = MllpClient("127.0.0.1", mllp_port(gw))
    try:
        assert parse_ack(await client.send(adt("AFTER-HUGE")))[0] == "AA"
    finally:
        await client.close()
    assert src.partial_bytes == 0


def _send_whole_then_read(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(frame(payload))
        received = b""
        while data := sock.recv(65536):
            received += data
        return received


async def test_a_large_oversize_frame_written_in_one_go_is_answered_ar(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = await start_gateway()
    payload = adt("HUGE2") + b"X" * (300 * LIMIT)  # 20 MB against a 64 KB limit
    received = await asyncio.to_thread(_send_whole_then_read, mllp_port(gw), payload)
    answers = FrameDecoder(1 << 20).feed(received)
    assert len(answers) == 1 and isinstance(answers[0], bytes)
    assert parse_ack(answers[0])[:2] == ("AR", "HUGE2")


async def test_the_rest_of_a_refused_frame_is_bounded_by_the_frame_deadline(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = await start_gateway(source_config(tmp_path, frame_timeout_s=0.3))
    src = mllp_source(gw)
    sender = await raw_sender(gw, SB + adt("HUGE3") + b"X" * (2 * LIMIT))  # and never its end block
    try:
        await until(lambda: sender.eof, what="the connection closed by the gateway")
        assert parse_ack(sender.answer())[:2] == ("AR", "HUGE3")
        assert src.timed_out_frames == 1
    finally:
        await sender.close()
