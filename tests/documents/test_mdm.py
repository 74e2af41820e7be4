"""The HL7v2 document feed: MDM^T02/T04/T10 golden mappings, and MLLP → repository → ITI-67 end to end."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from connectors.mllp.client import MllpClient
from gateway.hl7.er7 import Message
from gateway.mapping import catalog
from gateway.mapping.engine import Library
from gateway.mapping.validate import bundle_errors
from tests.conftest import ADMIN_ENTRY, make_config, mllp_port, with_settings
from tests.documents.conftest import TOKENS
from tests.documents.mdm_messages import CDA_V1, DOC_ROOT, INS, INS_NIR, IPP, IPP_OID, PDF_V2, mdm

MAPPINGS = Path(__file__).resolve().parents[2] / "mappings"
IDNPS = "urn:oid:1.2.250.1.71.4.2.1"
FR_0203 = "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0203"
MERGE = [{"url": "urn:passerelle:write-policy", "valueCode": "merge"}]


@pytest.fixture(scope="module")
def library() -> Library:
    return Library.load(MAPPINGS, catalog.available())


def _normalised(bundle: dict[str, Any]) -> dict[str, Any]:
    """urn:uuid fullUrls (random per run) → their entry index, everywhere they appear."""
    names = {e["fullUrl"]: f"urn:entry:{i}" for i, e in enumerate(bundle["entry"])}

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return names.get(node, node) if isinstance(node, str) else node

    out: dict[str, Any] = walk(bundle)
    return out


PATIENT = {
    "resourceType": "Patient",
    "meta": {"profile": [
        "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-patient",
        "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-patient-ins",  # the INS travels (VALI)
    ]},
    "identifier": [
        {"value": IPP, "system": f"urn:oid:{IPP_OID}",
         "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "PI"}]},
         "use": "usual", "assigner": {"display": "CHU-NANTES"}},
        {"use": "official", "type": {"coding": [{"system": FR_0203, "code": "INS-NIR"}]},
         "system": f"urn:oid:{INS_NIR}", "value": INS, "assigner": {"display": "ASIP-SANTE-INS-NIR"}},
    ],
    # PAM FR: XPN-3 of the birth name is the list of birth given names
    "name": [{"family": "Lefèvre", "given": ["Amélie"], "use": "official", "extension": [
        {"url": "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-patient-birth-list-given-name",
         "valueString": "Marie Jeanne"}]}],
    "gender": "female",
    "birthDate": "1984-07-07",
    "extension": [{
        "url": "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-identity-reliability",
        "extension": [{"url": "identityStatus", "valueCoding": {
            "system": "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0445", "code": "VALI"}}],
    }],
}  # fmt: skip
AUTHOR = {
    "resourceType": "Practitioner",
    "meta": {"profile": ["https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-practitioner"]},
    "identifier": [{"value": "10001234567", "system": "https://rpps.esante.gouv.fr",  # IDNPS = 8 + RPPS
                    "type": {"coding": [{"system": FR_0203, "code": "RPPS"}]},
                    "assigner": {"display": "ASIP-SANTE-PS"}},
                   {"value": "810001234567", "system": IDNPS,
                    "type": {"coding": [{"system": FR_0203, "code": "IDNPS"}]},
                    "assigner": {"display": "ASIP-SANTE-PS"}}],
    "name": [{"family": "Martin", "given": ["Jean"], "prefix": ["Dr"], "use": "usual"}],
}  # fmt: skip
VISIT = {
    "resourceType": "Encounter",
    "identifier": [
        {
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "VN"}]},
            "system": f"urn:oid:{IPP_OID}",
            "value": "V2024-0042",
            "assigner": {"display": "CHU-NANTES"},
        }
    ],
    "status": "unknown",
    "class": {
        "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
        "code": "AMB",
        "display": "ambulatory",
    },
    "subject": {"reference": "urn:entry:0"},
    "serviceProvider": {"reference": "urn:entry:2"},
}
CUSTODIAN = {
    "resourceType": "Organization",
    "meta": {"profile": ["https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-organization"]},
    "identifier": [{"system": "urn:ietf:rfc:3986", "value": "urn:oid:1.2.250.1.71.4.2.2.1234"}],
    "name": "CHU-NANTES",
}


def _document(
    doc: str, status: str, data: bytes, content_type: str, relates: str | None = None
) -> dict[str, Any]:
    ident = {"system": f"urn:oid:{DOC_ROOT}", "value": doc}
    resource: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "masterIdentifier": ident,
        "identifier": [ident],
        "status": status,
        "docStatus": "final",
        "type": {"coding": [{"system": "http://loinc.org", "code": "11488-4",
                             "display": "CR de consultation"}],
                 "text": "CR de consultation"},
        "subject": {"reference": "urn:entry:0"},
        "date": "2024-05-14T10:30:00+02:00",
        "author": [{"reference": "urn:entry:1"}],
        "custodian": {"reference": "urn:entry:2"},
    }  # fmt: skip
    if relates:
        target = f"DocumentReference?identifier=urn:oid:{DOC_ROOT}|{relates}"
        resource["relatesTo"] = [{"code": "replaces", "target": {"reference": target}}]
    resource["content"] = [{"attachment": {
        "contentType": content_type,
        "data": base64.b64encode(data).decode(),
        "size": len(data),
        "hash": base64.b64encode(hashlib.sha1(data, usedforsecurity=False).digest()).decode(),
        "title": "CR de consultation",
        "creation": "2024-05-14T09:30:00+02:00",
    }}]  # fmt: skip
    resource["context"] = {"period": {"start": "2024-05-14T10:00:00+02:00"}}
    return resource


def _expected(document: dict[str, Any]) -> dict[str, Any]:
    doc_id = document["identifier"][0]
    in_visit = {**document, "context": {**document["context"], "encounter": [{"reference": "urn:entry:4"}]}}
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            # a document feed only names the Patient: created when none has any of its keys,
            # never overwritten
            {"fullUrl": "urn:entry:0", "resource": PATIENT,
             "request": {"method": "POST", "url": "Patient",
                         "ifNoneExist": f"identifier=urn:oid:{IPP_OID}|{IPP},urn:oid:{INS_NIR}|{INS}"}},
            {"fullUrl": "urn:entry:1", "resource": AUTHOR,
             "request": {"method": "PUT", "url": f"Practitioner?identifier={IDNPS}|810001234567",
                         "extension": MERGE}},
            {"fullUrl": "urn:entry:2", "resource": CUSTODIAN,
             "request": {"method": "PUT",
                         "url": "Organization?identifier=urn:ietf:rfc:3986|urn:oid:1.2.250.1.71.4.2.2.1234",
                         "extension": MERGE}},
            {"fullUrl": "urn:entry:3", "resource": in_visit,
             "request": {"method": "PUT",
                         "url": f"DocumentReference?identifier={doc_id['system']}|{doc_id['value']}"}},
            # the visit the document belongs to (PV1-19): created when unknown, never changed
            {"fullUrl": "urn:entry:4", "resource": VISIT,
             "request": {"method": "POST", "url": "Encounter",
                         "ifNoneExist": f"identifier=urn:oid:{IPP_OID}|V2024-0042"}},
        ],
    }  # fmt: skip


@pytest.mark.parametrize(
    ("message", "document"),
    [
        (mdm("T02", "MDM-0001", "58132"), _document("58132", "current", CDA_V1, "application/xml")),
        (
            mdm("T04", "MDM-0002", "58132", result="D"),
            _document("58132", "entered-in-error", CDA_V1, "application/xml"),
        ),
        (
            mdm("T10", "MDM-0003", "58133", parent="58132", data=PDF_V2, kind="application^pdf", result="C"),
            _document("58133", "current", PDF_V2, "application/pdf", relates="58132"),
        ),
    ],
    ids=["T02-publish", "T04-delete", "T10-replace"],
)
def test_golden(library: Library, message: bytes, document: dict[str, Any]) -> None:
    result = library.map(Message.parse(message.decode("utf-8")))
    assert result.mapping == "mdm-documents"
    assert _normalised(result.bundle) == _expected(document)
    assert bundle_errors(result.bundle) == []
    assert result.warnings == []
    # What the mappings leave is reported, never dropped silently (PV1-1, the set id, names nothing).
    assert [u for u in result.unmapped if u.startswith("PV1")] == ["PV1-1[1]"]
    assert not any(u.startswith(("TXA-12", "OBX-5")) for u in result.unmapped)


def test_plain_text_document(library: Library) -> None:
    text = "Compte rendu : tension normale, pas de traitement."
    message = mdm("T02", "MDM-0004", "58134", data=text.encode(), kind="TEXT^PLAIN", encoding="A")
    result = library.map(Message.parse(message.decode("utf-8")))
    att = result.bundle["entry"][3]["resource"]["content"][0]["attachment"]
    assert att["contentType"] == "text/plain"
    assert base64.b64decode(att["data"]).decode() == text
    assert att["size"] == len(text.encode())


def test_a_document_sent_as_text_lines_is_a_text_document(library: Library) -> None:
    """OBX-2 TX in a document transmission (MDM): its lines (every TX OBX, every repetition) are
    the document, text/plain, joined by newlines; its OBX-5 is text, never read as ED components.
    (Before: the OBX was reported and no document made.)"""
    message = mdm("T02", "MDM-0005", "58135").decode("utf-8")
    message = message.replace(
        "OBX|1|ED|11488-4^CR de consultation^LN||^TEXT^XML^Base64^" + base64.b64encode(CDA_V1).decode(),
        "OBX|1|TX|11488-4^CR de consultation^LN||Tension normale.~Pas de traitement \\T\\ suivi",
    ).replace("||||||F\r", "||||||F\rOBX|2|TX|11488-4^CR de consultation^LN||Revoir dans un mois.||||||F\r")
    result = library.map(Message.parse(message))
    document = next(
        e["resource"] for e in result.bundle["entry"] if e["resource"]["resourceType"] == "DocumentReference"
    )
    att = document["content"][0]["attachment"]
    text = "Tension normale.\nPas de traitement & suivi\nRevoir dans un mois."
    assert att["contentType"] == "text/plain"
    assert base64.b64decode(att["data"]).decode() == text
    assert att["size"] == len(text.encode()) and att["title"] == "CR de consultation"
    assert document["type"]["coding"][0]["code"] == "11488-4"
    # the attachment holds the lines in Base64, not as sent: reported, and the message says why
    assert {"OBX-5[1]", "OBX-5[2]", "OBX[2]-5[1]"} <= set(result.unmapped)
    assert any("text lines (OBX-2 TX/FT) make the text/plain document" in w for w in result.warnings)
    assert bundle_errors(result.bundle) == []


# -- end to end -------------------------------------------------------------------------------------


def _config(tmp_path: Path) -> Any:
    cfg = make_config(
        tmp_path,
        name="documents",
        steps=[{"type": "fhir_mapping", "directory": str(MAPPINGS)}],
        destinations=[{"name": "repository", "type": "fhir_repository", "path": "{data_dir}/fhir.db"}],
    )
    return with_settings(cfg, auth={"tokens": [ADMIN_ENTRY, *TOKENS.values()]})


async def _send(gw: Any, message: bytes) -> None:
    client = MllpClient("127.0.0.1", mllp_port(gw))
    try:
        assert Message.decode(await client.send(message)).get("MSA-1") == "AA"
    finally:
        await client.close()


async def _wait_sent(gw: Any, n: int) -> None:
    for _ in range(400):
        rows = await gw.store.list_messages(
            status="SENT", control_id=None, channel="documents", limit=50, before_seq=None
        )
        if len(rows) >= n:
            return
        errors = await gw.store.list_messages(
            status="ERROR", control_id=None, channel=None, limit=5, before_seq=None
        )
        dead = await gw.store.list_messages(
            status="DEAD", control_id=None, channel=None, limit=5, before_seq=None
        )
        assert not errors and not dead, (errors, dead)
        await asyncio.sleep(0.05)
    raise AssertionError("messages not delivered in time")


async def test_mdm_feed_end_to_end(start_gateway: Any, tmp_path: Path) -> None:
    gw = await start_gateway(_config(tmp_path))
    base = f"http://127.0.0.1:{gw.http_port_bound}/fhir"
    pro = {"Authorization": f"Bearer {TOKENS['pro']['token']}"}
    query = f"{base}/DocumentReference?patient.identifier=urn:oid:{INS_NIR}|{INS}"
    async with aiohttp.ClientSession(headers=pro) as http:
        await _send(gw, mdm("T02", "MDM-0001", "58132"))
        await _wait_sent(gw, 1)
        async with http.get(f"{query}&status=current&type=http://loinc.org|11488-4") as resp:
            found = await resp.json(content_type=None)
        assert resp.status == 200 and found["total"] == 1
        first = found["entry"][0]["resource"]
        async with http.get(first["content"][0]["attachment"]["url"]) as resp:
            assert resp.headers["Content-Type"] == "application/xml"
            assert await resp.read() == CDA_V1
        async with http.get(
            f"{base}/List?patient.identifier=urn:oid:{INS_NIR}|{INS}&code=submissionset"
        ) as resp:
            assert (await resp.json(content_type=None))["total"] == 1

        # Replacement (T10): the PDF replaces the CDA, which becomes superseded.
        await _send(
            gw,
            mdm("T10", "MDM-0002", "58133", parent="58132", data=PDF_V2, kind="application^pdf", result="C"),
        )
        await _wait_sent(gw, 2)
        async with http.get(f"{query}&status=current") as resp:
            current = (await resp.json(content_type=None))["entry"]
        assert [d["resource"]["masterIdentifier"]["value"] for d in current] == ["58133"]
        async with http.get(f"{query}&status=superseded") as resp:
            superseded = (await resp.json(content_type=None))["entry"]
        assert [d["resource"]["id"] for d in superseded] == [first["id"]]

        # Deletion (T04) of the new version: logical, so it is found as entered-in-error.
        await _send(gw, mdm("T04", "MDM-0003", "58133", data=PDF_V2, kind="application^pdf", result="D"))
        await _wait_sent(gw, 3)
        async with http.get(f"{query}&status=current") as resp:
            assert (await resp.json(content_type=None))["total"] == 0
        async with http.get(f"{query}&status=entered-in-error") as resp:
            assert (await resp.json(content_type=None))["total"] == 1

        # The same T02 sent again under a new control id: nothing changes (idempotent).
        async with http.get(f"{base}/DocumentReference/{first['id']}") as resp:
            before = await resp.json(content_type=None)
        await _send(gw, mdm("T02", "MDM-0004", "58132"))
        await _wait_sent(gw, 4)
        async with http.get(f"{base}/DocumentReference/{first['id']}") as resp:
            after = await resp.json(content_type=None)
        assert after == before  # still superseded, same version: a replay resurrects nothing
