"""MDM^T01/T05/T09 (notifications: TXA without the document) and MDM^T06 (addendum with content).
Golden cases written from HL7 v2.5 chapter 9 (MDM_T01: EVN, PID, PV1, TXA; MDM_T02: … OBX) and the
TXA rows HL7 V2-to-FHIR maps for MDM_T02, on the CI-SIS shaped messages of tests/documents."""

from __future__ import annotations

import base64

import pytest

from gateway.core.errors import UnsupportedMessage
from tests.documents.mdm_messages import DOC_ROOT, PDF_V2, mdm
from tests.mapping.checked_conversion import convert, key, of_type

DAR = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"


def notification(trigger: str, doc: str, parent: str = "") -> str:
    """The CI-SIS message of tests/documents without its document (OBX): a notification."""
    lines = mdm(trigger, f"N-{trigger}", doc, parent=parent).decode().rstrip("\r").split("\r")
    return "\r".join(line for line in lines if not line.startswith("OBX")) + "\r"


def test_t01_announces_a_document_without_its_content() -> None:
    result = convert(notification("T01", "DOC-71"))
    (doc,) = of_type(result, "DocumentReference")
    # created when absent, never replacing the document a T02 published with its content
    assert doc["request"] == {
        "method": "POST",
        "url": "DocumentReference",
        "ifNoneExist": f"identifier=urn:oid:{DOC_ROOT}|DOC-71",
    }
    reference = doc["resource"]
    assert reference["status"] == "current"
    assert reference["docStatus"] == "final"  # TXA-17 AU
    assert reference["content"] == [
        {
            "attachment": {
                "_data": {"extension": [{"url": DAR, "valueCode": "unknown"}]},
                "creation": "2024-05-14T09:30:00+02:00",
            }
        }
    ]
    assert reference["context"]["period"]["start"] == "2024-05-14T10:00:00+02:00"
    assert reference["type"] == {"coding": [{"code": "11488-4"}]}  # TXA-2 alone (no OBX, no OBR)
    assert reference["author"] == [{"reference": of_type(result, "Practitioner")[0]["fullUrl"]}]
    assert "relatesTo" not in reference


@pytest.mark.parametrize(("trigger", "relation"), [("T05", "appends"), ("T09", "replaces")])
def test_an_addendum_or_a_replacement_notification_names_its_parent(trigger: str, relation: str) -> None:
    result = convert(notification(trigger, "DOC-72", parent="DOC-71"))
    (doc,) = of_type(result, "DocumentReference")
    assert key(doc) == f"identifier=urn:oid:{DOC_ROOT}|DOC-72"
    assert doc["resource"]["relatesTo"] == [
        {"code": relation, "target": {"reference": f"DocumentReference?identifier=urn:oid:{DOC_ROOT}|DOC-71"}}
    ]


def test_t06_an_addendum_with_its_content_appends_to_its_parent() -> None:
    result = convert(
        mdm("T06", "C-T06", "DOC-73", parent="DOC-71", data=PDF_V2, kind="application^pdf").decode()
    )
    (doc,) = of_type(result, "DocumentReference")
    assert doc["request"]["method"] == "PUT"  # MDM: replace, as a T02's document
    reference = doc["resource"]
    assert reference["relatesTo"][0]["code"] == "appends"
    attachment = reference["content"][0]["attachment"]
    assert base64.b64decode(attachment["data"]) == PDF_V2
    assert attachment["contentType"] == "application/pdf"
    assert attachment["size"] == len(PDF_V2)


def test_t02_t04_t10_keep_their_mapping() -> None:
    for trigger in ("T02", "T04", "T10"):
        text = mdm(trigger, f"C-{trigger}", "DOC-80", parent="DOC-79" if trigger == "T10" else "").decode()
        assert convert(text).mapping == "mdm-documents"


def test_t11_document_cancellation_is_refused_with_its_reason() -> None:
    with pytest.raises(UnsupportedMessage, match="cancellation"):
        convert(notification("T11", "DOC-71"))
