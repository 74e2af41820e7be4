"""Failover: two nodes under a steady load, one killed with SIGKILL.

Two `passerelle run` nodes share a fresh stream prefix and PostgreSQL schema (bench_nodes.Cluster) and
deliver to a far-end MLLP receiver in this process, which records each frame's time and connection.
Senders send at a steady rate, half of the connections to each node, to a far end that takes
--far-delay to answer (a node delivers over one connection, so it has messages in hand, waiting);
node 0 is killed with SIGKILL (with its worker process) after --before seconds, at the moment the far
end has just taken one of its messages and not answered yet; its senders move to node 1 and the load
goes on for --after seconds. The rate must be one that node 1 carries alone. Then:

- in flight at the kill: messages node 0 had ACKed to a sender that had not reached the far end;
- kill -> last delivered: when the survivor delivered the last of them (and every message ACKed
  before the kill, by either node: a partition whose message node 0 held waits for it too);
- redeliveries recognised by id: a message node 0 had sent, the far end confirmed, and node 0 had not
  recorded before it died is sent again by node 1; the far end, idempotent by MSH-10, answers it as
  the same delivery and counts it once;
- duplicates: any other second copy (one sent again after PostgreSQL recorded it done, or sent twice
  by a live node). Exactly once means zero.

    .venv/bin/python bench/bench_failover.py [--runs 3] [--rate 50] [--connections 10]
        [--partitions 32] [--far-delay 0.01] [--before 10] [--after 10] [--ack-wait SECONDS]

Needs PostgreSQL on 127.0.0.1:5432 (database test) and NATS with JetStream on 127.0.0.1:4222.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.bench_nodes import PG, Cluster, cpu_of, order_violations  # noqa: E402
from connectors.mllp.client import MllpClient  # noqa: E402
from tests.fakes import Receiver  # noqa: E402
from tests.messages import adt  # noqa: E402
from tests.scale.failover import copies, far_end_ports, recorded_sent, second_copies  # noqa: E402

SEND_ERRORS = (OSError, TimeoutError, asyncio.IncompleteReadError, ConnectionError)


@dataclass
class Run:
    kill_at: float = 0.0
    acked: dict[str, tuple[int, float]] = field(default_factory=dict)  # control id -> (node, when)
    killed_ports: set[int] = field(default_factory=set)  # node 0's connections to the far end
    recorded: set[str] = field(default_factory=set)  # SENT in PostgreSQL just after the kill
    recorded_at: float = 0.0


async def one_run(args: argparse.Namespace, work: Path) -> dict[str, float]:
    # The same ACK for the same MSH-10 (idempotent by message id), after --far-delay: a node has
    # messages in hand, as with a real far end, rather than none between two arrivals.
    far = Receiver(["AA"], delay_s=args.far_delay)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):  # the killed node's connections are reset
            await far.handle(reader, writer)

    far.server = await asyncio.start_server(handle, "127.0.0.1", 0)
    journal = {} if args.ack_wait is None else {"ack_wait_s": args.ack_wait}
    cluster = Cluster(work, far.port, partitions=args.partitions, **journal)
    run = Run()
    try:
        await cluster.start(2)
        victim = psutil.Process(cluster.procs[0].pid)
        survivor = psutil.Process(cluster.procs[1].pid)
        cpu0 = cpu_of([survivor])
        interval = args.connections / args.rate
        started = time.monotonic()
        stop_at = started + args.before + args.after

        async def sender(index: int) -> None:
            node = index % 2
            client = MllpClient("127.0.0.1", cluster.ports[node])
            n = 0
            offset = interval * index / args.connections  # the senders spread evenly over time
            try:
                while (due := started + offset + n * interval) < stop_at:
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                    cid = f"B{index:03d}-{n:05d}"
                    msg = adt(cid, patient=f"{index:03d}{n % 50:03d}")
                    while True:
                        try:
                            ack = await asyncio.wait_for(client.send(msg), 10)
                        except SEND_ERRORS:
                            await client.close()
                            node = 1  # node 0 is the one killed
                            client = MllpClient("127.0.0.1", cluster.ports[node])
                            continue
                        if b"MSA|AA|" in ack:
                            break
                        await asyncio.sleep(0.1)  # AE: sent again, as senders do
                    run.acked[cid] = (node, time.monotonic())
                    n += 1
            finally:
                await client.close()

        async def killer() -> None:
            await asyncio.sleep(args.before)
            children = victim.children(recursive=True)
            run.killed_ports = far_end_ports(victim.pid, far.port)
            # The worst moment: the far end has just taken one of node 0's messages and not yet
            # answered; node 0's other messages in hand wait for the connection behind it.
            seen = len(far.arrived)
            while not (len(far.arrived) > seen and far.arrived[-1][1] in run.killed_ports):
                seen = len(far.arrived)
                await asyncio.sleep(0.001)
            run.kill_at = time.monotonic()
            victim.send_signal(signal.SIGKILL)
            for child in children:  # its worker process goes with it, as on a dead machine
                with contextlib.suppress(psutil.Error):
                    child.send_signal(signal.SIGKILL)
            run.recorded_at = time.monotonic()
            run.recorded = await recorded_sent(PG, cluster.schema)

        await asyncio.gather(killer(), *(sender(i) for i in range(args.connections)))
        cluster.procs[0].wait(10)
        deadline = time.monotonic() + 120
        while set(copies(far)) < set(run.acked):
            if time.monotonic() > deadline:
                raise SystemExit("not every ACKed message reached the far end within 120 s")
            await asyncio.sleep(0.05)
        await asyncio.sleep(3)  # room for a late second copy to show
        cpu = cpu_of([survivor]) - cpu0
        return report(run, far, cpu, time.monotonic() - started)
    finally:
        await cluster.close()
        await far.close()


def report(run: Run, far: Receiver, survivor_cpu: float, elapsed: float) -> dict[str, float]:
    arrivals = copies(far)
    second = second_copies(arrivals, run.killed_ports, run.recorded, run.recorded_at)

    def done_at(cid: str) -> float | None:
        """When a message ACKed before the kill was delivered for good, if that was after the kill:
        its first arrival, or the survivor's copy of one node 0 sent but never saw confirmed."""
        if cid in second.recognised:
            return second.recognised[cid]
        first = arrivals[cid][0]
        return None if first[0] <= run.kill_at or first[1] in run.killed_ports else first[0]

    before = {cid: node for cid, (node, at) in run.acked.items() if at <= run.kill_at}
    open_at_kill = {cid: t for cid in before if (t := done_at(cid)) is not None}
    own = [t for cid, t in open_at_kill.items() if before[cid] == 0]
    last_own = max(own, default=run.kill_at) - run.kill_at
    last_any = max(open_at_kill.values(), default=run.kill_at) - run.kill_at
    after = [arrivals[cid][0][0] - at for cid, (_, at) in run.acked.items() if at > run.kill_at]
    late = order_violations(list(far.received))
    print(
        f"  {len(run.acked)} messages ACKed in {elapsed:.0f}s, node 0 killed after {len(before)};"
        f" in flight at the kill: {len(own)} ACKed by node 0 not yet delivered for good"
        f" ({len(open_at_kill)} ACKed by either node, {len(second.recognised)} of them at the far end"
        " but unconfirmed to node 0)"
    )
    print(
        f"  kill -> last of node 0's delivered by node 1: {last_own:.2f}s"
        f" (of either node's: {last_any:.2f}s); ACKed after the kill: longest ACK -> delivery"
        f" {max(after, default=0):.2f}s"
    )
    print(
        f"  sent again and recognised by id: {len(second.recognised)}; duplicates: {len(second.duplicates)};"
        f" per-patient order {'kept' if late == 0 else f'BROKEN for {late} patients'};"
        f" survivor CPU {survivor_cpu:.1f}s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    return {"last": max(last_own, last_any), "duplicates": len(second.duplicates), "late": late}


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=50, help="messages per second, all senders")
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--partitions", type=int, default=32)
    parser.add_argument(
        "--far-delay", type=float, default=0.01, help="seconds the far end takes to answer (default 0.01)"
    )
    parser.add_argument("--before", type=float, default=10, help="seconds of load before the kill")
    parser.add_argument("--after", type=float, default=10, help="seconds of load after the kill")
    parser.add_argument(
        "--ack-wait", type=float, default=None, help="journal ack_wait_s (default: the config's)"
    )
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            print(f"run {i + 1}:")
            results.append(await one_run(args, Path(tmp)))
    worst = max(r["last"] for r in results)
    bad = sum(r["duplicates"] + r["late"] for r in results)
    print(f"worst kill -> last delivered: {worst:.2f}s; duplicates or order breaks: {bad}")
    if bad:
        raise SystemExit(1)


if __name__ == "__main__":
    asyncio.run(main())
