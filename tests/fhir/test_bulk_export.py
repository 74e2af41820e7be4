"""FHIR Bulk Data export ($export): the asynchronous pattern, who receives what, the audit trail,
cancel and expiry; and the round trip SQLite gateway → NDJSON → PostgreSQL gateway, every resource
compared (content, id, version, references), documents and their masking included."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestServer
from yarl import URL

from gateway import config as config_mod
from gateway.core.errors import ConfigError
from gateway.http.app import build_app
from gateway.http.auth import TokenTable
from gateway.http.bulk import EXPORTER
from gateway.store.audit import AuditLog
from gateway.store.bulk import Exporter, ExportRequest
from gateway.store.documents import SqliteDocumentStore
from gateway.store.documents.postgres import PgDocumentStore
from gateway.store.fhir import SqliteFhirRepository
from gateway.store.fhir_common import FhirRepository
from gateway.store.pg_fhir import PgFhirRepository
from gateway.transfer import import_files
from tests.documents.conftest import TOKENS, auth
from tests.fhir.bulk_records import (
    MAPPED_TYPES,
    Client,
    async_headers,
    bulk_export,
    download,
    export_everything,
    fill,
    kick_off,
    manifest_of,
)
from tests.fhir.conftest import Clock, FhirOnlyRuntime
from tests.scale.test_pg_fhir import backend, clock, repo  # noqa: F401 - sqlite, and postgresql (live)


class Site:
    """A gateway's HTTP side over a repository: its client, audit trail and export directory."""

    def __init__(self, client: Client, audit: AuditLog, directory: Path, ids: dict[str, str]) -> None:
        self.client, self.audit, self.directory, self.ids = client, audit, directory, ids


async def _site(
    repository: FhirRepository, tmp: Path, ids: dict[str, str], **bulk: Any
) -> AsyncIterator[Site]:
    audit = AuditLog(tmp / "audit.db", follow=False)
    await audit.open()
    app = build_app(
        FhirOnlyRuntime(repository),  # type: ignore[arg-type]
        authenticator=TokenTable(TOKENS.values()),
        audit=audit,
        bulk={"directory": str(tmp / "exports"), **bulk},
    )
    async with TestClient_(app) as client:
        yield Site(client, audit, tmp / "exports", ids)
    await audit.close()


def TestClient_(app: Any) -> Client:
    return Client(TestServer(app, host="127.0.0.1", port=0))


@pytest.fixture
async def filled(
    tmp_path: Path,
) -> AsyncIterator[tuple[SqliteFhirRepository, SqliteDocumentStore, dict[str, str]]]:
    repository = SqliteFhirRepository(tmp_path / "fhir.db", clock=Clock())
    store = SqliteDocumentStore(repository)
    await store.open()
    ids = await fill(repository, store)
    yield repository, store, ids
    await repository.close()


@pytest.fixture
async def site(
    filled: tuple[SqliteFhirRepository, SqliteDocumentStore, dict[str, str]], tmp_path: Path
) -> AsyncIterator[Site]:
    async for s in _site(filled[0], tmp_path / "site", filled[2]):
        yield s


def _by_id(found: dict[str, list[Any]]) -> dict[tuple[str, str], Any]:
    return {(r["resourceType"], r["id"]): r for lines in found.values() for r in lines}


# -- the asynchronous request pattern ----------------------------------------------------------------


async def test_kick_off_poll_and_manifest(site: Site) -> None:
    status = await kick_off(site.client, "/fhir/$export", auth("admin"))
    manifest = await manifest_of(site.client, status, auth("admin"))
    assert manifest["requiresAccessToken"] is True and manifest["error"] == []
    assert manifest["request"].endswith("/fhir/$export")
    assert manifest["transactionTime"].endswith("Z")
    types = [o["type"] for o in manifest["output"]]
    assert len(types) == len(set(types))  # one file per resource type
    assert MAPPED_TYPES | {"Group"} <= set(types)
    found = await download(site.client, manifest, auth("admin"))
    patients = {p["id"]: p for p in found["Patient"]}
    assert patients["amelie"]["meta"]["versionId"] == "2"  # the current version, as stored
    binaries = {b["id"]: b for b in found["Binary"]}
    assert all(b["data"] and b["contentType"] == "application/xml" for b in binaries.values())


async def test_kick_off_needs_respond_async_and_a_known_format(site: Site) -> None:
    resp = await site.client.get("/fhir/$export", headers=auth("admin"))
    assert resp.status == 400
    body = await resp.json(content_type=None)
    assert body["resourceType"] == "OperationOutcome" and "respond-async" in body["issue"][0]["diagnostics"]
    for fmt in ("application/fhir+ndjson", "application/ndjson", "ndjson"):
        resp = await site.client.get(
            "/fhir/$export", params={"_outputFormat": fmt}, headers=async_headers(auth("admin"))
        )
        assert resp.status == 202, fmt
        status = URL(resp.headers["Content-Location"]).path
        assert (await site.client.delete(status, headers=auth("admin"))).status == 202
    for fmt in ("text/csv", "application/fhir+json", "parquet"):
        resp = await site.client.get(
            "/fhir/$export", params={"_outputFormat": fmt}, headers=async_headers(auth("admin"))
        )
        assert resp.status == 400, fmt
        assert (await resp.json(content_type=None))["resourceType"] == "OperationOutcome"


async def test_unsupported_parameters_are_refused_unless_lenient(site: Site) -> None:
    query = {"_typeFilter": "Observation?status=final"}
    resp = await site.client.get("/fhir/$export", params=query, headers=async_headers(auth("admin")))
    assert resp.status == 400 and "_typeFilter" in await resp.text()
    lenient = {**async_headers(auth("admin")), "Prefer": "respond-async, handling=lenient"}
    resp = await site.client.get("/fhir/$export", params=query, headers=lenient)
    assert resp.status == 202
    await manifest_of(site.client, URL(resp.headers["Content-Location"]).path, auth("admin"))
    for bad in ({"_type": "Patient,Pingouin"}, {"_since": "hier"}, {"_since": "2024-05-14"}):
        resp = await site.client.get("/fhir/$export", params=bad, headers=async_headers(auth("admin")))
        assert resp.status == 400, bad


async def test_type_and_since_select(site: Site, filled: Any) -> None:
    repository: SqliteFhirRepository = filled[0]
    found = await bulk_export(site.client, "/fhir/$export?_type=Observation,Patient", auth("admin"))
    assert set(found) == {"Observation", "Patient"}
    assert {o["id"] for o in found["Observation"]} == {"obs-a", "obs-p"}
    since = found["Observation"][0]["meta"]["lastUpdated"]
    found = await bulk_export(site.client, f"/fhir/$export?_since={since}", auth("admin"))
    assert found and all(r["meta"]["lastUpdated"] > since for lines in found.values() for r in lines)
    newest = max(r["meta"]["lastUpdated"] for lines in found.values() for r in lines)
    condition = await repository.read("Condition", "cond-a")
    assert condition is not None
    await repository.update("Condition", "cond-a", {**condition, "note": [{"text": "suivi"}]})
    found = await bulk_export(site.client, f"/fhir/$export?_since={newest}", auth("admin"))
    assert [(r["resourceType"], r["id"]) for lines in found.values() for r in lines] == [
        ("Condition", "cond-a")
    ]


async def test_unknown_group_is_404_and_a_group_exports_its_members(site: Site) -> None:
    resp = await site.client.get("/fhir/Group/inconnu/$export", headers=async_headers(auth("admin")))
    assert resp.status == 404
    body = await resp.json(content_type=None)
    assert body["resourceType"] == "OperationOutcome" and "Group/inconnu" in body["issue"][0]["diagnostics"]
    found = await bulk_export(site.client, "/fhir/Group/cohorte-diabete/$export", auth("admin"))
    assert [p["id"] for p in found["Patient"]] == ["paul"]
    assert {o["id"] for o in found["Observation"]} == {"obs-p"}
    assert "Practitioner" not in found and "Group" not in found  # outside the compartment
    resp = await site.client.get(
        "/fhir/Group/cohorte-diabete/$export?_type=Practitioner", headers=async_headers(auth("admin"))
    )
    assert resp.status == 400


async def test_patient_level_export_holds_compartment_types_only(site: Site) -> None:
    found = await bulk_export(site.client, "/fhir/Patient/$export", auth("operator"))
    assert {p["id"] for p in found["Patient"]} == {"amelie", "paul"}
    assert not {"Practitioner", "Organization", "Location", "Device", "Group"} & set(found)
    assert "DocumentReference" in found and "Binary" in found


# -- who receives what ----------------------------------------------------------------------------------


async def test_operator_receives_every_document(site: Site) -> None:
    found = _by_id(await bulk_export(site.client, "/fhir/$export", auth("operator")))
    for name in ("plain", "masked", "hidden"):
        assert ("DocumentReference", site.ids[name]) in found


async def test_professional_never_receives_a_masked_document(site: Site) -> None:
    everything = _by_id(await bulk_export(site.client, "/fhir/$export", auth("admin")))
    found = _by_id(await bulk_export(site.client, "/fhir/$export", auth("pro2")))
    masked = everything[("DocumentReference", site.ids["masked"])]
    masked_binary = masked["content"][0]["attachment"]["url"].rsplit("/", 1)[-1]
    assert ("DocumentReference", site.ids["masked"]) not in found
    assert ("Binary", masked_binary) not in found
    assert ("DocumentReference", site.ids["plain"]) in found and (
        "DocumentReference",
        site.ids["hidden"],
    ) in found
    lists = [r for (t, _), r in found.items() if t == "List"]
    named = {e["item"]["reference"] for item in lists for e in item.get("entry", [])}
    assert f"DocumentReference/{site.ids['masked']}" not in named
    assert ("Observation", "obs-p") in found and ("Practitioner", "dr-moreau") in found
    # Its author still sees it, as on every other route (they may unmask it).
    authored = _by_id(await bulk_export(site.client, "/fhir/$export", auth("pro")))
    assert ("DocumentReference", site.ids["masked"]) in authored and ("Binary", masked_binary) in authored


async def test_patient_token_receives_its_compartment_only(site: Site) -> None:
    found = _by_id(await bulk_export(site.client, "/fhir/$export", auth("patient")))
    assert {i for t, i in found if t == "Patient"} == {"amelie"}
    assert ("Observation", "obs-a") in found and ("Observation", "obs-p") not in found
    assert not {t for t, _ in found} & {"Practitioner", "Organization", "Group", "Location"}
    assert ("DocumentReference", site.ids["plain"]) in found
    assert ("DocumentReference", site.ids["hidden"]) not in found  # INVISIBLE_PATIENT
    assert ("DocumentReference", site.ids["masked"]) in found  # masked from professionals, not from them
    binaries = {i for t, i in found if t == "Binary"}
    named = {
        r["content"][0]["attachment"]["url"].rsplit("/", 1)[-1]
        for (t, _), r in found.items()
        if t == "DocumentReference"
    }
    assert binaries == named
    # A Group is not part of their record (its existence neither); nor are other types.
    for group in ("cohorte-diabete", "inconnu"):
        resp = await site.client.get(f"/fhir/Group/{group}/$export", headers=async_headers(auth("patient")))
        assert resp.status == 403
    mine = _by_id(await bulk_export(site.client, "/fhir/Patient/$export", auth("patient")))
    assert mine == found
    resp = await site.client.get("/fhir/$export?_type=Practitioner", headers=async_headers(auth("patient")))
    assert resp.status == 403


async def test_only_the_starting_subject_polls_downloads_and_cancels(site: Site) -> None:
    status = await kick_off(site.client, "/fhir/$export", auth("pro"))
    manifest = await manifest_of(site.client, status, auth("pro"))
    file_path = URL(manifest["output"][0]["url"]).path
    for other in ("pro2", "operator", "admin"):
        assert (await site.client.get(status, headers=auth(other))).status == 404
        assert (await site.client.get(file_path, headers=auth(other))).status == 404
        assert (await site.client.delete(status, headers=auth(other))).status == 404
    assert (await site.client.get(file_path)).status == 401
    assert (await site.client.get(status, headers=auth("pro"))).status == 200


# -- audit, cancel, expiry --------------------------------------------------------------------------------


async def test_kick_off_download_and_cancel_are_audited(site: Site) -> None:
    status = await kick_off(site.client, "/fhir/$export?_type=Patient", auth("pro"))
    job = status.rsplit("/", 1)[-1]
    manifest = await manifest_of(site.client, status, auth("pro"))
    await download(site.client, manifest, auth("pro"))
    assert (await site.client.delete(status, headers=auth("pro"))).status == 202
    refused = await site.client.get("/fhir/$export", headers=auth("pro"))
    assert refused.status == 400
    await site.audit.flush()
    rows = [r for _, r in await site.audit.search(count=50, agent="pro-1")]
    exports = [r for r in rows if "bulk export" in r.get("outcomeDesc", "")]
    by_action = {(r["action"], r["outcome"]) for r in exports}
    assert {("E", "0"), ("R", "0"), ("D", "0"), ("E", "4")} <= by_action
    named = [r for r in exports if r["action"] in "RD"]
    assert all(r["entity"][0]["what"]["identifier"]["value"] == job for r in named)
    assert any(r["entity"][0].get("name") == "Patient.ndjson" for r in named)
    assert all(r["agent"][0]["who"]["identifier"]["value"] == "pro-1" for r in exports)


async def test_cancel_stops_the_job_and_removes_its_files(site: Site) -> None:
    status = await kick_off(site.client, "/fhir/$export", auth("admin"))
    job = status.rsplit("/", 1)[-1]
    await manifest_of(site.client, status, auth("admin"))
    assert (site.directory / job).is_dir()
    resp = await site.client.delete(status, headers=auth("admin"))
    assert resp.status == 202
    assert not (site.directory / job).exists()
    assert (await site.client.get(status, headers=auth("admin"))).status == 404
    assert (await site.client.delete(status, headers=auth("admin"))).status == 404


async def test_cancel_while_running(filled: Any, tmp_path: Path) -> None:
    repository: SqliteFhirRepository = filled[0]
    exporter = Exporter(repository, tmp_path / "exports", documents=filled[1], page=1)
    job = await exporter.start(ExportRequest(owner="a", request="r", types=None))
    await asyncio.sleep(0)
    await exporter.cancel(job)
    assert job.task is not None and job.task.cancelled()
    assert not job.directory.exists() and exporter.get(job.id, "a") is None


async def test_a_large_group_is_read_in_chunks_each_record_once(filled: Any, tmp_path: Path) -> None:
    repository: SqliteFhirRepository = filled[0]
    cohort = frozenset({"amelie", "paul", *(f"p{n:03d}" for n in range(148))})  # two searches' worth
    # One record naming both patients: found by both searches, written once.
    shared = {"resourceType": "Basic", "id": "famille", "code": {"text": "Fratrie"},
              "patient": [{"reference": "Patient/amelie"}, {"reference": "Patient/paul"}]}  # fmt: skip
    await repository.update("Basic", "famille", shared)
    exporter = Exporter(repository, tmp_path / "exports", documents=filled[1])
    types = ("Patient", "Observation", "Basic")
    job = await exporter.start(ExportRequest(owner="a", request="r", types=types, patients=cohort))
    assert job.task is not None
    await job.task
    found = {o.type: (job.directory / o.name).read_bytes().splitlines() for o in job.outputs}
    ids = {t: sorted(orjson.loads(line)["id"] for line in lines) for t, lines in found.items()}
    assert ids == {"Patient": ["amelie", "paul"], "Observation": ["obs-a", "obs-p"], "Basic": ["famille"]}


async def test_files_expire_after_the_configured_time(filled: Any, tmp_path: Path) -> None:
    now = [1000.0]
    exporter = Exporter(filled[0], tmp_path / "exports", documents=filled[1], ttl_s=60, clock=lambda: now[0])
    job = await exporter.start(ExportRequest(owner="a", request="r", types=("Patient",)))
    assert job.task is not None
    await job.task
    assert exporter.file(job, "Patient.ndjson") is not None
    now[0] += 59
    assert exporter.expire() == [] and exporter.get(job.id, "a") is job
    now[0] += 1
    assert exporter.expire() == [job.id]
    assert not job.directory.exists() and exporter.get(job.id, "a") is None


async def test_expired_files_are_gone_over_http(filled: Any, tmp_path: Path) -> None:
    async for site in _site(filled[0], tmp_path / "site", filled[2], file_ttl_s=0.3):
        status = await kick_off(site.client, "/fhir/$export?_type=Patient", auth("admin"))
        manifest = await manifest_of(site.client, status, auth("admin"))
        job = status.rsplit("/", 1)[-1]
        await asyncio.sleep(0.4)
        assert (
            await site.client.get(URL(manifest["output"][0]["url"]).path, headers=auth("admin"))
        ).status == 404
        assert (await site.client.get(status, headers=auth("admin"))).status == 404
        assert not (site.directory / job).exists()


async def test_running_exports_per_caller_are_bounded(filled: Any, tmp_path: Path) -> None:
    async for site in _site(filled[0], tmp_path / "site", filled[2], max_running=1):
        exporter = site.client.app[EXPORTER]
        exporter.page = 1  # slow enough to be still running at the second kick-off
        await kick_off(site.client, "/fhir/$export", auth("admin"))
        resp = await site.client.get("/fhir/$export", headers=async_headers(auth("admin")))
        assert resp.status == 429
        assert (await site.client.get("/fhir/$export", headers=async_headers(auth("pro")))).status == 202


def test_export_settings_are_validated_naming_file_and_key(tmp_path: Path) -> None:
    text = (Path(__file__).resolve().parents[2] / "config.yaml").read_text("utf-8")
    good = config_mod.parse(text + "export:\n  file_ttl_s: 7200\n  max_running: 3\n", "config.yaml")
    assert (good.settings.export.file_ttl_s, good.settings.export.max_running) == (7200.0, 3)
    for bad, key in (("file_ttl_s: 0", "export.file_ttl_s"), ("max_running: 0", "export.max_running"),
                     ("ttl: 5", "export.ttl")):  # fmt: skip
        with pytest.raises(ConfigError) as caught:
            config_mod.parse(text + f"export:\n  {bad}\n", "config.yaml")
        assert caught.value.file == "config.yaml" and caught.value.key == key and caught.value.line


async def test_capability_statement_lists_the_export_operations(site: Site) -> None:
    resp = await site.client.get("/fhir/metadata")
    names = {o["name"] for o in (await resp.json(content_type=None))["rest"][0]["operation"]}
    assert names == {"export", "patient-export", "group-export"}


# -- the page-by-page read, on both backends ----------------------------------------------------------


async def test_scan_pages_by_type_and_id(repo: Any, clock: Clock) -> None:  # noqa: F811
    for n in range(7):
        await repo.update("Observation", f"obs-{n}", {"resourceType": "Observation", "status": "final",
                                                      "code": {"text": "Glycémie"}})  # fmt: skip
    await repo.update("Patient", "amelie", {"resourceType": "Patient", "name": [{"family": "Lefèvre"}]})
    await repo.delete("Observation", "obs-3")
    seen: list[tuple[str, str]] = []
    after = None
    while page := await repo.scan(after=after, limit=3):
        seen += [(r["resourceType"], r["id"]) for r in page]
        after = seen[-1]
    assert seen == sorted(seen) and ("Observation", "obs-3") not in seen and len(seen) == 7
    assert [r["id"] for r in await repo.scan(["Patient"])] == ["amelie"]
    one_type: list[str] = []
    cursor = None
    while page := await repo.scan(["Observation"], after=cursor, limit=2):
        one_type += [r["id"] for r in page]
        cursor = ("Observation", one_type[-1])
    assert one_type == [f"obs-{n}" for n in range(7) if n != 3]
    assert await repo.scan(["Observation"], after=("Patient", "")) == []
    assert len(await repo.scan(["Patient"], after=("Observation", "obs-6"))) == 1
    both = await repo.scan(["Patient", "Observation"], after=("Observation", "obs-5"))
    assert [(r["resourceType"], r["id"]) for r in both] == [("Observation", "obs-6"), ("Patient", "amelie")]
    assert await repo.scan([]) == []
    cut = (await repo.read("Observation", "obs-5"))["meta"]["lastUpdated"]
    assert {(r["resourceType"], r["id"]) for r in await repo.scan(since=cut)} == {
        ("Observation", "obs-6"),
        ("Patient", "amelie"),
    }


# -- the round trip: SQLite → NDJSON → PostgreSQL ------------------------------------------------------


@pytest.mark.live
async def test_export_from_sqlite_imports_into_postgresql_unchanged(
    site: Site, filled: Any, pg_store: tuple[PgFhirRepository, PgDocumentStore], tmp_path: Path
) -> None:
    pg_repo, pg_documents = pg_store
    status = await kick_off(site.client, "/fhir/$export", auth("admin"))
    manifest = await manifest_of(site.client, status, auth("admin"))
    files = tmp_path / "files"
    files.mkdir()
    exported = await download(site.client, manifest, auth("admin"))
    for type_, lines in exported.items():
        (files / f"{type_}.ndjson").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in lines))
    report = await import_files(pg_documents, [files])
    assert report.ok and report.created == sum(len(v) for v in exported.values())
    assert report.documents_indexed == 3
    before = await export_everything(filled[0], filled[1], tmp_path / "a")
    after = await export_everything(pg_repo, pg_documents, tmp_path / "b")
    assert set(before) == set(after) and {t for t, _ in after} >= MAPPED_TYPES
    for key, resource in before.items():
        assert after[key] == resource, key  # content, id, versionId, lastUpdated, references
    # The same answers from the PostgreSQL gateway, masking included.
    async for other in _site(pg_repo, tmp_path / "pg-site", site.ids):
        for who in ("pro", "pro2", "patient", "operator"):
            mine = _by_id(await bulk_export(site.client, "/fhir/$export", auth(who)))
            theirs = _by_id(await bulk_export(other.client, "/fhir/$export", auth(who)))
            assert mine == theirs, who
        pro = _by_id(await bulk_export(other.client, "/fhir/$export", auth("pro2")))
        assert ("DocumentReference", site.ids["masked"]) not in pro
    # Importing again changes nothing and conflicts with nothing.
    again = await import_files(pg_documents, [files])
    assert again.ok and again.unchanged == report.created and again.created == 0
