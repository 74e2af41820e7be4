"""Two `passerelle run` nodes on one NATS stream and one PostgreSQL store; one is SIGKILLed mid-run."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from connectors.mllp.client import MllpClient
from gateway.hl7.er7 import Message
from tests.fakes import Receiver
from tests.messages import adt
from tests.scale.conftest import NATS_URL, PG_DSN, LiveNames
from tests.waiting import until

pytestmark = [pytest.mark.live, pytest.mark.slow]

TOTAL = int(os.environ.get("PASSERELLE_TEST_NODES_TOTAL", 5000))
PATIENTS = 40
SENDERS = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_config(tmp_path: Path, live: LiveNames, far_port: int) -> Path:
    data = {
        "log_level": "warning",
        "drain_timeout_s": 5,
        "http": {"host": "127.0.0.1", "port": 0},
        # URLs come from the command line, as an operator starting several nodes would give them.
        "journal": {"stream_prefix": live.prefix, "partitions": 16, "ack_wait_s": 2},
        "store": {"schema": live.schema},
        "sources": [{"name": "hospital", "type": "mllp", "host": "127.0.0.1", "port": 0}],
        "channels": [
            {
                "name": "adt",
                "source": "hospital",
                "destinations": [
                    {
                        "name": "far",
                        "type": "mllp",
                        "host": "127.0.0.1",
                        "port": far_port,
                        "retry": {"max_attempts": 20, "initial_backoff_s": 0.05, "max_backoff_s": 1},
                    }
                ],
            }
        ],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def start_node(config: Path, data_dir: Path, mllp: int) -> subprocess.Popen[bytes]:
    with (data_dir.parent / f"{data_dir.name}.log").open("wb") as log:
        return _popen(config, data_dir, mllp, log)


def _popen(config: Path, data_dir: Path, mllp: int, log: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "run",
            "--config",
            str(config),
            "--data-dir",
            str(data_dir),
            "--mllp-port",
            str(mllp),
            "--http-port",
            str(free_port()),
            "--journal",
            NATS_URL,
            "--store",
            PG_DSN,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


async def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the node exited at start-up"
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise AssertionError("the node did not start listening")


async def test_two_nodes_one_killed_every_acked_message_once_in_order(
    tmp_path: Path, live: LiveNames
) -> None:
    far = Receiver(["AA"])
    far.server = await asyncio.start_server(far.handle, "127.0.0.1", 0)
    config = node_config(tmp_path, live, far.port)
    ports = [free_port(), free_port()]
    nodes = [start_node(config, tmp_path / f"node{i}", ports[i]) for i in range(2)]
    try:
        for port, proc in zip(ports, nodes, strict=True):
            await wait_listening(port, proc)
        acked: dict[str, list[str]] = {f"7{p:05d}": [] for p in range(PATIENTS)}
        count = {"acked": 0}
        killed = asyncio.Event()

        async def sender(index: int) -> None:
            """Sends its patients' messages one after the other; moves to the other node when one dies."""
            node = index % 2
            client = MllpClient("127.0.0.1", ports[node])
            patients = [p for i, p in enumerate(acked) if i % SENDERS == index]
            try:
                for n in range(TOTAL // SENDERS):
                    patient = patients[n % len(patients)]
                    cid = f"K{index:02d}-{n:04d}"
                    while True:
                        try:
                            ack = await asyncio.wait_for(client.send(adt(cid, patient=patient)), 10)
                        except (OSError, TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                            await client.close()
                            node = 1  # node 0 is the one killed
                            client = MllpClient("127.0.0.1", ports[node])
                            continue
                        if Message.decode(ack, default_charset="UNICODE UTF-8").get("MSA-1") == "AA":
                            break
                        await asyncio.sleep(0.1)  # AE: the sender tries again, as senders do
                    acked[patient].append(cid)
                    count["acked"] += 1
                    if count["acked"] == TOTAL // 3 and not killed.is_set():
                        nodes[0].send_signal(signal.SIGKILL)
                        killed.set()
            finally:
                await client.close()

        await asyncio.gather(*(sender(i) for i in range(SENDERS)))
        assert killed.is_set()
        assert nodes[0].wait(10) == -signal.SIGKILL
        expected = {cid for cids in acked.values() for cid in cids}
        assert len(expected) == TOTAL

        def control_ids() -> list[tuple[str, str]]:
            out = []
            for raw in list(far.received):
                msg = Message.decode(raw, default_charset="UNICODE UTF-8")
                out.append((msg.get("PID-3.1"), msg.control_id))
            return out

        deadline = time.monotonic() + 60
        while {cid for _, cid in control_ids()} != expected:
            assert time.monotonic() < deadline, "not every acknowledged message was delivered"
            await asyncio.sleep(0.2)
        got = control_ids()
        # At least once on the wire: only a message in hand on the killed node may come twice,
        # at most one per partition (JetStream lets one per partition be in flight).
        assert len(got) - TOTAL <= 16
        seen: dict[str, list[str]] = {p: [] for p in acked}
        for patient, cid in got:
            if cid not in seen[patient]:
                seen[patient].append(cid)
        assert seen == acked  # per-patient order, across both nodes and the failure

        # Once in effect: one message row per acknowledged message, each SENT exactly once.
        # The trace commits after the delivery: poll until it has, then check the final rows.
        async def rows_of() -> list[Any]:
            conn = await asyncpg.connect(PG_DSN, server_settings={"search_path": live.schema})
            try:
                return list(await conn.fetch("SELECT control_id, status FROM messages WHERE channel='adt'"))
            finally:
                await conn.close()

        async def all_sent() -> bool:
            rows = await rows_of()
            return len(rows) >= len(expected) and {r["status"] for r in rows} == {"SENT"}

        await until(all_sent, 30, "every row SENT")
        rows = await rows_of()
        assert sorted(r["control_id"] for r in rows) == sorted(expected)
        assert {r["status"] for r in rows} == {"SENT"}
    finally:
        for proc in nodes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in nodes:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        await far.close()
