"""ITI-67 latency at scale: load N synthetic DocumentReferences, then time patient + status + type.

    .venv/bin/python bench/bench_documents.py                      # 1,000,000 documents
    .venv/bin/python bench/bench_documents.py --documents 50000    # a quick run

The documents are loaded with the store's bulk path (``bulk_load``: the same index rows as a
publish, without the per-request rules). The searches go through the real HTTP route
(``GET /fhir/DocumentReference?patient.identifier=…&status=current&type=…``, with a bearer
token, masking applied) on 127.0.0.1, one at a time; the store call alone is timed as well.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from gateway.http.app import build_app
from gateway.http.auth import TokenTable
from gateway.store.documents import Actor, SqliteDocumentStore
from gateway.store.fhir import SqliteFhirRepository, _Writer

INS = "urn:oid:1.2.250.1.213.1.4.8"
LOINC = "http://loinc.org"
TYPES = ["11488-4", "11502-2", "18748-4", "34112-3", "60591-5", "57833-6", "11490-0", "15507-7"]
TOKEN = "bench-professional-token-0123456789"  # noqa: S105 - a benchmark credential


class _Runtime:
    def __init__(self, fhir: SqliteFhirRepository) -> None:
        self.fhir = fhir
        self.store: Any = None

    async def replay(self, message_id: str) -> bool:
        return False

    async def readiness(self) -> Mapping[str, Any]:
        return {}

    def snapshot(self) -> Mapping[str, Any]:
        return {}


def ins_of(n: int) -> str:
    return f"{2800000000000 + n:013d}"


def make_document(i: int, patients: int, rng: random.Random) -> dict[str, Any]:
    patient = i % patients
    status = "current" if rng.random() < 0.85 else "superseded"
    day = 1 + i % 28
    return {
        "resourceType": "DocumentReference",
        "id": f"d{i:09d}",
        "masterIdentifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:oid:1.2.250.1.999.7.{i}"},
        "status": status,
        "type": {"coding": [{"system": LOINC, "code": rng.choice(TYPES)}]},
        "subject": {"reference": f"Patient/p{patient}"},
        "date": f"2024-{1 + i % 12:02d}-{day:02d}T10:00:00+01:00",
        "content": [
            {
                "attachment": {
                    "contentType": "application/xml",
                    "url": f"Binary/b{i:09d}",
                    "size": 1024,
                    "hash": "A/hMRrv6Y15BjSM8kMLidrz+mHc=",
                }
            }
        ],
    }


async def load(
    store: SqliteDocumentStore, repo: SqliteFhirRepository, documents: int, patients: int
) -> float:
    now = "2024-06-01T00:00:00.000000Z"

    def add_patients(w: _Writer) -> None:
        for start in range(0, patients, 10000):
            rows, index = [], []
            for n in range(start, min(start + 10000, patients)):
                body = {
                    "resourceType": "Patient",
                    "id": f"p{n}",
                    "identifier": [{"system": INS, "value": ins_of(n)}],
                }
                rows.append(("Patient", f"p{n}", 1, now, 0, orjson.dumps(body)))
                index.append(("Patient", f"p{n}", "identifier", INS, ins_of(n)))
            w.conn.executemany("INSERT OR REPLACE INTO resources VALUES (?,?,?,?,?,?)", rows)
            w.conn.executemany(
                "INSERT INTO search_index(type, id, param, system, value) VALUES (?,?,?,?,?)", index
            )

    started = time.perf_counter()
    await repo._write(add_patients)
    rng = random.Random(7)
    batch = 5000
    for start in range(0, documents, batch):
        docs = [make_document(i, patients, rng) for i in range(start, min(start + batch, documents))]
        await store.bulk_load(docs, now=now)
        if (start // batch) % 20 == 0:
            print(f"  loaded {start + len(docs):>9,} documents", flush=True)
    return time.perf_counter() - started


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def run(args: argparse.Namespace) -> None:
    directory = Path(args.dir or tempfile.mkdtemp(prefix="passerelle-docs-"))
    db = directory / "fhir.db"
    repo = SqliteFhirRepository(db)
    store = SqliteDocumentStore(repo)
    await store.open()
    existing = await repo._read(lambda c: c.execute("SELECT COUNT(*) FROM doc_index").fetchone()[0])
    if existing < args.documents:
        print(f"loading {args.documents:,} documents for {args.patients:,} patients into {db}")
        seconds = await load(store, repo, args.documents, args.patients)
        print(f"loaded in {seconds:.0f} s ({args.documents / seconds:,.0f} documents/s)")
    else:
        print(f"reusing {existing:,} documents in {db}")
    rng = random.Random(11)
    queries = [(ins_of(rng.randrange(args.patients)), rng.choice(TYPES)) for _ in range(args.queries)]
    actor = Actor(hidden=1, subject="bench")
    store_times, found = [], 0
    for ins, code in queries:
        params = [("patient.identifier", f"{INS}|{ins}"), ("status", "current"), ("type", f"{LOINC}|{code}")]
        t0 = time.perf_counter()
        result = await store.search(params, actor)
        store_times.append((time.perf_counter() - t0) * 1000)
        found += result.total
    app = build_app(
        _Runtime(repo),
        authenticator=TokenTable([{"token": TOKEN, "subject": "bench", "role": "professional"}]),
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    http_times = []
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        for ins, code in queries:
            url = (
                f"http://127.0.0.1:{port}/fhir/DocumentReference?patient.identifier={INS}|{ins}"
                f"&status=current&type={LOINC}|{code}"
            )
            t0 = time.perf_counter()
            async with session.get(url) as resp:
                await resp.read()
                assert resp.status == 200
            http_times.append((time.perf_counter() - t0) * 1000)
    await runner.cleanup()
    await repo.close()
    print(f"ITI-67 patient + status + type over {args.documents:,} documents, {len(queries):,} queries")
    print(f"  matches per query: {found / len(queries):.2f} on average")
    for label, times in (("HTTP route", http_times), ("store call", store_times)):
        print(
            f"  {label}: p50 {statistics.median(times):.2f} ms, p95 {percentile(times, 95):.2f} ms,"
            f" max {max(times):.2f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--documents", type=int, default=1_000_000)
    parser.add_argument("--patients", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--dir", help="reuse or keep the database here (default: a new temp dir)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
