"""FHIR → HL7v2: reverse-mapping throughput per request type, and POST to answer through a live gateway.

.venv/bin/python bench/bench_reverse.py [--seconds 2] [--requests 2000] [--concurrency 20]

Part 1 maps the authored test requests (tests/reverse/fhir_data.py) with the reverse mappings and
encodes them with the ER7 codec, in one process. Part 2 starts a gateway (SQLite journal with
fsync, workers: 0) with a FHIR source, the hl7v2_mapping step and an MLLP destination to a local
receiver answering AA, POSTs Patients over HTTP (bearer token) from concurrent clients, and reports
the HTTP answer latency (journal commit + repository write included) and the rate until the
receiver has every message.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import yaml  # noqa: E402

from gateway.app import Gateway  # noqa: E402
from gateway.core import config as config_mod  # noqa: E402
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


def gateway_config(tmp: Path, port: int) -> config_mod.Config:
    data = {
        "data_dir": str(tmp / "var"),
        "log_level": "warning",
        "workers": 0,
        "http": {"host": "127.0.0.1", "port": 0},
        "auth": {"tokens": [{"token": TOKEN, "subject": "bench-gp", "role": "admin"}]},
        "sources": [{"name": "city", "type": "fhir"}],
        "channels": [
            {
                "name": "city-to-sih",
                "source": "city",
                "fhir": {"resource_types": ["Patient"]},
                "steps": [{"type": "hl7v2_mapping", "directory": str(ROOT / "mappings" / "reverse")}],
                "destinations": [{"name": "sih", "type": "mllp", "host": "127.0.0.1", "port": port}],
            }
        ],
    }
    return config_mod.parse(yaml.safe_dump(data, allow_unicode=True), str(tmp / "config.yaml"))


async def bench_post(requests: int, concurrency: int) -> None:
    receiver = Receiver(["AA"])
    receiver.server = await asyncio.start_server(receiver.handle, "127.0.0.1", 0)
    with tempfile.TemporaryDirectory() as tmp:
        gw = Gateway(gateway_config(Path(tmp), receiver.port))
        await gw.start()
        url = f"http://127.0.0.1:{gw.http_port_bound}/fhir/Patient"
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/fhir+json"}
        latencies: list[float] = []
        queue: asyncio.Queue[int] = asyncio.Queue()
        for n in range(requests):
            queue.put_nowait(n)

        async def client(http: aiohttp.ClientSession) -> None:
            while not queue.empty():
                n = queue.get_nowait()
                body: dict[str, Any] = copy.deepcopy(d.patient())
                body["identifier"][0]["value"] = f"B{n:07d}"
                start = time.perf_counter()
                async with http.post(url, json=body, headers=headers) as resp:
                    await resp.read()
                    assert resp.status == 201, resp.status
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:
            await asyncio.gather(*(client(http) for _ in range(concurrency)))
        answered = time.perf_counter() - start
        while len(receiver.received) < requests:
            await asyncio.sleep(0.005)
        delivered = time.perf_counter() - start
        await gw.stop()
    await receiver.close()
    latencies.sort()
    print(f"POST /fhir/Patient → 201 → ADT^A28 over MLLP, {requests} requests, {concurrency} clients")
    print(f"  answered:  {requests / answered:8,.0f} req/s")
    print(f"  delivered: {requests / delivered:8,.0f} msg/s (receiver has them all)")
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
    print(f"  POST → answer latency: p50 {p50:.1f} ms, p99 {p99:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=20)
    args = parser.parse_args()
    bench_mapping(args.seconds)
    asyncio.run(bench_post(args.requests, args.concurrency))


if __name__ == "__main__":
    main()
