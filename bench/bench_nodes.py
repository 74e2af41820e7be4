"""Scale-out benchmark: 1, 2, 3 nodes on the shared NATS JetStream + PostgreSQL backends.

Each round starts N `passerelle run` processes on a fresh stream prefix and PostgreSQL schema, sends
the same messages over MLLP from several connections spread over the nodes, and measures how long
until a far-end MLLP receiver (in this process) has every message, then checks that each patient's
messages arrived in the order they were sent. Prints msg/s per round and the ratio to one node.

To emulate separate machines, each node (its main and worker processes) runs in its own CPU cgroup
capped at --cpu-per-node CPUs (cgroup v1 `cpu` controller: cpu.cfs_quota_us / cpu.cfs_period_us; v2:
cpu.max), created under /sys/fs/cgroup and removed at exit; PostgreSQL, NATS and this process (the
senders and the far end) stay outside. Needs root; --cpu-per-node 0 runs the nodes uncapped.

    .venv/bin/python bench/bench_nodes.py [--messages 5000] [--connections 20] [--partitions 32]
        [--nodes 1,2,3] [--cpu-per-node 0.5]

Needs PostgreSQL on 127.0.0.1:5432 (database test) and NATS with JetStream on 127.0.0.1:4222.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import nats
import nats.js.errors
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.processes import free_port  # noqa: E402
from connectors.mllp.client import MllpClient  # noqa: E402
from tests.fakes import Receiver  # noqa: E402 - the same far end the tests use
from tests.messages import adt  # noqa: E402

PG = "postgresql://postgres@127.0.0.1:5432/test"
NATS = "nats://127.0.0.1:4222"


CGROUP_ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 100_000


class CpuCgroups:
    """One CPU-capped cgroup per node, v1 (`cpu` controller hierarchy) or v2 (unified), whichever this
    machine mounts with the cpu controller; the folders are removed by close()."""

    def __init__(self, cpus: float) -> None:
        self.cpus = cpus
        self.made: list[Path] = []
        v1 = CGROUP_ROOT / "cpu"
        if (v1 / "cpu.cfs_quota_us").exists():
            self.version, self.base = 1, v1
        elif "cpu" in (CGROUP_ROOT / "cgroup.controllers").read_text().split():
            self.version, self.base = 2, CGROUP_ROOT
            control = CGROUP_ROOT / "cgroup.subtree_control"
            if "cpu" not in control.read_text().split():
                control.write_text("+cpu")
        else:
            raise SystemExit("no cgroup cpu controller under /sys/fs/cgroup (see `mount | grep cgroup`)")

    def make(self, name: str) -> Path:
        folder = self.base / f"passerelle-bench-{os.getpid()}-{name}"
        folder.mkdir()
        self.made.append(folder)
        quota = int(self.cpus * PERIOD_US)
        if self.version == 1:
            (folder / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (folder / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            (folder / "cpu.max").write_text(f"{quota} {PERIOD_US}")
        return folder

    @staticmethod
    def command(folder: Path, cmd: list[str]) -> list[str]:
        """``cmd`` started inside ``folder``: the shell joins the cgroup, then execs it (same PID), so the
        worker processes it forks are born there."""
        join = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
        return ["/bin/sh", "-c", join, str(folder), *cmd]

    @staticmethod
    def members(folder: Path) -> set[int]:
        return {int(line) for line in (folder / "cgroup.procs").read_text().split()}

    def throttled(self, folder: Path) -> float:
        """Seconds the node was held back by its quota so far."""
        stat = dict(line.split() for line in (folder / "cpu.stat").read_text().splitlines())
        if self.version == 1:
            return int(stat.get("throttled_time", 0)) / 1e9
        return int(stat.get("throttled_usec", 0)) / 1e6

    def close(self) -> None:
        for folder in reversed(self.made):
            # Processes that outlived their node (none, normally) go back to the root before rmdir.
            for pid in self.members(folder):
                with contextlib.suppress(OSError):
                    (self.base / "cgroup.procs").write_text(str(pid))
            with contextlib.suppress(OSError):
                folder.rmdir()
        self.made.clear()


def cpu_of(procs: list[psutil.Process]) -> float:
    """User + system seconds of these processes and their children, those still there."""
    total = 0.0
    seen: set[int] = set()
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            for p in [proc, *proc.children(recursive=True)]:
                if p.pid not in seen:
                    seen.add(p.pid)
                    with contextlib.suppress(psutil.Error):
                        t = p.cpu_times()
                        total += t.user + t.system
    return total


def backend_processes() -> dict[str, list[psutil.Process]]:
    """PostgreSQL's and NATS's processes on this machine (outside the nodes' cgroups)."""
    found: dict[str, list[psutil.Process]] = {"postgres": [], "nats-server": []}
    for p in psutil.process_iter(["name"]):
        if p.info["name"] in found:
            found[p.info["name"]].append(p)
    return found


def order_violations(received: list[bytes]) -> int:
    """Patients whose messages reached the far end out of send order (first arrival of each message;
    a redelivered copy may come later). Control IDs are B<sender>-<n>, the patient <sender><n % 50>."""
    last: dict[tuple[str, int], int] = {}
    seen: set[bytes] = set()
    bad: set[tuple[str, int]] = set()
    for frame in received:
        cid = frame.split(b"\r", 1)[0].split(b"|")[9]
        if cid in seen:
            continue
        seen.add(cid)
        sender, n = cid.decode()[1:].split("-")
        patient = (sender, int(n) % 50)
        if last.get(patient, -1) > int(n):
            bad.add(patient)
        last[patient] = int(n)
    return len(bad)


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


class Cluster:
    """N `passerelle run` nodes on a fresh stream prefix and PostgreSQL schema, one MLLP channel
    delivering to ``far_port``; ``journal`` adds to the journal settings (all nodes the same)."""

    def __init__(self, work: Path, far_port: int, *, partitions: int, **journal: object) -> None:
        self.tag = uuid.uuid4().hex[:10]
        self.schema, self.prefix = f"b_{self.tag}", f"B{self.tag}"
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []
        self.groups: list[Path] = []
        config = {
            "log_level": "warning",
            "http": {"host": "127.0.0.1", "port": 0},
            "journal": {"stream_prefix": self.prefix, "partitions": partitions, **journal},
            "store": {"schema": self.schema},
            "sources": [{"name": "hospital", "type": "mllp", "host": "127.0.0.1", "port": 0}],
            "channels": [
                {
                    "name": "adt",
                    "source": "hospital",
                    "destinations": [{"name": "far", "type": "mllp", "host": "127.0.0.1", "port": far_port}],
                }
            ],
        }
        self.config = work / f"config-{self.tag}.yaml"
        self.config.write_text(yaml.safe_dump(config))

    async def start(self, nodes: int, cgroups: CpuCgroups | None = None) -> None:
        """Starts the nodes and waits until each listens (their logs: ``<work>/<tag>-<i>.log``)."""
        self.ports = [free_port() for _ in range(nodes)]
        for i, port in enumerate(self.ports):
            cmd = [sys.executable, "-m", "gateway.cli", "run", "--config", str(self.config)]
            cmd += ["--journal", NATS, "--store", PG, "--data-dir", str(self.work / f"{self.tag}-{i}")]
            cmd += ["--mllp-port", str(port), "--http-port", str(free_port())]
            if cgroups is not None:
                self.groups.append(cgroups.make(f"{nodes}-{i}"))
                cmd = cgroups.command(self.groups[-1], cmd)
            with open(self.work / f"{self.tag}-{i}.log", "wb") as log:
                self.procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log))
        for i, port in enumerate(self.ports):
            try:
                await wait_listening(port)
            except SystemExit:
                tail = (self.work / f"{self.tag}-{i}.log").read_text(errors="replace")[-2000:]
                raise SystemExit(f"node {i} did not start (exit {self.procs[i].poll()}):\n{tail}") from None

    async def close(self) -> None:
        """Stops the nodes still running, then drops the schema and the streams."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            proc.wait(30)
        conn = await asyncpg.connect(PG)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
        await conn.close()
        nc = await nats.connect(NATS)
        for stream in (f"{self.prefix}_IN", f"{self.prefix}_DLQ"):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await nc.jetstream().delete_stream(stream)
        await nc.close()


async def one_round(
    nodes: int, args: argparse.Namespace, work: Path, cgroups: CpuCgroups | None
) -> dict[str, float]:
    far = Receiver(["AA"])
    far.server = await asyncio.start_server(far.handle, "127.0.0.1", 0)
    cluster = Cluster(work, far.port, partitions=args.partitions)
    try:
        await cluster.start(nodes, cgroups)
        procs, ports, groups = cluster.procs, cluster.ports, cluster.groups
        nodes_ps = [psutil.Process(p.pid) for p in procs]
        for group, node in zip(groups, nodes_ps if groups else [], strict=True):  # none uncapped
            pids = {node.pid} | {c.pid for c in node.children(recursive=True)}
            if not pids <= CpuCgroups.members(group):
                raise SystemExit(f"node {node.pid}: processes {sorted(pids)} not all in {group}")
        backends = backend_processes()
        cpu0 = (cpu_of(nodes_ps), *(cpu_of(b) for b in backends.values()), time.process_time())
        throttled0 = sum(cgroups.throttled(g) for g in groups) if cgroups else 0.0
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
        cpu1 = (cpu_of(nodes_ps), *(cpu_of(b) for b in backends.values()), time.process_time())
        throttled = (sum(cgroups.throttled(g) for g in groups) if cgroups else 0.0) - throttled0
        us = [(b - a) / total * 1e6 for a, b in zip(cpu0, cpu1, strict=True)]
        rate = total / elapsed
        late = order_violations([bytes(r) for r in far.received])
        print(
            f"{nodes} node(s): {total} messages, ACKed in {acked:.1f}s,"
            f" delivered in {elapsed:.1f}s: {rate:,.0f} msg/s; per-patient order"
            f" {'kept' if late == 0 else f'BROKEN for {late} patients'}"
        )
        print(
            f"           CPU per message: nodes {us[0]:.0f} us, PostgreSQL {us[1]:.0f} us,"
            f" NATS {us[2]:.0f} us, senders + far end {us[3]:.0f} us;"
            f" nodes held back by their quota {throttled:.1f}s in all;"
            f" load average {os.getloadavg()[0]:.1f}"
        )
        if late:
            raise SystemExit(f"{late} patients' messages arrived out of order")
        return {"rate": rate, "node_us": us[0]}
    finally:
        await cluster.close()
        await far.close()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--partitions", type=int, default=32)
    parser.add_argument("--nodes", default="1,2,3", help="node counts to run, one round each (default 1,2,3)")
    parser.add_argument(
        "--cpu-per-node",
        type=float,
        default=0.5,
        help="CPUs each node's cgroup may use (default 0.5; 0: no cgroup, the nodes share the machine)",
    )
    args = parser.parse_args()
    # A SIGTERM unwinds like an exception, so the cgroup folders are still removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    counts = [int(n) for n in args.nodes.split(",")]
    cgroups = CpuCgroups(args.cpu_per_node) if args.cpu_per_node > 0 else None
    where = (
        f"each node in its own cgroup v{cgroups.version} capped at {args.cpu_per_node} CPU"
        if cgroups
        else "nodes uncapped"
    )
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; {where}")
    rates: dict[int, float] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for n in counts:
                rates[n] = (await one_round(n, args, Path(tmp), cgroups))["rate"]
    finally:
        if cgroups is not None:
            cgroups.close()
    first = 1 if 1 in rates else counts[0]
    for n in counts:
        if n != first:
            print(f"{n} nodes / {first} node{'s' if first > 1 else ''}: {rates[n] / rates[first]:.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
