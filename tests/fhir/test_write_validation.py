"""What /fhir stores is valid FHIR, and every link it gives answers.

- Required bindings and FHIR JSON primitive types are checked on every write path: create,
  update, conditional update, transaction and batch entries, ITI-65, ITI-105, metadata updates.
- ``Location`` headers and transaction answers name ``Type/id/_history/N``: vread serves it, and
  ``Type/id/_history`` the instance history.
- AuditEvent searches page with ``next`` links and never claim a wrong ``total``.
- Only JSON is served: ``_format`` (or an Accept) asking for another format is 406, a body in
  another format 415, both as OperationOutcomes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from fhir.resources.R4B import get_fhir_model_class
from yarl import URL

from gateway.fhir.validation import Bindings, validate_resource
from gateway.http.app import build_app
from gateway.http.auth import TokenTable
from gateway.store.audit import AuditLog
from gateway.store.fhir import SqliteFhirRepository
from tests.conftest import ADMIN_ENTRY, AUTH
from tests.fhir.conftest import FhirOnlyRuntime, patient

Client = TestClient[Any, Any]
FHIR_JSON = "application/fhir+json"
HEADERS = {"Content-Type": FHIR_JSON}


def observation(**extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "identifier": [{"system": "urn:oid:1.2.250.1.999.5", "value": "obs-1"}],
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
        "subject": {"reference": "Patient/p1"},
        **extra,
    }


# What the models let through and a strict client does not read back.
INVALID: dict[str, tuple[dict[str, Any], str]] = {
    "a code outside a required binding the models list in part": (
        observation(status="bogus"),
        "Observation.status",
    ),
    "a string for a boolean": (patient(active="yes"), "Patient.active"),
    "a string that reads as a boolean": (patient(active="true"), "Patient.active"),
    "a string for an integer": (patient(multipleBirthInteger="3"), "Patient.multipleBirthInteger"),
    "a string for a decimal": (
        observation(valueQuantity={"value": "12.5", "unit": "mmol/L"}),
        "Observation.valueQuantity.value",
    ),
    "a bad code deep inside": (
        {
            "resourceType": "Encounter",
            "status": "finished",
            "class": {"code": "IMP"},
            "statusHistory": [{"status": "gone", "period": {"start": "2024-05-14"}}],
        },
        "Encounter.statusHistory[0].status",
    ),
    "a bad code inside a contained resource": (
        patient(contained=[observation(status="maybe")]),
        "Patient.contained[0].status",
    ),
}


def _expressions(outcome: dict[str, Any]) -> list[str]:
    assert outcome["resourceType"] == "OperationOutcome", outcome
    return [e for issue in outcome["issue"] for e in issue.get("expression", [])]


async def _count(client: Client, type_: str) -> int:
    resp = await client.get(f"/fhir/{type_}")
    return int((await resp.json(content_type=None))["total"])


@pytest.mark.parametrize("case", sorted(INVALID))
async def test_invalid_resources_are_refused_on_every_write_path(client: Client, case: str) -> None:
    resource, where = INVALID[case]
    type_ = resource["resourceType"]
    raw = orjson.dumps(resource)
    resp = await client.post(f"/fhir/{type_}", data=raw, headers=HEADERS)
    assert resp.status == 422, (case, await resp.text())
    assert where in _expressions(await resp.json(content_type=None))
    resp = await client.put(f"/fhir/{type_}/x1", data=raw, headers=HEADERS)
    assert resp.status == 422, case
    resp = await client.put(f"/fhir/{type_}?identifier=urn:oid:9|9", data=raw, headers=HEADERS)
    assert resp.status == 422, case
    entry = {"resource": resource, "request": {"method": "POST", "url": type_}}
    good = {"resource": patient(ins="1950599123456"), "request": {"method": "POST", "url": "Patient"}}
    transaction = {"resourceType": "Bundle", "type": "transaction", "entry": [good, entry]}
    resp = await client.post("/fhir", data=orjson.dumps(transaction), headers=HEADERS)
    assert resp.status == 422, case
    assert f"Bundle.entry[1].resource.{where.partition('.')[2]}" in _expressions(
        await resp.json(content_type=None)
    )
    assert await _count(client, type_) == 0 and await _count(client, "Patient") == 0
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [good, entry]}
    resp = await client.post("/fhir", data=orjson.dumps(batch), headers=HEADERS)
    assert resp.status == 200
    answer = await resp.json(content_type=None)
    assert [e["response"]["status"][:3] for e in answer["entry"]] == ["201", "422"], case
    assert await _count(client, type_) == (1 if type_ == "Patient" else 0)  # only the good entry


async def test_every_page_of_what_was_written_reads_back_valid(client: Client) -> None:
    for i in range(5):
        body = observation(identifier=[{"system": "urn:oid:9", "value": str(i)}], valueQuantity={"value": i})
        resp = await client.post("/fhir/Observation", data=orjson.dumps(body), headers=HEADERS)
        assert resp.status == 201
    for case in INVALID.values():
        await client.post(f"/fhir/{case[0]['resourceType']}", data=orjson.dumps(case[0]), headers=HEADERS)
    url: str | None = "/fhir/Observation?_count=2"
    seen = 0
    while url is not None:
        resp = await client.get(url)
        assert resp.status == 200
        page = await resp.json(content_type=None)
        for entry in page["entry"]:
            resource = entry["resource"]
            get_fhir_model_class("Observation").model_validate(resource)
            validate_resource(resource, bindings=Bindings.REQUIRED)  # what a strict client needs
            seen += 1
        url = next((URL(link["url"]).path_qs for link in page["link"] if link["relation"] == "next"), None)
    assert seen == 5


# -- vread and history -----------------------------------------------------------------------------


async def test_location_headers_and_transaction_answers_resolve(client: Client) -> None:
    resp = await client.post("/fhir/Patient", data=orjson.dumps(patient()), headers=HEADERS)
    assert resp.status == 201
    first = await resp.json(content_type=None)
    location = URL(resp.headers["Location"]).path
    assert location.endswith(f"/Patient/{first['id']}/_history/1")
    resp = await client.get(location)
    assert resp.status == 200, await resp.text()
    assert await resp.json(content_type=None) == first
    assert resp.headers["ETag"] == 'W/"1"' and resp.content_type == FHIR_JSON
    changed = {**first, "active": True}
    resp = await client.put(f"/fhir/Patient/{first['id']}", data=orjson.dumps(changed), headers=HEADERS)
    second = await resp.json(content_type=None)
    assert second["meta"]["versionId"] == "2"
    # each version stays readable
    resp = await client.get(f"/fhir/Patient/{first['id']}/_history/1")
    assert (await resp.json(content_type=None)) == first
    resp = await client.get(f"/fhir/Patient/{first['id']}/_history/2")
    assert (await resp.json(content_type=None)) == second
    # the history, newest first
    resp = await client.get(f"/fhir/Patient/{first['id']}/_history")
    assert resp.status == 200
    history = await resp.json(content_type=None)
    assert history["type"] == "history" and history["total"] == 2
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["2", "1"]
    get_fhir_model_class("Bundle").model_validate(history)
    # a transaction's answer
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": observation(), "request": {"method": "POST", "url": "Observation"}}],
    }
    resp = await client.post("/fhir", data=orjson.dumps(bundle), headers=HEADERS)
    answer = await resp.json(content_type=None)
    resp = await client.get("/fhir/" + answer["entry"][0]["response"]["location"])
    assert resp.status == 200 and (await resp.json(content_type=None))["resourceType"] == "Observation"
    # after a deletion: the deleted version is gone (410), the history says so, absent ones 404
    assert (await client.delete(f"/fhir/Patient/{first['id']}")).status == 200
    assert (await client.get(f"/fhir/Patient/{first['id']}/_history/3")).status == 410
    assert (await client.get(f"/fhir/Patient/{first['id']}/_history/2")).status == 200
    resp = await client.get(f"/fhir/Patient/{first['id']}/_history")
    history = await resp.json(content_type=None)
    assert history["entry"][0]["request"] == {"method": "DELETE", "url": f"Patient/{first['id']}"}
    assert "resource" not in history["entry"][0]
    for path in (f"Patient/{first['id']}/_history/9", "Patient/nobody/_history/1", "Patient/nobody/_history"):
        resp = await client.get(f"/fhir/{path}")
        assert resp.status == 404, path
        assert (await resp.json(content_type=None))["resourceType"] == "OperationOutcome"
    assert (await client.get(f"/fhir/Patient/{first['id']}/_history/x")).status == 404


async def test_the_capability_statement_says_versions_are_read(client: Client) -> None:
    resp = await client.get("/fhir/metadata")
    statement = await resp.json(content_type=None)
    for entry in statement["rest"][0]["resource"]:
        if entry["type"] == "AuditEvent":
            continue
        codes = {i["code"] for i in entry["interaction"]}
        assert {"vread", "history-instance"} <= codes, entry["type"]
        assert entry["readHistory"] is True


# -- AuditEvent paging -----------------------------------------------------------------------------


@pytest.fixture
async def audited(repo: SqliteFhirRepository, tmp_path: Path) -> Any:
    log = AuditLog(tmp_path / "audit.db")
    await log.open()
    app = build_app(FhirOnlyRuntime(repo), authenticator=TokenTable([ADMIN_ENTRY]), audit=log)
    async with TestClient(TestServer(app, host="127.0.0.1", port=0), headers=AUTH) as c:
        yield c, log
    await log.close()


async def test_audit_event_search_pages_with_next_links_and_a_true_total(audited: Any) -> None:
    client, log = audited
    for i in range(7):
        await client.get(f"/fhir/Patient/p{i}")
    await log.flush()
    expected = [r["id"] for _, r in await log.search(count=1000)]
    assert len(expected) == 7
    url: str | None = "/fhir/AuditEvent?_count=3&action=R"
    pages: list[list[str]] = []
    while url is not None:
        resp = await client.get(url)
        assert resp.status == 200, await resp.text()
        page = await resp.json(content_type=None)
        ids = [e["resource"]["id"] for e in page["entry"]]
        pages.append(ids)
        # a total, when given, is the number of matches: never the size of the page
        assert page.get("total", 7) == 7, page
        url = next((URL(link["url"]).path_qs for link in page["link"] if link["relation"] == "next"), None)
        assert len(pages) < 10
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [i for p in pages for i in p] == expected  # newest first, each once
    resp = await client.get("/fhir/AuditEvent?_count=1000&action=R")
    assert (await resp.json(content_type=None))["total"] == 7
    assert (await client.get("/fhir/AuditEvent?_cursor=abc")).status == 400


# -- formats ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/fhir/Patient?_format=xml",
        "/fhir/metadata?_format=xml",
        "/fhir/Patient/p1?_format=application/fhir+xml",
        "/fhir/Patient?_format=ttl",
        "/fhir/DocumentReference?_format=text/xml&patient=x&status=current",
    ],
)
async def test_another_format_than_json_is_406(client: Client, path: str) -> None:
    resp = await client.get(path)
    assert resp.status == 406, await resp.text()
    assert resp.content_type == FHIR_JSON
    outcome = await resp.json(content_type=None)
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["code"] == "not-supported"


async def test_json_formats_and_accept_headers(client: Client) -> None:
    for fmt in ("json", "application/json", "application/fhir+json", "application/json+fhir"):
        assert (await client.get(f"/fhir/Patient?_format={fmt}")).status == 200, fmt
    for accept in ("application/fhir+json", "*/*", "application/json, application/fhir+xml;q=0.5", ""):
        assert (await client.get("/fhir/Patient", headers={"Accept": accept})).status == 200, accept
    for accept in ("application/fhir+xml", "application/xml, text/xml"):
        resp = await client.get("/fhir/Patient", headers={"Accept": accept})
        assert resp.status == 406, accept
        assert resp.content_type == FHIR_JSON


async def test_an_xml_body_is_415(client: Client) -> None:
    body = b'<Patient xmlns="http://hl7.org/fhir"><active value="true"/></Patient>'
    for method, path in (("POST", "/fhir/Patient"), ("PUT", "/fhir/Patient/p1"), ("POST", "/fhir")):
        resp = await client.request(method, path, data=body, headers={"Content-Type": "application/fhir+xml"})
        assert resp.status == 415, (method, path)
        assert (await resp.json(content_type=None))["resourceType"] == "OperationOutcome"
