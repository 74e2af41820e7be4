"""ITI-65 and ITI-105 over HTTP: all or nothing, responses in request order, bytes checked and kept once."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path
from typing import Any

from gateway.store.fhir import SqliteFhirRepository
from tests.documents.conftest import (
    CDA,
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
    sha1_b64,
)


def _count(path: Path, sql: str) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute(sql).fetchone()[0])


async def test_iti65_publishes_in_request_order_with_locations(client: Client, patient_id: str) -> None:
    pdf = b"%PDF-1.4\n% fictive compte rendu\n"
    bundle = provide_bundle(
        document(inline=False, url="urn:uuid:0b7a1f2e-0000-4000-8000-200000000001"),
        document(master="urn:oid:1.2.250.1.999.1.2", data=pdf, inline=True),
        binaries={"urn:uuid:0b7a1f2e-0000-4000-8000-200000000001": CDA},
    )
    bundle["entry"][2]["resource"]["content"][0]["attachment"]["contentType"] = "application/pdf"
    status, answer = await publish(client, bundle)
    assert status == 200, answer
    assert answer["type"] == "transaction-response"
    kinds = [e["response"]["location"].split("/")[0] for e in answer["entry"]]
    assert kinds == ["List", "DocumentReference", "DocumentReference", "Binary"]
    assert all(e["response"]["status"].startswith("201") for e in answer["entry"])
    # The SubmissionSet's references were rewritten to the stored documents, its patient resolved.
    list_id = location_id(answer["entry"][0])
    resp = await client.get(f"/fhir/List/{list_id}", headers=auth("pro"))
    stored_list = await resp.json(content_type=None)
    assert stored_list["subject"] == {"reference": f"Patient/{patient_id}"}
    assert [e["item"]["reference"] for e in stored_list["entry"]] == [
        f"DocumentReference/{location_id(answer['entry'][1])}",
        f"DocumentReference/{location_id(answer['entry'][2])}",
    ]
    # ITI-67 finds both; ITI-68 gives each document's bytes back in its own content type.
    status, found = await search(client, f"patient.identifier={INS}|{PATIENT_INS}&status=current")
    assert status == 200 and found["total"] == 2
    by_id = {e["resource"]["id"]: e["resource"] for e in found["entry"]}
    first = by_id[location_id(answer["entry"][1])]["content"][0]["attachment"]
    second = by_id[location_id(answer["entry"][2])]["content"][0]["attachment"]
    assert "data" not in first and "data" not in second
    for att, data, ctype in ((first, CDA, "application/xml"), (second, pdf, "application/pdf")):
        assert att["url"].startswith("http://127.0.0.1:")
        resp = await client.get(att["url"].split("/fhir", 1)[1].join(["/fhir", ""]), headers=auth("pro"))
        assert resp.status == 200
        assert resp.headers["Content-Type"] == ctype
        assert await resp.read() == data


async def test_bytes_are_stored_once_content_addressed(client: Client, repo: SqliteFhirRepository) -> None:
    bundle = provide_bundle(document(), document(master="urn:oid:1.2.250.1.999.1.2"))
    status, answer = await publish(client, bundle)
    assert status == 200, answer
    assert _count(repo.path, "SELECT COUNT(*) FROM doc_blobs") == 1
    digest = hashlib.sha256(CDA).hexdigest()
    assert _count(repo.path, f"SELECT COUNT(*) FROM doc_blobs WHERE sha256='{digest}'") == 1  # noqa: S608
    assert _count(repo.path, "SELECT COUNT(*) FROM resources WHERE type='Binary'") == 1


async def test_size_mismatch_is_422_and_nothing_is_stored(client: Client, repo: SqliteFhirRepository) -> None:
    bundle = provide_bundle(document(), document(master="urn:oid:1.2.250.1.999.1.2", size=len(CDA) + 1))
    status, answer = await publish(client, bundle)
    assert status == 422
    issue = answer["issue"][0]
    assert issue["expression"] == ["Bundle.entry[2].resource.content[0].attachment.size"]
    for table in ("doc_blobs", "doc_index"):
        assert _count(repo.path, f"SELECT COUNT(*) FROM {table}") == 0  # noqa: S608
    assert _count(repo.path, "SELECT COUNT(*) FROM resources WHERE type IN ('List','DocumentReference')") == 0


async def test_hash_mismatch_is_422_and_nothing_is_stored(client: Client, repo: SqliteFhirRepository) -> None:
    status, answer = await publish(client, provide_bundle(document(hash_=sha1_b64(b"other bytes"))))
    assert status == 422
    assert answer["issue"][0]["expression"] == ["Bundle.entry[1].resource.content[0].attachment.hash"]
    assert _count(repo.path, "SELECT COUNT(*) FROM doc_blobs") == 0
    assert _count(repo.path, "SELECT COUNT(*) FROM resources WHERE type='List'") == 0


async def test_a_bad_entry_rolls_the_whole_transaction_back(
    client: Client, repo: SqliteFhirRepository
) -> None:
    # The second document's patient is unknown: the first one, the List and the bytes go too.
    bad = document(master="urn:oid:1.2.250.1.999.1.2", subject=f"Patient?identifier={INS}|0000000000000")
    status, answer = await publish(client, provide_bundle(document(), bad))
    assert status == 422
    assert answer["issue"][0]["expression"] == ["Bundle.entry[2].resource.subject"]
    assert _count(repo.path, "SELECT COUNT(*) FROM resources WHERE type<>'Patient'") == 0
    assert _count(repo.path, "SELECT COUNT(*) FROM doc_index") == 0


async def test_required_elements_missing_are_errors(client: Client) -> None:
    for missing in ("type", "subject"):
        doc = document()
        doc.pop(missing)
        status, answer = await publish(client, provide_bundle(doc))
        assert status == 422, (missing, answer)
        assert missing in answer["issue"][0]["expression"][0]


async def test_a_bundle_without_submission_set_is_refused(client: Client) -> None:
    bundle = provide_bundle(document())
    bundle["entry"].pop(0)
    status, answer = await publish(client, bundle)
    assert status == 422
    assert "SubmissionSet" in answer["issue"][0]["diagnostics"]


async def test_patient_by_ipp_or_literal_reference(client: Client, patient_id: str) -> None:
    by_ipp = document(subject="Patient?identifier=urn:oid:1.2.250.1.71.4.2.7|100001")
    literal = document(master="urn:oid:1.2.250.1.999.1.2", subject=f"Patient/{patient_id}")
    status, answer = await publish(client, provide_bundle(by_ipp, literal))
    assert status == 200, answer
    status, found = await search(client, f"patient={patient_id}&status=current")
    assert found["total"] == 2
    assert {e["resource"]["subject"]["reference"] for e in found["entry"]} == {f"Patient/{patient_id}"}


async def test_iti105_simplified_publish(client: Client, patient_id: str) -> None:
    doc = document()
    resp = await client.post(
        "/fhir/DocumentReference", json=doc, headers={**auth("pro"), "Content-Type": FHIR_JSON}
    )
    stored = await resp.json(content_type=None)
    assert resp.status == 201, stored
    assert resp.headers["Location"].endswith(f"/DocumentReference/{stored['id']}/_history/1")
    att = stored["content"][0]["attachment"]
    assert "data" not in att and att["url"].endswith(f"/Binary/{hashlib.sha256(CDA).hexdigest()}")
    # A SubmissionSet was made for it, as ITI-105 asks of the recipient.
    resp = await client.get(
        f"/fhir/List?patient={patient_id}&code=submissionset&status=current", headers=auth("pro")
    )
    lists = await resp.json(content_type=None)
    assert lists["total"] == 1
    assert lists["entry"][0]["resource"]["entry"] == [
        {"item": {"reference": f"DocumentReference/{stored['id']}"}}
    ]


async def test_iti105_hash_mismatch_names_the_element(client: Client) -> None:
    doc = document(hash_=sha1_b64(b"x"))
    resp = await client.post(
        "/fhir/DocumentReference", json=doc, headers={**auth("pro"), "Content-Type": FHIR_JSON}
    )
    answer = await resp.json(content_type=None)
    assert resp.status == 422
    assert answer["issue"][0]["expression"] == ["DocumentReference.content[0].attachment.hash"]


async def test_missing_size_and_hash_are_computed_with_warnings(client: Client) -> None:
    doc = document()
    del doc["content"][0]["attachment"]["size"], doc["content"][0]["attachment"]["hash"]
    status, answer = await publish(client, provide_bundle(doc))
    assert status == 200
    issues = answer["entry"][1]["response"]["outcome"]["issue"]
    assert {i["expression"][0].rsplit(".", 1)[1] for i in issues} == {"size", "hash"}
    _, found = await search(client, f"patient.identifier={INS}|{PATIENT_INS}&status=current")
    att = found["entry"][0]["resource"]["content"][0]["attachment"]
    assert att["size"] == len(CDA) and att["hash"] == sha1_b64(CDA)


async def test_publishing_needs_a_professional_or_the_patient(client: Client) -> None:
    # an operator runs the gateway, it does not write in patients' records
    status, _answer = await publish(client, provide_bundle(document()), who="operator")
    assert status == 403
    # the patient adds to their own record (more in test_patient_publish.py)
    status, _answer = await publish(client, provide_bundle(document()), who="patient")
    assert status == 200
    resp = await client.post("/fhir", json=provide_bundle(document()))
    assert resp.status == 401


async def test_bad_base64_is_400(client: Client) -> None:
    doc = document()
    doc["content"][0]["attachment"]["data"] = "not base64!!"
    status, answer = await publish(client, provide_bundle(doc))
    assert status in (400, 422)
    assert answer["resourceType"] == "OperationOutcome"


async def test_other_bundles_still_go_to_the_generic_handler(client: Client) -> None:
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": {"resourceType": "Organization", "name": "CH Test"},
                   "request": {"method": "POST", "url": "Organization"}}],
    }  # fmt: skip
    status, answer = await publish(client, bundle, who="admin")
    assert status == 200 and answer["entry"][0]["response"]["status"].startswith("201")


def test_b64_helper_round_trips() -> None:
    assert b64(b"abc") == "YWJj"
