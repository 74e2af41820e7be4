"""The $export of a real gateway, driven by a third-party Bulk Data client: SMART's ``smart-fetch``.

    .venv/bin/python bench/bulk_client_check.py                     # client cached in ~/.cache
    .venv/bin/python bench/bulk_client_check.py --cache /tmp/client --resources 2000

``smart-fetch`` (PyPI, from the SMART Health IT team) is installed into its own virtual
environment under ``--cache`` the first time (pinned version), never into the project's. A SQLite
repository is filled as bench/bench_bulk.py fills it (patients, stays, results, documents), plus a
Group of five patients; a gateway (``passerelle run``, its own process) serves it. The client then
runs a system-level export (``smart-fetch bulk``) and a Group export (``--group``), with a bearer
token; every file it downloaded is checked against the repository: the same ids per type, each
line a resource of its file's type, and for the Group only its members' records. Exits 1 on any
difference.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_bulk  # noqa: E402

from gateway.store import bulk  # noqa: E402
from gateway.store.documents import SqliteDocumentStore  # noqa: E402
from gateway.store.fhir import SqliteFhirRepository  # noqa: E402

CLIENT = "smart-fetch==1.0.3"
TYPES = ("Patient", "Encounter", "Observation", "DocumentReference")  # what the client may ask for
GROUP = "cohorte-diabete"


def client_binary(cache: Path) -> Path:
    """The client's executable, installed into ``cache`` on first use."""
    binary = cache / "venv" / "bin" / "smart-fetch"
    if binary.exists():
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    venv.create(cache / "venv", with_pip=True)
    pip = [str(cache / "venv" / "bin" / "python"), "-m", "pip", "install", "--quiet", CLIENT]
    subprocess.run(pip, check=True, timeout=900)
    return binary


async def prepare(data_dir: Path, size: int) -> dict[str, set[str]]:
    """Fill the repository and add the Group; the ids stored, per type ("Group:" the members')."""
    await bench_bulk.fill(data_dir, size)
    repository = SqliteFhirRepository(data_dir / "fhir.db")
    store = SqliteDocumentStore(repository)
    await store.open()
    members = [f"pat-{n}" for n in (0, 3, 10, 20, 21)]
    group = {
        "resourceType": "Group",
        "id": GROUP,
        "meta": bench_bulk.meta(),
        "type": "person",
        "actual": True,
        "member": [{"entity": {"reference": f"Patient/{m}"}} for m in members],
    }
    await bulk.restore(store, [group])
    stored: dict[str, set[str]] = {}
    after = None
    while page := await repository.scan(TYPES, after=after):
        for resource in page:
            stored.setdefault(resource["resourceType"], set()).add(resource["id"])
        after = (page[-1]["resourceType"], page[-1]["id"])
    for type_ in TYPES:
        if type_ == "Patient":
            criteria = [("_id", ",".join(members))]
        else:
            criteria = [("patient", ",".join(f"Patient/{m}" for m in members))]
        found = await repository.search(type_, criteria, count=500)
        stored[f"Group:{type_}"] = {str(r["id"]) for r in found.matches}
    await repository.close()
    return stored


def downloaded(directory: Path) -> dict[str, set[str]]:
    """The ids in the client's files, per type; each line checked against its file's type."""
    found: dict[str, set[str]] = {}
    for path in sorted(directory.glob("*.ndjson")):
        if path.name == "log.ndjson":
            continue
        type_ = path.name.split(".", 1)[0]
        for line in path.read_bytes().splitlines():
            resource = orjson.loads(line)
            if resource.get("resourceType") != type_:
                raise SystemExit(f"{path.name}: a {resource.get('resourceType')} in the {type_} file")
            found.setdefault(type_, set()).add(resource["id"])
    return found


def run_client(binary: Path, base: str, token: Path, out: Path, *extra: str) -> None:
    args = [str(binary), "bulk", "--fhir-url", base, "--bearer-token", str(token), "--no-compression"]
    args += ["--no-default-filters", "--type", ",".join(TYPES), *extra, str(out)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise SystemExit(
            f"smart-fetch failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )


def compare(label: str, expected: dict[str, set[str]], found: dict[str, set[str]]) -> bool:
    ok = True
    for type_ in TYPES:
        want, got = expected.get(type_, set()), found.get(type_, set())
        same = want == got
        ok &= same
        verdict = "ok" if same else "DIFFER"
        print(f"  {label:<7} {type_:<18} {len(got):>6} downloaded / {len(want):>6} stored  {verdict}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_cache = (
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "passerelle" / "bulk-client"
    )
    parser.add_argument("--cache", type=Path, default=default_cache, help="where the client is installed")
    parser.add_argument("--resources", type=int, default=1000, help="how many resources to serve")
    args = parser.parse_args()
    binary = client_binary(args.cache)
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False)
    print(f"client: {version.stdout.strip() or CLIENT}")
    with tempfile.TemporaryDirectory(prefix="passerelle-bulk-client-") as tmp:
        workdir = Path(tmp)
        data_dir = workdir / "var"
        data_dir.mkdir()
        stored = asyncio.run(prepare(data_dir, args.resources))
        token = workdir / "token"
        token.write_text(bench_bulk.TOKEN)
        token.chmod(0o600)
        proc, base = bench_bulk.start_gateway(workdir, data_dir)
        try:
            run_client(binary, base, token, workdir / "system")
            ok = compare("system", stored, downloaded(workdir / "system"))
            run_client(binary, base, token, workdir / "group", "--group", GROUP)
            members = {t: stored.get(f"Group:{t}", set()) for t in TYPES}
            ok &= compare("group", members, downloaded(workdir / "group"))
        finally:
            bench_bulk.stop(proc)
    print("third-party client check:", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
