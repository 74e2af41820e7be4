"""Documents: the one validation on the MHD write paths, and their versions read with their rules.

ITI-105, ITI-65 and the metadata update store nothing the validation refuses; the Locations
they give answer (vread), to who may see the document only, as the document itself does.
"""

from __future__ import annotations

from typing import Any

import orjson
from yarl import URL

from gateway.store.documents import IS_ARCHIVED, VISIBILITY
from tests.documents.conftest import (
    CONFIDENTIALITY,
    FHIR_JSON,
    INS,
    PATIENT_INS,
    Client,
    auth,
    document,
    location_id,
    patient_resource,
    provide_bundle,
    publish,
    search,
    visibility,
)

MINE = f"patient.identifier={INS}|{PATIENT_INS}"
JSON_PATCH = "application/json-patch+json"


async def test_iti105_and_iti65_refuse_what_the_models_let_through(client: Client) -> None:
    lax = document(extension=[{"url": IS_ARCHIVED, "valueBoolean": "true"}])
    resp = await client.post(
        "/fhir/DocumentReference", data=orjson.dumps(lax), headers={**auth("pro"), "Content-Type": FHIR_JSON}
    )
    assert resp.status == 422, await resp.text()
    outcome = await resp.json(content_type=None)
    assert "DocumentReference.extension[0].valueBoolean" in outcome["issue"][0]["expression"]
    status, answer = await publish(client, provide_bundle(lax))
    assert status == 422, answer
    # a Patient the Bundle carries too
    bad_patient = {
        "fullUrl": "urn:uuid:0b7a1f2e-0000-4000-8000-900000000001",
        "resource": {**patient_resource("1950599000000"), "active": "yes"},
        "request": {"method": "POST", "url": "Patient"},
    }
    status, answer = await publish(client, provide_bundle(document(), extra=[bad_patient]))
    assert status == 422, answer
    _, found = await search(client, f"{MINE}&status=current")
    assert found["total"] == 0


async def test_a_metadata_update_stores_nothing_invalid(client: Client) -> None:
    status, answer = await publish(client, provide_bundle(document()))
    assert status == 200, answer
    doc_id = location_id(answer["entry"][1])
    for ops in (
        [{"op": "add", "path": "/extension", "value": [{"url": IS_ARCHIVED, "valueBoolean": "yes"}]}],
        [{"op": "add", "path": "/securityLabel/0/coding/0/userSelected", "value": "no"}],
        [{"op": "replace", "path": "/securityLabel", "value": {"coding": []}}],
    ):
        resp = await client.patch(
            f"/fhir/DocumentReference/{doc_id}",
            data=orjson.dumps(ops),
            headers={**auth("pro"), "Content-Type": JSON_PATCH},
        )
        assert resp.status == 422, (ops, await resp.text())
    resp = await client.get(f"/fhir/DocumentReference/{doc_id}", headers=auth("pro"))
    assert (await resp.json(content_type=None))["meta"]["versionId"] == "1"


async def test_document_versions_are_read_with_the_documents_rules(client: Client) -> None:
    resp = await client.post(
        "/fhir/DocumentReference",
        data=orjson.dumps(document(labels=((CONFIDENTIALITY, "N"),))),
        headers={**auth("pro"), "Content-Type": FHIR_JSON},
    )
    assert resp.status == 201
    location = URL(resp.headers["Location"]).path
    doc_id = (await resp.json(content_type=None))["id"]
    for who in ("pro", "pro2", "patient", "admin"):
        resp = await client.get(location, headers=auth(who))
        assert resp.status == 200, (who, await resp.text())
    masked = [
        {"coding": [{"system": CONFIDENTIALITY, "code": "N"}]},
        {"coding": [{"system": VISIBILITY, "code": "MASQUE_PS"}]},
    ]
    resp = await client.patch(
        f"/fhir/DocumentReference/{doc_id}",
        data=orjson.dumps([{"op": "replace", "path": "/securityLabel", "value": masked}]),
        headers={**auth("pro"), "Content-Type": JSON_PATCH},
    )
    assert resp.status == 200
    # masked now: its earlier versions and its history are hidden as it is, from whom it is
    for path in (location, f"/fhir/DocumentReference/{doc_id}/_history"):
        for who, expected in (("pro", 200), ("pro2", 404), ("patient", 200), ("admin", 200)):
            resp = await client.get(path, headers=auth(who))
            assert resp.status == expected, (path, who)
    resp = await client.get(f"/fhir/DocumentReference/{doc_id}/_history", headers=auth("pro"))
    history = await resp.json(content_type=None)
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["2", "1"]


async def test_versions_of_lists_and_other_records_follow_the_callers_scope(client: Client) -> None:
    doc = document(labels=((CONFIDENTIALITY, "N"), visibility("INVISIBLE_PATIENT")))
    status, answer = await publish(client, provide_bundle(doc))
    assert status == 200, answer
    list_location = "/fhir/" + answer["entry"][0]["response"]["location"]
    doc_location = "/fhir/" + answer["entry"][1]["response"]["location"]
    for who, expected in (("pro", 200), ("pro2", 200), ("patient", 404), ("admin", 200)):
        for path in (list_location, doc_location):
            resp = await client.get(path, headers=auth(who))
            assert resp.status == expected, (path, who)
    # another patient's record: not through versions either
    resp = await client.get("/fhir/Patient?identifier=" + f"{INS}|1950599123456", headers=auth("admin"))
    other: dict[str, Any] = (await resp.json(content_type=None))["entry"][0]["resource"]
    for path in (f"/fhir/Patient/{other['id']}/_history/1", f"/fhir/Patient/{other['id']}/_history"):
        assert (await client.get(path, headers=auth("patient"))).status == 404
        assert (await client.get(path, headers=auth("pro"))).status == 200
    resp = await client.get("/fhir/Patient?identifier=" + f"{INS}|{PATIENT_INS}", headers=auth("admin"))
    mine = (await resp.json(content_type=None))["entry"][0]["resource"]["id"]
    assert (await client.get(f"/fhir/Patient/{mine}/_history/1", headers=auth("patient"))).status == 200
