"""FHIR → HL7v2: reverse-mapping throughput per request type, and POST to answer through a live gateway.

.venv/bin/python bench/bench_reverse.py [--seconds 2] [--requests 4000] [--concurrency 20]
                                        [--workers 0] [--store] [--profile FILE]

Part 1 maps the authored test requests (tests/reverse/fhir_data.py) with the reverse mappings and
encodes them with the ER7 codec, in one process.

Part 2 starts ``passerelle run`` as its own process (SQLite journal with fsync, a FHIR source, the
hl7v2_mapping step, an MLLP destination to a receiver in this process answering AA), POSTs
Patients over HTTP (bearer token) from concurrent clients, and reports the HTTP answer latency
(journal commit included; with ``--store`` the repository write too) and the rate until the
receiver has every message. ``--profile FILE`` samples the gateway process with py-spy (when
installed) and prints where its time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import copy
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import orjson  # noqa: E402
import yaml  # noqa: E402

from gateway.mapping import reverse_functions  # noqa: E402
from gateway.mapping.reverse import ReverseLibrary  # noqa: E402
from tests.fakes import Receiver  # noqa: E402
from tests.reverse import fhir_data as d  # noqa: E402 - the authored test requests

TOKEN = "bench-token-0123456789abcdef0123"  # noqa: S105 - a local benchmark credential
REQUESTS = {
    "Patient → ADT^A28": d.patient(),
    "Encounter Bundle → ADT^A01": d.encounter_bundle(),
    "DiagnosticReport Bundle → ORU^R01 (2 OBX)": d.report_bundle(),
    "device Observations → ORU^R01 (6 OBX)": d.device_bundle(),
    "DocumentReference + Binary → MDM^T02": d.document_bundle(),
}


def bench_mapping(seconds: float) -> None:
    lib = ReverseLibrary.load(ROOT / "mappings" / "reverse", reverse_functions.available())
    now = datetime.now(UTC)
    print(f"reverse mapping + ER7 encode, {seconds:.0f} s each (one core)")
    for label, data in REQUESTS.items():
        count, start = 0, time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            for _ in range(100):
                for msg in lib.map(data, control_id="BENCH", now=now).messages:
                    msg.encode()
            count += 100
        rate = count / (time.perf_counter() - start)
        print(f"  {label:45s} {rate:10,.0f} req/s")


def gateway_config(tmp: Path, port: int, workers: int, store: bool) -> Path:
    data = {
        "data_dir": str(tmp / "var"),
        "log_level": "info",  # the production default: one line per received message
        "workers": workers,
        "http": {"host": "127.0.0.1", "port": 0, "rate_limit": {"requests_per_s": 1e6, "burst": 1_000_000}},
        "auth": {"tokens": [{"token": TOKEN, "subject": "bench-gp", "role": "admin"}]},
        "sources": [{"name": "city", "type": "fhir"}],
        "channels": [
            {
                "name": "city-to-sih",
                "source": "city",
                "fhir": {"resource_types": ["Patient"], "store": store},
                "steps": [{"type": "hl7v2_mapping", "directory": str(ROOT / "mappings" / "reverse")}],
                "destinations": [{"name": "sih", "type": "mllp", "host": "127.0.0.1", "port": port}],
            }
        ],
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


async def _started(log_path: Path, proc: subprocess.Popen[bytes]) -> int:
    """The HTTP port the gateway bound, read from its ``gateway_started`` log line."""
    while proc.poll() is None:
        for line in log_path.read_bytes().splitlines():
            if b"gateway_started" in line:
                return int(orjson.loads(line)["http_port"])
        await asyncio.sleep(0.05)
    tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
    raise SystemExit(f"the gateway exited with {proc.returncode}:\n{tail}")


async def bench_post(
    requests: int, concurrency: int, workers: int, store: bool, profile: str | None, tree: str | None = None
) -> None:
    receiver = Receiver(["AA"])
    receiver.server = await asyncio.start_server(receiver.handle, "127.0.0.1", 0)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        config = gateway_config(tmp, receiver.port, workers, store)
        log_path = tmp / "gateway.log"
        with log_path.open("wb") as out:
            # --tree: the gateway's code from another checkout (a before/after comparison)
            command = [sys.executable, "-c", "import sys; from gateway.cli import main; sys.exit(main())"]
            env = {**os.environ, "PYTHONPATH": tree} if tree else None
            proc = subprocess.Popen(
                [
                    *command,
                    "run",
                    "--config",
                    str(config),
                    "--http-port",
                    "0",
                    "--mllp-port",
                    "0",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=tmp,
                env=env,
            )
        spy: subprocess.Popen[bytes] | None = None
        try:
            port = await _started(log_path, proc)
            url = f"http://127.0.0.1:{port}/fhir/Patient"
            headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/fhir+json"}
            expect = 201 if store else 202
            bodies = []
            for n in range(requests):
                body: dict[str, Any] = copy.deepcopy(d.patient())
                body["identifier"][0]["value"] = f"B{n:07d}"
                bodies.append(orjson.dumps(body))
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:
                for body in bodies[:50]:  # warm-up: models imported, connections open
                    async with http.post(url, data=body, headers=headers) as resp:
                        await resp.read()
                        assert resp.status == expect, resp.status
                warm = len(receiver.received)
                while len(receiver.received) < 50:
                    await asyncio.sleep(0.01)
                if profile:
                    spy = _start_profiler(proc.pid, profile)
                latencies: list[float] = []
                todo = collections.deque(bodies[50:])

                async def client() -> None:
                    while todo:
                        payload = todo.popleft()
                        start = time.perf_counter()
                        async with http.post(url, data=payload, headers=headers) as resp:
                            await resp.read()
                            assert resp.status == expect, resp.status
                        latencies.append(time.perf_counter() - start)

                journal0 = await _journal(http, port, headers)
                cpu0 = _cpu_seconds(proc.pid)
                start = time.perf_counter()
                await asyncio.gather(*(client() for _ in range(concurrency)))
                answered = time.perf_counter() - start
                cpu = _cpu_seconds(proc.pid) - cpu0
                journal1 = await _journal(http, port, headers)
            while len(receiver.received) < requests:
                await asyncio.sleep(0.005)
            delivered = time.perf_counter() - start
        finally:
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait()
            proc.send_signal(signal.SIGTERM)
            proc.wait()
    await asyncio.sleep(0.1)  # the receiver's handlers see the gateway's connections close
    await receiver.close()
    count = requests - 50
    latencies.sort()
    answer = "201" if store else "202"
    print(
        f"POST /fhir/Patient → {answer} → ADT^A28 over MLLP: {count} requests, {concurrency} clients, "
        f"workers: {workers}, store: {str(store).lower()} (after {warm} warm-up)"
    )
    print(f"  answered:  {count / answered:8,.0f} req/s")
    print(f"  delivered: {count / delivered:8,.0f} msg/s (receiver has them all)")
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
    print(f"  POST → answer latency: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    print(
        f"  gateway process CPU while answering: {100 * cpu / answered:.0f}% of one core, "
        f"{1000 * cpu / count:.2f} ms per request"
    )
    commits = journal1["commits"] - journal0["commits"]
    ops = journal1["ops"] - journal0["ops"]
    print(
        f"  journal while answering: {commits} commits (fsyncs), {ops / max(commits, 1):.1f} writes each, "
        f"{count / max(commits, 1):.1f} requests per commit"
    )
    if profile and spy is not None:
        _print_profile(profile)


async def _journal(http: aiohttp.ClientSession, port: int, headers: dict[str, str]) -> dict[str, int]:
    async with http.get(f"http://127.0.0.1:{port}/api/stats", headers=headers) as resp:
        journal: dict[str, int] = (await resp.json())["journal"]
        return journal


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start_profiler(pid: int, path: str) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy") or str(ROOT / ".venv" / "bin" / "py-spy")
    if not os.path.exists(spy):
        print("py-spy is not installed: no profile", file=sys.stderr)
        return None
    return subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--output",
            path,
            "--rate",
            "250",
            "--nonblocking",
            "--gil",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _print_profile(path: str, top: int = 25) -> None:
    """Self and inclusive sample counts per function of the main thread, from py-spy's raw stacks."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        n = int(count_text)
        samples += n
        own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
    print(f"profile of the gateway process ({samples} samples, all threads): self / inclusive")
    for frame, n in own.most_common(top):
        print(f"  {100 * n / samples:5.1f}% {100 * total[frame] / samples:5.1f}%  {frame[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--store", action="store_true", help="the channel also stores (store: true) → 201")
    parser.add_argument("--profile", default=None, help="py-spy raw output file (gateway process)")
    parser.add_argument("--skip-mapping", action="store_true")
    parser.add_argument("--tree", default=None, help="run the gateway from this source tree (before/after)")
    args = parser.parse_args()
    if not args.skip_mapping:
        bench_mapping(args.seconds)
    asyncio.run(
        bench_post(args.requests, args.concurrency, args.workers, args.store, args.profile, args.tree)
    )


if __name__ == "__main__":
    main()
