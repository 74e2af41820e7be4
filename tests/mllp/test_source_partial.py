"""Defect 5: bytes of frames still arriving (no end block yet) are bounded, per connection and in total.

Small numbers stand for the real ones (bench/bench_mllp_hostile.py measures 256 connections each
sending an unterminated 16 MB frame): frames of a few hundred KB and a budget that holds two of them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from connectors.mllp.client import MllpClient
from gateway.app import Gateway
from gateway.core.errors import ConfigError
from gateway.hl7.ack import parse_ack
from tests.conftest import GatewayFactory, make_config, mllp_port
from tests.messages import adt
from tests.mllp.hostile import (
    SB,
    close_all,
    held_by_connections,
    mllp_source,
    raw_sender,
    server_side,
    source_config,
)
from tests.waiting import until

FRAME_LIMIT = 200_000
BUDGET = 300_000  # max_partial_bytes: two of the attackers' frames, not three
PARTIAL = 120_000  # what each attacker sends of its frame, never its end block
ATTACKERS = 8
READ_CHUNK = 256 * 1024  # the most asyncio reads at once: what may be held past the budget, briefly


async def test_incomplete_frames_are_bounded_across_connections_and_normal_senders_are_served(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = await start_gateway(
        source_config(
            tmp_path,
            max_frame_bytes=FRAME_LIMIT,
            max_partial_bytes=BUDGET,
            max_connections_per_address=100,
        )
    )
    src = mllp_source(gw)
    body = SB + adt("PARTIAL") + b"X" * PARTIAL  # under the frame limit, never ended
    attackers = [await raw_sender(gw, body) for _ in range(ATTACKERS)]
    try:

        def accounted() -> bool:
            # each attacker is either answered (refused) or held whole by the server
            for a in attackers:
                conn = server_side(src, a)
                if not a.answered and (conn is None or conn.decoder.buffered < len(body) - 1):
                    return False
            return True

        await until(accounted, what="every attacker answered or held")
        held = held_by_connections(src)
        assert held <= BUDGET, held  # on the unbounded code: all eight frames, 960 KB
        assert src.partial_bytes == held  # the source's own accounting agrees
        assert src.partial_peak <= BUDGET + READ_CHUNK
        refused = [a for a in attackers if a.answered]
        assert len(refused) >= ATTACKERS - BUDGET // len(body)
        for a in refused:  # refused from their readable header: AE (send again), ERR-3 207
            assert parse_ack(a.answer()) == ("AE", "PARTIAL", "207")
        assert src.deferred_frames == len(refused)

        client = MllpClient("127.0.0.1", mllp_port(gw))
        try:
            assert parse_ack(await client.send(adt("NORMAL")))[0] == "AA"
        finally:
            await client.close()
        await gw.store.flush()
        rows = await gw.store.list_messages(
            status="ERROR", control_id=None, channel="source:hospital", limit=50, before_seq=None
        )
        assert len(rows) == len(refused)  # every refusal journaled its beginning first
    finally:
        await close_all(attackers)
    await until(lambda: src.partial_bytes == 0 and not src.connections, what="everything released")


async def test_a_frame_over_the_limit_is_refused_before_its_end_block(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = await start_gateway(source_config(tmp_path, max_frame_bytes=FRAME_LIMIT))
    src = mllp_source(gw)
    sender = await raw_sender(gw, SB + adt("TOOBIG") + b"X" * (FRAME_LIMIT + 1000))
    try:
        await until(lambda: sender.answered, what="an answer without an end block")
        assert parse_ack(sender.answer())[:2] == ("AR", "TOOBIG")
        assert src.partial_bytes == held_by_connections(src) == 0
    finally:
        await sender.close()


@pytest.mark.parametrize(
    ("setting", "value", "match"),
    [
        ("max_partial_bytes", 100, "max_partial_bytes"),
        ("max_partial_bytes", "lots", "max_partial_bytes"),
        ("max_partial_bytes", 32_768, "at least max_frame_bytes"),
        ("frame_timeout_s", -1, "frame_timeout_s"),
        ("frame_timeout_s", "soon", "frame_timeout_s"),
        ("first_frame_timeout_s", -0.5, "first_frame_timeout_s"),
    ],
)
def test_the_new_source_settings_are_checked_at_load(
    tmp_path: Path, setting: str, value: object, match: str
) -> None:
    cfg = source_config(tmp_path, **{setting: value})  # the shared config's max_frame_bytes: 65536
    with pytest.raises(ConfigError, match=match):
        Gateway(cfg)


async def test_the_new_source_settings_are_taken_and_default_sensibly(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gw = await start_gateway(
        source_config(tmp_path, max_partial_bytes=1 << 20, frame_timeout_s=12.5, first_frame_timeout_s=40)
    )
    src = mllp_source(gw)
    assert (src.max_partial_bytes, src.frame_timeout_s, src.first_frame_timeout_s) == (1 << 20, 12.5, 40)
    defaults = mllp_source(await start_gateway(make_config(tmp_path / "defaults")))
    assert defaults.max_partial_bytes == 32 * 1024 * 1024  # max_frame_bytes here: 64 KiB
    assert (defaults.frame_timeout_s, defaults.first_frame_timeout_s) == (30, 60)
    big = mllp_source(await start_gateway(source_config(tmp_path / "big", max_frame_bytes=20 << 20)))
    assert big.max_partial_bytes == 40 << 20  # two frames of max_frame_bytes
