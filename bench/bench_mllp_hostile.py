"""Hostile MLLP senders against a real `passerelle run`: memory and service under attack.

Runs, in one invocation, against one gateway started with the source's default limits
(max_frame_bytes 16 MiB, max_partial_bytes 32 MiB, frame_timeout_s 30, first_frame_timeout_s 60,
max_connections 256, max_connections_per_address 64), with the bench's own config (one worker, file
destination) or ``--config config.yaml`` (the project's: two workers, the FHIR channel):

  1. unterminated frames: N connections (default 256) each write 16 MB of a frame that never ends,
     while a normal sender sends one ADT a second on a new connection; prints the gateway's RSS
     (main process and its worker together) before and at its peak, what the attackers got back,
     and the normal sender's ACK latency;
  2. slowloris: M connections (default 320) each trickle one byte a second of a frame, and reconnect
     as soon as the gateway closes them (the harshest churn; ``--reconnect-delay 1`` for a gentler
     attacker); a normal sender sends one ADT every
     half second, each on a new connection; prints its ACKs, refusals and latency, and the RSS;
  3. one 200 MB frame written in one go, then read: prints the answer (AR expected, not a reset).

Attackers connect from their own loopback addresses (127.1.x.y), as a spread-out attack would, so
that the per-address limit does not do the work. Counts of the gateway's own events (evictions,
frame deadlines, budget refusals) are read from its log.

    .venv/bin/python bench/bench_mllp_hostile.py [--frames 256] [--frame-mb 16] [--slow 320]
        [--slow-seconds 60] [--huge-mb 200] [--phases unterminated,slowloris,huge] [--config FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import IO

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.processes import RssWatch, free_port, wait_port  # noqa: E402
from tests.messages import adt  # noqa: E402 - the same authored messages the tests use

SB, EB = b"\x0b", b"\x1c\r"
CHUNK = 256 * 1024


def attacker_address(i: int) -> str:
    return f"127.1.{i // 250}.{i % 250 + 1}"


def start_gateway(
    workdir: Path, port: int, log: IO[bytes], config_file: Path | None
) -> subprocess.Popen[bytes]:
    """``passerelle run`` with the bench's own config (one worker, file destination), or with
    ``config_file`` (its ports and data directory overridden)."""
    config = {
        "workers": 1,
        "log_level": "info",
        "http": {"host": "127.0.0.1", "port": free_port()},
        # Only what the bench needs: every MLLP limit is the source's default.
        "sources": [{"name": "hospital", "type": "mllp", "host": "127.0.0.1", "port": port}],
        "channels": [
            {
                "name": "adt",
                "source": "hospital",
                "destinations": [{"name": "files", "type": "file", "directory": str(workdir / "out")}],
            }
        ],
    }
    if config_file is None:
        config_file = workdir / "config.yaml"
        config_file.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "run",
            "--config",
            str(config_file),
            "--data-dir",
            str(workdir / "var"),
            "--mllp-port",
            str(port),
            "--http-port",
            str(free_port()),
        ],
        cwd=ROOT,
        stdout=log,
    )
    wait_port(port)
    return proc


def count_events(log_path: Path) -> Counter[str]:
    events: Counter[str] = Counter()
    for line in log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            events[json.loads(line).get("event", "?")] += 1
    return events


def msa1(answer: bytes) -> str:
    for segment in answer.split(b"\r"):
        if segment.startswith(b"MSA"):
            return segment.split(b"|")[1].decode(errors="replace")
    return "?"


def ms(values: list[float], p: float) -> str:
    if not values:
        return "-"
    s = sorted(values)
    return f"{s[min(len(s) - 1, int(len(s) * p / 100))] * 1000:.1f} ms"


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    data = await reader.readuntil(EB)
    return data[data.index(SB) + 1 : -2]


class NormalSender(threading.Thread):
    """Sends one ADT every ``period`` seconds, each on a new connection from 127.0.0.1, from its own
    thread with blocking sockets: its latency does not wait on the attackers' event loop."""

    def __init__(self, port: int, period: float, tag: str) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.period = period
        self.tag = tag
        self.latencies: list[float] = []
        self.codes: Counter[str] = Counter()
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            t0 = time.perf_counter()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                    sock.sendall(SB + adt(f"{self.tag}{i:05d}") + EB)
                    answer = b""
                    while EB not in answer:
                        data = sock.recv(65536)
                        if not data:
                            raise ConnectionError("closed before an answer")
                        answer += data
                self.latencies.append(time.perf_counter() - t0)
                self.codes[msa1(answer)] += 1
            except OSError as exc:
                self.codes[f"failed: {type(exc).__name__}"] += 1
            self.stop.wait(self.period)

    def finish(self) -> None:
        self.stop.set()
        self.join()

    def report(self) -> str:
        return (
            f"{dict(self.codes)}; ACK latency p50 {ms(self.latencies, 50)}, p95 {ms(self.latencies, 95)},"
            f" max {ms(self.latencies, 100)} (connect + send + ACK, a new connection each time)"
        )


async def unterminated(port: int, index: int, size: int, results: Counter[str]) -> None:
    """Write ``size`` bytes of a frame that never ends, then wait for whatever the gateway does."""
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=(attacker_address(index), 0)
        )
    except OSError:
        results["could not connect"] += 1
        return
    header = SB + adt(f"BIG{index:04d}")
    filler = b"X" * CHUNK
    answer = asyncio.ensure_future(reader.read(65536))
    try:
        writer.write(header)
        sent = len(header)
        while sent < size and not answer.done():
            writer.write(filler)
            sent += CHUNK
            await writer.drain()
        data = await asyncio.wait_for(answer, 90)  # the answer, or EOF at the frame deadline
        results[f"answered {msa1(data)}" if SB in data else "closed without an answer"] += 1
    except TimeoutError:  # before OSError, of which it is a subclass
        results["no answer within 90 s"] += 1
    except (ConnectionError, OSError) as exc:
        results[f"error {type(exc).__name__}"] += 1
    finally:
        answer.cancel()
        writer.close()


async def phase_unterminated(port: int, args: argparse.Namespace, watch: RssWatch) -> None:
    size = int(args.frame_mb * 1_000_000)
    results: Counter[str] = Counter()
    normal = NormalSender(port, 1.0, "U")
    watch.reset_peak()
    before = watch.last
    t0 = time.perf_counter()
    normal.start()
    await asyncio.gather(*(unterminated(port, i, size, results) for i in range(args.frames)))
    elapsed = time.perf_counter() - t0
    normal.finish()
    print(
        f"unterminated  {args.frames} connections x {args.frame_mb:g} MB frames without end block"
        f" ({args.frames * size / 1e9:.1f} GB sent in {elapsed:.1f} s)"
    )
    print(f"              gateway RSS before {before / 2**20:.0f} MB, peak {watch.peak / 2**20:.0f} MB")
    print(f"              attackers: {dict(results)}")
    print(f"              normal sender: {normal.report()}")


async def slow_one(
    port: int, index: int, stop: asyncio.Event, stats: Counter[str], reconnect_delay: float
) -> None:
    """Trickle a frame one byte a second; reconnect (after ``reconnect_delay``) whenever the gateway
    closes the connection."""
    body = SB + adt(f"SLOW{index:04d}")
    first = True
    while not stop.is_set():
        if not first and reconnect_delay:
            await asyncio.sleep(reconnect_delay)
        first = False
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(attacker_address(index), 0)
            )
        except OSError:
            stats["connect failed"] += 1
            await asyncio.sleep(0.1)
            continue
        stats["connections"] += 1
        eof = asyncio.ensure_future(reader.read(65536))
        try:
            for byte in body:
                writer.write(bytes([byte]))
                done, _ = await asyncio.wait([eof], timeout=1.0)
                if done or stop.is_set():
                    break
            if eof.done() and not eof.cancelled() and eof.exception() is None:
                stats[f"answered {msa1(eof.result())}" if SB in eof.result() else "closed"] += 1
        except (ConnectionError, OSError):
            stats["reset"] += 1
        finally:
            eof.cancel()
            writer.close()


async def phase_slowloris(port: int, args: argparse.Namespace, watch: RssWatch) -> None:
    stop = asyncio.Event()
    stats: Counter[str] = Counter()
    watch.reset_peak()
    before = watch.last
    attackers = [
        asyncio.ensure_future(slow_one(port, i, stop, stats, args.reconnect_delay)) for i in range(args.slow)
    ]
    await asyncio.sleep(3)  # every slot taken before the normal sender starts
    normal = NormalSender(port, 0.5, "S")
    normal.start()
    await asyncio.sleep(args.slow_seconds)
    normal.finish()
    stop.set()
    for task in attackers:
        task.cancel()
    await asyncio.gather(*attackers, return_exceptions=True)
    again = f"after {args.reconnect_delay:g} s" if args.reconnect_delay else "at once"
    print(
        f"slowloris     {args.slow} connections trickling one byte a second for {args.slow_seconds:g} s,"
        f" reconnecting {again} when closed: {dict(stats)}"
    )
    print(f"              normal sender: {normal.report()}")
    print(f"              gateway RSS at the start {before / 2**20:.0f} MB, peak {watch.peak / 2**20:.0f} MB")


def phase_huge(port: int, megabytes: int) -> None:
    payload = adt("HUGE") + b"X" * (megabytes * 1_000_000)
    t0 = time.perf_counter()
    outcome = ""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        try:
            sock.sendall(SB + payload + EB)
            received = b""
            while data := sock.recv(65536):
                received += data
            outcome = f"answered {msa1(received)}, then closed" if SB in received else "closed, no answer"
        except OSError as exc:
            outcome = f"{type(exc).__name__}"
    elapsed = time.perf_counter() - t0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(SB + adt("AFTER-HUGE") + EB)
        after = sock.recv(65536)
    print(
        f"huge frame    {megabytes} MB in one write: {outcome} ({elapsed:.1f} s); next sender: {msa1(after)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=256, help="connections sending an unterminated frame")
    parser.add_argument("--frame-mb", type=float, default=16.0, help="MB written of each unterminated frame")
    parser.add_argument("--slow", type=int, default=320, help="slowloris connections")
    parser.add_argument("--slow-seconds", type=float, default=60.0)
    parser.add_argument(
        "--reconnect-delay",
        type=float,
        default=0.0,
        help="slowloris: seconds before reconnecting (0: at once)",
    )
    parser.add_argument("--huge-mb", type=int, default=200)
    parser.add_argument(
        "--config",
        type=Path,
        help="run the gateway with this config file (e.g. the project's config.yaml: two workers, the FHIR"
        " channel) instead of the bench's own (one worker, file destination)",
    )
    parser.add_argument("--keep-log", type=Path, help="copy the gateway's log (JSON lines) there")
    parser.add_argument(
        "--phases", default="unterminated,slowloris,huge", help="which phases to run, comma-separated"
    )
    args = parser.parse_args()
    phases = set(args.phases.split(","))
    with tempfile.TemporaryDirectory(prefix="passerelle-hostile-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        log_path = workdir / "gateway.log"
        with log_path.open("wb") as log:
            proc = start_gateway(workdir, port, log, args.config)
            watch = RssWatch(proc.pid)
            watch.start()
            try:
                time.sleep(1.0)
                quiet = NormalSender(port, 0.1, "Q")
                quiet.start()
                time.sleep(2.0)
                quiet.finish()
                print(f"gateway       started, RSS {watch.sample() / 2**20:.0f} MB (main + worker)")
                print(f"no attack     normal sender: {quiet.report()}")
                if "unterminated" in phases:
                    asyncio.run(phase_unterminated(port, args, watch))
                if "slowloris" in phases:
                    asyncio.run(phase_slowloris(port, args, watch))
                if "huge" in phases:
                    phase_huge(port, args.huge_mb)
                print(f"overall       gateway RSS peak {watch.overall / 2**20:.0f} MB")
            finally:
                watch.running = False
                proc.send_signal(signal.SIGTERM)
                code = proc.wait(60)
        events = count_events(log_path)
        if args.keep_log is not None:
            shutil.copyfile(log_path, args.keep_log)
        wanted = (
            "mllp_partial_budget",
            "mllp_oversize_frame",
            "mllp_frame_timeout",
            "mllp_connection_evicted",
            "mllp_connection_refused",
            "mllp_first_frame_timeout",
            "message_rejected",
        )
        print(f"gateway log   {', '.join(f'{e} {events[e]}' for e in wanted)}; SIGTERM exit code {code}")


if __name__ == "__main__":
    main()
