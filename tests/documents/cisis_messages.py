"""Authored CI-SIS document messages with their MetaDMPMSS OBX ("Transmission de documents CDA en
HL7v2" v2.1: OBX-3 = code^label^MetaDMPMSS, OBX-5 = Y|N^^expandedYes-NoIndicator, OBX-11 F; CWE in an
MDM, CE in an ORU), and a way to publish them through the repository destination (the document
store's ITI-65 path) and read them back over HTTP as each audience."""

from __future__ import annotations

import base64
import functools
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
from aiohttp.test_utils import TestClient, TestServer

from connectors.fhir_repository import FhirRepositoryDestination
from gateway.core.envelope import FHIR_JSON, Envelope
from gateway.core.protocols import DeliveryResult
from gateway.hl7.er7 import Message
from gateway.http.app import build_app
from gateway.http.auth import TokenTable
from gateway.mapping import catalog
from gateway.mapping.engine import Library, MappingResult
from gateway.store.fhir import SqliteFhirRepository
from tests.documents.conftest import TOKENS, auth
from tests.documents.mdm_messages import CDA_V1, INS, INS_NIR, IPP, IPP_OID, mdm
from tests.fhir.conftest import FhirOnlyRuntime

MAPPINGS = Path(__file__).resolve().parents[2] / "mappings"
VISIBILITY = (
    "https://mos.esante.gouv.fr/NOS/TRE_A07-StatutVisibiliteDocument/FHIR/TRE-A07-StatutVisibiliteDocument"
)
FLAGS_EXTENSION = "urn:passerelle:cisis:MetaDMPMSS"
LABELS = {
    "MASQUE_PS": "Masqué aux professionnels de Santé",
    "INVISIBLE_PATIENT": "Document Non Visible par le patient",
    "INVISIBLE_REP_LEGAUX": "Non visible par les représentants Légaux du patient",
    "CONNEXION_SECRETE": "Connexion Secrete",
    "MODIF_CONF_CODE": "Modification Confidentiality Code",
    "DESTDMP": "Destinataire DMP",
    "DESTMSSANTEPS": "Destinataire (Professionnel de Santé, organisation ou BAL applicative)",
    "DESTMSSANTEPAT": "Destinataire Patient",
    "ACK_RECEPTION": "Accusé de réception",
    "ACK_LECTURE_MSS": "Accusé de lecture",
}
# The author of the authored documents: Dr Jean Martin, IDNPS 8 + RPPS 10001234567 (the "pro" token).
AUTHOR_XCN = "810001234567^Martin^Jean^^^Dr^^^ASIP-SANTE-PS&1.2.250.1.71.4.2.1&ISO^D^^^IDNPS"
PATIENT_QUERY = f"patient.identifier=urn:oid:{INS_NIR}|{INS}"


def flag_obx(n: int, code: str, value: str, value_type: str = "CWE") -> str:
    label = LABELS.get(code, code)
    return f"OBX|{n}|{value_type}|{code}^{label}^MetaDMPMSS||{value}^^expandedYes-NoIndicator||||||F"


def all_flags(**yes: str) -> dict[str, str]:
    """Every flag of the CI-SIS table valued N, but those given."""
    return {code: yes.get(code, "N") for code in LABELS}


def mdm_with_flags(trigger: str, control_id: str, doc: str, flags: Mapping[str, str], **kwargs: Any) -> bytes:
    """An MDM of tests.documents.mdm_messages with the MetaDMPMSS OBX after its document."""
    base = mdm(trigger, control_id, doc, **kwargs).decode("utf-8")
    obx = [flag_obx(n, code, value) for n, (code, value) in enumerate(flags.items(), 2)]
    return (base + "\r".join(obx) + ("\r" if obx else "")).encode("utf-8")


def oru_with_flags(
    control_id: str,
    flags: Mapping[str, str],
    *,
    result: str = "F",
    order_control: str = "NW",
    extra_obx: list[str] | None = None,
    data: bytes = CDA_V1,
) -> bytes:
    """An ORU^R01 as the CI-SIS volume shapes it: one order whose first OBX is the CDA (Base64),
    followed by its PRT "SB" (the author asks for it to be published), then the flags (CE)."""
    order = "CR-4242^^1.2.250.1.71.4.2.2.4455^ISO"
    lines = [
        "MSH|^~\\&|SIL|LABO-NANTES|PASSERELLE|CHU-NANTES|20240514080000||ORU^R01^ORU_R01|"
        f"{control_id}|P|2.5|||||FRA|UNICODE UTF-8|||2.1^CISIS_CDA_HL7_V2",
        "PID|"
        + "|".join(  # PID-1 … PID-32, the INS traveling with PID-32 VALI (PAM FR)
            {
                1: "1",
                3: f"{IPP}^^^CHU-NANTES&{IPP_OID}&ISO^PI~{INS}^^^ASIP-SANTE-INS-NIR&{INS_NIR}&ISO^INS",
                5: "Lefèvre^Amélie^Marie Jeanne^^^^L",
                7: "19840707",
                8: "F",
                32: "VALI",
            }.get(n, "")
            for n in range(1, 33)
        ),
        f"ORC|{order_control}||{order}",
        f"OBR|1||{order}|11502-2^CR d'examens biologiques^LN|||20240514073000||||||||||||||||||F",
        f"OBX|1|ED|11502-2^CR d'examens biologiques^LN||^TEXT^XML^Base64^{base64.b64encode(data).decode()}"
        f"||||||{result}",
        f"PRT||UC||SB^Send by^participation|{AUTHOR_XCN}",
        *(extra_obx or []),
    ]
    lines += [
        flag_obx(n, code, value, "CE")
        for n, (code, value) in enumerate(flags.items(), 2 + len(extra_obx or []))
    ]
    return ("\r".join(lines) + "\r").encode("utf-8")


@functools.cache
def library() -> Library:
    # Loaded once: property tests convert hundreds of messages, and a load takes a third of a second.
    return Library.load(MAPPINGS, catalog.available())


def convert(message: bytes) -> MappingResult:
    return library().map(Message.parse(message.decode("utf-8")))


def envelope(n: int) -> Envelope:
    return Envelope(
        id=f"01HZX00000000000000000{n:04d}",
        channel="documents",
        source="hospital",
        raw=b"",
        content_type=FHIR_JSON,
        sender="DPI^CHU",
        control_id=f"C-{n}",
        message_type="MDM^T02",
        partition_key="k",
        received_at=1715675400.0 + n,
        trace_id="t",
    )


class Feed:
    """The repository destination over one SQLite file: messages mapped and published in turn."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.destination = FhirRepositoryDestination("repository", {"path": str(path)})
        self.sent = 0

    async def publish(self, message: bytes) -> DeliveryResult:
        self.sent += 1
        bundle = convert(message).bundle
        return await self.destination.send(envelope(self.sent), orjson.dumps(bundle))

    async def aclose(self) -> None:
        await self.destination.aclose()


@asynccontextmanager
async def reader(path: Path) -> AsyncIterator[TestClient[Any, Any]]:
    """The /fhir API over the repository the feed wrote, with the test tokens."""
    repo = SqliteFhirRepository(path)
    await repo.open()
    try:
        app = build_app(FhirOnlyRuntime(repo), authenticator=TokenTable(TOKENS.values()))
        async with TestClient(TestServer(app, host="127.0.0.1", port=0)) as client:
            yield client
    finally:
        await repo.close()


async def visible_to(client: TestClient[Any, Any], who: str, status: str = "current") -> list[str]:
    """The masterIdentifier (else identifier) values of the documents ``who`` finds (ITI-67)."""
    resp = await client.get(f"/fhir/DocumentReference?{PATIENT_QUERY}&status={status}", headers=auth(who))
    body = await resp.json(content_type=None)
    assert resp.status == 200, body
    out = []
    for entry in body.get("entry", []):
        doc = entry["resource"]
        ident = doc.get("masterIdentifier") or doc["identifier"][0]
        out.append(str(ident["value"]))
    return sorted(out)


async def readable_by(client: TestClient[Any, Any], who: str, doc_id: str) -> bool:
    """Whether ``who`` reads the DocumentReference and its bytes (404 when hidden)."""
    resp = await client.get(f"/fhir/DocumentReference/{doc_id}", headers=auth(who))
    if resp.status == 404:
        return False
    assert resp.status == 200, await resp.text()
    doc = await resp.json(content_type=None)
    url = str(doc["content"][0]["attachment"]["url"])  # absolute: this server's /fhir/Binary/{id}
    got = await client.get("/fhir/" + url.split("/fhir/", 1)[-1], headers=auth(who))
    assert got.status == 200
    return True
