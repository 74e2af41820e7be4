"""Scale-out benchmark: one node vs two nodes on the shared NATS JetStream + PostgreSQL backends.

Each round starts N `passerelle run` processes on a fresh stream prefix and PostgreSQL schema, sends
the same messages over MLLP from several connections spread over the nodes, and measures how long
until a far-end MLLP receiver (in this process) has every message. Prints msg/s per round and the
two-node / one-node ratio.

    .venv/bin/python bench/bench_nodes.py [--messages 5000] [--connections 20] [--partitions 32]

Needs PostgreSQL on 127.0.0.1:5432 (database test) and NATS with JetStream on 127.0.0.1:4222.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import nats
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from connectors.mllp.client import MllpClient  # noqa: E402
from tests.fakes import Receiver  # noqa: E402 - the same far end the tests use
from tests.messages import adt  # noqa: E402

PG = "postgresql://postgres@127.0.0.1:5432/test"
NATS = "nats://127.0.0.1:4222"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_listening(port: int) -> None:
    for _ in range(300):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        return
    raise SystemExit("a node did not start")


async def one_round(nodes: int, args: argparse.Namespace, work: Path) -> float:
    tag = uuid.uuid4().hex[:10]
    schema, prefix = f"b_{tag}", f"B{tag}"
    far = Receiver(["AA"])
    far.server = await asyncio.start_server(far.handle, "127.0.0.1", 0)
    config = {
        "log_level": "warning",
        "http": {"host": "127.0.0.1", "port": 0},
        "journal": {"stream_prefix": prefix, "partitions": args.partitions},
        "store": {"schema": schema},
        "sources": [{"name": "hospital", "type": "mllp", "host": "127.0.0.1", "port": 0}],
        "channels": [
            {
                "name": "adt",
                "source": "hospital",
                "destinations": [{"name": "far", "type": "mllp", "host": "127.0.0.1", "port": far.port}],
            }
        ],
    }
    path = work / f"config-{tag}.yaml"
    path.write_text(yaml.safe_dump(config))
    ports = [free_port() for _ in range(nodes)]
    procs = []
    for i, port in enumerate(ports):
        cmd = [sys.executable, "-m", "gateway.cli", "run", "--config", str(path), "--journal", NATS]
        cmd += ["--store", PG, "--data-dir", str(work / f"{tag}-{i}"), "--mllp-port", str(port)]
        cmd += ["--http-port", str(free_port())]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        for port in ports:
            await wait_listening(port)
        per = args.messages // args.connections

        async def sender(index: int) -> None:
            client = MllpClient("127.0.0.1", ports[index % nodes])
            try:
                for n in range(per):
                    await client.send(adt(f"B{index:03d}-{n:05d}", patient=f"{index:03d}{n % 50:03d}"))
            finally:
                await client.close()

        started = time.perf_counter()
        await asyncio.gather(*(sender(i) for i in range(args.connections)))
        acked = time.perf_counter() - started
        total = per * args.connections
        while len({bytes(r) for r in far.received}) < total:
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
        rate = total / elapsed
        print(
            f"{nodes} node(s): {total} messages, ACKed in {acked:.1f}s,"
            f" delivered in {elapsed:.1f}s: {rate:,.0f} msg/s"
        )
        return rate
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(30)
        await far.close()
        conn = await asyncpg.connect(PG)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
        nc = await nats.connect(NATS)
        for stream in (f"{prefix}_IN", f"{prefix}_DLQ"):
            await nc.jetstream().delete_stream(stream)
        await nc.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--partitions", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = await one_round(1, args, Path(tmp))
        two = await one_round(2, args, Path(tmp))
    print(f"two nodes / one node: {two / one:.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
