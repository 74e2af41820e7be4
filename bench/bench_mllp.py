"""MLLP end-to-end benchmark: N concurrent senders against a real `passerelle run`, journal durable.

Runs, in one invocation on this machine:
  1. throughput: N connections send as fast as ACKs return; reports ACKed msg/s, end-to-end msg/s
     (every message written by the file destination), ACK latency percentiles, and the gateway's peak RSS;
  2. latency at a fixed rate (default 1,000 msg/s): ACK p50/p95/p99;
  3. peers: the python-hl7 asyncio MLLP server and Medplum's Hl7Server (Node.js), each parse + ACK only,
     nothing stored, with the same senders and frames, and the ratios (--peer picks them).

The baseline is python-hl7's documented asyncio server (``start_hl7_server``, ``readmessage``,
``create_ack``, ``drain``) on the standard asyncio loop, without the example's print of each message.
Both servers get the same frames from the same senders (same window, ACKs counted the same way), and
the CPU each spends per message is printed too: on a shared machine it moves much less than msg/s.
The Medplum peer is a few lines of JavaScript this bench writes beside an `npm install @medplum/hl7`
(a bench dependency only): each frame parsed into an Hl7Message, answered with its buildAck().

    .venv/bin/python bench/bench_mllp.py [--messages 30000] [--connections 10] [--rate 1000] [--window 1]
        [--peer python-hl7|medplum|both]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import cast

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.processes import RssWatch, free_port, wait_port  # noqa: E402
from tests.messages import adt  # noqa: E402 - the same authored messages the tests use

FSYNC = os.environ.get("BENCH_FSYNC", "1") == "1"
MAX_IN_MEMORY = int(os.environ.get("BENCH_MAX_IN_MEMORY", "10000"))
WORKERS = 1
WARM_UP = 2000  # messages sent (and delivered) before the throughput run
OUT_BASE: Path | None = None  # --out-dir: where the file destination writes
SB, EB = b"\x0b", b"\x1c\x0d"


class _Sender(asyncio.Protocol):
    """One MLLP connection with up to ``window`` unanswered frames (1: wait for each ACK, as MLLP senders
    usually do). The same class drives both servers; an ACK is counted by its end block, unparsed."""

    def __init__(
        self,
        frames: list[bytes],
        latencies: list[float],
        done: asyncio.Future[None],
        pace: float | None,
        window: int,
    ) -> None:
        self.frames = frames
        self.latencies = latencies
        self.done = done
        self.pace = pace
        self.window = window
        self.sent = 0
        self.acked = 0
        self.sent_at: deque[float] = deque()
        self.transport: asyncio.Transport | None = None
        self.next_due = time.perf_counter()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        self._send()

    def _send(self) -> None:
        if self.acked >= len(self.frames):
            if not self.done.done():
                self.done.set_result(None)
            return
        while self.sent < len(self.frames) and self.sent - self.acked < self.window:
            if self.pace is not None:
                delay = self.next_due - time.perf_counter()
                self.next_due = max(self.next_due, time.perf_counter()) + self.pace
                if delay > 0:
                    self.sent += 1
                    asyncio.get_running_loop().call_later(delay, self._write, self.sent - 1)
                    continue
            self.sent += 1
            self._write(self.sent - 1)

    def _write(self, i: int) -> None:
        assert self.transport is not None
        self.sent_at.append(time.perf_counter())
        self.transport.write(self.frames[i])

    def data_received(self, data: bytes) -> None:
        # Every ACK ends with the only 0x1C in its frame: counting them is enough.
        n = data.count(0x1C)
        if n:
            now = time.perf_counter()
            for _ in range(n):
                self.latencies.append(now - self.sent_at.popleft())
            self.acked += n
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"lost after {self.acked} messages"))


async def drive(
    port: int, per_conn: list[list[bytes]], rate: float | None, window: int = 1
) -> tuple[float, list[float]]:
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    waits = []
    pace = len(per_conn) / rate if rate else None
    start = time.perf_counter()
    for frames in per_conn:
        done: asyncio.Future[None] = loop.create_future()
        await loop.create_connection(
            lambda f=frames, d=done: _Sender(f, latencies, d, pace, window), "127.0.0.1", port
        )
        waits.append(done)
    await asyncio.gather(*waits)
    return time.perf_counter() - start, latencies


def frames_for(total: int, conns: int, tag: str) -> list[list[bytes]]:
    out: list[list[bytes]] = [[] for _ in range(conns)]
    for i in range(total):
        c = i % conns
        out[c].append(SB + adt(f"{tag}{i:07d}", patient=f"{i % 997:06d}") + EB)
    return out


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p / 100))] * 1000


def cpu_seconds(proc: psutil.Process) -> tuple[float, float, float]:
    """(user + system, system) seconds of a process and its children, then the main process's own."""
    total = system = main = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        t = p.cpu_times()
        total += t.user + t.system
        system += t.system
        if p.pid == proc.pid:
            main = t.user + t.system
    return total, system, main


def out_dir(workdir: Path) -> Path:
    return (OUT_BASE / workdir.name) if OUT_BASE is not None else workdir / "out"


def fs_probe(directory: Path, files: int = 2000) -> tuple[float, float]:
    """Files/s and CPU µs per file for a bare create + write + rename loop (no fsync) where the file
    destination writes: on a virtual disk this alone can bound the file destination."""
    directory.mkdir(parents=True, exist_ok=True)
    probe = Path(tempfile.mkdtemp(prefix=".probe-", dir=directory))
    data = b"x" * 600
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(files):
            tmp, final = probe / f".{i}.tmp", probe / f"{i}.hl7"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            os.write(fd, data)
            os.close(fd)
            os.replace(tmp, final)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return files / wall, cpu / files * 1e6


def default_fhir_steps() -> list[dict[str, object]]:
    """The steps of the shipped config.yaml's FHIR channel, as written there (its mapping policies:
    what is refused at intake, and so mapped before the ACK, differs with them)."""
    shipped = yaml.safe_load((ROOT / "config.yaml").read_text())
    for channel in shipped["channels"]:
        steps = channel.get("steps") or []
        if any(step.get("type") == "fhir_mapping" for step in steps):
            text = yaml.safe_dump(steps).replace("{config_dir}", str(ROOT))
            return cast(list[dict[str, object]], yaml.safe_load(text))
    raise SystemExit("config.yaml has no channel with a fhir_mapping step")


def channel_for(workdir: Path, destination: str) -> dict[str, object]:
    if destination == "fhir":
        # The default config's FHIR channel: its steps (PAM FR mapping, R4B validation, its
        # policies), the built-in repository.
        return {
            "name": "adt",
            "source": "hospital",
            "max_in_memory": MAX_IN_MEMORY,
            "steps": default_fhir_steps(),
            "destinations": [
                {"name": "fhir", "type": "fhir_repository", "path": str(workdir / "var" / "fhir.db")}
            ],
        }
    return {
        "name": "adt",
        "source": "hospital",
        "max_in_memory": MAX_IN_MEMORY,
        "destinations": [
            {"name": "files", "type": "file", "directory": str(out_dir(workdir)), "fsync": FSYNC}
        ],
    }


def delivered(workdir: Path, destination: str) -> int:
    if destination == "file":
        return count_files(out_dir(workdir))
    db = sqlite3.connect(workdir / "var" / "passerelle.db", timeout=30)
    try:
        return int(db.execute("SELECT COUNT(*) FROM messages WHERE status='SENT'").fetchone()[0])
    finally:
        db.close()


def start_gateway(workdir: Path, port: int, http_port: int, destination: str) -> subprocess.Popen[bytes]:
    config = {
        "workers": WORKERS,
        "log_level": "warning",
        "http": {"host": "127.0.0.1", "port": http_port},
        "sources": [
            {
                "name": "hospital",
                "type": "mllp",
                "host": "127.0.0.1",
                "port": port,
                "max_connections": 1024,
                "max_connections_per_address": 1024,
            }
        ],
        "channels": [channel_for(workdir, destination)],
    }
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "run",
            "--config",
            str(workdir / "config.yaml"),
            "--data-dir",
            str(workdir / "var"),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    wait_port(port)
    return proc


def count_files(directory: Path) -> int:
    try:
        return sum(1 for e in os.scandir(directory) if not e.name.startswith("."))
    except FileNotFoundError:
        return 0


def run_gateway(args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="passerelle-bench-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        proc = start_gateway(workdir, port, free_port(), args.destination)
        watch = RssWatch(proc.pid, interval=0.05)
        watch.start()
        try:
            # warm-up, then the throughput run, then the paced latency run
            asyncio.run(drive(port, frames_for(WARM_UP, args.connections, "W"), None, args.window))
            # Delivered too before the clock starts: where delivery is slower than the ACKs, the
            # warm-up's backlog would otherwise be charged to the measured run (time and CPU).
            while delivered(workdir, args.destination) < WARM_UP:
                time.sleep(0.05)
            frames = frames_for(args.messages, args.connections, "T")
            gw = psutil.Process(proc.pid)
            cpu0 = cpu_seconds(gw)
            t0 = time.perf_counter()
            gen0 = time.process_time()
            elapsed, lat = asyncio.run(drive(port, frames, None, args.window))
            gen_us = (time.process_time() - gen0) / args.messages * 1e6
            target = args.messages + WARM_UP
            while delivered(workdir, args.destination) < target:
                time.sleep(0.05)
            e2e = time.perf_counter() - t0
            cpu1 = cpu_seconds(gw)
            cpu_share = (cpu1[0] - cpu0[0]) / e2e
            sys_share = (cpu1[1] - cpu0[1]) / e2e
            paced_total = int(args.rate * args.paced_seconds)
            _, paced = asyncio.run(drive(port, frames_for(paced_total, args.connections, "R"), args.rate))
        finally:
            watch.running = False
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(60)
            if OUT_BASE is not None:
                shutil.rmtree(out_dir(workdir), ignore_errors=True)
        return {
            "acked_per_s": args.messages / elapsed,
            "e2e_per_s": args.messages / e2e,
            "p50": pct(lat, 50),
            "p95": pct(lat, 95),
            "p99": pct(lat, 99),
            "paced_p50": pct(paced, 50),
            "paced_p95": pct(paced, 95),
            "paced_p99": pct(paced, 99),
            "rss_mb": watch.peak / 2**20,
            "cpu": cpu_share,
            "cpu_us": (cpu1[0] - cpu0[0]) / args.messages * 1e6,
            "main_us": (cpu1[2] - cpu0[2]) / args.messages * 1e6,
            "gen_us": gen_us,
            "sys": sys_share,
            "exit": code,
        }


BASELINE = """
import asyncio, sys
import hl7, hl7.mllp

async def handle(reader, writer):
    try:
        while not writer.is_closing():
            message = await reader.readmessage()
            writer.writemessage(message.create_ack())
            await writer.drain()
    except (hl7.mllp.InvalidBlockError, asyncio.IncompleteReadError, ConnectionError):
        writer.close()

async def main():
    server = await hl7.mllp.start_hl7_server(handle, "127.0.0.1", int(sys.argv[1]), encoding="utf-8")
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


def run_peer(args: argparse.Namespace, command: list[str], cwd: Path | None = None) -> dict[str, float]:
    """A peer server (parse + ACK only) driven exactly like the gateway's throughput run."""
    port = free_port()
    proc = subprocess.Popen([*command, str(port)], cwd=cwd, stdout=subprocess.DEVNULL)
    try:
        wait_port(port)
        asyncio.run(drive(port, frames_for(2000, args.connections, "W"), None, args.window))
        frames = frames_for(args.messages, args.connections, "B")
        server = psutil.Process(proc.pid)
        cpu0 = cpu_seconds(server)[0]
        elapsed, lat = asyncio.run(drive(port, frames, None, args.window))
        cpu1 = cpu_seconds(server)[0]
    finally:
        proc.kill()
        proc.wait()
    return {
        "acked_per_s": args.messages / elapsed,
        "p50": pct(lat, 50),
        "p99": pct(lat, 99),
        "cpu_us": (cpu1 - cpu0) / args.messages * 1e6,
    }


def run_baseline(args: argparse.Namespace) -> dict[str, float]:
    return run_peer(args, [sys.executable, "-c", BASELINE])


# Medplum's MLLP server from @medplum/hl7 (Node.js): the connection parses each frame into an
# Hl7Message before the "message" event; the handler answers that message's buildAck() and keeps nothing.
MEDPLUM = """
const { Hl7Server } = require("@medplum/hl7");

const server = new Hl7Server((connection) => {
  connection.addEventListener("message", (event) => {
    connection.send(event.message.buildAck());
  });
  connection.addEventListener("error", () => {});
});
server.start(Number(process.argv[2]), "utf-8");
"""
MEDPLUM_DIR = Path(
    os.environ.get("BENCH_MEDPLUM_DIR", Path.home() / ".cache" / "passerelle-bench" / "medplum")
)


def medplum_server() -> Path:
    """The peer's script in MEDPLUM_DIR, installing @medplum/hl7 there with npm the first time."""
    MEDPLUM_DIR.mkdir(parents=True, exist_ok=True)
    if not (MEDPLUM_DIR / "node_modules" / "@medplum" / "hl7" / "package.json").exists():
        if not (MEDPLUM_DIR / "package.json").exists():
            (MEDPLUM_DIR / "package.json").write_text('{"private": true}\n')
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "@medplum/hl7"],
            cwd=MEDPLUM_DIR,
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=600,
        )
    script = MEDPLUM_DIR / "server.cjs"
    script.write_text(MEDPLUM)
    return script


def medplum_version() -> str:
    meta = MEDPLUM_DIR / "node_modules" / "@medplum" / "hl7" / "package.json"
    return str(json.loads(meta.read_text())["version"])


def node_version() -> str:
    return subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=30).stdout.strip()


def run_medplum(args: argparse.Namespace) -> dict[str, float]:
    script = medplum_server()
    return run_peer(args, ["node", str(script)], cwd=MEDPLUM_DIR)


PLOT = Path(__file__).resolve().parent / "out" / "mllp.svg"  # bench/out/ is not tracked


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=30000)
    parser.add_argument("--connections", type=int, default=30)
    parser.add_argument("--rate", type=float, default=1000.0, help="msg/s for the latency run")
    parser.add_argument("--paced-seconds", type=float, default=10.0)
    parser.add_argument(
        "--window",
        type=int,
        default=1,
        help="frames a sender may have unanswered (1: wait for each ACK); the same for both servers",
    )
    parser.add_argument("--skip-baseline", action="store_true", help="run no peer server at all")
    parser.add_argument(
        "--peer",
        choices=["python-hl7", "medplum", "both"],
        default="both",
        help="peer server(s) given the same senders and frames: python-hl7's asyncio MLLP server, Medplum's"
        " Hl7Server (@medplum/hl7 on Node.js, installed with npm on first use into $BENCH_MEDPLUM_DIR,"
        " default ~/.cache/passerelle-bench/medplum), or both; only window 1 for Medplum, whose server"
        " takes a frame as ending where a read ends",
    )
    parser.add_argument(
        "--destination",
        choices=["file", "fhir"],
        default="file",
        help="file: raw HL7 to files; fhir: PAM FR mapping + validation into the built-in FHIR repository",
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes running the channels")
    parser.add_argument(
        "--out-dir",
        type=Path,
        help="where the file destination writes (default: beside the journal, on the same file system)",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        default=PLOT,
        help="SVG of this run's throughput and latency (default: bench/out/mllp.svg)",
    )
    args = parser.parse_args()
    global WORKERS, OUT_BASE
    WORKERS = args.workers
    OUT_BASE = args.out_dir
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    print(
        f"machine: {os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f}); {args.messages} ADT^A01"
        f" over {args.connections} connections, window {args.window}; "
        f"journal SQLite WAL synchronous=FULL; destination: {args.destination}; workers: {args.workers}"
    )
    if args.destination == "file":
        where = args.out_dir or Path(tempfile.gettempdir())
        rate, cpu = fs_probe(where)
        print(
            f"file system  {rate:8.0f} files/s  ({cpu:.0f} us of CPU per file) creating, writing and renaming"
            f" 600-byte files in {where}, no gateway, no fsync"
        )
    g = run_gateway(args)
    print(
        f"passerelle  acked      {g['acked_per_s']:8.0f} msg/s   ACK p50 {g['p50']:.2f} ms"
        f"  p95 {g['p95']:.2f} ms  p99 {g['p99']:.2f} ms"
    )
    print(
        f"passerelle  end-to-end {g['e2e_per_s']:8.0f} msg/s   (ACKed and delivered to the {args.destination}"
        " destination)"
    )
    print(
        f"passerelle  at {args.rate:.0f} msg/s: ACK p50 {g['paced_p50']:.2f} ms  p95 {g['paced_p95']:.2f} ms"
        f"  p99 {g['paced_p99']:.2f} ms"
    )
    print(f"passerelle  peak RSS   {g['rss_mb']:8.1f} MB   (SIGTERM exit code {g['exit']:.0f})")
    print(
        f"passerelle  CPU        {g['cpu']:8.2f} cores busy during the throughput run"
        f" ({g['sys']:.2f} in the kernel); {g['cpu_us']:.0f} us of CPU per message, main + worker"
        f" ({g['main_us']:.0f} + {g['cpu_us'] - g['main_us']:.0f}); the load generator {g['gen_us']:.0f} us"
    )
    peers: dict[str, dict[str, float]] = {}
    if not args.skip_baseline and args.peer in ("python-hl7", "both"):
        peers["python-hl7"] = run_baseline(args)
    if not args.skip_baseline and args.peer in ("medplum", "both"):
        if args.window == 1:
            peers["medplum"] = run_medplum(args)
        else:
            print("medplum     skipped: its server reads one frame per read, so only with --window 1")
    for name, b in peers.items():
        what = "parse + ACK only, nothing stored"
        if name == "medplum":
            what = f"@medplum/hl7 {medplum_version()} Hl7Server, Node.js {node_version()}; " + what
        print(
            f"{name:<11} acked      {b['acked_per_s']:8.0f} msg/s   ACK p50 {b['p50']:.2f} ms"
            f"  p99 {b['p99']:.2f} ms   ({what})"
        )
        print(f"{name:<11} CPU        {b['cpu_us']:8.0f} us per message (one process)")
    for name, b in peers.items():
        print(f"ratio       end-to-end passerelle / {name} = {g['e2e_per_s'] / b['acked_per_s']:.2f}x")
        # Throughput moves with whatever else the two cores run; CPU per message much less so.
        print(f"ratio       CPU per message {name} / passerelle = {b['cpu_us'] / g['cpu_us']:.2f}x")
    print(f"machine     load average after the runs {os.getloadavg()[0]:.1f}")
    write_plot(args.plot, args, g, peers)
    print(f"plot        {args.plot}")


def write_plot(
    path: Path, args: argparse.Namespace, g: dict[str, float], peers: dict[str, dict[str, float]]
) -> None:
    """The run's figures as two bar charts in one SVG: msg/s, and ACK latency percentiles."""
    from gateway.core.charts import bar_chart, side_by_side

    rates = {"passerelle acked": [g["acked_per_s"]], "passerelle end-to-end": [g["e2e_per_s"]]}
    latency = {
        f"passerelle, {args.connections} senders flat out": [g["p50"], g["p95"], g["p99"]],
        f"passerelle at {args.rate:.0f} msg/s": [g["paced_p50"], g["paced_p95"], g["paced_p99"]],
    }
    for name, b in peers.items():
        rates[f"{name} acked (nothing stored)"] = [b["acked_per_s"]]
        latency[f"{name} flat out"] = [b["p50"], None, b["p99"]]
    run = f"{args.messages} ADT^A01, {args.destination} destination, {args.workers} worker(s)"
    svg = side_by_side(
        [
            bar_chart(f"Throughput — {run}", ["msg/s"], rates, y_title="messages per second", width=520),
            bar_chart("ACK latency", ["p50", "p95", "p99"], latency, y_title="ms", width=520),
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(svg, "utf-8")


if __name__ == "__main__":
    main()
