"""Who may change a published document's status and visibility, on every write path.

A document's status, visibility labels (TRE_A07 codes, confidentiality) and archive flag are its
author's to change (an administrator's and the gateway's own feed too). The patient may mask and
unmask a document of their own record from professionals (MASQUE_PS, MASQUE_PSOCIAL,
MASQUE_PT), nothing else. A professional who is not the author changes none of them: 403,
and the document stays as it was.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.store.documents import IS_ARCHIVED, VISIBILITY
from tests.documents.conftest import (
    CONFIDENTIALITY,
    FHIR_JSON,
    INS,
    PATIENT_INS,
    Client,
    auth,
    b64,
    document,
    location_id,
    provide_bundle,
    publish,
    search,
    visibility,
)

JSON_PATCH = "application/json-patch+json"
MINE = f"patient.identifier={INS}|{PATIENT_INS}"
MASTER = "urn:oid:1.2.250.1.999.1.1"


def labels(*codes: str) -> list[dict[str, Any]]:
    out = [{"coding": [{"system": CONFIDENTIALITY, "code": "N"}]}]
    return out + [{"coding": [{"system": VISIBILITY, "code": c}]} for c in codes]


async def _publish(client: Client, *codes: str, master: str = MASTER) -> str:
    data = f"<ClinicalDocument>{master}</ClinicalDocument>".encode()
    doc = document(master=master, data=data, labels=((CONFIDENTIALITY, "N"), *(visibility(c) for c in codes)))
    status, answer = await publish(client, provide_bundle(doc))
    assert status == 200, answer
    return location_id(answer["entry"][1])


async def _stored(client: Client, doc_id: str) -> dict[str, Any]:
    resp = await client.get(f"/fhir/DocumentReference/{doc_id}", headers=auth("admin"))
    assert resp.status == 200
    return dict(await resp.json(content_type=None))


async def _patch(client: Client, target: str, ops: list[dict[str, Any]], who: str) -> tuple[int, Any]:
    resp = await client.patch(
        f"/fhir/DocumentReference{target}",
        data=orjson.dumps(ops),
        headers={**auth(who), "Content-Type": JSON_PATCH},
    )
    return resp.status, await resp.json(content_type=None)


def _targets(doc_id: str) -> list[str]:
    """The two PATCH forms: by id, and the conditional one (PDSm metadata update)."""
    return [f"/{doc_id}", f"?identifier=urn:ietf:rfc:3986|{MASTER}"]


def _replace_labels(*codes: str) -> list[dict[str, Any]]:
    return [{"op": "replace", "path": "/securityLabel", "value": labels(*codes)}]


ARCHIVED = {"url": IS_ARCHIVED, "valueBoolean": True}
CONFIDENTIALITY_CODE = "/securityLabel/0/coding/0/code"

# What a professional who is not the author tried, and succeeded at: each one is refused now.
REFUSED_TO_OTHERS = {
    "unhide from the patient": (("INVISIBLE_PATIENT",), _replace_labels()),
    "unhide from legal representatives": (("INVISIBLE_REPRESENTANTS_LEGAUX",), _replace_labels()),
    "mask from every professional": ((), _replace_labels("MASQUE_PS")),
    "add a mask with add": ((), [{"op": "add", "path": "/securityLabel/-", "value": labels("MASQUE_PT")[1]}]),
    "supersede": ((), [{"op": "replace", "path": "/status", "value": "superseded"}]),
    "delete": ((), [{"op": "replace", "path": "/status", "value": "entered-in-error"}]),
    "archive": ((), [{"op": "add", "path": "/extension", "value": [ARCHIVED]}]),
    "change the confidentiality": ((), [{"op": "replace", "path": CONFIDENTIALITY_CODE, "value": "R"}]),
}


@pytest.mark.parametrize("form", ["id", "conditional"])
@pytest.mark.parametrize("what", sorted(REFUSED_TO_OTHERS))
async def test_a_professional_who_is_not_the_author_changes_no_status_or_visibility(
    client: Client, what: str, form: str
) -> None:
    codes, ops = REFUSED_TO_OTHERS[what]
    doc_id = await _publish(client, *codes)
    before = await _stored(client, doc_id)
    target = _targets(doc_id)[0 if form == "id" else 1]
    status, answer = await _patch(client, target, ops, "pro2")
    assert status == 403, (what, answer)
    assert answer["resourceType"] == "OperationOutcome" and answer["issue"][0]["code"] == "forbidden"
    assert await _stored(client, doc_id) == before  # nothing written, no new version


async def test_the_patient_still_cannot_read_what_another_professional_tried_to_unhide(
    client: Client,
) -> None:
    doc_id = await _publish(client, "INVISIBLE_PATIENT")
    status, _ = await _patch(client, f"/{doc_id}", _replace_labels(), "pro2")
    assert status == 403
    resp = await client.get(f"/fhir/DocumentReference/{doc_id}", headers=auth("patient"))
    assert resp.status == 404
    _, found = await search(client, f"{MINE}&status=current", who="patient")
    assert found["total"] == 0


async def test_the_author_changes_status_and_visibility(client: Client) -> None:
    doc_id = await _publish(client, "INVISIBLE_PATIENT")
    # after the consultation where the patient was told: visible to the patient
    status, stored = await _patch(client, f"/{doc_id}", _replace_labels(), "pro")
    assert status == 200, stored
    resp = await client.get(f"/fhir/DocumentReference/{doc_id}", headers=auth("patient"))
    assert resp.status == 200
    for ops in (
        _replace_labels("MASQUE_PS", "INVISIBLE_REPRESENTANTS_LEGAUX"),
        [{"op": "replace", "path": "/securityLabel/0/coding/0/code", "value": "R"}],
        [{"op": "add", "path": "/extension", "value": [{"url": IS_ARCHIVED, "valueBoolean": True}]}],
        [{"op": "replace", "path": "/status", "value": "superseded"}],
    ):
        status, stored = await _patch(client, _targets(doc_id)[1], ops, "pro")
        assert status == 200, (ops, stored)
    assert stored["status"] == "superseded"


async def test_the_patient_masks_and_unmasks_from_professionals_only(client: Client) -> None:
    doc_id = await _publish(client)
    status, stored = await _patch(client, f"/{doc_id}", _replace_labels("MASQUE_PS"), "patient")
    assert status == 200, stored
    _, found = await search(client, f"{MINE}&status=current", who="pro2")
    assert found["total"] == 0  # hidden from other professionals
    _, found = await search(client, f"{MINE}&status=current", who="patient")
    assert found["total"] == 1
    status, stored = await _patch(client, _targets(doc_id)[1], _replace_labels("MASQUE_PT"), "patient")
    assert status == 200, stored
    status, stored = await _patch(client, f"/{doc_id}", _replace_labels(), "patient")
    assert status == 200, stored
    _, found = await search(client, f"{MINE}&status=current", who="pro2")
    assert found["total"] == 1
    before = await _stored(client, doc_id)
    for ops in (
        _replace_labels("INVISIBLE_REPRESENTANTS_LEGAUX"),
        [{"op": "replace", "path": "/securityLabel/0/coding/0/code", "value": "V"}],
        [{"op": "replace", "path": "/status", "value": "entered-in-error"}],
        [{"op": "add", "path": "/extension", "value": [{"url": IS_ARCHIVED, "valueBoolean": True}]}],
    ):
        status, answer = await _patch(client, f"/{doc_id}", ops, "patient")
        assert status == 403, (ops, answer)
    assert await _stored(client, doc_id) == before


async def test_the_patient_patches_only_their_own_documents(client: Client) -> None:
    other = await _publish_for_the_other_patient(client)
    status, _ = await _patch(client, f"/{other}", _replace_labels("MASQUE_PS"), "patient")
    assert status == 404  # as if absent: the other patient's record is not theirs to see
    # the conditional form does not name the document it found either
    by_identifier = "?identifier=urn:ietf:rfc:3986|urn:oid:1.2.250.1.999.1.7"
    status, answer = await _patch(client, by_identifier, _replace_labels("MASQUE_PS"), "patient")
    assert status == 404
    assert other not in orjson.dumps(answer).decode()


async def _publish_for_the_other_patient(client: Client) -> str:
    from tests.documents.conftest import OTHER_INS

    doc = document(
        master="urn:oid:1.2.250.1.999.1.7",
        data=b"<ClinicalDocument>other</ClinicalDocument>",
        subject=f"Patient?identifier={INS}|{OTHER_INS}",
    )
    bundle = provide_bundle(doc)
    bundle["entry"][0]["resource"]["subject"] = {"reference": f"Patient?identifier={INS}|{OTHER_INS}"}
    status, answer = await publish(client, bundle)
    assert status == 200, answer
    return location_id(answer["entry"][1])


def _fhirpath_entry(doc_id: str, path: str, value: dict[str, Any], kind: str = "replace") -> dict[str, Any]:
    return {
        "resource": {"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
            {"name": "type", "valueCode": kind},
            {"name": "path", "valueString": path},
            {"name": "value", **value}]}]},
        "request": {"method": "PATCH", "url": f"DocumentReference/{doc_id}"},
    }  # fmt: skip


def _json_patch_entry(target: str, ops: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resource": {"resourceType": "Binary", "contentType": JSON_PATCH, "data": b64(orjson.dumps(ops))},
        "request": {"method": "PATCH", "url": f"DocumentReference{target}"},
    }


async def test_transaction_bundles_follow_the_same_rules(client: Client) -> None:
    doc_id = await _publish(client, "INVISIBLE_PATIENT")
    before = await _stored(client, doc_id)
    new = document(master="urn:oid:1.2.250.1.999.1.2", data=b"<ClinicalDocument>n</ClinicalDocument>")
    entries = {
        "FHIRPath status": _fhirpath_entry(doc_id, "DocumentReference.status", {"valueCode": "superseded"}),
        "FHIRPath label": _fhirpath_entry(
            doc_id,
            "DocumentReference.securityLabel",
            {"valueCodeableConcept": {"coding": [{"system": VISIBILITY, "code": "MASQUE_PS"}]}},
        ),
        "FHIRPath label removed": _fhirpath_entry(doc_id, "DocumentReference.securityLabel", {}, "delete"),
        "JSON Patch": _json_patch_entry(f"/{doc_id}", _replace_labels()),
        "conditional JSON Patch": _json_patch_entry(f"?identifier={MASTER}", _replace_labels("MASQUE_PS")),
        "DELETE": {"request": {"method": "DELETE", "url": f"DocumentReference/{doc_id}"}},
    }
    for what, entry in entries.items():
        status, answer = await publish(client, provide_bundle(new, extra=[entry]), who="pro2")
        assert status == 403, (what, answer)
    # a replacement supersedes the replaced document: its author's call too
    replacement = document(
        master="urn:oid:1.2.250.1.999.1.3",
        data=b"<ClinicalDocument>r</ClinicalDocument>",
        relatesTo=[{"code": "replaces", "target": {"reference": f"DocumentReference/{doc_id}"}}],
    )
    status, answer = await publish(client, provide_bundle(replacement), who="pro2")
    assert status == 403, answer
    # a PUT of the document with other labels
    changed = {k: v for k, v in before.items() if k != "meta"}
    changed["securityLabel"] = labels()
    put = {"resource": changed, "request": {"method": "PUT", "url": f"DocumentReference/{doc_id}"}}
    bundle = provide_bundle(extra=[put])
    bundle["entry"][0]["resource"]["entry"] = [{"item": {"reference": f"DocumentReference/{doc_id}"}}]
    status, answer = await publish(client, bundle, who="pro2")
    assert status in (403, 405), answer
    assert await _stored(client, doc_id) == before
    _, found = await search(client, f"{MINE}&status=current", who="pro")
    assert found["total"] == 1  # nothing of the refused Bundles was written
    # the author's own Bundle does it
    status, answer = await publish(client, provide_bundle(new, extra=[entries["JSON Patch"]]), who="pro")
    assert status == 200, answer
    resp = await client.get(f"/fhir/DocumentReference/{doc_id}", headers=auth("patient"))
    assert resp.status == 200


async def test_a_masked_document_is_not_found_by_a_bundle_patch_of_who_may_not_see_it(client: Client) -> None:
    doc_id = await _publish(client, "MASQUE_PS")
    entry = _fhirpath_entry(doc_id, "DocumentReference.status", {"valueCode": "superseded"})
    new = document(master="urn:oid:1.2.250.1.999.1.2", data=b"<ClinicalDocument>n</ClinicalDocument>")
    status, answer = await publish(client, provide_bundle(new, extra=[entry]), who="pro2")
    assert status == 404, answer  # as if absent, not "forbidden": pro2 may not know it exists
    assert (await client.put(
        f"/fhir/DocumentReference/{doc_id}", data=b"{}", headers={**auth("pro2"), "Content-Type": FHIR_JSON}
    )).status == 405  # fmt: skip
