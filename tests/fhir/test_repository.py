"""The SQLite FHIR repository: versions, idempotent writes, search, transactions and batches."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.core.errors import BadRequest, Conflict, MethodNotAllowed, NotFound
from gateway.fhir.resource import ID_RE
from gateway.store.fhir import (
    _SCHEMA,
    SqliteFhirRepository,
    match_ids,
    run_search,
)
from gateway.store.fhir_common import parse_search
from tests.fhir.conftest import INS, IPP, Clock, patient

# -- helpers ------------------------------------------------------------------------------------


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def counts(path: Path) -> tuple[int, int, int]:
    """(current resources, stored versions, index rows): what a no-op must leave untouched."""
    return (
        rows(path, "SELECT COUNT(*) FROM resources")[0][0],
        rows(path, "SELECT COUNT(*) FROM resource_versions")[0][0],
        rows(path, "SELECT COUNT(*) FROM search_index")[0][0],
    )


def encounter(patient_ref: str, visit: str = "V-2024-001", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "identifier": [{"system": "urn:oid:1.2.250.1.71.4.2.9", "value": visit}],
        "status": "in-progress",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
        "subject": {"reference": patient_ref},
        **extra,
    }


def observation(subject: str, enc: str | None = None, code: str = "8867-4") -> dict[str, Any]:
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": subject},
        "valueQuantity": {"value": 72, "unit": "/min"},
    }
    if enc:
        obs["encounter"] = {"reference": enc}
    return obs


def entry(method: str, url: str, resource: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    e: dict[str, Any] = {"request": {"method": method, "url": url}}
    if resource is not None:
        e["resource"] = resource
    for key, value in extra.items():
        if key in ("ifNoneExist", "ifMatch"):
            e["request"][key] = value
        else:
            e[key] = value
    return e


def bundle(kind: str, *entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def ids(result: Any) -> set[str]:
    return {r["id"] for r in result.matches}


# -- create, read, update, delete, versions -------------------------------------------------------


async def test_create_assigns_id_version_and_last_updated(repo: SqliteFhirRepository, clock: Clock) -> None:
    clock.set("2024-05-14T09:00:00+00:00")
    stored, created = await repo.create({**patient(), "id": "ignored-by-create"})
    assert created
    assert stored["id"] != "ignored-by-create" and ID_RE.fullmatch(stored["id"])
    assert stored["meta"] == {"versionId": "1", "lastUpdated": "2024-05-14T09:00:00.000000Z"}
    assert await repo.read("Patient", stored["id"]) == stored
    assert await repo.read("Patient", "absent") is None
    assert await repo.read("Observation", stored["id"]) is None


async def test_update_makes_versions_and_keeps_history(repo: SqliteFhirRepository, tmp_path: Path) -> None:
    first, created = await repo.update("Patient", "pat-1", patient(family="Martin"))
    assert created and first["meta"]["versionId"] == "1" and first["id"] == "pat-1"
    second, created = await repo.update("Patient", "pat-1", patient(family="Martin-Lefèvre"))
    assert not created
    assert second["meta"]["versionId"] == "2"
    assert second["meta"]["lastUpdated"] > first["meta"]["lastUpdated"]
    assert (await repo.read("Patient", "pat-1")) == second
    history = rows(tmp_path / "fhir.db", "SELECT version_id, deleted FROM resource_versions ORDER BY 1")
    assert history == [(1, 0), (2, 0)]


async def test_unchanged_update_writes_nothing(
    repo: SqliteFhirRepository, tmp_path: Path, clock: Clock
) -> None:
    stored, _ = await repo.update("Patient", "pat-1", patient(meta={"profile": ["http://fr-core/Patient"]}))
    before = counts(tmp_path / "fhir.db")
    clock.set("2030-01-01T00:00:00+00:00")
    # Server-owned meta differs (as when a client echoes what it read): still the same content.
    again = patient(
        meta={"profile": ["http://fr-core/Patient"], "versionId": "7", "lastUpdated": "2001-01-01"}
    )
    replayed, created = await repo.update("Patient", "pat-1", again)
    assert not created
    assert replayed == stored
    assert counts(tmp_path / "fhir.db") == before


async def test_update_keeps_client_meta_and_puts_server_meta_first(repo: SqliteFhirRepository) -> None:
    stored, _ = await repo.update("Patient", "p", patient(meta={"source": "urn:hopital-a"}))
    assert list(stored)[:3] == ["resourceType", "id", "meta"]
    assert stored["meta"]["source"] == "urn:hopital-a"


async def test_update_rejects_a_mismatched_id_or_type(repo: SqliteFhirRepository) -> None:
    with pytest.raises(BadRequest):
        await repo.update("Patient", "a", {**patient(), "id": "b"})
    with pytest.raises(BadRequest):
        await repo.update("Observation", "a", patient())
    with pytest.raises(BadRequest):
        await repo.update("Patient", "not an id!", patient())


async def test_if_match_detects_version_conflicts(repo: SqliteFhirRepository) -> None:
    await repo.update("Patient", "p", patient())
    await repo.update("Patient", "p", patient(family="Bernard"), if_match='W/"1"')
    with pytest.raises(Conflict, match="version 2"):
        await repo.update("Patient", "p", patient(family="Roux"), if_match='W/"1"')
    with pytest.raises(Conflict):
        await repo.update("Patient", "nobody", patient(), if_match='W/"1"')


async def test_delete_then_recreate(repo: SqliteFhirRepository, tmp_path: Path) -> None:
    await repo.update("Patient", "p", patient())
    assert await repo.delete("Patient", "p")
    assert await repo.read("Patient", "p") is None
    assert await repo.is_deleted("Patient", "p")
    assert not await repo.is_deleted("Patient", "never")
    assert not await repo.delete("Patient", "p")  # already gone: idempotent, no new version
    assert (await repo.search("Patient", [("identifier", f"{INS}|2840775123456")])).total == 0
    again, created = await repo.update("Patient", "p", patient())
    assert created and again["meta"]["versionId"] == "3"
    history = rows(tmp_path / "fhir.db", "SELECT version_id, deleted, body IS NULL FROM resource_versions")
    assert sorted(history) == [(1, 0, 0), (2, 1, 1), (3, 0, 0)]


async def test_concurrent_updates_get_consecutive_versions(repo: SqliteFhirRepository) -> None:
    await asyncio.gather(*(repo.update("Patient", "p", patient(given=f"Léa{i}")) for i in range(20)))
    current = await repo.read("Patient", "p")
    assert current is not None and current["meta"]["versionId"] == "20"


async def test_another_connection_sees_writes_and_waits_for_the_lock(
    repo: SqliteFhirRepository, tmp_path: Path
) -> None:
    other = SqliteFhirRepository(tmp_path / "fhir.db")
    await other.open()
    try:
        await other.update("Patient", "from-worker", patient())
        assert await repo.read("Patient", "from-worker") is not None
        await repo.update("Patient", "from-worker", patient(family="Girard"))
        current = await other.read("Patient", "from-worker")
        assert current is not None and current["meta"]["versionId"] == "2"
    finally:
        await other.close()


async def test_conditional_create(repo: SqliteFhirRepository) -> None:
    first, created = await repo.create(patient(), if_none_exist=f"identifier={INS}|2840775123456")
    assert created
    second, created = await repo.create(patient(), if_none_exist=f"Patient?identifier={INS}|2840775123456")
    assert not created and second == first
    await repo.create(patient(ins="2840775123456", ipp="42"))
    with pytest.raises(Conflict, match="more than one"):
        await repo.create(patient(), if_none_exist=f"identifier={INS}|2840775123456")
    with pytest.raises(BadRequest):
        await repo.create(patient(), if_none_exist="_count=3")  # no criteria at all


async def test_conditional_update(repo: SqliteFhirRepository) -> None:
    query = f"identifier={IPP}|IPP-001"
    made, created = await repo.conditional_update("Patient", query, patient(ipp="IPP-001"))
    assert created and made["meta"]["versionId"] == "1"
    changed, created = await repo.conditional_update("Patient", query, patient(ipp="IPP-001", gender="other"))
    assert not created and changed["id"] == made["id"] and changed["meta"]["versionId"] == "2"
    with pytest.raises(BadRequest):
        await repo.conditional_update("Patient", query, {**patient(ipp="IPP-001"), "id": "someone-else"})
    await repo.update("Patient", "twin", patient(ipp="IPP-001"))
    with pytest.raises(Conflict):
        await repo.conditional_update("Patient", query, patient(ipp="IPP-001"))


# -- search ---------------------------------------------------------------------------------------


@pytest.fixture
async def clinic(repo: SqliteFhirRepository, clock: Clock) -> dict[str, str]:
    """Two patients, an encounter each, observations; each written on its own day."""
    clock.set("2024-05-01T10:00:00+00:00")
    await repo.update("Patient", "amelie", patient(ins="2840775123456", ipp="IPP-001"))
    clock.set("2024-05-02T10:00:00+00:00")
    await repo.update("Patient", "hugo", patient("Moreau", "Hugo", ins="1920375999001", ipp="IPP-002"))
    clock.set("2024-05-03T10:00:00+00:00")
    await repo.update("Encounter", "enc-a", encounter("Patient/amelie"))
    clock.set("2024-05-04T10:00:00+00:00")
    await repo.update("Encounter", "enc-h", encounter("Patient/hugo", "V-2024-002"))
    clock.set("2024-05-05T10:00:00+00:00")
    await repo.update("Observation", "obs-a1", observation("Patient/amelie", "Encounter/enc-a"))
    clock.set("2024-05-06T10:00:00+00:00")
    await repo.update("Observation", "obs-a2", observation("Patient/amelie", code="8310-5"))
    clock.set("2024-05-07T10:00:00+00:00")
    await repo.update("Observation", "obs-h1", observation("Patient/hugo", "Encounter/enc-h"))
    clock.set("2024-05-08T10:00:00+00:00")
    await repo.update("Observation", "obs-g", observation("Group/ward-3"))
    return {}


@pytest.mark.usefixtures("clinic")
async def test_search_by_id_and_identifier(repo: SqliteFhirRepository) -> None:
    assert ids(await repo.search("Patient", [("_id", "amelie")])) == {"amelie"}
    assert ids(await repo.search("Patient", [("_id", "amelie,hugo,nobody")])) == {"amelie", "hugo"}
    assert ids(await repo.search("Patient", [("identifier", f"{INS}|1920375999001")])) == {"hugo"}
    assert ids(await repo.search("Patient", [("identifier", "IPP-001")])) == {"amelie"}
    assert ids(await repo.search("Patient", [("identifier", f"{IPP}|")])) == {"amelie", "hugo"}
    assert ids(await repo.search("Patient", [("identifier", f"{INS}|IPP-001")])) == set()
    assert ids(await repo.search("Patient", [("identifier", "IPP-001,IPP-002")])) == {"amelie", "hugo"}
    # Repeated parameters are ANDed.
    both = [("identifier", f"{IPP}|IPP-001"), ("identifier", f"{INS}|2840775123456")]
    assert ids(await repo.search("Patient", both)) == {"amelie"}
    clash = [("identifier", f"{IPP}|IPP-001"), ("identifier", f"{INS}|1920375999001")]
    assert ids(await repo.search("Patient", clash)) == set()


async def test_search_identifier_without_system(repo: SqliteFhirRepository) -> None:
    await repo.update("Patient", "nosys", {"resourceType": "Patient", "identifier": [{"value": "X1"}]})
    await repo.update(
        "Patient", "sys", {"resourceType": "Patient", "identifier": [{"system": "s", "value": "X1"}]}
    )
    assert ids(await repo.search("Patient", [("identifier", "|X1")])) == {"nosys"}
    assert ids(await repo.search("Patient", [("identifier", "X1")])) == {"nosys", "sys"}


@pytest.mark.usefixtures("clinic")
async def test_search_by_reference(repo: SqliteFhirRepository) -> None:
    assert ids(await repo.search("Observation", [("subject", "Patient/amelie")])) == {"obs-a1", "obs-a2"}
    assert ids(await repo.search("Observation", [("subject", "ward-3")])) == {"obs-g"}
    # ``patient`` is indexed from a Patient subject, never from a Group one.
    assert ids(await repo.search("Observation", [("patient", "amelie")])) == {"obs-a1", "obs-a2"}
    assert ids(await repo.search("Observation", [("patient", "Group/ward-3")])) == set()
    assert ids(await repo.search("Observation", [("patient", "amelie,hugo")])) == {
        "obs-a1",
        "obs-a2",
        "obs-h1",
    }
    assert ids(await repo.search("Observation", [("encounter", "Encounter/enc-a")])) == {"obs-a1"}
    assert ids(await repo.search("Observation", [("encounter", "enc-h")])) == {"obs-h1"}
    assert ids(await repo.search("Encounter", [("patient", "Patient/hugo")])) == {"enc-h"}
    absolute = [("subject", "http://example.org/fhir/Patient/hugo")]
    assert ids(await repo.search("Observation", absolute)) == {"obs-h1"}


@pytest.mark.usefixtures("clinic")
async def test_chained_identifier_search(repo: SqliteFhirRepository) -> None:
    by_ins = await repo.search("Observation", [("patient.identifier", f"{INS}|2840775123456")])
    assert ids(by_ins) == {"obs-a1", "obs-a2"}
    by_ipp = await repo.search("Encounter", [("subject.identifier", "IPP-002")])
    assert ids(by_ipp) == {"enc-h"}
    assert (await repo.search("Observation", [("patient.identifier", f"{INS}|0000")])).total == 0
    # Once the Patient is deleted its identifiers select nothing.
    await repo.delete("Patient", "amelie")
    assert (await repo.search("Observation", [("patient.identifier", "IPP-001")])).total == 0


@pytest.mark.usefixtures("clinic")
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-05-05", {"obs-a1"}),
        ("eq2024-05-05", {"obs-a1"}),
        ("ge2024-05-06", {"obs-a2", "obs-h1", "obs-g"}),
        ("gt2024-05-06", {"obs-h1", "obs-g"}),
        ("le2024-05-06", {"obs-a1", "obs-a2"}),
        ("lt2024-05-06", {"obs-a1"}),
        ("gt2024-05-06T10:00:00Z", {"obs-h1", "obs-g"}),
        ("ge2024-05-06T10:00:00Z", {"obs-a2", "obs-h1", "obs-g"}),
        ("ge2024-05-06T12:00:00+02:00", {"obs-a2", "obs-h1", "obs-g"}),  # the same instant as 10:00Z
        ("ge2024-05-06T12:00:00 02:00", {"obs-a2", "obs-h1", "obs-g"}),  # '+' decoded as a space
        ("lt2024-05-06T10:00:00.001Z", {"obs-a1", "obs-a2"}),
        ("eq2024-05", {"obs-a1", "obs-a2", "obs-h1", "obs-g"}),
        ("eq2023", set()),
        ("lt2024-05-06,gt2024-05-07", {"obs-a1", "obs-g"}),  # comma: OR
    ],
)
async def test_last_updated_prefixes(repo: SqliteFhirRepository, value: str, expected: set[str]) -> None:
    assert ids(await repo.search("Observation", [("_lastUpdated", value)])) == expected


@pytest.mark.usefixtures("clinic")
async def test_last_updated_range_is_anded(repo: SqliteFhirRepository) -> None:
    window = [("_lastUpdated", "ge2024-05-06"), ("_lastUpdated", "lt2024-05-08")]
    assert ids(await repo.search("Observation", window)) == {"obs-a2", "obs-h1"}


@pytest.mark.usefixtures("clinic")
async def test_include_returns_referenced_resources(repo: SqliteFhirRepository) -> None:
    result = await repo.search(
        "Observation",
        [("patient", "amelie"), ("_include", "Observation:patient"), ("_include", "Observation:encounter")],
    )
    assert ids(result) == {"obs-a1", "obs-a2"}
    assert sorted((r["resourceType"], r["id"]) for r in result.included) == [
        ("Encounter", "enc-a"),
        ("Patient", "amelie"),
    ]
    typed = await repo.search("Observation", [("_include", "Observation:subject:Patient")])
    assert {r["id"] for r in typed.included} == {"amelie", "hugo"}  # not the Group, which is not stored


@pytest.mark.usefixtures("clinic")
async def test_paging_sort_and_total(repo: SqliteFhirRepository) -> None:
    first = await repo.search("Observation", [("_count", "3")])
    assert first.total == 4 and first.count == 3
    assert [r["id"] for r in first.matches] == ["obs-a1", "obs-a2", "obs-h1"]
    rest = await repo.search("Observation", [("_count", "3"), ("_offset", "3")])
    assert [r["id"] for r in rest.matches] == ["obs-g"] and rest.total == 4
    newest = await repo.search("Observation", [("_sort", "-_lastUpdated")], count=2)
    assert [r["id"] for r in newest.matches] == ["obs-g", "obs-h1"]
    only_total = await repo.search("Observation", [("_count", "0")])
    assert only_total.matches == [] and only_total.total == 4
    capped = await repo.search("Observation", [("_count", "100000")])
    assert capped.count == 500


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ([("name", "Lefèvre")], "name"),
        ([("identifier:exact", "x")], "identifier:exact"),
        ([("_lastUpdated", "sa2024")], "_lastUpdated"),
        ([("_lastUpdated", "2024-13-01")], "_lastUpdated"),
        ([("_count", "-1")], "_count"),
        ([("_count", "1"), ("_count", "2")], "_count"),
        ([("_sort", "name")], "_sort"),
        ([("_include", "Observation:performer")], "_include"),
        ([("_include", "Patient:patient")], "_include"),
        ([("identifier", "a|b|c")], "identifier"),
        ([("subject", "not a reference")], "subject"),
    ],
)
async def test_unsupported_search_is_a_bad_request_naming_the_parameter(
    repo: SqliteFhirRepository, params: list[tuple[str, str]], named: str
) -> None:
    with pytest.raises(BadRequest) as info:
        await repo.search("Observation", params)
    assert info.value.location == named


async def test_empty_values_are_ignored(repo: SqliteFhirRepository) -> None:
    await repo.update("Patient", "p", patient())
    assert (await repo.search("Patient", [("identifier", ""), ("_id", "")])).total == 1


# -- transactions and batches -------------------------------------------------------------------


def admission(visit: str = "V-2024-001") -> dict[str, Any]:
    """What an ADT^A01 becomes: a Patient found by INS or created, and its Encounter."""
    return bundle(
        "transaction",
        entry(
            "POST",
            "Patient",
            patient(),
            fullUrl="urn:uuid:5f0d6a3e-0000-4000-8000-000000000001",
            ifNoneExist=f"identifier={INS}|2840775123456",
        ),
        entry(
            "PUT",
            f"Encounter?identifier=urn:oid:1.2.250.1.71.4.2.9|{visit}",
            encounter("urn:uuid:5f0d6a3e-0000-4000-8000-000000000001", visit),
            fullUrl="urn:uuid:5f0d6a3e-0000-4000-8000-000000000002",
        ),
        entry(
            "POST",
            "Observation",
            {
                **observation("urn:uuid:5f0d6a3e-0000-4000-8000-000000000001"),
                "encounter": {"reference": "urn:uuid:5f0d6a3e-0000-4000-8000-000000000002"},
                "performer": [{"reference": "urn:uuid:5f0d6a3e-0000-4000-8000-000000000001"}],
            },
            ifNoneExist="identifier=urn:obs|O-1",
        ),
    )


def _with_obs_identifier(b: dict[str, Any]) -> dict[str, Any]:
    b["entry"][2]["resource"]["identifier"] = [{"system": "urn:obs", "value": "O-1"}]
    return b


async def test_transaction_resolves_urn_uuid_references(repo: SqliteFhirRepository) -> None:
    answer = await repo.transaction(_with_obs_identifier(admission()))
    assert answer["type"] == "transaction-response"
    statuses = [e["response"]["status"] for e in answer["entry"]]
    assert statuses == ["201 Created", "201 Created", "201 Created"]
    locations = [e["response"]["location"] for e in answer["entry"]]
    pat_id = locations[0].split("/")[1]
    enc_id = locations[1].split("/")[1]
    assert locations[0] == f"Patient/{pat_id}/_history/1"
    assert answer["entry"][0]["response"]["etag"] == 'W/"1"'
    assert answer["entry"][0]["response"]["lastModified"].endswith("Z")
    enc = await repo.read("Encounter", enc_id)
    assert enc is not None and enc["subject"] == {"reference": f"Patient/{pat_id}"}
    obs = (await repo.search("Observation", [("patient", pat_id)])).matches
    assert len(obs) == 1
    assert obs[0]["encounter"] == {"reference": f"Encounter/{enc_id}"}
    assert obs[0]["performer"] == [{"reference": f"Patient/{pat_id}"}]


async def test_replayed_transaction_changes_nothing(repo: SqliteFhirRepository, tmp_path: Path) -> None:
    first = await repo.transaction(_with_obs_identifier(admission()))
    before = counts(tmp_path / "fhir.db")
    second = await repo.transaction(_with_obs_identifier(admission()))
    assert counts(tmp_path / "fhir.db") == before
    assert [e["response"]["status"] for e in second["entry"]] == ["200 OK", "200 OK", "200 OK"]
    for a, b in zip(first["entry"], second["entry"], strict=True):
        assert a["response"]["location"] == b["response"]["location"]
        assert a["response"]["lastModified"] == b["response"]["lastModified"]


async def test_conditional_create_in_a_transaction_reuses_the_known_patient(
    repo: SqliteFhirRepository,
) -> None:
    known, _ = await repo.update("Patient", "amelie", patient())
    answer = await repo.transaction(admission())
    assert answer["entry"][0]["response"]["status"] == "200 OK"
    assert answer["entry"][0]["response"]["location"] == "Patient/amelie/_history/1"
    assert (await repo.search("Encounter", [("patient", "amelie")])).total == 1
    assert await repo.read("Patient", "amelie") == known


async def test_conditional_update_in_a_transaction_updates_the_match(repo: SqliteFhirRepository) -> None:
    await repo.update("Patient", "amelie", patient())
    await repo.update("Encounter", "enc-1", encounter("Patient/amelie"))
    changed = admission()
    changed["entry"][1]["resource"]["status"] = "finished"
    answer = await repo.transaction(changed)
    assert answer["entry"][1]["response"]["location"] == "Encounter/enc-1/_history/2"
    assert answer["entry"][1]["response"]["status"] == "200 OK"
    enc = await repo.read("Encounter", "enc-1")
    assert enc is not None and enc["status"] == "finished"


async def test_conditional_url_may_carry_a_system_url_in_its_query(repo: SqliteFhirRepository) -> None:
    rpps = {
        "resourceType": "Practitioner",
        "identifier": [{"system": "https://rpps.esante.gouv.fr", "value": "10003456789"}],
    }
    url = "Practitioner?identifier=https://rpps.esante.gouv.fr|10003456789"
    first = await repo.transaction(bundle("transaction", entry("PUT", url, rpps)))
    again = await repo.transaction(bundle("transaction", entry("PUT", url, rpps)))
    assert first["entry"][0]["response"]["status"] == "201 Created"
    assert again["entry"][0]["response"]["location"] == first["entry"][0]["response"]["location"]
    assert (
        await repo.search("Practitioner", [("identifier", "https://rpps.esante.gouv.fr|10003456789")])
    ).total == 1


async def test_transaction_is_all_or_nothing(repo: SqliteFhirRepository, tmp_path: Path) -> None:
    await repo.update("Patient", "keep", patient())
    before = counts(tmp_path / "fhir.db")
    bad = admission()
    bad["entry"].append(entry("GET", "Patient/nobody"))
    with pytest.raises(NotFound) as info:
        await repo.transaction(bad)
    assert info.value.location is not None and info.value.location.startswith("Bundle.entry[3]")
    assert "Bundle.entry[3]" in info.value.message
    assert counts(tmp_path / "fhir.db") == before


@pytest.mark.parametrize(
    ("bad", "error", "where"),
    [
        (entry("PUT", "Patient/a", {**patient(), "id": "b"}), BadRequest, "Bundle.entry[1].resource.id"),
        (entry("PATCH", "Patient/a", patient()), MethodNotAllowed, "Bundle.entry[1].request.method"),
        (entry("POST", "Patient/a", patient()), BadRequest, "Bundle.entry[1].request.url"),
        (entry("PUT", "Patient", patient()), BadRequest, "Bundle.entry[1].request.url"),
        (entry("POST", "Encounter", patient()), BadRequest, "Bundle.entry[1].resource"),
        (entry("DELETE", "http://elsewhere/Patient/a"), BadRequest, "Bundle.entry[1].request.url"),
        (entry("POST", "Patient", patient(), ifNoneExist="name=x"), BadRequest, "Bundle.entry[1]"),
        ({"resource": patient()}, BadRequest, "Bundle.entry[1].request"),
    ],
)
async def test_transaction_failures_name_the_entry(
    repo: SqliteFhirRepository, tmp_path: Path, bad: dict[str, Any], error: type[Exception], where: str
) -> None:
    with pytest.raises(error) as info:
        await repo.transaction(bundle("transaction", entry("PUT", "Patient/ok", patient()), bad))
    assert getattr(info.value, "location", None) == where
    assert counts(tmp_path / "fhir.db") == (0, 0, 0)


async def test_transaction_multiple_matches_is_a_conflict(repo: SqliteFhirRepository) -> None:
    await repo.update("Patient", "a", patient())
    await repo.update("Patient", "b", patient())
    with pytest.raises(Conflict, match=r"Bundle.entry\[0\]"):
        await repo.transaction(admission())


async def test_transaction_delete_and_get(repo: SqliteFhirRepository) -> None:
    await repo.update("Patient", "gone", patient())
    await repo.update("Patient", "stays", patient(ins="1920375999001"))
    answer = await repo.transaction(
        bundle(
            "transaction",
            entry("GET", "Patient/stays"),
            entry("DELETE", "Patient/gone"),
            entry("DELETE", "Patient/never-was"),
            entry("GET", f"Patient?identifier={INS}|1920375999001"),
        )
    )
    statuses = [e["response"]["status"] for e in answer["entry"]]
    assert statuses == ["200 OK", "204 No Content", "204 No Content", "200 OK"]
    assert answer["entry"][0]["resource"]["id"] == "stays"
    assert answer["entry"][3]["resource"]["type"] == "searchset"
    assert answer["entry"][3]["resource"]["total"] == 1
    assert await repo.read("Patient", "gone") is None


async def test_batch_entries_succeed_or_fail_alone(repo: SqliteFhirRepository) -> None:
    answer = await repo.transaction(
        bundle(
            "batch",
            entry("PUT", "Patient/ok-1", patient()),
            entry("GET", "Patient/nobody"),
            entry("PUT", "Patient/bad", {**patient(), "id": "other"}),
            {"request": {"method": "POST"}},
            entry("PUT", "Patient/ok-2", patient(ins="1920375999001")),
        )
    )
    assert answer["type"] == "batch-response"
    statuses = [e["response"]["status"] for e in answer["entry"]]
    assert statuses == ["201 Created", "404 Not Found", "400 Bad Request", "400 Bad Request", "201 Created"]
    outcome = answer["entry"][1]["response"]["outcome"]
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["expression"] == ["Bundle.entry[1].request.url"]
    assert await repo.read("Patient", "ok-1") is not None
    assert await repo.read("Patient", "ok-2") is not None
    assert await repo.read("Patient", "bad") is None


async def test_batch_entry_failing_midway_leaves_no_half_write(repo: SqliteFhirRepository) -> None:
    await repo.update("Patient", "p", patient())
    answer = await repo.transaction(
        bundle("batch", entry("PUT", "Patient/p", patient(family="Neuf"), ifMatch='W/"9"'))
    )
    assert answer["entry"][0]["response"]["status"] == "409 Conflict"
    current = await repo.read("Patient", "p")
    assert current is not None and current["meta"]["versionId"] == "1"


@pytest.mark.parametrize(
    "not_a_bundle",
    [
        {"resourceType": "Patient"},
        {"resourceType": "Bundle", "type": "collection"},
        {"resourceType": "Bundle", "type": "batch", "entry": {"x": 1}},
    ],
)
async def test_not_a_transaction_bundle(repo: SqliteFhirRepository, not_a_bundle: dict[str, Any]) -> None:
    with pytest.raises(BadRequest):
        await repo.transaction(not_a_bundle)


async def test_closed_repository_is_a_store_error(tmp_path: Path) -> None:
    from gateway.core.errors import StoreError

    r = SqliteFhirRepository(tmp_path / "f.db")
    with pytest.raises(StoreError):
        await r.read("Patient", "x")
    await r.open()
    await r.ping()
    await r.close()
    await r.close()  # twice is harmless
    with pytest.raises(StoreError):
        await r.update("Patient", "x", patient())


# -- property: the search-parameter parser never crashes ----------------------------------------

NAMES = [
    "_id",
    "identifier",
    "patient",
    "subject",
    "encounter",
    "patient.identifier",
    "subject.identifier",
    "_lastUpdated",
    "_count",
    "_offset",
    "_include",
    "_sort",
]
# Pieces that reach the parser's branches (prefixes, dates, escapes, references) more often than noise.
PIECES = [*"|,\\/:.-+ Tgelqt0123456789ZPaé%*?[]_'\";\x00", "Patient/", "2024-05-06", "T10:00", "Observation:"]
VALUES = st.lists(st.sampled_from(PIECES), max_size=12).map("".join)


@pytest.fixture(scope="module")
def schema_conn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(tmp_path_factory.mktemp("prop") / "fhir.db", isolation_level=None)
    conn.executescript(_SCHEMA)
    conn.execute(
        "INSERT INTO resources VALUES ('Observation', 'o1', 1, '2024-05-01T00:00:00.000000Z', 0, ?)",
        (b'{"resourceType":"Observation","id":"o1"}',),
    )
    conn.execute("INSERT INTO search_index VALUES ('Observation', 'o1', 'patient', '', 'Patient/p1')")
    yield conn
    conn.close()


@settings(database=None, deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.one_of(st.sampled_from(NAMES), st.text(max_size=12)),
            st.one_of(st.text(max_size=30), VALUES),
        ),
        max_size=5,
    ),
    st.sampled_from(["Observation", "Patient", "patient", "", "Obs/x"]),
)
@example([("_lastUpdated", "gt9999")], "Observation")
@example([("_lastUpdated", "lt0001-01-01T00:00:00+14:00")], "Observation")
@example([("_count", "99999999999")], "Observation")
@example([("patient", "\\,")], "Observation")
def test_search_parser_gives_a_result_or_a_bad_request(
    schema_conn: sqlite3.Connection, params: list[tuple[str, str]], type_: str
) -> None:
    try:
        query = parse_search(type_, params)
    except BadRequest:
        return  # a 400 OperationOutcome at the HTTP boundary
    result = run_search(schema_conn, query)
    assert 0 <= len(result.matches) <= result.total <= 1
    assert 0 <= result.count <= 500


@settings(database=None, deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=60), VALUES.map(lambda v: f"patient={v}&_lastUpdated={v}")))
@example("Observation?patient=p1")
@example("?&=&")
def test_conditional_criteria_give_ids_or_a_bad_request(schema_conn: sqlite3.Connection, query: str) -> None:
    try:
        found = match_ids(schema_conn, "Observation", query)
    except BadRequest:
        return
    assert found in ([], ["o1"])
