"""Defect 6: slow or silent connections (slowloris) cannot hold connection slots against normal senders.

A frame has a deadline from its first byte (``frame_timeout_s``); a connection that completes no frame
has a shorter one (``first_frame_timeout_s``), which bytes outside frames do not extend; and at
``max_connections`` a new connection takes the place of the one that has gone longest without
completing a frame (never one with frames unanswered, nor one that completed a frame recently).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from connectors.mllp.client import MllpClient
from gateway.hl7.ack import parse_ack
from tests.conftest import GatewayFactory, mllp_port
from tests.messages import adt
from tests.mllp.hostile import SB, close_all, mllp_source, raw_sender, server_side, source_config
from tests.waiting import until


async def test_a_frame_not_complete_in_time_is_answered_ar_and_its_connection_closed(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = await start_gateway(source_config(tmp_path, frame_timeout_s=0.3))
    src = mllp_source(gw)
    message = adt("SLOW1")
    sender = await raw_sender(gw, SB + message[: len(message) // 2])  # then nothing, ever
    try:
        await until(lambda: sender.eof, what="the connection closed by the gateway")
        assert sender.answered  # on the code without a frame deadline: held for idle_timeout_s (600 s)
        assert parse_ack(sender.answer()) == ("AR", "SLOW1", "100")
        assert src.timed_out_frames == 1
        await gw.store.flush()
        rows = await gw.store.list_messages(
            status="ERROR", control_id=None, channel="source:hospital", limit=5, before_seq=None
        )
        assert len(rows) == 1  # its beginning is journaled, as for every refusal
    finally:
        await sender.close()
    assert src.partial_bytes == 0


async def test_a_stalled_frame_without_a_readable_header_is_closed_without_an_answer(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = await start_gateway(source_config(tmp_path, frame_timeout_s=0.3))
    sender = await raw_sender(gw, SB + b"\x00\x01")
    try:
        await until(lambda: sender.eof, what="the connection closed by the gateway")
        assert not sender.answered
    finally:
        await sender.close()


async def test_a_trickled_frame_does_not_extend_its_deadline(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = await start_gateway(source_config(tmp_path, frame_timeout_s=0.3))
    trickle = adt("TRICKLE") + b"X" * 500  # never its end block
    sender = await raw_sender(gw, SB)
    try:
        for sent in range(500):  # a byte every 20 ms, for as long as the connection lasts
            if sender.eof:
                break
            sender.send(trickle[sent : sent + 1])
            await asyncio.sleep(0.02)
        assert sender.eof, "still open after 500 bytes"
        assert parse_ack(sender.answer())[0] == "AR"
    finally:
        await sender.close()


async def test_a_connection_that_completes_no_frame_is_closed_even_if_it_sends_bytes_between_frames(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = await start_gateway(source_config(tmp_path, first_frame_timeout_s=0.3, idle_timeout_s=600))
    src = mllp_source(gw)
    sender = await raw_sender(gw)
    try:
        for _ in range(500):  # CR/LF between frames, every 20 ms: not activity
            if sender.eof:
                break
            sender.send(b"\r\n")
            await asyncio.sleep(0.02)
        assert sender.eof, "still open after 500 sends"
        assert not sender.answered
        await until(lambda: server_side(src, sender) is None, what="the connection gone from the source")
    finally:
        await sender.close()


async def test_slow_connections_at_max_connections_do_not_lock_normal_senders_out(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = await start_gateway(source_config(tmp_path, max_connections=4, max_connections_per_address=100))
    src = mllp_source(gw)
    message = adt("LORIS")
    slow = [await raw_sender(gw, SB + message[:10]) for _ in range(6)]  # 6 > max_connections
    try:
        await until(lambda: sum(s.eof for s in slow) == 2, what="two connections closed")
        await until(lambda: len(src.connections) == 4, what="slots full")

        # A normal sender still gets in (on the code that refused at max_connections: ConnectionError).
        client = MllpClient("127.0.0.1", mllp_port(gw))
        try:
            assert parse_ack(await client.send(adt("NORMAL1")))[0] == "AA"
            # Having completed a frame, it keeps its place while more slow connections arrive.
            more = [await raw_sender(gw, SB + message[:10]) for _ in range(4)]
            slow += more
            await until(lambda: sum(s.eof for s in slow) == 7, what="older slow connections evicted")
            assert parse_ack(await client.send(adt("NORMAL2")))[0] == "AA"
        finally:
            await client.close()
        assert src.refused_connections == 0
        assert src.evicted_connections == 7  # 2 + 1 (for the normal sender) + 4
        for s in slow:
            if s.eof:  # an evicted frame whose header can be read is answered (AE: send again), never dropped
                assert parse_ack(s.answer()) == ("AE", "", "207")
    finally:
        await close_all(slow)


async def test_a_connection_with_frames_unanswered_is_never_evicted(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = await start_gateway(source_config(tmp_path, max_connections=1))
    src = mllp_source(gw)
    client = MllpClient("127.0.0.1", mllp_port(gw))
    try:
        assert parse_ack(await client.send(adt("KEEP1")))[0] == "AA"
        # It completed a frame just now: not quiet for frame_timeout_s, so a newcomer is refused.
        newcomer = await raw_sender(gw)
        try:
            await until(lambda: newcomer.eof, what="the newcomer refused")
        finally:
            await newcomer.close()
        assert src.refused_connections == 1 and src.evicted_connections == 0
        assert parse_ack(await client.send(adt("KEEP2")))[0] == "AA"
    finally:
        await client.close()
