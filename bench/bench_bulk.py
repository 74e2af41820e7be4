"""Bulk export and import at scale: resources per second and peak RSS, at two sizes.

    .venv/bin/python bench/bench_bulk.py                       # 20,000 then 100,000 resources
    .venv/bin/python bench/bench_bulk.py --sizes 100000 --target sqlite

For each size: a SQLite repository is filled (patients, their encounters and observations, and a
share of documents with their bytes); a real gateway (``passerelle run``, its own process) serves
it; the export is kicked off over HTTP, polled, and every file downloaded to disk, and the gateway's
peak RSS is sampled throughout. Then ``passerelle import`` (its own process, RSS sampled) loads the
files into a fresh PostgreSQL schema (``--target postgresql``, the default) or SQLite data
directory, and the count stored is checked against the count exported.

The RSS figures are what bounds memory: the export holds one page of the repository (500
resources) and one page of each file's writes; the import one batch (500 lines). Neither grows with
the repository's size, which the two sizes side by side show.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import orjson
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.processes import RssWatch, free_port  # noqa: E402
from gateway.store import bulk  # noqa: E402
from gateway.store.documents import SqliteDocumentStore  # noqa: E402
from gateway.store.fhir import SqliteFhirRepository  # noqa: E402

PG_DSN = os.environ.get("PASSERELLE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
TOKEN = secrets.token_urlsafe(24)  # the bench gateway's admin token, made afresh each run
INS = "urn:oid:1.2.250.1.213.1.4.8"
IPP = "urn:oid:1.2.250.1.71.4.2.7"
NOW = "2024-05-14T08:30:00.000000Z"
FAMILIES = ("Lefèvre", "Martin", "Bernard", "Dubois", "Moreau", "Laurent", "Girard", "Rousseau")
GIVEN = ("Amélie", "Benoît", "Chloé", "Éric", "Françoise", "Gaëlle", "Hélène", "Jérôme")


def meta(version: int = 1) -> dict[str, str]:
    return {"versionId": str(version), "lastUpdated": NOW}


def records(n: int) -> list[dict[str, Any]]:
    """The n-th patient's resources: the patient, a stay, eight results; every 10th has a document."""
    pid, subject = f"pat-{n}", {"reference": f"Patient/pat-{n}"}
    out: list[dict[str, Any]] = [
        {"resourceType": "Patient", "id": pid, "meta": meta(),
         "identifier": [{"system": INS, "value": f"2{n:012d}"}, {"system": IPP, "value": f"{n:08d}"}],
         "name": [{"family": FAMILIES[n % 8], "given": [GIVEN[n % 8]]}], "gender": "female",
         "birthDate": "1975-04-12"},
        {"resourceType": "Encounter", "id": f"enc-{n}", "meta": meta(), "status": "finished",
         "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
         "subject": subject},
    ]  # fmt: skip
    for k in range(8):
        out.append(
            {"resourceType": "Observation", "id": f"obs-{n}-{k}", "meta": meta(), "status": "final",
             "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}], "text": "Glycémie"},
             "subject": subject, "encounter": {"reference": f"Encounter/enc-{n}"},
             "valueQuantity": {"value": 4 + (n * 8 + k) % 30 / 10, "unit": "mmol/L"}}
        )  # fmt: skip
    return out


def documents(n: int) -> list[dict[str, Any]]:
    """A compte rendu and its bytes, for the n-th patient."""
    data = f"<ClinicalDocument>compte rendu {n}</ClinicalDocument>".encode()
    digest = hashlib.sha256(data).hexdigest()
    return [
        {"resourceType": "Binary", "id": digest, "meta": meta(), "contentType": "application/xml",
         "data": base64.b64encode(data).decode()},
        {"resourceType": "DocumentReference", "id": f"doc-{n}", "meta": meta(), "status": "current",
         "subject": {"reference": f"Patient/pat-{n}"}, "type": {"coding": [{"system": "http://loinc.org",
         "code": "11488-4"}]}, "content": [{"attachment": {"contentType": "application/xml",
         "url": f"Binary/{digest}", "size": len(data)}}]},
    ]  # fmt: skip


async def fill(data_dir: Path, size: int) -> int:
    """About ``size`` resources into ``data_dir/fhir.db``; how many."""
    repository = SqliteFhirRepository(data_dir / "fhir.db")
    store = SqliteDocumentStore(repository)
    await store.open()
    written, n, batch, docs = 0, 0, [], []
    while written + len(batch) < size:
        batch += records(n)
        if n % 10 == 0:
            batch += documents(n)
            docs.append(f"doc-{n}")
        n += 1
        if len(batch) >= 500:
            written += len(await bulk.restore(store, batch))
            batch = []
    if batch:
        written += len(await bulk.restore(store, batch))
    for start in range(0, len(docs), 500):
        await bulk.reindex(store, docs[start : start + 500])
    await repository.close()
    return written


def write_config(workdir: Path, http_port: int, store: dict[str, Any] | None = None) -> Path:
    config: dict[str, Any] = {
        "workers": 0,
        "log_level": "warning",
        "http": {"host": "127.0.0.1", "port": http_port},
        "auth": {"tokens": [{"token": TOKEN, "subject": "bench-admin", "role": "admin"}]},
        "sources": [{"name": "hospital", "type": "mllp", "host": "127.0.0.1", "port": free_port()}],
        "channels": [
            {
                "name": "adt",
                "source": "hospital",
                "destinations": [{"name": "files", "type": "file", "directory": str(workdir / "out")}],
            }
        ],
    }
    if store is not None:
        config["store"] = store
    path = workdir / f"config-{http_port}.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return path


def start_gateway(workdir: Path, data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A gateway over ``data_dir``; (process, its /fhir base URL)."""
    port = free_port()
    config = write_config(workdir, port)
    args = ["-m", "gateway.cli", "run", "--config", str(config), "--data-dir", str(data_dir)]
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return proc, f"http://127.0.0.1:{port}/fhir"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the gateway did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def request(url: str, *, method: str = "GET", headers: dict[str, str] | None = None) -> Any:
    req = urllib.request.Request(  # noqa: S310 - the bench's own gateway on 127.0.0.1
        url, method=method, headers={"Authorization": f"Bearer {TOKEN}", **(headers or {})}
    )
    return urllib.request.urlopen(req, timeout=600)  # noqa: S310


def export(base: str, into: Path) -> int:
    """Kick off, poll, download every file into ``into``; the resources downloaded."""
    with request(
        f"{base}/$export", headers={"Prefer": "respond-async", "Accept": "application/fhir+json"}
    ) as r:
        status_url = r.headers["Content-Location"]
    while True:
        with request(status_url) as r:
            if r.status == 200:
                manifest = orjson.loads(r.read())
                break
        time.sleep(0.2)
    total = 0
    for item in manifest["output"]:
        with (
            request(item["url"], headers={"Accept": "application/fhir+ndjson"}) as r,
            (into / f"{item['type']}.ndjson").open("ab") as out,
        ):
            while chunk := r.read(1 << 20):
                out.write(chunk)
        total += int(item["count"])
    return total


def run_import(workdir: Path, files: Path, target: str) -> tuple[float, int, str, dict[str, Any] | None]:
    """``passerelle import`` in its own process: (seconds, peak RSS, its summary, the store used)."""
    store: dict[str, Any] | None = None
    data_dir = workdir / "imported"
    if target == "postgresql":
        store = {"backend": "postgresql", "dsn": PG_DSN, "schema": f"bench_{uuid.uuid4().hex[:10]}"}
    config = write_config(workdir, free_port(), store)
    args = ["-m", "gateway.cli", "import", "--config", str(config), "--data-dir", str(data_dir), str(files)]
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    watch = RssWatch(proc.pid)
    watch.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - started
    watch.running = False
    if proc.returncode != 0:
        raise SystemExit(f"import failed: {err.decode()[-2000:]}")
    return seconds, watch.peak, out.decode().strip(), store


async def drop_schema(store: dict[str, Any] | None) -> None:
    if store is None:
        return
    import asyncpg

    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{store["schema"]}" CASCADE')
    finally:
        await conn.close()


def one_size(size: int, target: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="passerelle-bulk-") as tmp:
        workdir = Path(tmp)
        data_dir = workdir / "var"
        data_dir.mkdir()
        filled = asyncio.run(fill(data_dir, size))
        proc, base = start_gateway(workdir, data_dir)
        try:
            watch = RssWatch(proc.pid)
            idle = watch.sample()
            watch.start()
            files = workdir / "files"
            files.mkdir()
            started = time.perf_counter()
            exported = export(base, files)
            export_s = time.perf_counter() - started
            watch.running = False
        finally:
            stop(proc)
        if exported != filled:
            raise SystemExit(f"exported {exported} of {filled} resources")
        import_s, import_rss, summary, store = run_import(workdir, files, target)
        asyncio.run(drop_schema(store))
        if f"{filled} created" not in summary:
            raise SystemExit(f"import: {summary}")
        return {
            "resources": filled,
            "export_per_s": exported / export_s,
            "export_s": export_s,
            "gateway_idle_mb": idle / 2**20,
            "gateway_peak_mb": watch.peak / 2**20,
            "import_per_s": filled / import_s,
            "import_s": import_s,
            "import_peak_mb": import_rss / 2**20,
        }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="20000,100000", help="comma-separated resource counts")
    parser.add_argument(
        "--target", choices=["postgresql", "sqlite"], default="postgresql", help="import into"
    )
    args = parser.parse_args()
    print(
        f"{'resources':>10} {'export/s':>9} {'gateway RSS idle→peak':>22} {'import/s':>9} {'import RSS':>11}"
    )
    for size in (int(s) for s in args.sizes.split(",")):
        r = one_size(size, args.target)
        print(
            f"{r['resources']:>10.0f} {r['export_per_s']:>9.0f} "
            f"{r['gateway_idle_mb']:>9.0f} → {r['gateway_peak_mb']:>5.0f} MB "
            f"{r['import_per_s']:>9.0f} {r['import_peak_mb']:>8.0f} MB"
            f"   (export {r['export_s']:.1f} s, import {r['import_s']:.1f} s into {args.target})"
        )


if __name__ == "__main__":
    main()
