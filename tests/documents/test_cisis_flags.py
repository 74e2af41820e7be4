"""The CI-SIS MetaDMPMSS flags sent beside a document.

Each flag, in an MDM and in an ORU, is published through the repository destination (the document
store's ITI-65 path) and the document is then searched (ITI-67) and read (with its bytes, ITI-68) as
the patient, the legal representative, the author ("pro": the document's TXA-9 / PRT SB is Dr Martin,
IDNPS 810001234567) and another professional ("pro2"). The visibility flags valued Y are the
document's TRE_A07 security labels; every flag is kept in the extension urn:passerelle:cisis:
MetaDMPMSS; a flag valued N adds nothing; none is ever a clinical Observation.

Before the fix an MDM ignored the flags (published current, no label: everyone read it) and an ORU
turned them into Observations in DiagnosticReport.result.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from gateway.core.status import Status
from gateway.mapping.validate import bundle_errors
from tests.documents.cisis_messages import (
    FLAGS_EXTENSION,
    VISIBILITY,
    Feed,
    all_flags,
    convert,
    mdm_with_flags,
    oru_with_flags,
    readable_by,
    reader,
    visible_to,
)

AUDIENCES = ("patient", "rep", "pro", "pro2")
# flag valued Y → who reads the document (docs/documents.md → Visibility)
EVERYONE = dict.fromkeys(AUDIENCES, True)
READERS = {
    "MASQUE_PS": {**EVERYONE, "pro2": False},  # the author still reads it
    "INVISIBLE_PATIENT": {**EVERYONE, "patient": False, "rep": False},
    "INVISIBLE_REP_LEGAUX": {**EVERYONE, "rep": False},
    # a DMP "connexion secrète": hidden from the legal representatives
    "CONNEXION_SECRETE": {**EVERYONE, "rep": False},
    "MODIF_CONF_CODE": EVERYONE,
    "DESTDMP": EVERYONE,
    "DESTMSSANTEPS": EVERYONE,
    "DESTMSSANTEPAT": EVERYONE,
    "ACK_RECEPTION": EVERYONE,
    "ACK_LECTURE_MSS": EVERYONE,
}
LABEL_OF = {
    "MASQUE_PS": "MASQUE_PS",
    "INVISIBLE_PATIENT": "INVISIBLE_PATIENT",
    "INVISIBLE_REP_LEGAUX": "INVISIBLE_REPRESENTANTS_LEGAUX",
    "CONNEXION_SECRETE": "INVISIBLE_REPRESENTANTS_LEGAUX",
}


def _documents(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DocumentReference"]


def _labels(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return [(c["system"], c["code"]) for label in doc.get("securityLabel", []) for c in label["coding"]]


def _flags(doc: dict[str, Any]) -> dict[str, Any]:
    ext = next(e for e in doc.get("extension", []) if e["url"] == FLAGS_EXTENSION)
    return {part["url"]: part.get("valueBoolean") for part in ext["extension"]}


def _message(kind: str, flags: dict[str, str], control: str = "C-1") -> bytes:
    if kind == "MDM":
        return mdm_with_flags("T02", control, "58132", flags)
    return oru_with_flags(control, flags)


@pytest.mark.parametrize("kind", ["MDM", "ORU"])
@pytest.mark.parametrize("flag", list(READERS))
def test_a_flag_valued_y_is_a_label_and_a_kept_fact_never_a_result(kind: str, flag: str) -> None:
    result = convert(_message(kind, all_flags(**{flag: "Y"})))
    assert bundle_errors(result.bundle) == []
    [doc] = _documents(result.bundle)
    expected = [(VISIBILITY, LABEL_OF[flag])] if flag in LABEL_OF else []
    assert _labels(doc) == expected
    assert _flags(doc) == {code: code == flag for code in READERS}
    assert doc["status"] == "current"
    resources = [e["resource"] for e in result.bundle["entry"]]
    assert not any(r["resourceType"] == "Observation" for r in resources)
    assert all(not r.get("result") for r in resources if r["resourceType"] == "DiagnosticReport")
    assert not any(w for w in result.warnings if "MetaDMPMSS" in w)


@pytest.mark.parametrize("kind", ["MDM", "ORU"])
def test_flags_valued_n_or_absent_add_nothing(kind: str) -> None:
    [valued_n] = _documents(convert(_message(kind, all_flags())).bundle)
    assert "securityLabel" not in valued_n
    assert _flags(valued_n) == dict.fromkeys(READERS, False)  # kept as facts, hiding nothing
    [absent] = _documents(convert(_message(kind, {})).bundle)
    assert "securityLabel" not in absent and "extension" not in absent


@pytest.mark.parametrize("kind", ["MDM", "ORU"])
@pytest.mark.parametrize("flag", list(READERS))
async def test_who_reads_a_document_sent_with_a_flag(tmp_path: Path, kind: str, flag: str) -> None:
    feed = Feed(tmp_path / "fhir.db")
    try:
        sent = await feed.publish(_message(kind, all_flags(**{flag: "Y"})))
        assert sent.status is Status.SENT
    finally:
        await feed.aclose()
    async with reader(tmp_path / "fhir.db") as client:
        [doc_id] = await _ids(client)
        seen = {who: await readable_by(client, who, doc_id) for who in AUDIENCES}
        found = {who: bool(await visible_to(client, who)) for who in AUDIENCES}
    assert seen == READERS[flag]
    assert found == READERS[flag]


async def _ids(client: Any) -> list[str]:
    resp = await client.get(
        "/fhir/DocumentReference?patient.identifier=urn:oid:1.2.250.1.213.1.4.8|2840775123456&status=current",
        headers={"Authorization": "Bearer admin-token-0123456789"},
    )
    body = await resp.json(content_type=None)
    return [e["resource"]["id"] for e in body.get("entry", [])]


async def test_a_flag_valued_n_hides_nothing_from_anyone(tmp_path: Path) -> None:
    feed = Feed(tmp_path / "fhir.db")
    try:
        assert (await feed.publish(_message("MDM", all_flags()))).status is Status.SENT
    finally:
        await feed.aclose()
    async with reader(tmp_path / "fhir.db") as client:
        [doc_id] = await _ids(client)
        assert {who: await readable_by(client, who, doc_id) for who in AUDIENCES} == EVERYONE


def test_older_flag_names_and_flags_sent_without_their_table() -> None:
    """The LPS volume 1.0 sends the flags without OBX-3.3 and ACK_LECTURE; v1.x sent
    INVISIBLE_REPRESENTANTS_LEGAUX (renamed INVISIBLE_REP_LEGAUX in v2.0, change-log.md)."""
    message = mdm_with_flags("T02", "C-1", "58132", {}).decode()
    message += (
        "OBX|2|CWE|MASQUE_PS^Masqué aux professionnels de Santé||N||||||F\r"
        "OBX|3|CWE|INVISIBLE_REPRESENTANTS_LEGAUX^Non visible par les représentants légaux^MetaDMPMSS"
        "||Y||||||F\r"
        "OBX|4|CWE|ACK_LECTURE^Accusé de lecture||Y||||||F\r"
    )
    [doc] = _documents(convert(message.encode()).bundle)
    assert _labels(doc) == [(VISIBILITY, "INVISIBLE_REPRESENTANTS_LEGAUX")]
    assert _flags(doc) == {"MASQUE_PS": False, "INVISIBLE_REP_LEGAUX": True, "ACK_LECTURE_MSS": True}


def test_a_flag_neither_y_nor_n_is_reported_not_guessed() -> None:
    message = mdm_with_flags("T02", "C-1", "58132", {"MASQUE_PS": "X", "DESTDMP": "Y"})
    result = convert(message)
    [doc] = _documents(result.bundle)
    assert "securityLabel" not in doc
    assert _flags(doc) == {"DESTDMP": True}
    assert "OBX[2]-5[1].1" in result.unmapped
    assert any("OBX[2]-5.1: MASQUE_PS valued 'X'" in w for w in result.warnings)


def test_an_oru_with_two_documents_gives_the_flags_to_both() -> None:
    """CI-SIS: the metadata are common to the CDA level 1 and level 3 of one ORU order."""
    second = "OBX|2|ED|11502-2^CR d'examens biologiques^LN||^TEXT^XML^Base64^PENEQS8+||||||F"
    result = convert(oru_with_flags("C-1", all_flags(MASQUE_PS="Y"), extra_obx=[second]))
    docs = _documents(result.bundle)
    assert len(docs) == 2
    assert all(_labels(d) == [(VISIBILITY, "MASQUE_PS")] for d in docs)
    [report] = [
        e["resource"] for e in result.bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"
    ]
    assert len(report["presentedForm"]) == 2 and "result" not in report


def test_the_mail_bodies_are_kept_on_the_document() -> None:
    body = "Cher confrère, vous trouverez ci-joint le compte rendu."
    data = base64.b64encode(body.encode()).decode()
    mail = f"OBX|12|ED|CORPSMAIL_PS^Corps du mail pour un PS^MetaDMPMSS||^text^^Base64^{data}||||||F"
    message = (mdm_with_flags("T02", "C-1", "58132", all_flags()).decode() + mail + "\r").encode()
    result = convert(message)
    [doc] = _documents(result.bundle)
    ext = next(e for e in doc["extension"] if e["url"] == FLAGS_EXTENSION)
    [kept] = [p["valueAttachment"] for p in ext["extension"] if p["url"] == "CORPSMAIL_PS"]
    assert base64.b64decode(kept["data"]).decode() == body and kept["contentType"] == "text/plain"
    assert kept["title"] == "Corps du mail pour un PS"
    assert not any(u.startswith("OBX[12]-5") for u in result.unmapped)


def test_the_oru_mapping_knows_every_flag_of_the_concept_map() -> None:
    """mappings/oru.yaml keeps the flags out of the results by their codes: the same list as the
    concept map cisis-metadmpmss-flag (which the functions read)."""
    import yaml

    mappings = Path(__file__).resolve().parents[2] / "mappings"
    flags = yaml.safe_load((mappings / "conceptmaps" / "cisis-metadmpmss.yaml").read_text("utf-8"))
    oru = yaml.safe_load((mappings / "oru.yaml").read_text("utf-8"))
    [observations] = [r for r in oru["resources"] if r["key"] == "observations"]
    [by_code] = [c for c in observations["when"] if c["from"] == "OBX-3.1"]
    assert set(by_code["not_in"]) == set(flags["cisis-metadmpmss-flag"])
