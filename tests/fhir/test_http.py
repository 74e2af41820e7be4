"""The /fhir REST API over a real aiohttp server on 127.0.0.1 and a real SQLite repository."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestClient
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.operationoutcome import OperationOutcome
from multidict import CIMultiDict

from gateway.store.fhir import SqliteFhirRepository
from tests.conftest import AUTH, GatewayFactory
from tests.fhir.conftest import INS, IPP, patient

Client = TestClient[Any, Any]
FHIR_JSON = "application/fhir+json"


async def send(
    client: Client,
    method: str,
    path: str,
    body: Any = None,
    *,
    content_type: str = FHIR_JSON,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, CIMultiDict[str]]:
    data = body if isinstance(body, bytes) or body is None else orjson.dumps(body)
    hdrs = {"Content-Type": content_type, **(headers or {})} if data is not None else dict(headers or {})
    async with client.request(method, path, data=data, headers=hdrs) as resp:
        raw = await resp.read()
        if raw:
            assert resp.content_type == FHIR_JSON
        return resp.status, orjson.loads(raw) if raw else None, CIMultiDict(resp.headers)


def outcome_of(body: Any) -> dict[str, Any]:
    OperationOutcome.model_validate(body)  # every error is a valid OperationOutcome
    issue: dict[str, Any] = body["issue"][0]
    return issue


async def test_metadata_is_a_valid_capability_statement(client: Client) -> None:
    status, body, _ = await send(client, "GET", "/fhir/metadata")
    assert status == 200
    CapabilityStatement.model_validate(body)
    assert body["fhirVersion"] == "4.0.1" and "json" in body["format"]
    rest = body["rest"][0]
    assert {i["code"] for i in rest["interaction"]} == {"transaction", "batch"}
    by_type = {r["type"]: r for r in rest["resource"]}
    required = [
        *("Patient", "Encounter", "Observation", "DiagnosticReport", "DocumentReference", "Binary", "List"),
        *("Practitioner", "Organization", "Specimen", "Appointment", "ServiceRequest", "Immunization"),
        *("Consent", "Location"),
    ]
    for t in required:
        assert t in by_type, t
    assert len(by_type) > 100  # every resource type the R4B models know
    obs = by_type["Observation"]
    assert {i["code"] for i in obs["interaction"]} == {
        "read",
        "vread",
        "history-instance",
        "search-type",
        "create",
        "update",
        "delete",
    }
    params = {p["name"]: p for p in obs["searchParam"]}
    assert set(params) == {"_id", "_lastUpdated", "identifier", "patient", "subject", "encounter"}
    assert "patient.identifier" in params["patient"]["documentation"]
    assert set(obs["searchInclude"]) == {
        "Observation:patient",
        "Observation:subject",
        "Observation:encounter",
    }
    assert {p["name"] for p in by_type["Patient"]["searchParam"]} == {"_id", "_lastUpdated", "identifier"}
    immunization = {p["name"] for p in by_type["Immunization"]["searchParam"]}
    assert {"patient", "encounter"} <= immunization and "subject" not in immunization


async def test_create_read_update_delete(client: Client) -> None:
    status, created, headers = await send(client, "POST", "/fhir/Patient", patient())
    assert status == 201
    pid = created["id"]
    assert headers["ETag"] == 'W/"1"'
    assert headers["Location"].endswith(f"/fhir/Patient/{pid}/_history/1")

    status, read, headers = await send(client, "GET", f"/fhir/Patient/{pid}")
    assert status == 200 and read == created
    assert headers["ETag"] == 'W/"1"' and headers["Last-Modified"].endswith("GMT")

    status, updated, headers = await send(client, "PUT", f"/fhir/Patient/{pid}", {**read, "gender": "other"})
    assert status == 200 and updated["meta"]["versionId"] == "2" and headers["ETag"] == 'W/"2"'
    status, same, _ = await send(client, "PUT", f"/fhir/Patient/{pid}", {**read, "gender": "other"})
    assert status == 200 and same == updated  # unchanged: no version 3

    status, made, _ = await send(client, "PUT", "/fhir/Patient/chosen-id", patient(ins="1920375999001"))
    assert status == 201 and made["id"] == "chosen-id"

    status, body, _ = await send(client, "DELETE", f"/fhir/Patient/{pid}")
    assert status == 200 and body["issue"][0]["severity"] == "information"
    status, body, _ = await send(client, "GET", f"/fhir/Patient/{pid}")
    assert status == 410 and outcome_of(body)["code"] == "deleted"
    status, body, _ = await send(client, "DELETE", f"/fhir/Patient/{pid}")
    assert status == 200  # deleting again is not an error


async def test_if_match_conflict(client: Client) -> None:
    await send(client, "PUT", "/fhir/Patient/p", patient())
    status, body, _ = await send(
        client, "PUT", "/fhir/Patient/p", patient(gender="male"), headers={"If-Match": 'W/"3"'}
    )
    assert status == 409 and outcome_of(body)["code"] == "conflict"


async def test_conditional_create_and_update(client: Client) -> None:
    condition = {"If-None-Exist": f"identifier={INS}|2840775123456"}
    status, first, _ = await send(client, "POST", "/fhir/Patient", patient(), headers=condition)
    assert status == 201
    status, second, _ = await send(client, "POST", "/fhir/Patient", patient(), headers=condition)
    assert status == 200 and second["id"] == first["id"]

    url = f"/fhir/Patient?identifier={IPP}|IPP-777"
    status, made, _ = await send(client, "PUT", url, patient(ins=None, ipp="IPP-777"))
    assert status == 201
    status, changed, _ = await send(client, "PUT", url, patient(ins=None, ipp="IPP-777", gender="unknown"))
    assert status == 200 and changed["id"] == made["id"] and changed["meta"]["versionId"] == "2"
    await send(client, "PUT", "/fhir/Patient/twin", patient(ins=None, ipp="IPP-777"))
    status, body, _ = await send(client, "PUT", url, patient(ins=None, ipp="IPP-777"))
    assert status == 409 and "more than one" in outcome_of(body)["diagnostics"]
    status, body, _ = await send(client, "PUT", "/fhir/Patient", patient())
    assert status == 400


async def test_not_found_and_unknown_type(client: Client) -> None:
    status, body, _ = await send(client, "GET", "/fhir/Patient/nobody")
    assert status == 404 and outcome_of(body)["code"] == "not-found"
    status, body, _ = await send(client, "GET", "/fhir/Patient/not%20an%20id")
    assert status == 404
    for method, path in (("GET", "/fhir/Unicorn/1"), ("GET", "/fhir/HumanName"), ("POST", "/fhir/Unicorn")):
        status, body, _ = await send(client, method, path, {"resourceType": "Unicorn"})
        assert status == 404 and outcome_of(body)["code"] == "not-supported", path
    status, body, _ = await send(client, "DELETE", "/fhir/Patient")
    assert status == 405 and outcome_of(body)


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "application/fhir+xml"])
async def test_non_json_body_is_415(client: Client, content_type: str) -> None:
    status, body, _ = await send(client, "POST", "/fhir/Patient", b"<Patient/>", content_type=content_type)
    assert status == 415 and outcome_of(body)["code"] == "not-supported"


async def test_plain_json_content_type_is_accepted(client: Client) -> None:
    status, _, _ = await send(client, "POST", "/fhir/Patient", patient(), content_type="application/json")
    assert status == 201


@pytest.mark.parametrize("raw", [b"{", b"", b"[1, 2]", b'"Patient"', b"\xff\xfe"])
async def test_bad_json_is_400(client: Client, raw: bytes) -> None:
    status, body, _ = await send(client, "POST", "/fhir/Patient", raw)
    assert status == 400 and outcome_of(body)["code"] == "invalid"


async def test_resource_type_must_match_the_url(client: Client) -> None:
    status, body, _ = await send(client, "POST", "/fhir/Encounter", patient())
    assert status == 400 and outcome_of(body)["expression"] == ["resourceType"]
    status, body, _ = await send(client, "PUT", "/fhir/Patient/a", {**patient(), "id": "b"})
    assert status == 400


async def test_invalid_code_is_422(client: Client, repo: SqliteFhirRepository) -> None:
    status, body, _ = await send(client, "POST", "/fhir/Patient", patient(gender="banana"))
    assert status == 422
    issue = outcome_of(body)
    assert issue["code"] == "code-invalid" and issue["expression"] == ["Patient.gender"]
    assert (await repo.search("Patient", [])).total == 0


@pytest.mark.parametrize("extension", [3, "3", [1]])
async def test_a_malformed_primitive_extension_is_422_not_a_crash(
    client: Client, repo: SqliteFhirRepository, extension: object
) -> None:
    status, body, _ = await send(client, "POST", "/fhir/Patient", patient(_gender=extension))
    assert status == 422
    assert outcome_of(body)["code"] in ("structure", "value")  # pydantic refuses some, crashes on "3"
    assert (await repo.search("Patient", [])).total == 0


async def test_every_validation_error_is_listed_with_its_location(client: Client) -> None:
    bad = patient(birthDate="14/07/1984", name=[{"family": 12, "given": ["Zoé"]}], colour="bleu")
    status, body, _ = await send(client, "POST", "/fhir/Patient", bad)
    assert status == 422
    OperationOutcome.model_validate(body)
    where = {i["expression"][0]: i["code"] for i in body["issue"]}
    assert where == {
        "Patient.birthDate": "value",
        "Patient.name[0].family": "value",
        "Patient.colour": "structure",
    }
    obs = {"resourceType": "Observation", "code": {"text": "pouls"}}
    status, body, _ = await send(client, "POST", "/fhir/Observation", obs)
    assert status == 422 and body["issue"][0] == {
        "severity": "error",
        "code": "required",
        "diagnostics": body["issue"][0]["diagnostics"],
        "expression": ["Observation.status"],
    }


async def seed(client: Client, n: int) -> list[str]:
    status, _, _ = await send(client, "PUT", "/fhir/Patient/amelie", patient())
    assert status == 201
    made = []
    for i in range(n):
        obs = {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": f"mesure {i}"},
            "subject": {"reference": "Patient/amelie"},
        }
        status, body, _ = await send(client, "POST", "/fhir/Observation", obs)
        assert status == 201
        made.append(body["id"])
    return made


async def test_search_bundle_shape_and_paging(client: Client) -> None:
    made = await seed(client, 5)
    status, page, _ = await send(
        client, "GET", "/fhir/Observation?patient=amelie&_include=Observation:patient&_count=2"
    )
    assert status == 200
    Bundle.model_validate(page)
    assert page["type"] == "searchset" and page["total"] == 5
    matches = [e for e in page["entry"] if e["search"]["mode"] == "match"]
    includes = [e for e in page["entry"] if e["search"]["mode"] == "include"]
    assert [e["resource"]["id"] for e in matches] == made[:2]
    assert [e["resource"]["id"] for e in includes] == ["amelie"]
    assert all(
        e["fullUrl"].endswith(f"/fhir/{e['resource']['resourceType']}/{e['resource']['id']}")
        for e in page["entry"]
    )
    links = {link["relation"]: link["url"] for link in page["link"]}
    assert "_count=2" in links["self"] and "previous" not in links

    seen = [e["resource"]["id"] for e in matches]
    next_url = links.get("next")
    while next_url:
        path = next_url[next_url.index("/fhir/") :]
        status, page, _ = await send(client, "GET", path)
        assert status == 200 and page["total"] == 5
        seen += [e["resource"]["id"] for e in page["entry"] if e["search"]["mode"] == "match"]
        next_url = {link["relation"]: link["url"] for link in page["link"]}.get("next")
    assert seen == made


async def test_search_errors_are_outcomes(client: Client) -> None:
    status, body, _ = await send(client, "GET", "/fhir/Observation?name=Dupont")
    assert status == 400 and outcome_of(body)["expression"] == ["name"]
    status, body, _ = await send(client, "GET", "/fhir/Observation?_lastUpdated=ap2024")
    assert status == 400 and "prefix" in outcome_of(body)["diagnostics"]
    status, body, _ = await send(client, "GET", "/fhir/Observation?_format=json")
    assert status == 200 and body["total"] == 0


async def test_search_by_chained_identifier_over_http(client: Client) -> None:
    await seed(client, 2)
    path = f"/fhir/Observation?patient.identifier={INS}|2840775123456&_sort=-_lastUpdated"
    status, page, _ = await send(client, "GET", path.replace("|", "%7C"))
    assert status == 200 and page["total"] == 2


def admission_bundle(kind: str = "transaction", gender: str = "female") -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": kind,
        "entry": [
            {
                "fullUrl": "urn:uuid:3c1e5b52-0000-4000-8000-00000000000a",
                "resource": patient(gender=gender),
                "request": {
                    "method": "POST",
                    "url": "Patient",
                    "ifNoneExist": f"identifier={INS}|2840775123456",
                },
            },
            {
                "fullUrl": "urn:uuid:3c1e5b52-0000-4000-8000-00000000000b",
                "resource": {
                    "resourceType": "Encounter",
                    "status": "arrived",
                    "class": {"code": "EMER"},
                    "identifier": [{"system": "urn:visit", "value": "URG-1"}],
                    "subject": {"reference": "urn:uuid:3c1e5b52-0000-4000-8000-00000000000a"},
                },
                "request": {"method": "PUT", "url": "Encounter?identifier=urn:visit|URG-1"},
            },
        ],
    }


async def test_transaction_over_http(client: Client, repo: SqliteFhirRepository) -> None:
    status, answer, _ = await send(client, "POST", "/fhir", admission_bundle())
    assert status == 200
    Bundle.model_validate(answer)
    assert answer["type"] == "transaction-response"
    assert [e["response"]["status"] for e in answer["entry"]] == ["201 Created", "201 Created"]
    pid = answer["entry"][0]["response"]["location"].split("/")[1]
    status, page, _ = await send(client, "GET", f"/fhir/Encounter?subject=Patient/{pid}")
    assert page["total"] == 1
    status, again, _ = await send(client, "POST", "/fhir", admission_bundle())
    assert [e["response"]["status"] for e in again["entry"]] == ["200 OK", "200 OK"]


async def test_invalid_entry_fails_the_transaction_with_its_index(
    client: Client, repo: SqliteFhirRepository
) -> None:
    status, body, _ = await send(client, "POST", "/fhir", admission_bundle(gender="banana"))
    assert status == 422
    assert body["issue"][0]["expression"] == ["Bundle.entry[0].resource.gender"]
    assert (await repo.search("Encounter", [])).total == 0


async def test_failing_entry_status_is_the_transaction_status(
    client: Client, repo: SqliteFhirRepository
) -> None:
    b = admission_bundle()
    b["entry"].append({"request": {"method": "GET", "url": "Patient/nobody"}})
    status, body, _ = await send(client, "POST", "/fhir", b)
    assert status == 404
    issue = outcome_of(body)
    assert (
        issue["expression"] == ["Bundle.entry[2].request.url"] and "Bundle.entry[2]" in issue["diagnostics"]
    )
    assert (await repo.search("Patient", [])).total == 0


async def test_batch_over_http_reports_each_entry(client: Client, repo: SqliteFhirRepository) -> None:
    b = admission_bundle("batch")
    b["entry"][1]["resource"]["subject"] = {"reference": "Patient/amelie"}
    b["entry"].insert(
        1, {"resource": patient(gender="banana"), "request": {"method": "PUT", "url": "Patient/x"}}
    )
    b["entry"].append(
        {"resource": {"resourceType": "Unicorn"}, "request": {"method": "POST", "url": "Unicorn"}}
    )
    status, answer, _ = await send(client, "POST", "/fhir", b)
    assert status == 200
    Bundle.model_validate(answer)
    statuses = [e["response"]["status"] for e in answer["entry"]]
    assert statuses == ["201 Created", "422 Unprocessable Entity", "201 Created", "404 Not Found"]
    assert answer["entry"][1]["response"]["outcome"]["issue"][0]["expression"] == [
        "Bundle.entry[1].resource.gender"
    ]
    assert await repo.read("Patient", "x") is None


@pytest.mark.parametrize(
    "body",
    [
        patient(),
        {"resourceType": "Bundle", "type": "searchset"},
        {"resourceType": "Bundle", "type": "batch", "entry": 3},
    ],
)
async def test_post_fhir_takes_only_transaction_or_batch(client: Client, body: dict[str, Any]) -> None:
    status, answer, _ = await send(client, "POST", "/fhir", body)
    assert status == 400 and outcome_of(answer)


async def test_gateway_serves_fhir_and_reports_it_ready(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway()
    base = f"http://127.0.0.1:{gw.http_port_bound}"
    async with ClientSession(headers=AUTH) as http:
        async with http.get(f"{base}/ready") as resp:
            ready = await resp.json()
            assert ready["checks"]["fhir"] == {"ok": True}
        async with http.put(
            f"{base}/fhir/Patient/p1", data=orjson.dumps(patient()), headers={"Content-Type": FHIR_JSON}
        ) as resp:
            assert resp.status == 201
    assert (gw.data_dir / "fhir.db").exists()
