"""Group commit in the FHIR repository: concurrent writes share one SQLite transaction (one fsync),
and one failing write fails alone while the others are stored (tests/fhir/test_write_path.py checks
the savepoint-free way this is done against the savepoint per write it replaced)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from gateway.core.errors import BadRequest, Conflict, StoreError
from gateway.store.fhir import SqliteFhirRepository, _Writer
from tests.fhir.conftest import INS, patient

VISITS = "urn:oid:1.2.250.1.71.4.2.9"


def rows(path: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def entry(method: str, url: str, resource: dict[str, Any] | None = None, **request: str) -> dict[str, Any]:
    e: dict[str, Any] = {"request": {"method": method, "url": url, **request}}
    if resource is not None:
        e["resource"] = resource
    return e


def transaction(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}


def admission(ins: str, visit: str) -> dict[str, Any]:
    """What an ADT^A01 becomes: a Patient found by INS or created, and its Encounter by visit number."""
    pat_url = f"urn:uuid:pat-{ins}"
    return transaction(
        {**entry("PUT", f"Patient?identifier={INS}|{ins}", patient(ins=ins)), "fullUrl": pat_url},
        entry(
            "PUT",
            f"Encounter?identifier={VISITS}|{visit}",
            {
                "resourceType": "Encounter",
                "identifier": [{"system": VISITS, "value": visit}],
                "status": "in-progress",
                "class": {"code": "IMP"},
                "subject": {"reference": pat_url},
            },
        ),
    )


def statuses(answer: dict[str, Any]) -> list[str]:
    return [e["response"]["status"] for e in answer["entry"]]


async def test_concurrent_transactions_share_commits(repo: SqliteFhirRepository, tmp_path: Path) -> None:
    before = repo.commits
    answers = await asyncio.gather(
        *(repo.transaction(admission(f"28407751{i:05d}", f"V-{i}")) for i in range(100))
    )
    assert all(statuses(a) == ["201 Created", "201 Created"] for a in answers)
    assert repo.commits - before == 1  # submitted in one loop turn: one batch, one commit
    assert rows(tmp_path / "fhir.db", "SELECT type, COUNT(*) FROM resources GROUP BY type") == [
        ("Encounter", 100),
        ("Patient", 100),
    ]
    # Every Encounter points at its own Patient: references were resolved inside each Bundle.
    for answer in answers[:5]:
        pat = answer["entry"][0]["response"]["location"].split("/_history")[0]
        enc_type, enc_id = answer["entry"][1]["response"]["location"].split("/")[:2]
        enc = await repo.read(enc_type, enc_id)
        assert enc is not None and enc["subject"] == {"reference": pat}


async def test_batches_are_capped(repo: SqliteFhirRepository) -> None:
    repo.max_batch = 8
    before = repo.commits
    await asyncio.gather(*(repo.update("Patient", f"p{i}", patient(ins=f"1{i:012d}")) for i in range(20)))
    assert repo.commits - before == 3  # 8 + 8 + 4
    assert repo.committed_writes >= 20


async def test_failing_bundle_in_a_batch_fails_alone(repo: SqliteFhirRepository, tmp_path: Path) -> None:
    await repo.update("Patient", "known", patient(ins="1111111111111"))
    before = repo.commits
    version_conflict = transaction(
        entry("PUT", "Patient/half-written", patient(ins="2222222222222")),
        entry("PUT", "Patient/known", patient(ins="1111111111111", given="Zoé"), ifMatch='W/"7"'),
    )
    malformed = transaction(
        entry("PUT", "Patient/also-half", patient(ins="3333333333333")),
        entry("PUT", "Patient", patient()),  # PUT needs an id or a query: 400
    )
    results = await asyncio.gather(
        repo.transaction(admission("2840775000001", "V-1")),
        repo.transaction(version_conflict),
        repo.update("Patient", "single", patient(ins="4444444444444")),
        repo.transaction(malformed),
        repo.transaction(admission("2840775000002", "V-2")),
        return_exceptions=True,
    )
    assert repo.commits - before == 1  # all five went through one transaction
    good1, conflict, single, bad_request, good2 = results
    assert isinstance(conflict, Conflict) and "Bundle.entry[1]" in conflict.message
    assert isinstance(bad_request, BadRequest) and bad_request.location == "Bundle.entry[1].request.url"
    assert isinstance(good1, dict) and statuses(good1) == ["201 Created", "201 Created"]
    assert isinstance(good2, dict) and statuses(good2) == ["201 Created", "201 Created"]
    assert isinstance(single, tuple) and single[1] is True
    # The failing Bundles left nothing: no resource, no version, no index row.
    db = tmp_path / "fhir.db"
    for table in ("resources", "resource_versions", "search_index"):
        assert rows(db, f"SELECT COUNT(*) FROM {table} WHERE id IN ('half-written', 'also-half')") == [(0,)]  # noqa: S608
    known = await repo.read("Patient", "known")
    assert known is not None and known["meta"]["versionId"] == "1" and known["name"][0]["given"] == ["Amélie"]
    assert rows(db, "SELECT type, COUNT(*) FROM resources GROUP BY type") == [
        ("Encounter", 2),
        ("Patient", 4),
    ]


async def test_same_resource_twice_in_one_batch_gets_consecutive_versions(repo: SqliteFhirRepository) -> None:
    before = repo.commits
    first, second = await asyncio.gather(
        repo.transaction(transaction(entry("PUT", "Patient/p", patient(given="Léa")))),
        repo.transaction(transaction(entry("PUT", "Patient/p", patient(given="Léonie")))),
    )
    assert repo.commits - before == 1
    assert first["entry"][0]["response"]["location"] == "Patient/p/_history/1"
    assert second["entry"][0]["response"]["location"] == "Patient/p/_history/2"
    third, _ = await asyncio.gather(
        repo.transaction(transaction(entry("PUT", "Patient/p", patient(given="Lise")))),
        repo.update("Patient", "other", patient(ins="1234567890123")),
    )
    assert third["entry"][0]["response"]["location"] == "Patient/p/_history/3"
    current = await repo.read("Patient", "p")
    assert (
        current is not None
        and current["meta"]["versionId"] == "3"
        and current["name"][0]["given"] == ["Lise"]
    )
    # Applied in the order submitted: the later write wins, and times follow versions.
    history = await asyncio.to_thread(
        rows,
        repo.path,
        "SELECT version_id, last_updated FROM resource_versions"
        " WHERE type='Patient' AND id='p' ORDER BY version_id",
    )
    assert [v for v, _ in history] == [1, 2, 3]
    assert [t for _, t in history] == sorted(t for _, t in history)


async def test_replay_in_a_batch_creates_no_new_version(repo: SqliteFhirRepository, tmp_path: Path) -> None:
    message = admission("2840775123456", "V-2024-001")
    await repo.transaction(message)
    db = tmp_path / "fhir.db"
    versions = rows(db, "SELECT COUNT(*) FROM resource_versions")
    before = repo.commits
    # The same message replayed twice, alongside a new one, all in one batch.
    replay1, fresh, replay2 = await asyncio.gather(
        repo.transaction(message),
        repo.transaction(admission("2840775999999", "V-2024-002")),
        repo.transaction(message),
    )
    assert repo.commits - before == 1
    assert statuses(replay1) == statuses(replay2) == ["200 OK", "200 OK"]
    assert [e["response"]["location"] for e in replay1["entry"]] == [
        e["response"]["location"] for e in replay2["entry"]
    ]
    assert all(e["response"]["location"].endswith("/_history/1") for e in replay1["entry"])
    assert statuses(fresh) == ["201 Created", "201 Created"]
    assert rows(db, "SELECT COUNT(*) FROM resource_versions") == [(versions[0][0] + 2,)]


async def test_two_new_bundles_for_one_patient_in_a_batch_find_each_other(repo: SqliteFhirRepository) -> None:
    """The second Bundle's conditional PUT sees the Patient the first one created moments before."""
    first, second = await asyncio.gather(
        repo.transaction(admission("2840775123456", "V-1")),
        repo.transaction(admission("2840775123456", "V-2")),
    )
    assert statuses(first) == ["201 Created", "201 Created"]
    assert statuses(second) == ["200 OK", "201 Created"]
    assert (await repo.search("Patient", [("identifier", f"{INS}|2840775123456")])).total == 1


async def test_a_write_resolves_only_once_committed(repo: SqliteFhirRepository, tmp_path: Path) -> None:
    async def write_then_look(i: int) -> int:
        await repo.update("Patient", f"d{i}", patient(ins=f"9{i:012d}"))
        # Another connection sees it as soon as the caller is told.
        found = await asyncio.to_thread(
            rows, tmp_path / "fhir.db", "SELECT COUNT(*) FROM resources WHERE id=?", f"d{i}"
        )
        return int(found[0][0])

    assert await asyncio.gather(*(write_then_look(i) for i in range(10))) == [1] * 10


async def test_an_abandoned_transaction_reruns_each_write_alone(repo: SqliteFhirRepository) -> None:
    """When SQLite gives up the whole transaction (I/O error, disk full), the others are not lost."""

    def broken(w: _Writer) -> None:
        w.conn.execute("ROLLBACK")  # what SQLite does by itself on some errors
        raise sqlite3.OperationalError("disk I/O error")

    a, lost, b = await asyncio.gather(
        repo.create(patient(ins="1000000000001")),
        repo._write(broken),
        repo.create(patient(ins="1000000000002")),
        return_exceptions=True,
    )
    assert isinstance(lost, StoreError)
    assert isinstance(a, tuple) and isinstance(b, tuple)
    assert (await repo.search("Patient", [])).total == 2  # each stored once, not twice


async def test_close_writes_what_was_queued(tmp_path: Path) -> None:
    repo = SqliteFhirRepository(tmp_path / "fhir.db")
    await repo.open()
    tasks = [
        asyncio.ensure_future(repo.update("Patient", f"q{i}", patient(ins=f"5{i:012d}"))) for i in range(5)
    ]
    await asyncio.sleep(0)  # queued, not yet applied
    await repo.close()
    assert all(t.done() and not t.exception() for t in tasks)
    assert rows(tmp_path / "fhir.db", "SELECT COUNT(*) FROM resources") == [(5,)]
    with pytest.raises(StoreError):
        await repo.update("Patient", "late", patient())
