"""The built-in FHIR repository's write path: mapped ADT^A01 transaction Bundles per CPU second.

    .venv/bin/python bench/bench_repository.py                 # 3 runs of 3,000 messages + 10 % replays
    .venv/bin/python bench/bench_repository.py --batch 8          # smaller group commits
    .venv/bin/py-spy record --threads --format raw -o out.txt -- .venv/bin/python bench/bench_repository.py

The Bundles come from the real PAM FR mapping (mappings/, ``tests.messages.adt``): every message has
its own patient, visit and movement, and a share of them is mapped a second time and sent again, as a
replayed message is (new urn:uuid fullUrls, same content: no new version may come of it). They are
built before the clock starts. Each run writes them into a fresh SQLite repository through the
destination the channels use (``FhirRepositoryDestination.send``: payload bytes in, response out),
``--batch`` sends at a time, so that they share group commits as concurrent lanes do.

Only the CPU time of this process is counted (``time.process_time``: the event loop and the
repository's writer thread), so that other jobs on the machine slow the run without skewing it. The
figure is the median of ``--runs`` runs. ``--direct`` calls ``SqliteFhirRepository.transaction`` with
the parsed Bundle instead of the destination. Each run checks the repository afterwards: three
resources of one version per distinct message, whatever the replays.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from connectors.fhir_repository import FhirRepositoryDestination  # noqa: E402
from gateway.core.envelope import FHIR_JSON, Envelope  # noqa: E402
from gateway.hl7.er7 import Message  # noqa: E402
from gateway.mapping import catalog  # noqa: E402
from gateway.mapping.engine import Library  # noqa: E402
from tests.messages import adt  # noqa: E402

VISIT = b"V2026000123"  # the visit number tests.messages.adt always gives


def message(n: int) -> bytes:
    """The n-th distinct ADT^A01: its own patient, visit (PV1-19) and movement (ZBE-1, from MSH-10)."""
    raw = adt(f"B{n:08d}", patient=f"P{n:08d}", family=f"NOM{n}")
    return raw.replace(VISIT, f"V{n:010d}".encode())


def build(lib: Library, messages: int, replays: float, seed: int) -> list[bytes]:
    """Mapped Bundles as the mapping step hands them on (JSON bytes), replays mixed in."""
    rng = random.Random(seed)
    payloads: list[bytes] = []
    for n in range(messages):
        payloads.append(orjson.dumps(lib.map(Message.decode(message(n))).bundle))
        if n and rng.random() < replays:
            # A replay is mapped again: fresh urn:uuid fullUrls, the same resources.
            earlier = rng.randrange(n)
            payloads.append(orjson.dumps(lib.map(Message.decode(message(earlier))).bundle))
    return payloads


def envelope(i: int) -> Envelope:
    return Envelope(
        id=f"bench{i:010d}",
        channel="adt",
        source="bench",
        raw=b"",
        content_type=FHIR_JSON,
        sender="DXCARE^HOPITAL-NORD",
        control_id=f"B{i:08d}",
        message_type="ADT^A01",
        partition_key="",
        received_at=time.time(),
        trace_id="",
    )


async def one_run(payloads: list[bytes], batch: int, direct: bool) -> float:
    """CPU seconds to write every payload into a fresh repository."""
    with tempfile.TemporaryDirectory(prefix="bench-repo-") as tmp:
        path = Path(tmp) / "fhir.db"
        dest = FhirRepositoryDestination("fhir", {"path": str(path)})
        repo = dest.repository
        await repo.open()
        dest._opened = True  # opened above, outside the timed part
        envelopes = [envelope(i) for i in range(len(payloads))]
        bundles = [orjson.loads(p) for p in payloads] if direct else []

        async def send(i: int) -> Any:
            if direct:
                return await repo.transaction(bundles[i])
            return await dest.send(envelopes[i], payloads[i])

        start = time.process_time()
        for first in range(0, len(payloads), batch):
            await asyncio.gather(*(send(i) for i in range(first, min(first + batch, len(payloads)))))
        cpu = time.process_time() - start
        await dest.aclose()
        check(path, payloads)
    return cpu


def check(path: Path, payloads: list[bytes]) -> None:
    """Replays must have added nothing: one version of three resources per distinct message."""
    distinct = {
        tuple(e["request"]["url"] for e in orjson.loads(p)["entry"])  # the business identifiers
        for p in payloads
    }
    db = sqlite3.connect(path)
    try:
        resources = db.execute("SELECT COUNT(*) FROM resources").fetchone()[0]
        versions = db.execute("SELECT COUNT(*) FROM resource_versions").fetchone()[0]
    finally:
        db.close()
    expected = 3 * len(distinct)
    if resources != expected or versions != expected:
        raise SystemExit(
            f"wrong repository content: {resources} resources, {versions} versions, {expected} expected"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=3000, help="distinct messages per run")
    parser.add_argument("--replays", type=float, default=0.1, help="share of messages sent a second time")
    parser.add_argument("--batch", type=int, default=32, help="sends in flight together (group commit)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--direct", action="store_true", help="repository.transaction on parsed Bundles")
    args = parser.parse_args()
    lib = Library.load(ROOT / "mappings", catalog.available())
    payloads = build(lib, args.messages, args.replays, seed=7)
    rates = []
    for run in range(args.runs):
        cpu = asyncio.run(one_run(payloads, args.batch, args.direct))
        rates.append(len(payloads) / cpu)
        print(f"run {run + 1}: {len(payloads)} Bundles in {cpu:.2f} CPU s: {rates[-1]:,.0f} Bundles/CPU s")
    mode = "repository.transaction" if args.direct else "destination send"
    print(
        f"{mode}, batch {args.batch}: median {statistics.median(rates):,.0f} Bundles per CPU second"
        f" ({statistics.median(1e6 / r for r in rates):,.0f} µs per Bundle)"
    )


if __name__ == "__main__":
    main()
