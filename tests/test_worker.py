"""The gateway with its worker process (``workers: 1``): real processes, real sockets, real SQLite."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
import psutil
import pytest

from connectors.mllp.client import MllpClient
from gateway.hl7.er7 import Message
from tests.conftest import AUTH, make_config, mllp_port, wait_for, with_settings
from tests.fakes import Receiver
from tests.messages import adt


def ack_code(raw: bytes) -> str:
    return Message.decode(raw, default_charset="UNICODE UTF-8").get("MSA-1")


def files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.hl7")) if directory.exists() else []


@pytest.mark.parametrize("workers", [1, 2])
async def test_worker_delivers_and_the_trace_is_recorded(start_gateway, tmp_path: Path, workers: int) -> None:
    out = tmp_path / "out"
    cfg = make_config(tmp_path, destinations=[{"name": "files", "type": "file", "directory": str(out)}])
    cfg = with_settings(cfg, workers=workers)
    gw = await start_gateway(cfg)
    client = MllpClient("127.0.0.1", mllp_port(gw))
    try:
        for i in range(20):
            assert ack_code(await client.send(adt(f"W{i}", patient=str(i % 4)))) == "AA"
    finally:
        await client.close()
    await wait_for(lambda: len(files(out)) == 20)
    await wait_for(lambda: gw.channels["adt"].snapshot()["counters"].get("sent") == 20)
    rows: list[dict[str, object]] = []
    for _ in range(100):  # the worker's writes reach the journal through the main process
        rows = await gw.store.list_messages(
            status="SENT", control_id=None, channel="adt", limit=50, before_seq=None
        )
        if len(rows) == 20:
            break
        await asyncio.sleep(0.05)
    assert len(rows) == 20
    checks = await gw.readiness()
    assert checks["worker"] == {"ok": True}


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_killed_worker_is_restarted_and_nothing_is_lost(
    start_gateway, tmp_path: Path, workers: int
) -> None:
    out = tmp_path / "out"
    cfg = make_config(tmp_path, destinations=[{"name": "files", "type": "file", "directory": str(out)}])
    cfg = with_settings(cfg, workers=workers)
    gw = await start_gateway(cfg)
    first = gw._worker_procs[0]
    assert first is not None
    client = MllpClient("127.0.0.1", mllp_port(gw))
    try:
        for i in range(10):
            await client.send(adt(f"K{i}"))
        os.kill(first.pid, signal.SIGKILL)
        # intake goes on while the worker is away: the journal holds the messages
        for i in range(10, 30):
            assert ack_code(await client.send(adt(f"K{i}"))) == "AA"
    finally:
        await client.close()
    await wait_for(lambda: gw._worker_procs[0] is not first and gw.worker.connected, timeout=15)
    await wait_for(lambda: len(files(out)) == 30, timeout=15)
    cids = sorted(Message.decode(p.read_bytes()).control_id for p in files(out))
    assert cids == sorted(f"K{i}" for i in range(30))


async def test_outcomes_cross_the_link_for_after_delivery_channels(
    start_gateway, tmp_path: Path, receiver: Receiver
) -> None:
    receiver.plan = ["AE", "AA"]
    cfg = make_config(
        tmp_path,
        queue=False,
        ack={"timing": "after_delivery"},
        destinations=[{"name": "sih", "type": "mllp", "host": "127.0.0.1", "port": receiver.port}],
    )
    cfg = with_settings(cfg, workers=1)
    gw = await start_gateway(cfg)
    client = MllpClient("127.0.0.1", mllp_port(gw))
    try:
        assert ack_code(await client.send(adt("OUT1"))) == "AE"
        assert ack_code(await client.send(adt("OUT1"))) == "AA"  # the resend is processed afresh
    finally:
        await client.close()
    assert len(receiver.received) == 2


async def test_dead_letters_and_replay_through_the_worker(
    start_gateway, tmp_path: Path, receiver: Receiver
) -> None:
    receiver.plan = ["AR"]
    cfg = make_config(
        tmp_path,
        destinations=[
            {
                "name": "sih",
                "type": "mllp",
                "host": "127.0.0.1",
                "port": receiver.port,
                "retry": {"max_attempts": 2, "initial_backoff_s": 0.01},
            }
        ],
    )
    cfg = with_settings(cfg, workers=1)
    gw = await start_gateway(cfg)
    client = MllpClient("127.0.0.1", mllp_port(gw))
    try:
        assert ack_code(await client.send(adt("DL1"))) == "AA"
    finally:
        await client.close()
    dead: list[dict[str, object]] = []
    for _ in range(200):
        dead = await gw.store.dead_letters(None, 10)
        if dead:
            break
        await asyncio.sleep(0.05)
    assert [d["control_id"] for d in dead] == ["DL1"]
    receiver.plan = ["AA"]
    async with aiohttp.ClientSession(headers=AUTH) as http:
        url = f"http://127.0.0.1:{gw.http_port_bound}/api/messages/{dead[0]['id']}/replay"
        async with http.post(url) as resp:
            assert resp.status == 202
    for _ in range(200):
        msg = await gw.store.get_message(str(dead[0]["id"]), with_payloads=False)
        if msg is not None and msg["status"] == "SENT":
            break
        await asyncio.sleep(0.05)
    assert msg is not None and msg["status"] == "SENT"
    assert len(receiver.received) == 3


async def test_idle_connections_are_closed(start_gateway, tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    cfg.data["sources"][0]["idle_timeout_s"] = 0.3
    gw = await start_gateway(cfg)
    reader, writer = await asyncio.open_connection("127.0.0.1", mllp_port(gw))
    try:
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
    finally:
        writer.close()


async def test_two_workers_keep_each_patients_order(
    start_gateway, tmp_path: Path, receiver: Receiver
) -> None:
    cfg = make_config(
        tmp_path, destinations=[{"name": "sih", "type": "mllp", "host": "127.0.0.1", "port": receiver.port}]
    )
    cfg = with_settings(cfg, workers=2)
    gw = await start_gateway(cfg)
    patients = [f"8{p:04d}" for p in range(8)]
    sent: dict[str, list[str]] = {p: [] for p in patients}

    async def sender(conn: int) -> None:
        client = MllpClient("127.0.0.1", mllp_port(gw))
        try:
            for i in range(15):
                patient = patients[(conn * 3 + i) % len(patients)]
                cid = f"S{conn}-{i}"
                assert ack_code(await client.send(adt(cid, patient=patient))) == "AA"
                sent[patient].append(cid)
        finally:
            await client.close()

    await asyncio.gather(*(sender(c) for c in range(4)))
    await wait_for(lambda: len(receiver.received) == 60, timeout=20)
    seen: dict[str, list[str]] = {p: [] for p in patients}
    for raw in receiver.received:
        msg = Message.decode(raw, default_charset="UNICODE UTF-8")
        seen[msg.get("PID-3.1")].append(msg.control_id)
    assert seen == sent
    # worker snapshots arrive every half second: both report, and their counts add up
    await wait_for(lambda: gw.channels["adt"].snapshot()["counters"].get("sent") == 60)
    assert gw.channels["adt"].snapshot()["workers"] == 2


async def test_workers_run_at_the_configured_niceness(start_gateway, tmp_path: Path) -> None:
    """Intake and ACKs (the main process) come first when the CPU is short: the workers are niced."""
    cfg = make_config(tmp_path, destinations=[{"name": "files", "type": "file", "directory": str(tmp_path)}])
    cfg = with_settings(cfg, workers=1, worker_nice=7)
    gw = await start_gateway(cfg)
    proc = gw._worker_procs[0]
    assert proc is not None
    assert psutil.Process(proc.pid).nice() == psutil.Process().nice() + 7
