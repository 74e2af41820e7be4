"""Which OBX is an MDM's document, and what the message says of it.

The document is the OBX of type ED that is neither a MetaDMPMSS flag nor the MSSanté mail (else the
text lines, see test_mdm.py); its OBX-3 is the document's type. Before: the type and the bytes were
read from OBX[1] whatever it was, so an MDM whose first OBX named a DICOM study and whose second
carried the PDF gave no document (or one typed "DICOM Study"). The PRT "SB" (send by) gives the
author and its institution (CI-SIS mapping.md: authorInstitution ← PRT-8 of the SB PRT).
"""

from __future__ import annotations

import base64
from typing import Any

from gateway.mapping.validate import bundle_errors
from tests.documents.cisis_messages import convert
from tests.documents.mdm_messages import CDA_V1, PDF_V2, mdm
from tests.hl7_leaves import silent_leaves

DICOM_STUDY = "OBX|1|RP|113014^DICOM Study^DCM||1.2.250.1.999.3.4.5^^application^dicom||||||F"
SB = (
    "PRT||UC||SB^Send by^participation|801234567866^DIAZ^Thierry^^^^^^ASIP-SANTE-PS&1.2.250.1.71.4.2.1&ISO"
    "^D^^^RPPS|||labo^^^^^ASIP-SANTE-ST&1.2.250.1.71.4.2.2&ISO^FINEG^^^1120459876"
)


def _pdf_second(extra_first: str) -> bytes:
    text = mdm("T02", "C-1", "58132", data=PDF_V2, kind="application^pdf").decode()
    text = text.replace("OBX|1|ED|", extra_first + "\rOBX|2|ED|")
    return text.encode()


def _document(bundle: dict[str, Any]) -> dict[str, Any]:
    [doc] = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DocumentReference"]
    return doc


def test_the_type_comes_from_the_obx_that_carries_the_document() -> None:
    raw = _pdf_second(DICOM_STUDY)
    result = convert(raw)
    doc = _document(result.bundle)
    att = doc["content"][0]["attachment"]
    assert att["contentType"] == "application/pdf" and base64.b64decode(att["data"]) == PDF_V2
    assert doc["type"]["coding"][0]["code"] == "11488-4"  # OBX[2]-3, not OBX[1]'s DICOM Study
    assert att["title"] == "CR de consultation"
    assert {"OBX-3[1].1", "OBX-5[1].1"} <= set(result.unmapped)  # the study reference is reported
    assert bundle_errors(result.bundle) == []
    assert silent_leaves(raw, result.bundle, result.unmapped) == []


def test_of_two_eds_the_one_typed_as_the_document_is_the_document() -> None:
    """TXA-2 (the document's type, JDV_J07) names which ED is the document."""
    other = f"OBX|1|ED|18748-4^CR d'imagerie^LN||^TEXT^XML^Base64^{base64.b64encode(CDA_V1).decode()}||||||F"
    result = convert(_pdf_second(other))
    doc = _document(result.bundle)
    assert doc["content"][0]["attachment"]["contentType"] == "application/pdf"
    assert any("OBX[1]: an MDM carries one document" in w for w in result.warnings)


def test_the_sender_gives_the_author_and_its_institution() -> None:
    text = mdm("T02", "C-1", "58132").decode()
    # no originator (TXA-9): the sender of the request is the author, its structure the institution
    text = text.replace(
        "810001234567^Martin^Jean^^^Dr^^^ASIP-SANTE-PS&1.2.250.1.71.4.2.1&ISO^D^^^IDNPS", ""
    ).rstrip("\r")
    raw = (text + "\r" + SB + "\r").encode()
    result = convert(raw)
    entries = {e["fullUrl"]: e["resource"] for e in result.bundle["entry"]}
    doc = _document(result.bundle)
    authors = [entries[a["reference"]] for a in doc["author"]]
    assert [a["resourceType"] for a in authors] == ["Practitioner", "Organization"]
    # typed RPPS but 8 + an RPPS: the national id it is (the CI-SIS examples send it so)
    assert [(i["system"], i["value"]) for i in authors[0]["identifier"]] == [
        ("urn:oid:1.2.250.1.71.4.2.1", "801234567866")
    ]
    # a national structure id (1 + FINESS): idNatSt and the FINESS it holds
    assert [(i["system"], i["value"]) for i in authors[1]["identifier"]] == [
        ("urn:oid:1.2.250.1.71.4.2.2", "1120459876"),
        ("https://finess.esante.gouv.fr", "120459876"),
    ]
    assert bundle_errors(result.bundle) == []
    assert silent_leaves(raw, result.bundle, result.unmapped) == []


def test_the_mail_a_document_came_from_is_kept() -> None:
    """LPS volume: the second OBX group is the MSSanté mail (OBX-3.1 its Message-ID, OBX-3.2 its
    subject, OBX-5 its content)."""
    mail = (
        "OBX|2|ED|<1234@mssante.fr>^XDM/1.0/DDM+CR de consultation LEFEVRE Amelie 07/07/1984||"
        f"^text^^Base64^{base64.b64encode(b'Corps du courriel').decode()}||||||F"
    )
    raw = (mdm("T02", "C-1", "58132").decode() + mail + "\r").encode()
    result = convert(raw)
    doc = _document(result.bundle)
    [kept] = [e for e in doc["extension"] if e["url"] == "urn:passerelle:cisis:courriel"]
    parts = {p["url"]: p for p in kept["extension"]}
    assert parts["subject"]["valueString"].startswith("XDM/1.0/DDM+CR de consultation")
    assert parts["message-id"]["valueString"] == "<1234@mssante.fr>"
    assert base64.b64decode(parts["content"]["valueAttachment"]["data"]) == b"Corps du courriel"
    assert base64.b64decode(doc["content"][0]["attachment"]["data"]) == CDA_V1  # still the CDA
    assert silent_leaves(raw, result.bundle, result.unmapped) == []
