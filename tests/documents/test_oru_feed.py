"""ORU^R01 with an embedded document (OBX ED → DocumentReference + Binary) goes through the
document store like any publish: bytes kept once and checked, found by ITI-67, served by ITI-68."""

from __future__ import annotations

import base64
from pathlib import Path

import orjson

from connectors.fhir_repository import FhirRepositoryDestination
from gateway.core.envelope import FHIR_JSON, Envelope
from gateway.core.status import Status
from gateway.hl7.er7 import Message
from gateway.mapping import catalog
from gateway.mapping.engine import Library
from gateway.store.documents import FEED, SqliteDocumentStore
from gateway.store.fhir import SqliteFhirRepository
from tests.documents.mdm_messages import IPP, IPP_OID

PDF = b"%PDF-1.4\n1 0 obj << /Title (Compte rendu de biologie - Mme Lefevre) >> endobj\n%%EOF\n"


def oru_with_document() -> str:
    """An authored ORU^R01: one order whose result is the PDF report (OBX ED, Base64)."""
    order = "CMD-4242^^1.2.250.1.71.4.2.2.4455^ISO"
    return (
        "\r".join(
            [
                "MSH|^~\\&|SIL|LABO-NANTES|PASSERELLE|CHU-NANTES|20240514080000||ORU^R01^ORU_R01|ORU-0001|P|"
                "2.5^FRA^2.11|||||FRA|UNICODE UTF-8|||2.1^CISIS_CDA_HL7_V2",
                f"PID|1||{IPP}^^^CHU-NANTES&{IPP_OID}&ISO^PI||Lefèvre^Amélie^^^^^L||19840707|F",
                f"ORC|RE||{order}",
                f"OBR|1||{order}|11502-2^CR d'examens biologiques^LN|||20240514073000",
                "OBX|1|ED|11502-2^CR d'examens biologiques^LN||"
                f"^application^pdf^Base64^{base64.b64encode(PDF).decode()}||||||F|||20240514075500",
            ]
        )
        + "\r"
    )


MAPPINGS = Path(__file__).resolve().parents[2] / "mappings"


def _envelope(n: int) -> Envelope:
    return Envelope(
        id=f"01HZX0000000000000000000{n:02d}",
        channel="hospital-fhir",
        source="hospital",
        raw=b"",
        content_type=FHIR_JSON,
        sender="LAB^CHU",
        control_id=f"ORU-{n}",
        message_type="ORU^R01",
        partition_key="k",
        received_at=1715675400.0,
        trace_id="t",
    )


async def test_oru_document_is_published_through_the_store(tmp_path: Path) -> None:
    library = Library.load(MAPPINGS, catalog.available())
    bundle = library.map(Message.parse(oru_with_document())).bundle
    assert any(e["resource"]["resourceType"] == "DocumentReference" for e in bundle["entry"])
    destination = FhirRepositoryDestination("repository", {"path": str(tmp_path / "fhir.db")})
    try:
        result = await destination.send(_envelope(1), orjson.dumps(bundle))
        assert result.status is Status.SENT
        again = await destination.send(_envelope(1), orjson.dumps(bundle))  # a replay
        assert again.status is Status.SENT
    finally:
        await destination.aclose()
    repo = SqliteFhirRepository(tmp_path / "fhir.db")
    store = SqliteDocumentStore(repo)
    await store.open()
    try:
        docs = await repo.search("DocumentReference", [], count=50)
        assert docs.total == 1  # the replay made no second document
        doc = docs.matches[0]
        patient = doc["subject"]["reference"]
        found = await store.search([("patient", patient), ("status", "current")], FEED)
        assert [d["id"] for d in found.matches] == [doc["id"]]
        binary_id = doc["content"][0]["attachment"]["url"].rsplit("/", 1)[1]
        got = await store.retrieve(binary_id, FEED)
        assert got is not None and got.data == PDF and got.content_type == "application/pdf"
        lists = await store.search_lists([("patient", patient), ("code", "submissionset")], FEED)
        assert lists.total == 1  # one SubmissionSet per message, not one per delivery
    finally:
        await repo.close()
