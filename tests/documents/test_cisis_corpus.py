"""Every ANS document message (the CI-SIS "Transmission de documents CDA en HL7v2" and "Transmission
au LPS d'un document CDA provenant d'un courriel MSSanté" examples) through the mapping and the
document store. The files are read where the shared corpus keeps them, never copied; the three ORU
whose MSH-2 is corrupted are refused at decoding, which is right.

What each message must give is read from the message itself (with the independent ER7 reader of
tests/hl7_leaves.py), never written down per file: a valid Bundle with no profile error and no silent
leaf, one DocumentReference per document OBX (ED, not a MetaDMPMSS flag, not the MSSanté mail), the
security labels its visibility flags valued Y ask for, every flag in the extension, no flag as an
Observation, and the status its action asks for (OBX-11 D, ORC-1 CA, MDM^T04: entered-in-error).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.core.errors import MessageError
from gateway.core.status import Status
from gateway.engine.steps import FhirMapping
from gateway.hl7.er7 import Message
from gateway.mapping.validate import bundle_errors
from tests.documents.cisis_messages import FLAGS_EXTENSION, VISIBILITY, Feed, envelope
from tests.hl7_leaves import Er7, read, silent_leaves, unknown_paths
from tests.mapping.test_corpus import LEGAL_MSH2, profile_errors

ANS = Path(__file__).resolve().parents[3] / "shared" / "corpus" / "ans"
if not ANS.is_dir():
    pytest.skip(
        f"the ANS reference messages are not at {ANS} (tests read them there, never a copy)",
        allow_module_level=True,
    )

MAPPINGS = Path(__file__).resolve().parents[2] / "mappings"
FILES = sorted(
    p
    for p in ANS.iterdir()
    if p.is_file()
    and "_ack" not in p.name
    and ("TRANS_DOC" in p.name.upper() or "TRANS_LPS" in p.name.upper())
)
# The CI-SIS table « MetaDMP/MSS » (meta-dmp-mss.md) and its earlier names (change-log.md).
FLAG_CODES = {
    "MASQUE_PS", "INVISIBLE_PATIENT", "INVISIBLE_REP_LEGAUX", "INVISIBLE_REPRESENTANTS_LEGAUX",
    "CONNEXION_SECRETE", "MODIF_CONF_CODE", "MODIF_CONFIDENTIALITYCODE", "DESTDMP", "DESTMSSANTEPS",
    "DESTMSSANTEPAT", "ACK_RECEPTION", "ACK_LECTURE_MSS", "ACK_LECTURE", "CORPSMAIL_PS", "CORPSMAIL_PATIENT",
}  # fmt: skip
# flag valued Y → the TRE_A07 label the document store reads
LABEL_OF = {
    "MASQUE_PS": "MASQUE_PS",
    "INVISIBLE_PATIENT": "INVISIBLE_PATIENT",
    "INVISIBLE_REP_LEGAUX": "INVISIBLE_REPRESENTANTS_LEGAUX",
    "INVISIBLE_REPRESENTANTS_LEGAUX": "INVISIBLE_REPRESENTANTS_LEGAUX",
    "CONNEXION_SECRETE": "INVISIBLE_REPRESENTANTS_LEGAUX",
}
# The order in which a sender lives a document: published, replaced, deleted.
STAGES = (("initiale", "INIT"), ("Remplacement", "RPLC"), ("Suppression", "DEL"))


def _stage(path: Path) -> int:
    return next((i for i, words in enumerate(STAGES) if any(w in path.name for w in words)), 0)


def _name(path: Path) -> str:
    return path.name


def _step() -> FhirMapping:
    return FhirMapping("ans", {"directory": str(MAPPINGS), "missing_namespace": "sender"})


def _obx(msg: Er7) -> list[int]:
    return [seg.occurrence for seg in msg.segments if seg.name == "OBX"]


def _flag(msg: Er7, n: int) -> str | None:
    code, table = msg.value("OBX", 3, comp=1, occurrence=n), msg.value("OBX", 3, comp=3, occurrence=n)
    if table == "MetaDMPMSS" or (not table and code in FLAG_CODES):
        return code
    return None


def _documents_sent(msg: Er7) -> list[int]:
    return [
        n
        for n in _obx(msg)
        if msg.value("OBX", 2, occurrence=n) == "ED"
        and _flag(msg, n) is None
        and not msg.value("OBX", 3, comp=2, occurrence=n).startswith("XDM/1.0/DDM")
    ]


def _resources(bundle: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


@pytest.mark.parametrize("path", FILES, ids=_name)
def test_an_ans_document_message(path: Path) -> None:
    raw = path.read_bytes()
    sent = read(raw)
    try:
        message = Message.decode(raw, default_charset="8859/15")
    except MessageError:
        assert sent.raw("MSH", 2) not in LEGAL_MSH2, "only a corrupted MSH-2 is refused at decoding"
        return
    result = _step().convert(message)
    bundle, unmapped = result.bundle, list(result.unmapped)
    assert bundle_errors(bundle) == []
    assert profile_errors(bundle) == []
    assert [f"{leaf.path} = {leaf.value[:30]!r}" for leaf in silent_leaves(raw, bundle, unmapped)] == []
    assert unknown_paths(raw, unmapped) == []

    flags = {code: sent.value("OBX", 5, comp=1, occurrence=n) for n in _obx(sent) if (code := _flag(sent, n))}
    labels = sorted({(VISIBILITY, LABEL_OF[c]) for c, v in flags.items() if c in LABEL_OF and v == "Y"})
    is_mdm = sent.value("MSH", 9, comp=1) == "MDM"
    expected_docs = _documents_sent(sent)[:1] if is_mdm else _documents_sent(sent)
    documents = _resources(bundle, "DocumentReference")
    assert len(documents) == len(expected_docs)
    deleting = sent.value("ORC", 1) == "CA" or (is_mdm and sent.value("MSH", 9, comp=2) == "T04")
    for doc, n in zip(documents, expected_docs, strict=True):
        got = sorted(
            (c["system"], c["code"]) for label in doc.get("securityLabel", []) for c in label["coding"]
        )
        assert got == labels
        if flags:
            [kept] = [e for e in doc["extension"] if e["url"] == FLAGS_EXTENSION]
            assert {p["url"] for p in kept["extension"]} <= {
                *FLAG_CODES,
                "ACK_LECTURE_MSS",
                "INVISIBLE_REP_LEGAUX",
            }
        gone = deleting or sent.value("OBX", 11, occurrence=n) == "D"
        assert doc["status"] == ("entered-in-error" if gone else "current")
        assert not (is_mdm and sent.value("MSH", 9, comp=2) != "T10" and doc.get("relatesTo"))
    for observation in _resources(bundle, "Observation"):
        assert not {c.get("code") for c in observation["code"].get("coding", [])} & FLAG_CODES
    for report in _resources(bundle, "DiagnosticReport"):
        assert not report.get("result")


async def test_every_ans_document_message_is_published_through_the_store(tmp_path: Path) -> None:
    """In the order a sender lives a document (published, replaced, deleted), each decodable message
    is delivered (never refused by the store) and its documents reach the patient's record."""
    feed = Feed(tmp_path / "fhir.db")
    delivered = []
    try:
        for path in sorted(FILES, key=lambda p: (_stage(p), p.name)):
            raw = path.read_bytes()
            try:
                message = Message.decode(raw, default_charset="8859/15")
            except MessageError:
                continue
            bundle = _step().convert(message).bundle
            result = await feed.destination.send(envelope(len(delivered) + 1), orjson.dumps(bundle))
            delivered.append((path.name, result.status))
    finally:
        await feed.aclose()
    assert delivered and all(status is Status.SENT for _, status in delivered), delivered
