"""GET /fhir/metadata says what the document routes really serve: every advertised search parameter
is accepted, every accepted one is advertised, and the interactions are the ones the routes answer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from fhir.resources.R4B.capabilitystatement import CapabilityStatement

from gateway.http.app import build_app
from gateway.http.auth import TokenTable
from gateway.store.audit import AuditLog
from gateway.store.documents.search import ALL_PARAMS, RESULT_PARAMS, parse_document_search
from gateway.store.fhir import SqliteFhirRepository
from tests.documents.conftest import (
    FHIR_JSON,
    IDNPS,
    PATIENT_INS,
    PRO_RPPS,
    TOKENS,
    Client,
    auth,
    document,
    location_id,
    provide_bundle,
    publish,
)
from tests.fhir.conftest import INS, FhirOnlyRuntime

MINE = f"patient.identifier={INS}|{PATIENT_INS}"


async def statement(client: Client) -> dict[str, Any]:
    resp = await client.get("/fhir/metadata")  # public, as FHIR servers make it
    assert resp.status == 200
    body: dict[str, Any] = await resp.json(content_type=None)
    return body


def resource(body: dict[str, Any], type_: str) -> dict[str, Any]:
    (found,) = [r for r in body["rest"][0]["resource"] if r["type"] == type_]
    return found


def params(entry: dict[str, Any]) -> dict[str, str]:
    return {p["name"]: p["type"] for p in entry["searchParam"]}


def sample(name: str, kind: str, patient_id: str) -> str:
    """A well-formed value of a parameter, so that only an unknown name can be refused."""
    special = {
        "patient": patient_id,
        "patient.identifier": f"{INS}|{PATIENT_INS}",
        "subject.identifier": f"{INS}|{PATIENT_INS}",
        "status": "current",
        "isArchived": "false",
        "relatesto": "DocumentReference/abc",
        "code": "submissionset",
    }
    if name in special:
        return special[name]
    return {"token": "x", "reference": "Practitioner/abc", "date": "ge2024-01-01"}[kind]


async def test_the_statement_is_a_valid_capability_statement(client: Client) -> None:
    body = await statement(client)
    # The R4B model (structure, cardinalities, types). Not validate_resource: it takes the model's
    # short list "json | xml | ttl | mime" for CapabilityStatement.format as closed.
    CapabilityStatement.model_validate(body)
    kinds = {r["type"] for r in body["rest"][0]["resource"]}
    assert {"DocumentReference", "List", "Binary", "AuditEvent", "Patient"} <= kinds
    transaction = body["rest"][0]["interaction"][0]
    assert transaction["code"] == "transaction" and "ITI-65" in transaction["documentation"]


async def test_document_search_parameters_match_the_parser(client: Client, patient_id: str) -> None:
    advertised = params(resource(await statement(client), "DocumentReference"))
    # every parameter the ITI-67 parser takes is advertised (paging is said at the rest level)
    taken = {p for p in ALL_PARAMS if p not in RESULT_PARAMS} - {"relatesTo"}
    assert set(advertised) == taken
    # and each advertised one is accepted over HTTP
    for name, kind in advertised.items():
        query = f"{MINE}&status=current&{name}={sample(name, kind, patient_id)}"
        resp = await client.get(f"/fhir/DocumentReference?{query}", headers=auth("pro"))
        assert resp.status == 200, (name, await resp.text())
    # a parameter it does not advertise is refused
    resp = await client.get(
        f"/fhir/DocumentReference?{MINE}&status=current&contenttype=x", headers=auth("pro")
    )
    assert resp.status == 400
    parse_document_search([("patient", "p"), ("status", "current"), ("relatesTo", "DocumentReference/a")])


async def test_document_interactions_are_the_routes(client: Client) -> None:
    entry = resource(await statement(client), "DocumentReference")
    codes = {i["code"] for i in entry["interaction"]}
    assert codes == {"read", "vread", "history-instance", "search-type", "create", "patch", "delete"}
    assert "update" not in codes and entry["conditionalUpdate"] is False
    # create: ITI-105
    resp = await client.post(
        "/fhir/DocumentReference", json=document(), headers={**auth("pro"), "Content-Type": FHIR_JSON}
    )
    assert resp.status == 201
    doc = await resp.json(content_type=None)
    # no update: PUT is 405
    resp = await client.put(
        f"/fhir/DocumentReference/{doc['id']}", json=doc, headers={**auth("pro"), "Content-Type": FHIR_JSON}
    )
    assert resp.status == 405
    # patch, conditional
    master = doc["masterIdentifier"]
    resp = await client.patch(
        f"/fhir/DocumentReference?identifier={master['system']}|{master['value']}",
        data=b'[{"op": "replace", "path": "/status", "value": "entered-in-error"}]',
        headers={**auth("pro"), "Content-Type": "application/json-patch+json"},
    )
    assert resp.status == 200 and (await resp.json(content_type=None))["status"] == "entered-in-error"
    patch_doc = next(i for i in entry["interaction"] if i["code"] == "patch")["documentation"]
    assert "conditional" in patch_doc and "405" in patch_doc


async def test_list_search_parameters_are_accepted(client: Client, patient_id: str) -> None:
    advertised = params(resource(await statement(client), "List"))
    assert {"patient", "patient.identifier", "code", "status", "identifier", "source.identifier"} <= set(
        advertised
    )
    for name, kind in advertised.items():
        query = f"{name}={sample(name, kind, patient_id)}"
        if name not in ("patient", "patient.identifier") and name in ("code", "status", "source.identifier"):
            query += f"&{MINE}"  # ITI-66 ones go with the patient
        resp = await client.get(f"/fhir/List?{query}", headers=auth("pro"))
        assert resp.status == 200, (name, await resp.text())
    resp = await client.get(f"/fhir/List?{MINE}&designation=x", headers=auth("pro"))
    assert resp.status == 400


async def test_list_source_identifier_finds_the_submission_set_of_an_author(client: Client) -> None:
    bundle = provide_bundle(document())
    submission = bundle["entry"][0]["resource"]
    submission["contained"] = [
        {
            "resourceType": "Practitioner",
            "id": "src",
            "identifier": [{"system": IDNPS, "value": f"8{PRO_RPPS}"}],
        }
    ]
    submission["source"] = {"reference": "#src"}
    status, answer = await publish(client, bundle)
    assert status == 200, answer
    list_id = location_id(answer["entry"][0])

    async def found(value: str) -> list[str]:
        resp = await client.get(f"/fhir/List?{MINE}&source.identifier={value}", headers=auth("pro"))
        return [e["resource"]["id"] for e in (await resp.json(content_type=None))["entry"]]

    assert await found(f"{IDNPS}|8{PRO_RPPS}") == [list_id]
    assert await found(f"8{PRO_RPPS}") == [list_id]
    assert await found(f"{IDNPS}|8000") == []


async def test_binary_and_audit_event_entries(
    client: Client, tmp_path: Path, repo: SqliteFhirRepository
) -> None:
    body = await statement(client)
    binary = resource(body, "Binary")
    assert "ITI-68" in binary["documentation"] and {"code": "read"} in binary["interaction"]
    audit = resource(body, "AuditEvent")
    assert {i["code"] for i in audit["interaction"]} == {"read", "search-type"}
    # each advertised parameter is taken by the AuditEvent search of a gateway with an audit log
    log = AuditLog(tmp_path / "audit.db")
    await log.open()
    try:
        app = build_app(FhirOnlyRuntime(repo), authenticator=TokenTable(TOKENS.values()), audit=log)
        async with TestClient(TestServer(app, host="127.0.0.1", port=0)) as audited:
            for name in params(audit):
                value = {"action": "R", "date": "ge2024-01-01T00:00:00Z"}.get(name, "x")
                resp = await audited.get(f"/fhir/AuditEvent?{name}={value}", headers=auth("operator"))
                assert resp.status == 200, (name, await resp.text())
            resp = await audited.get("/fhir/AuditEvent?entity=x", headers=auth("operator"))
            assert resp.status == 400
    finally:
        await log.close()
