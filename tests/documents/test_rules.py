"""The DMP rules: replacement, archive, visibility per audience, author-only delete, metadata update."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.store.documents import IS_ARCHIVED, VISIBILITY
from tests.documents.conftest import (
    CONFIDENTIALITY,
    FHIR_JSON,
    INS,
    OTHER_INS,
    OTHER_RPPS,
    PATIENT_INS,
    Client,
    auth,
    b64,
    document,
    ids,
    location_id,
    provide_bundle,
    publish,
    search,
    visibility,
)

JSON_PATCH = "application/json-patch+json"
MINE = f"patient.identifier={INS}|{PATIENT_INS}"


async def _publish_one(client: Client, **kwargs: Any) -> str:
    status, answer = await publish(client, provide_bundle(document(**kwargs)))
    assert status == 200, answer
    return location_id(answer["entry"][1])


async def _patch(client: Client, query: str, ops: list[dict[str, Any]], who: str = "pro") -> tuple[int, Any]:
    resp = await client.patch(
        f"/fhir/DocumentReference?{query}",
        data=orjson.dumps(ops),
        headers={**auth(who), "Content-Type": JSON_PATCH},
    )
    return resp.status, await resp.json(content_type=None)


async def test_replacement_supersedes_the_old_document_in_the_same_transaction(client: Client) -> None:
    old_id = await _publish_one(client)
    new = document(
        master="urn:oid:1.2.250.1.999.1.2",
        data=b"<ClinicalDocument>v2</ClinicalDocument>",
        relatesTo=[{"code": "replaces", "target": {"reference": f"DocumentReference/{old_id}"}}],
    )
    # As PDSm shows it: a FHIRPath Patch entry in the same Bundle sets the old one superseded.
    patch_entry = {
        "fullUrl": "urn:uuid:0b7a1f2e-0000-4000-8000-300000000001",
        "resource": {"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
            {"name": "type", "valueCode": "replace"},
            {"name": "path", "valueString": "DocumentReference.status"},
            {"name": "value", "valueCode": "superseded"}]}]},
        "request": {"method": "PATCH", "url": f"DocumentReference/{old_id}"},
    }  # fmt: skip
    status, answer = await publish(client, provide_bundle(new, extra=[patch_entry]))
    assert status == 200, answer
    assert answer["entry"][2]["response"]["status"] == "200 OK"
    assert answer["entry"][2]["response"]["location"].startswith(f"DocumentReference/{old_id}/_history/")
    new_id = location_id(answer["entry"][1])
    _, current = await search(client, f"{MINE}&status=current")
    assert ids(current) == [new_id]
    _, superseded = await search(client, f"{MINE}&status=superseded")
    assert ids(superseded) == [old_id]
    _, related = await search(client, f"{MINE}&status=current&relatesTo=DocumentReference/{old_id}")
    assert ids(related) == [new_id]


async def test_replacement_without_patch_entry_still_supersedes(client: Client) -> None:
    old_id = await _publish_one(client)
    new = document(
        master="urn:oid:1.2.250.1.999.1.2",
        relatesTo=[{"code": "replaces",
                    "target": {"reference": "DocumentReference?identifier=urn:oid:1.2.250.1.999.1.1"}}],
    )  # fmt: skip
    status, answer = await publish(client, provide_bundle(new))
    assert status == 200, answer
    _, superseded = await search(client, f"{MINE}&status=superseded")
    assert ids(superseded) == [old_id]
    # A superseded document cannot be replaced again: 409, nothing written.
    again = document(
        master="urn:oid:1.2.250.1.999.1.3",
        relatesTo=[{"code": "replaces", "target": {"reference": f"DocumentReference/{old_id}"}}],
    )
    status, answer = await publish(client, provide_bundle(again))
    assert status == 409
    _, current = await search(client, f"{MINE}&status=current")
    assert current["total"] == 1


async def test_replacing_a_document_of_another_patient_is_refused(client: Client) -> None:
    other = await _publish_one(client, subject=f"Patient?identifier={INS}|{OTHER_INS}")
    new = document(
        master="urn:oid:1.2.250.1.999.1.2",
        relatesTo=[{"code": "replaces", "target": {"reference": f"DocumentReference/{other}"}}],
    )
    status, answer = await publish(client, provide_bundle(new))
    assert status == 422
    assert "same patient" in answer["issue"][0]["diagnostics"]


async def test_archive_flag_by_metadata_update_and_search(client: Client) -> None:
    doc_id = await _publish_one(client)
    status, stored = await _patch(
        client,
        "identifier=urn:ietf:rfc:3986|urn:oid:1.2.250.1.999.1.1",
        [{"op": "add", "path": "/extension", "value": [{"url": IS_ARCHIVED, "valueBoolean": True}]}],
    )
    assert status == 200, stored
    assert stored["meta"]["versionId"] == "2"
    _, archived = await search(client, f"{MINE}&status=current&isArchived=true")
    assert ids(archived) == [doc_id]
    _, live = await search(client, f"{MINE}&status=current&isArchived=false")
    assert live["total"] == 0


@pytest.mark.parametrize(
    "path",
    ["/type", "/subject", "/content/0/attachment/title", "/date", "/masterIdentifier/value"],
)
async def test_metadata_update_of_anything_else_is_405(client: Client, path: str) -> None:
    await _publish_one(client)
    status, answer = await _patch(
        client, "identifier=urn:oid:1.2.250.1.999.1.1", [{"op": "replace", "path": path, "value": "x"}]
    )
    assert status == 405, answer
    assert answer["issue"][0]["code"] == "not-supported"
    _, found = await search(client, f"{MINE}&status=current")
    assert found["entry"][0]["resource"]["meta"]["versionId"] == "1"


async def test_mask_and_unmask_by_metadata_update(client: Client) -> None:
    await _publish_one(client)
    masked = [{"coding": [{"system": VISIBILITY, "code": "MASQUE_PS"}]}]
    status, _ = await _patch(
        client,
        "identifier=urn:oid:1.2.250.1.999.1.1",
        [{"op": "replace", "path": "/securityLabel", "value": masked}],
    )
    assert status == 200
    _, found = await search(client, f"{MINE}&status=current", who="pro2")
    assert found["total"] == 0  # another professional no longer sees it
    _, found = await search(client, f"{MINE}&status=current")
    assert found["total"] == 1  # its author still does, and may unmask it
    _, found = await search(client, f"{MINE}&status=current", who="patient")
    assert found["total"] == 1
    normal = [{"coding": [{"system": CONFIDENTIALITY, "code": "N"}]}]
    status, _ = await _patch(
        client,
        "identifier=urn:oid:1.2.250.1.999.1.1",
        [{"op": "replace", "path": "/securityLabel", "value": normal}],
    )
    assert status == 200
    _, found = await search(client, f"{MINE}&status=current", who="pro2")
    assert found["total"] == 1


# code → callers that must not see it, callers that still do
# A professional with audience scopes is still a professional: MASQUE_PS hides documents from
# them too, and each audience adds its own mask (the most restrictive rule wins).
VISIBILITY_RULES = {
    # "pro" authored the document: a mask from professionals does not hide it from its author
    "MASQUE_PS": (
        {"pro2", "social", "third", "social_third"},
        {"pro", "patient", "rep", "admin", "operator"},
    ),
    "INVISIBLE_PATIENT": (
        {"patient", "rep"},
        {"pro", "social", "third", "social_third", "admin", "operator"},
    ),
    "INVISIBLE_REPRESENTANTS_LEGAUX": (
        {"rep"},
        {"patient", "pro", "social", "third", "social_third", "admin", "operator"},
    ),
    "MASQUE_PSOCIAL": ({"social", "social_third"}, {"pro", "patient", "rep", "third", "admin", "operator"}),
    "MASQUE_PT": ({"third", "social_third"}, {"pro", "patient", "rep", "social", "admin", "operator"}),
}


@pytest.mark.parametrize("code", sorted(VISIBILITY_RULES))
async def test_each_visibility_code_per_role(client: Client, code: str) -> None:
    doc_id = await _publish_one(client, labels=(visibility(code),))
    hidden, shown = VISIBILITY_RULES[code]
    for who in sorted(hidden | shown):
        status, found = await search(client, f"{MINE}&status=current", who=who)
        assert status == 200, (who, found)
        assert (found["total"] == 1) == (who in shown), (code, who)
        resp = await client.get(f"/fhir/DocumentReference/{doc_id}", headers=auth(who))
        assert resp.status == (200 if who in shown else 404), (code, who)
        binary = f"/fhir/Binary/{(await _attachment_id(client, doc_id))}"
        resp = await client.get(binary, headers=auth(who))
        assert resp.status == (200 if who in shown else 404), (code, who, "ITI-68")


async def _attachment_id(client: Client, doc_id: str) -> str:
    resp = await client.get(f"/fhir/DocumentReference/{doc_id}", headers=auth("admin"))
    doc = await resp.json(content_type=None)
    return str(doc["content"][0]["attachment"]["url"]).rsplit("/", 1)[1]


async def test_a_patient_sees_only_their_own_record(client: Client) -> None:
    await _publish_one(client, subject=f"Patient?identifier={INS}|{OTHER_INS}")
    status, _answer = await search(
        client, f"patient.identifier={INS}|{OTHER_INS}&status=current", who="patient"
    )
    assert status == 403
    status, found = await search(client, f"patient.identifier={INS}|{OTHER_INS}&status=current", who="pro")
    assert status == 200 and found["total"] == 1


async def test_delete_is_logical_and_for_the_author_only(client: Client) -> None:
    doc_id = await _publish_one(client)
    for who, expected in (("pro2", 403), ("patient", 403), ("operator", 403)):
        resp = await client.delete(f"/fhir/DocumentReference/{doc_id}", headers=auth(who))
        assert resp.status == expected, who
    _, found = await search(client, f"{MINE}&status=current")
    assert found["total"] == 1
    resp = await client.delete(f"/fhir/DocumentReference/{doc_id}", headers=auth("pro"))
    stored = await resp.json(content_type=None)
    assert resp.status == 200 and stored["status"] == "entered-in-error"
    _, found = await search(client, f"{MINE}&status=current")
    assert found["total"] == 0
    _, deleted = await search(client, f"{MINE}&status=entered-in-error")
    assert ids(deleted) == [doc_id]  # logical: still there, marked


async def test_delete_by_metadata_update_follows_the_author_rule(client: Client) -> None:
    await _publish_one(client, author_rpps=OTHER_RPPS)
    ops = [{"op": "replace", "path": "/status", "value": "entered-in-error"}]
    status, answer = await _patch(client, "identifier=urn:oid:1.2.250.1.999.1.1", ops, who="pro")
    assert status == 403, answer
    status, stored = await _patch(client, "identifier=urn:oid:1.2.250.1.999.1.1", ops, who="pro2")
    assert status == 200 and stored["status"] == "entered-in-error"


async def test_put_on_a_document_is_405(client: Client) -> None:
    doc_id = await _publish_one(client)
    resp = await client.put(
        f"/fhir/DocumentReference/{doc_id}",
        json=document(),
        headers={**auth("pro"), "Content-Type": FHIR_JSON},
    )
    assert resp.status == 405


async def test_conditional_patch_errors(client: Client) -> None:
    status, _ = await _patch(
        client, "identifier=urn:oid:9.9.9", [{"op": "replace", "path": "/status", "value": "current"}]
    )
    assert status == 404
    resp = await client.patch(
        "/fhir/DocumentReference?identifier=x",
        data=b"[]",
        headers={**auth("pro"), "Content-Type": "application/json"},
    )
    assert resp.status == 415
    await _publish_one(client)
    status, _answer = await _patch(
        client,
        "identifier=urn:oid:1.2.250.1.999.1.1",
        [{"op": "replace", "path": "/status", "value": "bogus"}],
    )
    assert status == 422


async def test_json_patch_binary_entry_in_a_bundle(client: Client) -> None:
    doc_id = await _publish_one(client)
    ops = [{"op": "add", "path": "/extension", "value": [{"url": IS_ARCHIVED, "valueBoolean": True}]}]
    entry = {
        "resource": {"resourceType": "Binary", "contentType": JSON_PATCH, "data": b64(orjson.dumps(ops))},
        "request": {"method": "PATCH", "url": f"DocumentReference/{doc_id}"},
    }
    bundle = provide_bundle(document(master="urn:oid:1.2.250.1.999.1.2"), extra=[entry])
    status, answer = await publish(client, bundle)
    assert status == 200, answer
    _, archived = await search(client, f"{MINE}&status=current&isArchived=true")
    assert ids(archived) == [doc_id]


@pytest.mark.parametrize("kind", ["batch", "transaction"])
async def test_generic_bundle_writes_cannot_touch_a_document(client: Client, kind: str) -> None:
    doc_id = await _publish_one(client, labels=(visibility("MASQUE_PS"),))
    resp = await client.get(f"/fhir/DocumentReference/{doc_id}", headers=auth("admin"))
    before = await resp.json(content_type=None)
    changed = {**before, "description": "rewritten"}
    entries = [
        {"resource": changed, "request": {"method": "PUT", "url": f"DocumentReference/{doc_id}"}},
        {"request": {"method": "DELETE", "url": f"DocumentReference/{doc_id}"}},
        {
            "resource": {k: v for k, v in changed.items() if k not in ("id", "meta")},
            "request": {"method": "POST", "url": "DocumentReference"},
        },
    ]
    for who in ("pro2", "admin"):
        for entry in entries:
            bundle = {"resourceType": "Bundle", "type": kind, "entry": [entry]}
            headers = {**auth(who), "Content-Type": "application/fhir+json"}
            resp = await client.post("/fhir", data=orjson.dumps(bundle), headers=headers)
            answer = await resp.json(content_type=None)
            # refused as a whole (405, or 422 when a transaction is taken for an ITI-65 without
            # its SubmissionSet), or entry by entry in a batch-response: never applied
            if resp.status == 200:
                assert kind == "batch", answer
                assert answer["entry"][0]["response"]["status"].startswith("405"), (who, entry, answer)
            else:
                assert resp.status in (405, 422), (who, entry, answer)
                assert answer["resourceType"] == "OperationOutcome"
    resp = await client.get(f"/fhir/DocumentReference/{doc_id}", headers=auth("admin"))
    assert await resp.json(content_type=None) == before
