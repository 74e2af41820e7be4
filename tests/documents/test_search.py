"""ITI-67 with every listed parameter, paging, required parameters; ITI-66; parsing properties."""

from __future__ import annotations

import string
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.errors import BadRequest
from gateway.store.documents.search import ALL_PARAMS, parse_document_search
from tests.documents.conftest import (
    CLASSES,
    CONFIDENTIALITY,
    FORMATS,
    IDNPS,
    INS,
    LOINC,
    OTHER_RPPS,
    PATIENT_INS,
    PRO_RPPS,
    SECTORS,
    SETTINGS,
    SNOMED,
    Client,
    auth,
    document,
    ids,
    location_id,
    provide_bundle,
    publish,
    search,
)

MINE = f"patient.identifier={INS}|{PATIENT_INS}&status=current"


@pytest.fixture
async def two(client: Client) -> dict[str, str]:
    """Two documents that differ in every searchable element."""
    a = document(
        master="urn:oid:1.2.250.1.999.1.1",
        date="2024-05-14T10:00:00+02:00",
        archived=False,
    )
    b = document(
        master="urn:oid:1.2.250.1.999.1.2",
        data=b"<ClinicalDocument>B</ClinicalDocument>",
        type_code="11502-2",
        category="11",
        labels=((CONFIDENTIALITY, "R"),),
        author_rpps=OTHER_RPPS,
        date="2023-01-02T08:00:00+01:00",
        archived=True,
    )
    b["content"][0]["attachment"]["creation"] = "2022-12-31T23:00:00+01:00"
    b["content"][0]["format"] = {"system": FORMATS, "code": "urn:ihe:iti:xds-sd:pdf:2008"}
    b["context"] = {
        "period": {"start": "2023-01-01T08:00:00+01:00"},
        "facilityType": {"coding": [{"system": SECTORS, "code": "SA07"}]},
        "practiceSetting": {"coding": [{"system": SETTINGS, "code": "AMBULATOIRE"}]},
        "event": [{"coding": [{"system": SNOMED, "code": "73761001"}]}],
    }
    status, answer = await publish(client, provide_bundle(a, b))
    assert status == 200, answer
    return {"a": location_id(answer["entry"][1]), "b": location_id(answer["entry"][2])}


CASES: list[tuple[str, str]] = [
    (f"type={LOINC}|11488-4", "a"),
    ("type=11502-2", "b"),
    (f"category={CLASSES}|11", "b"),
    (f"security-label={CONFIDENTIALITY}|R", "b"),
    (f"format={FORMATS}|urn:ihe:iti:xds-sd:pdf:2008", "b"),
    (f"facility={SECTORS}|SA07", "b"),
    (f"setting={SETTINGS}|ETABLISSEMENT", "a"),
    (f"event={SNOMED}|73761001", "b"),
    ("identifier=urn:ietf:rfc:3986|urn:oid:1.2.250.1.999.1.2", "b"),
    ("identifier=urn:oid:1.2.250.1.999.1.1", "a"),
    (f"author.identifier={IDNPS}|8{PRO_RPPS}", "a"),
    ("date=2024-05-14", "a"),
    ("date=lt2024-01-01", "b"),
    ("creation=ge2024-01-01", "a"),
    ("creation=2022-12-31", "b"),
    ("period=2024-05-14", "ab"),  # b's period has no end: it overlaps too
    ("period=2023-06-01", "b"),
    ("period=2022-06-01", ""),
    ("period-start=lt2024", "b"),
    ("period-end=2024-05-14", "a"),
    ("isArchived=true", "b"),
    ("isArchived=false", "a"),
]


@pytest.mark.parametrize(("query", "expected"), CASES)
async def test_each_search_parameter(client: Client, two: dict[str, str], query: str, expected: str) -> None:
    status, found = await search(client, f"{MINE}&{query}")
    assert status == 200, found
    assert sorted(ids(found)) == sorted(two[key] for key in expected), query


async def test_author_and_relates_to_by_reference(
    client: Client, two: dict[str, str], patient_id: str
) -> None:
    new = document(
        master="urn:oid:1.2.250.1.999.1.3",
        subject=f"Patient/{patient_id}",
        relatesTo=[{"code": "replaces", "target": {"reference": f"DocumentReference/{two['a']}"}}],
    )
    new["contained"] = []
    new["author"] = [{"reference": "Practitioner/pract-1"}]
    await client.put(
        "/fhir/Practitioner/pract-1",
        json={
            "resourceType": "Practitioner",
            "id": "pract-1",
            "identifier": [{"system": IDNPS, "value": "8123"}],
        },
        headers=auth("admin"),
    )
    status, answer = await publish(client, provide_bundle(new))
    assert status == 200, answer
    new_id = location_id(answer["entry"][1])
    _, found = await search(client, f"{MINE}&author=Practitioner/pract-1")
    assert ids(found) == [new_id]
    _, found = await search(client, f"{MINE}&author.identifier={IDNPS}|8123")
    assert ids(found) == [new_id]
    _, found = await search(client, f"{MINE}&relatesTo=DocumentReference/{two['a']}")
    assert ids(found) == [new_id]


async def test_patient_by_id_ins_or_ipp_give_the_same(
    client: Client, two: dict[str, str], patient_id: str
) -> None:
    results = []
    for query in (
        f"patient={patient_id}&status=current",
        f"patient=Patient/{patient_id}&status=current",
        f"patient.identifier={INS}|{PATIENT_INS}&status=current",
        "patient.identifier=urn:oid:1.2.250.1.71.4.2.7|100001&status=current",
    ):
        status, found = await search(client, query)
        assert status == 200
        results.append(sorted(ids(found)))
    assert all(r == sorted(two.values()) for r in results)


async def test_or_and_and(client: Client, two: dict[str, str]) -> None:
    _, found = await search(client, f"{MINE}&type=11488-4,11502-2")
    assert found["total"] == 2
    _, found = await search(client, f"{MINE}&type=11488-4&category=11")
    assert found["total"] == 0
    _, found = await search(client, f"{MINE}&status=current,superseded&type=11502-2")
    assert ids(found) == [two["b"]]


async def test_paging(client: Client) -> None:
    docs = [
        document(master=f"urn:oid:1.2.250.1.999.2.{i}", date=f"2024-05-{i + 1:02d}T10:00:00+02:00")
        for i in range(5)
    ]
    status, _ = await publish(client, provide_bundle(*docs))
    assert status == 200
    seen: list[str] = []
    status, page = await search(client, f"{MINE}&_count=2")
    while True:
        assert page["total"] == 5
        seen += ids(page)
        nxt = [link["url"] for link in page["link"] if link["relation"] == "next"]
        if not nxt:
            break
        resp = await client.get(
            nxt[0].split("127.0.0.1", 1)[1].split("/", 1)[1].join(["/", ""]), headers=auth("pro")
        )
        page = await resp.json(content_type=None)
    assert len(seen) == 5 and len(set(seen)) == 5
    dates = [
        d["date"] for d in (await search(client, f"{MINE}&_count=5"))[1]["entry"] for d in [d["resource"]]
    ]
    assert dates == sorted(dates, reverse=True)  # newest first


@pytest.mark.parametrize(
    ("query", "location"),
    [
        ("status=current", "patient"),
        (f"patient.identifier={INS}|{PATIENT_INS}", "status"),
        (f"{MINE}&status=bogus", "status"),
        (f"{MINE}&unknown=1", "unknown"),
        (f"{MINE}&date=notadate", "date"),
        (f"{MINE}&isArchived=maybe", "isArchived"),
        (f"{MINE}&_count=-1", "_count"),
    ],
)
async def test_bad_searches_are_400(client: Client, query: str, location: str) -> None:
    status, answer = await search(client, query)
    assert status == 400
    assert answer["resourceType"] == "OperationOutcome"
    assert answer["issue"][0]["expression"] == [location]


async def test_search_needs_a_caller(client: Client) -> None:
    resp = await client.get(f"/fhir/DocumentReference?{MINE}")
    assert resp.status == 401


async def test_iti66_lists(client: Client, two: dict[str, str], patient_id: str) -> None:
    query = f"patient.identifier={INS}|{PATIENT_INS}&code=https://profiles.ihe.net/ITI/MHD/CodeSystem/MHDlistTypes|submissionset&status=current"
    resp = await client.get(f"/fhir/List?{query}", headers=auth("pro"))
    found = await resp.json(content_type=None)
    assert resp.status == 200 and found["total"] == 1
    items = [e["item"]["reference"] for e in found["entry"][0]["resource"]["entry"]]
    assert sorted(items) == sorted(f"DocumentReference/{i}" for i in two.values())
    resp = await client.get(f"/fhir/List?patient={patient_id}&code=folder", headers=auth("pro"))
    assert (await resp.json(content_type=None))["total"] == 0
    resp = await client.get("/fhir/List?code=submissionset", headers=auth("pro"))
    assert resp.status == 400


# -- parsing properties ----------------------------------------------------------------------------

_TEXT = st.text(alphabet=string.ascii_letters + string.digits + ":/.-_|,\\$ ", max_size=30)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([*ALL_PARAMS, "bogus", "_sort"]), _TEXT), max_size=6))
def test_parsing_answers_a_query_or_a_400(params: list[tuple[str, str]]) -> None:
    """Whatever a client sends, the parser returns a query or raises BadRequest naming a parameter."""
    try:
        query = parse_document_search(params)
    except BadRequest as exc:
        location = exc.location
        assert location  # every refusal names the parameter
        return
    assert query.statuses and (query.patient_ids or query.patient_identifiers)
    clause, args = query.clause()
    assert clause.count("?") == len(args)  # every value travels as a placeholder


@settings(max_examples=200, deadline=None)
@given(
    st.text(alphabet=string.ascii_letters + string.digits + ":/.-", min_size=1, max_size=20),
    st.text(alphabet=string.ascii_letters + string.digits + "-.", min_size=1, max_size=20),
)
def test_token_values_round_trip(system: str, code: str) -> None:
    query = parse_document_search([("patient", "p1"), ("status", "current"), ("type", f"{system}|{code}")])
    _, args = query.clause()
    assert args == ["type", system, code]


@settings(max_examples=100, deadline=None)
@given(st.dates(), st.sampled_from(["", "eq", "ge", "gt", "le", "lt"]))
def test_date_prefixes_parse(day: Any, prefix: str) -> None:
    query = parse_document_search(
        [("patient", "p1"), ("status", "current"), ("date", f"{prefix}{day.isoformat()}")]
    )
    clause, args = query.clause()
    assert "d.date" in clause and clause.count("?") == len(args)
