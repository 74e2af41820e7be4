"""The FhirRepository contract (gateway.store.fhir_common), on SQLite and PostgreSQL.

Reads, versioned writes, conditional writes, search and paging, transaction and batch Bundles,
the export scan, and the versions the repository keeps (served as vread and history through the
document store on the same tables). Then the validation of every write path, through HTTP.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.core.errors import BadRequest, Conflict, NotFound, StoreError
from gateway.store.documents import BaseDocumentStore
from gateway.store.fhir import SqliteFhirRepository
from gateway.store.fhir_common import FhirRepository
from gateway.store.pg_fhir import PgFhirRepository
from tests.contracts.conftest import Repository
from tests.fhir.conftest import INS, IPP, Clock, patient
from tests.fhir.conftest import client as client  # the HTTP client on this module's ``repo``

# Moved here so that they run on every backend: the write paths validate, versions read back.
from tests.fhir.test_write_validation import (  # noqa: F401
    test_every_page_of_what_was_written_reads_back_valid,
    test_invalid_resources_are_refused_on_every_write_path,
    test_location_headers_and_transaction_answers_resolve,
)

AMELIE = "2840775123456"
HUGO = "1920375999001"


def observation(subject: str, code: str = "8867-4", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": subject},
        "valueQuantity": {"value": 72, "unit": "/min"},
        **extra,
    }


def entry(method: str, url: str, resource: dict[str, Any] | None = None, **request: str) -> dict[str, Any]:
    e: dict[str, Any] = {"request": {"method": method, "url": url, **request}}
    if resource is not None:
        e["resource"] = resource
    return e


def bundle(kind: str, *entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def ids(found: Any) -> list[str]:
    return [r["id"] for r in found.matches]


# -- create, read, update, delete -----------------------------------------------------------------


async def test_create_assigns_the_id_and_the_first_version(repo: FhirRepository, clock: Clock) -> None:
    clock.set("2024-05-14T09:00:00+00:00")
    stored, created = await repo.create({**patient(), "id": "chosen-by-client"})
    assert created and stored["id"] != "chosen-by-client"
    assert stored["meta"] == {"versionId": "1", "lastUpdated": "2024-05-14T09:00:00.000000Z"}
    assert stored["name"] == [{"family": "Lefèvre", "given": ["Amélie"]}]
    assert await repo.read("Patient", stored["id"]) == stored
    assert await repo.read("Patient", "absent") is None
    assert await repo.read("Observation", stored["id"]) is None


async def test_update_creates_then_versions(repo: FhirRepository) -> None:
    first, created = await repo.update("Patient", "pat-1", patient(family="Martin"))
    assert created and (first["id"], first["meta"]["versionId"]) == ("pat-1", "1")
    second, created = await repo.update("Patient", "pat-1", patient(family="Martin-Lefèvre"))
    assert not created and second["meta"]["versionId"] == "2"
    assert second["meta"]["lastUpdated"] > first["meta"]["lastUpdated"]
    assert await repo.read("Patient", "pat-1") == second


async def test_unchanged_content_writes_no_new_version(
    repo: FhirRepository, documents: BaseDocumentStore, clock: Clock
) -> None:
    stored, _ = await repo.update("Patient", "p", patient(meta={"profile": ["http://fr-core/Patient"]}))
    clock.set("2030-01-01T00:00:00+00:00")
    # Server meta echoed back differs, the content does not.
    echoed = patient(meta={"profile": ["http://fr-core/Patient"], "versionId": "9", "lastUpdated": "2001"})
    assert await repo.update("Patient", "p", echoed) == (stored, False)
    assert [v.version for v in await documents.versions("Patient", "p")] == [1]


async def test_if_match_must_name_the_current_version(repo: FhirRepository) -> None:
    await repo.update("Patient", "p", patient())
    changed, _ = await repo.update("Patient", "p", patient(family="Bernard"), if_match='W/"1"')
    assert changed["meta"]["versionId"] == "2"
    with pytest.raises(Conflict, match="version 2"):
        await repo.update("Patient", "p", patient(family="Roux"), if_match='W/"1"')
    with pytest.raises(Conflict):
        await repo.update("Patient", "nobody", patient(), if_match='W/"1"')
    current = await repo.read("Patient", "p")
    assert current is not None and current["name"][0]["family"] == "Bernard"


async def test_update_refuses_another_id_or_type(repo: FhirRepository) -> None:
    for type_, id_, resource in (
        ("Patient", "a", {**patient(), "id": "b"}),
        ("Observation", "a", patient()),
        ("Patient", "not an id!", patient()),
    ):
        with pytest.raises(BadRequest):
            await repo.update(type_, id_, resource)
    assert await repo.read("Patient", "a") is None


async def test_delete_is_a_version_and_the_id_can_be_used_again(
    repo: FhirRepository, documents: BaseDocumentStore
) -> None:
    await repo.update("Patient", "p", patient())
    assert await repo.delete("Patient", "p") is True
    assert await repo.read("Patient", "p") is None
    assert await repo.is_deleted("Patient", "p") is True
    assert await repo.delete("Patient", "p") is False  # already gone: no new version
    assert await repo.delete("Patient", "never") is False
    assert await repo.is_deleted("Patient", "never") is False
    assert (await repo.search("Patient", [("identifier", f"{INS}|{AMELIE}")])).total == 0
    again, created = await repo.update("Patient", "p", patient(family="Roux"))
    assert created and again["meta"]["versionId"] == "3"
    assert await repo.is_deleted("Patient", "p") is False
    history = await documents.versions("Patient", "p")
    assert [(v.version, v.body is None) for v in history] == [(3, False), (2, True), (1, False)]


async def test_versions_are_kept_for_vread_and_history(
    repo: FhirRepository, documents: BaseDocumentStore
) -> None:
    first, _ = await repo.update("Patient", "p", patient(family="Martin"))
    second, _ = await repo.update("Patient", "p", patient(family="Roux"))
    history = await documents.versions("Patient", "p")
    assert [v.version for v in history] == [2, 1]  # newest first
    assert [v.body for v in history] == [second, first]
    assert [v.last_updated for v in history] == [second["meta"]["lastUpdated"], first["meta"]["lastUpdated"]]
    assert await documents.versions("Patient", "never") == []


async def test_concurrent_updates_get_consecutive_versions(
    repo: FhirRepository, documents: BaseDocumentStore
) -> None:
    await asyncio.gather(*(repo.update("Patient", "p", patient(given=f"Léa{i}")) for i in range(12)))
    current = await repo.read("Patient", "p")
    assert current is not None and current["meta"]["versionId"] == "12"
    assert [v.version for v in await documents.versions("Patient", "p")] == list(range(12, 0, -1))


# -- conditional writes ---------------------------------------------------------------------------


async def test_conditional_create_reuses_a_single_match(repo: FhirRepository) -> None:
    query = f"identifier={INS}|{AMELIE}"
    first, created = await repo.create(patient(), if_none_exist=query)
    assert created
    again, created = await repo.create(patient(family="Autre"), if_none_exist=f"Patient?{query}")
    assert not created and again == first
    await repo.create(patient(ipp="42"))
    with pytest.raises(Conflict, match="more than one"):
        await repo.create(patient(), if_none_exist=query)
    with pytest.raises(BadRequest):
        await repo.create(patient(), if_none_exist="_count=3")
    assert (await repo.search("Patient", [("identifier", f"{INS}|{AMELIE}")])).total == 2


async def test_conditional_update_creates_updates_or_conflicts(repo: FhirRepository) -> None:
    query = f"identifier={IPP}|IPP-001"
    made, created = await repo.conditional_update("Patient", query, patient(ipp="IPP-001"))
    assert created and made["meta"]["versionId"] == "1"
    changed, created = await repo.conditional_update("Patient", query, patient(ipp="IPP-001", gender="other"))
    assert not created and (changed["id"], changed["meta"]["versionId"]) == (made["id"], "2")
    with pytest.raises(BadRequest):
        await repo.conditional_update("Patient", query, {**patient(ipp="IPP-001"), "id": "someone-else"})
    with pytest.raises(BadRequest):
        await repo.conditional_update("Observation", query, patient(ipp="IPP-001"))
    await repo.update("Patient", "twin", patient(ipp="IPP-001"))
    with pytest.raises(Conflict):
        await repo.conditional_update("Patient", query, patient(ipp="IPP-001", gender="male"))
    current = await repo.read("Patient", made["id"])
    assert current is not None and current["gender"] == "other"


# -- search ---------------------------------------------------------------------------------------


@pytest.fixture
async def clinic(repo: FhirRepository, clock: Clock) -> None:
    """Two patients and their observations, each written on a day of its own."""
    writes = [
        ("Patient", "amelie", patient(ins=AMELIE, ipp="IPP-001")),
        ("Patient", "hugo", patient("Moreau", "Hugo", ins=HUGO, ipp="IPP-002")),
        ("Observation", "obs-a1", observation("Patient/amelie")),
        ("Observation", "obs-a2", observation("Patient/amelie", "8310-5")),
        ("Observation", "obs-h1", observation("Patient/hugo")),
        ("Observation", "obs-g", observation("Group/ward-3")),
    ]
    for day, (type_, id_, resource) in enumerate(writes, start=1):
        clock.set(f"2024-05-0{day}T10:00:00+00:00")
        await repo.update(type_, id_, resource)


@pytest.mark.usefixtures("clinic")
async def test_search_by_id_and_identifier(repo: FhirRepository) -> None:
    assert ids(await repo.search("Patient", [("_id", "hugo")])) == ["hugo"]
    assert ids(await repo.search("Patient", [("identifier", f"{INS}|{AMELIE}")])) == ["amelie"]
    assert ids(await repo.search("Patient", [("identifier", "IPP-002")])) == ["hugo"]
    both = await repo.search("Patient", [("identifier", f"{IPP}|IPP-001,{IPP}|IPP-002")])
    assert sorted(ids(both)) == ["amelie", "hugo"] and both.total == 2
    assert (await repo.search("Patient", [("identifier", f"{IPP}|")])).total == 2
    assert (await repo.search("Patient", [("identifier", f"{INS}|nobody")])).total == 0


@pytest.mark.usefixtures("clinic")
async def test_search_by_reference_and_chained_identifier(repo: FhirRepository) -> None:
    assert sorted(ids(await repo.search("Observation", [("patient", "amelie")]))) == ["obs-a1", "obs-a2"]
    assert ids(await repo.search("Observation", [("subject", "Patient/hugo")])) == ["obs-h1"]
    assert ids(await repo.search("Observation", [("subject", "ward-3")])) == ["obs-g"]
    chained = await repo.search("Observation", [("patient.identifier", f"{INS}|{HUGO}")])
    assert ids(chained) == ["obs-h1"]


@pytest.mark.usefixtures("clinic")
async def test_search_by_last_updated(repo: FhirRepository) -> None:
    async def found(*values: str) -> list[str]:
        return sorted(ids(await repo.search("Observation", [("_lastUpdated", v) for v in values])))

    assert await found("2024-05-04") == ["obs-a2"]
    assert await found("ge2024-05-05") == ["obs-g", "obs-h1"]
    assert await found("lt2024-05-04") == ["obs-a1"]
    assert await found("gt2024-05-03", "le2024-05-05") == ["obs-a2", "obs-h1"]
    with pytest.raises(BadRequest):
        await repo.search("Observation", [("_lastUpdated", "yesterday")])


@pytest.mark.usefixtures("clinic")
async def test_paging_with_count_offset_and_total(repo: FhirRepository) -> None:
    pages = [await repo.search("Observation", [("_sort", "_lastUpdated")], count=3, offset=o) for o in (0, 3)]
    assert [ids(p) for p in pages] == [["obs-a1", "obs-a2", "obs-h1"], ["obs-g"]]
    assert [(p.total, p.count, p.offset) for p in pages] == [(4, 3, 0), (4, 3, 3)]
    newest = await repo.search("Observation", [("_sort", "-_lastUpdated"), ("_count", "2")])
    assert ids(newest) == ["obs-g", "obs-h1"] and newest.total == 4
    with_patient = await repo.search("Observation", [("_id", "obs-h1"), ("_include", "Observation:subject")])
    assert [r["id"] for r in with_patient.included] == ["hugo"]


async def test_unsupported_search_is_a_bad_request_naming_the_parameter(repo: FhirRepository) -> None:
    with pytest.raises(BadRequest) as info:
        await repo.search("Patient", [("name", "Lefèvre")])
    assert info.value.location == "name"


# -- Bundles --------------------------------------------------------------------------------------


def admission() -> dict[str, Any]:
    """A Patient found by INS or created, and an Observation that points at it by urn:uuid."""
    url = "urn:uuid:5f0d6a3e-0000-4000-8000-000000000001"
    return bundle(
        "transaction",
        {**entry("POST", "Patient", patient(), ifNoneExist=f"identifier={INS}|{AMELIE}"), "fullUrl": url},
        entry(
            "POST",
            "Observation",
            observation(url, identifier=[{"system": "urn:obs", "value": "O-1"}]),
            ifNoneExist="identifier=urn:obs|O-1",
        ),
    )


async def test_transaction_writes_every_entry_and_resolves_references(repo: FhirRepository) -> None:
    answer = await repo.transaction(admission())
    assert answer["type"] == "transaction-response"
    assert [e["response"]["status"] for e in answer["entry"]] == ["201 Created", "201 Created"]
    pat, obs = (e["response"]["location"].split("/") for e in answer["entry"])
    assert (pat[0], pat[2:], obs[0], obs[2:]) == (
        "Patient",
        ["_history", "1"],
        "Observation",
        ["_history", "1"],
    )
    stored = await repo.read("Observation", obs[1])
    assert stored is not None and stored["subject"] == {"reference": f"Patient/{pat[1]}"}
    again = await repo.transaction(admission())  # conditional creates match now
    assert [e["response"]["status"] for e in again["entry"]] == ["200 OK", "200 OK"]
    assert [e["response"]["location"] for e in again["entry"]] == [
        e["response"]["location"] for e in answer["entry"]
    ]


async def test_a_failing_transaction_writes_nothing(repo: FhirRepository) -> None:
    await repo.update("Patient", "keep", patient(ins=HUGO))
    bad = admission()
    bad["entry"].append(entry("GET", "Patient/nobody"))
    with pytest.raises(NotFound) as info:
        await repo.transaction(bad)
    assert info.value.location == "Bundle.entry[2].request.url"
    conflicting = bundle(
        "transaction",
        entry("PUT", "Patient/new", patient(ins=AMELIE)),
        entry("PUT", "Patient/keep", patient(family="Roux", ins=HUGO), ifMatch='W/"7"'),
    )
    with pytest.raises(Conflict):
        await repo.transaction(conflicting)
    assert (await repo.search("Patient", [])).total == 1
    assert await repo.read("Patient", "new") is None
    assert (await repo.search("Observation", [])).total == 0
    kept = await repo.read("Patient", "keep")
    assert kept is not None and kept["meta"]["versionId"] == "1"


async def test_batch_entries_succeed_or_fail_alone(repo: FhirRepository) -> None:
    answer = await repo.transaction(
        bundle(
            "batch",
            entry("PUT", "Patient/ok", patient()),
            entry("GET", "Patient/nobody"),
            entry("PUT", "Patient/also-ok", patient(ins=HUGO)),
        )
    )
    assert answer["type"] == "batch-response"
    statuses = [e["response"]["status"] for e in answer["entry"]]
    assert statuses[0].startswith("201") and statuses[1].startswith("404") and statuses[2].startswith("201")
    assert await repo.read("Patient", "ok") is not None and await repo.read("Patient", "also-ok") is not None


async def test_transaction_delete_and_read(repo: FhirRepository) -> None:
    await repo.update("Patient", "gone", patient())
    await repo.update("Patient", "kept", patient(ins=HUGO))
    answer = await repo.transaction(
        bundle("transaction", entry("DELETE", "Patient/gone"), entry("GET", "Patient/kept"))
    )
    first, second = answer["entry"]
    assert first["response"]["status"].startswith("204") or first["response"]["status"].startswith("200")
    assert second["resource"]["id"] == "kept"
    assert await repo.is_deleted("Patient", "gone")


async def test_not_a_transaction_or_batch_is_refused(repo: FhirRepository) -> None:
    with pytest.raises(BadRequest):
        await repo.transaction(bundle("collection", entry("PUT", "Patient/p", patient())))
    assert await repo.read("Patient", "p") is None


# -- scan, life cycle -----------------------------------------------------------------------------


async def test_scan_pages_live_resources_in_type_and_id_order(repo: FhirRepository, clock: Clock) -> None:
    clock.set("2024-05-01T10:00:00+00:00")
    for id_ in ("c", "a", "b"):
        await repo.update("Patient", id_, patient(ins=None, ipp=id_))
    await repo.update("Observation", "o1", observation("Patient/a"))
    clock.set("2024-06-01T10:00:00+00:00")
    await repo.update("Observation", "o2", observation("Patient/b"))
    await repo.delete("Patient", "c")
    assert isinstance(repo, SqliteFhirRepository | PgFhirRepository)  # scan is theirs, not the Protocol's
    scan = repo.scan

    def keys(page: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return [(r["resourceType"], r["id"]) for r in page]

    assert keys(await scan()) == [
        ("Observation", "o1"),
        ("Observation", "o2"),
        ("Patient", "a"),
        ("Patient", "b"),
    ]
    first = await scan(limit=3)
    assert keys(await scan(after=keys(first)[-1], limit=3)) == [("Patient", "b")]
    assert keys(await scan(["Patient"])) == [("Patient", "a"), ("Patient", "b")]
    assert keys(await scan(["Patient"], after=("Patient", "a"))) == [("Patient", "b")]
    assert keys(await scan(["Observation", "Patient"], after=("Observation", "o2"))) == [
        ("Patient", "a"),
        ("Patient", "b"),
    ]
    assert keys(await scan(since="2024-05-15T00:00:00.000000Z")) == [("Observation", "o2")]
    assert await scan([]) == []


async def test_ping_and_a_reopened_repository_reads_what_was_written(
    repository: Repository, clock: Clock
) -> None:
    repo = repository.repo
    await repo.ping()  # open: it answers
    stored, _ = await repo.update("Patient", "p", patient())
    await repo.close()
    with pytest.raises(StoreError):
        await repo.ping()
    with pytest.raises(StoreError):
        await repo.read("Patient", "p")
    again = repository.build(clock)
    await again.open()
    try:
        assert await again.read("Patient", "p") == stored
        changed, created = await again.update("Patient", "p", patient(family="Roux"))
        assert not created and changed["meta"]["versionId"] == "2"
    finally:
        await again.close()
    repository.repo = again
