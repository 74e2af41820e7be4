"""A patient adds documents to their own record (ITI-65 and ITI-105), and to nobody else's."""

from __future__ import annotations

from typing import Any

from tests.documents.conftest import (
    FHIR_JSON,
    OTHER_INS,
    PATIENT_INS,
    Client,
    auth,
    document,
    ids,
    location_id,
    patient_resource,
    provide_bundle,
    publish,
    search,
)
from tests.fhir.conftest import INS

MINE = f"patient.identifier={INS}|{PATIENT_INS}&status=current"
THEIRS = f"patient.identifier={INS}|{OTHER_INS}&status=current"


def for_patient(ins: str, **extra: Any) -> dict[str, Any]:
    return document(subject=f"Patient?identifier={INS}|{ins}", **extra)


def other_bundle(doc: dict[str, Any]) -> dict[str, Any]:
    bundle = provide_bundle(doc)
    bundle["entry"][0]["resource"]["subject"] = doc["subject"]
    return bundle


async def test_patient_publishes_to_their_own_record(client: Client) -> None:
    status, answer = await publish(
        client, provide_bundle(document(master="urn:oid:1.2.250.1.999.5.1")), "patient"
    )
    assert status == 200, answer
    doc_id = location_id(answer["entry"][1])
    # the professional and the patient both find it
    for who in ("pro", "patient"):
        status, found = await search(client, MINE, who)
        assert status == 200 and ids(found) == [doc_id]
    # a legal representative of the patient may publish too
    status, answer = await publish(
        client, provide_bundle(document(master="urn:oid:1.2.250.1.999.5.2")), "rep"
    )
    assert status == 200, answer


async def test_patient_simplified_publish(client: Client) -> None:
    resp = await client.post(
        "/fhir/DocumentReference", json=document(), headers={**auth("patient"), "Content-Type": FHIR_JSON}
    )
    assert resp.status == 201, await resp.text()
    stored = await resp.json(content_type=None)
    _, found = await search(client, MINE, "patient")
    assert ids(found) == [stored["id"]]


async def test_patient_may_not_publish_to_another_record(client: Client) -> None:
    # another patient the store knows, one it does not know: the same refusal (nothing revealed)
    for ins in (OTHER_INS, "1010101010101"):
        status, answer = await publish(client, other_bundle(for_patient(ins)), "patient")
        assert status == 403, answer
        assert answer["issue"][0]["code"] == "forbidden"
        resp = await client.post(
            "/fhir/DocumentReference",
            json=for_patient(ins),
            headers={**auth("patient"), "Content-Type": FHIR_JSON},
        )
        assert resp.status == 403
    _, found = await search(client, THEIRS, "pro")
    assert ids(found) == []  # nothing was stored


async def test_patient_may_not_name_the_other_record_by_id(client: Client, patient_id: str) -> None:
    _, others = await search(client, THEIRS, "pro")  # to learn the other patient's id
    resp = await client.get(f"/fhir/Patient?identifier={INS}|{OTHER_INS}", headers=auth("admin"))
    other_id = (await resp.json(content_type=None))["entry"][0]["resource"]["id"]
    assert other_id != patient_id and others["total"] == 0
    status, answer = await publish(client, other_bundle(document(subject=f"Patient/{other_id}")), "patient")
    assert status == 403, answer
    # and by their own id it is fine
    status, answer = await publish(client, other_bundle(document(subject=f"Patient/{patient_id}")), "patient")
    assert status == 200, answer


async def test_own_documents_in_another_patients_submission_set_are_refused(client: Client) -> None:
    bundle = provide_bundle(document())
    bundle["entry"][0]["resource"]["subject"] = {"reference": f"Patient?identifier={INS}|{OTHER_INS}"}
    status, answer = await publish(client, bundle, "patient")
    assert status == 403 and "entry[0]" in answer["issue"][0]["expression"][0]
    _, found = await search(client, MINE, "pro")
    assert ids(found) == []  # all or nothing


async def test_patient_bundle_holds_new_documents_only(client: Client) -> None:
    # a Patient resource (or anything else) in the Bundle
    bundle = provide_bundle(document())
    bundle["entry"].append(
        {
            "fullUrl": "urn:uuid:0b7a1f2e-0000-4000-8000-200000000001",
            "resource": patient_resource("1999999999999"),
            "request": {"method": "POST", "url": "Patient"},
        }
    )
    status, answer = await publish(client, bundle, "patient")
    assert status == 403 and answer["issue"][0]["expression"][0].startswith("Bundle.entry[2]")

    # a professional's document: the patient does not replace it, nor change its metadata
    status, answer = await publish(client, provide_bundle(document(master="urn:oid:1.2.250.1.999.6.1")))
    assert status == 200
    old_id = location_id(answer["entry"][1])
    replacing = document(
        master="urn:oid:1.2.250.1.999.6.2",
        relatesTo=[{"code": "replaces", "target": {"reference": f"DocumentReference/{old_id}"}}],
    )
    status, answer = await publish(client, provide_bundle(replacing), "patient")
    assert status == 403
    patch = {
        "fullUrl": "urn:uuid:0b7a1f2e-0000-4000-8000-200000000002",
        "resource": {"resourceType": "Parameters", "parameter": []},
        "request": {"method": "PATCH", "url": f"DocumentReference/{old_id}"},
    }
    status, answer = await publish(client, provide_bundle(document(), extra=[patch]), "patient")
    assert status == 403
    resp = await client.patch(
        f"/fhir/DocumentReference/{old_id}",
        data=b'[{"op": "replace", "path": "/status", "value": "entered-in-error"}]',
        headers={**auth("patient"), "Content-Type": "application/json-patch+json"},
    )
    assert resp.status == 403
    _, found = await search(client, MINE, "pro")
    assert ids(found) == [old_id]  # still the professional's document, current, alone
