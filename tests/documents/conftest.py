"""Document store fixtures: a real SQLite repository, the document store on it, an HTTP client
with the professional / patient / admin tokens of ``auth.tokens``, and PDSm resource builders."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.http.app import build_app
from gateway.http.auth import TokenTable
from gateway.store.documents import (
    IS_ARCHIVED,
    MHD_LIST_TYPES,
    VISIBILITY,
    SqliteDocumentStore,
)
from gateway.store.fhir import SqliteFhirRepository
from tests.fhir.conftest import INS, IPP, Clock, FhirOnlyRuntime

Client = TestClient[Any, Any]
FHIR_JSON = "application/fhir+json"
IDNPS = "urn:oid:1.2.250.1.71.4.2.1"  # national practitioner id; value = "8" + RPPS
LOINC = "http://loinc.org"
CLASSES = "https://mos.esante.gouv.fr/NOS/TRE_A03-ClasseDocument/FHIR/TRE-A03-ClasseDocument"
FORMATS = "https://mos.esante.gouv.fr/NOS/TRE_A11-IheFormatCode/FHIR/TRE-A11-IheFormatCode"
SECTORS = "https://mos.esante.gouv.fr/NOS/TRE_R02-SecteurActivite/FHIR/TRE-R02-SecteurActivite"
SETTINGS = "https://mos.esante.gouv.fr/NOS/TRE_A01-CadreExercice/FHIR/TRE-A01-CadreExercice"
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
SNOMED = "http://snomed.info/sct"

PRO_RPPS = "10001234567"  # the professional's RPPS; their IDNPS is "8" + RPPS
OTHER_RPPS = "10009876543"
PATIENT_INS = "2840775123456"
OTHER_INS = "1950599123456"

TOKENS = {
    "pro": {"token": "pro-token-0123456789", "subject": "pro-1", "role": "professional",
            "practitioner": f"{IDNPS}|8{PRO_RPPS}"},
    "pro2": {"token": "pro2-token-0123456789", "subject": "pro-2", "role": "professional",
             "practitioner": f"{IDNPS}|8{OTHER_RPPS}"},
    "social": {"token": "social-token-0123456789", "subject": "social-1", "role": "professional",
               "scopes": ["audience:social"]},
    "third": {"token": "third-token-0123456789", "subject": "third-1", "role": "professional",
              "scopes": ["audience:third-party"]},
    # both audiences at once: every mask of either applies
    "social_third": {"token": "social-third-token-0123456789", "subject": "social-third-1",
                     "role": "professional", "scopes": ["audience:third-party", "audience:social"]},
    "patient": {"token": "patient-token-0123456789", "subject": "patient-1", "role": "patient",
                "patients": [f"{INS}|{PATIENT_INS}"]},
    "rep": {"token": "rep-token-0123456789", "subject": "rep-1", "role": "patient",
            "patients": [f"{INS}|{PATIENT_INS}"], "scopes": ["audience:legal-representative"]},
    "admin": {"token": "admin-token-0123456789", "subject": "admin-1", "role": "admin"},
    "operator": {"token": "operator-token-0123456789", "subject": "op-1", "role": "operator"},
}  # fmt: skip


def auth(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[who]['token']}"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def sha1_b64(data: bytes) -> str:
    return b64(hashlib.sha1(data, usedforsecurity=False).digest())


CDA = (
    '<?xml version="1.0" encoding="UTF-8"?><ClinicalDocument xmlns="urn:hl7-org:v3">'
    "<title>Compte rendu de consultation — Amélie Lefèvre</title></ClinicalDocument>"
).encode()


def patient_resource(ins: str = PATIENT_INS, ipp: str = "100001", family: str = "Lefèvre") -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": INS, "value": ins}, {"system": IPP, "value": ipp}],
        "name": [{"family": family, "given": ["Amélie"]}],
        "gender": "female",
        "birthDate": "1984-07-07",
    }


def document(
    *,
    data: bytes = CDA,
    inline: bool = True,
    url: str | None = None,
    master: str = "urn:oid:1.2.250.1.999.1.1",
    type_code: str = "11488-4",
    type_system: str = LOINC,
    category: str = "10",
    labels: tuple[tuple[str, str], ...] = ((CONFIDENTIALITY, "N"),),
    author_rpps: str = PRO_RPPS,
    subject: str | None = None,
    date: str = "2024-05-14T10:00:00+02:00",
    archived: bool | None = None,
    size: int | None = None,
    hash_: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A PDSm DocumentReference for the patient (by INS unless ``subject`` says otherwise)."""
    attachment: dict[str, Any] = {
        "contentType": "application/xml",
        "language": "fr-FR",
        "title": "Compte rendu de consultation",
        "creation": "2024-05-14T09:30:00+02:00",
        "size": len(data) if size is None else size,
        "hash": sha1_b64(data) if hash_ is None else hash_,
    }
    if inline:
        attachment["data"] = b64(data)
    if url is not None:
        attachment["url"] = url
    doc: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "contained": [
            {"resourceType": "Practitioner", "id": "author",
             "identifier": [{"system": IDNPS, "value": f"8{author_rpps}"}]}
        ],
        "masterIdentifier": {"system": "urn:ietf:rfc:3986", "value": master},
        "status": "current",
        "type": {"coding": [{"system": type_system, "code": type_code}]},
        "category": [{"coding": [{"system": CLASSES, "code": category}]}],
        "subject": {"reference": subject or f"Patient?identifier={INS}|{PATIENT_INS}"},
        "date": date,
        "author": [{"reference": "#author"}],
        "securityLabel": [{"coding": [{"system": s, "code": c}]} for s, c in labels],
        "content": [
            {"attachment": attachment,
             "format": {"system": FORMATS, "code": "urn:ihe:iti:xds-sd:text:2008"}}
        ],
        "context": {
            "period": {"start": "2024-05-14T09:00:00+02:00", "end": "2024-05-14T11:00:00+02:00"},
            "facilityType": {"coding": [{"system": SECTORS, "code": "SA01"}]},
            "practiceSetting": {"coding": [{"system": SETTINGS, "code": "ETABLISSEMENT"}]},
            "event": [{"coding": [{"system": SNOMED, "code": "11429006"}]}],
        },
        **extra,
    }  # fmt: skip
    if archived is not None:
        doc["extension"] = [{"url": IS_ARCHIVED, "valueBoolean": archived}]
    return doc


def submission_set_entry(items: list[str], ident: str = "urn:oid:1.2.250.1.999.9.1") -> dict[str, Any]:
    return {
        "fullUrl": "urn:uuid:0b7a1f2e-0000-4000-8000-000000000001",
        "resource": {
            "resourceType": "List",
            "identifier": [{"system": "urn:ietf:rfc:3986", "value": ident}],
            "status": "current",
            "mode": "working",
            "code": {"coding": [{"system": MHD_LIST_TYPES, "code": "submissionset"}]},
            "subject": {"reference": f"Patient?identifier={INS}|{PATIENT_INS}"},
            "date": "2024-05-14T10:00:00+02:00",
            "entry": [{"item": {"reference": url}} for url in items],
        },
        "request": {"method": "POST", "url": "List"},
    }


def provide_bundle(
    *docs: dict[str, Any], binaries: dict[str, bytes] | None = None, extra: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """An ITI-65 transaction: SubmissionSet, the documents (urn:uuid fullUrls), their Binaries."""
    urls = [f"urn:uuid:0b7a1f2e-0000-4000-8000-1000000000{i:02d}" for i in range(len(docs))]
    entries = [submission_set_entry(urls)]
    entries += [
        {"fullUrl": url, "resource": doc, "request": {"method": "POST", "url": "DocumentReference"}}
        for url, doc in zip(urls, docs, strict=True)
    ]
    for url, data in (binaries or {}).items():
        entries.append(
            {
                "fullUrl": url,
                "resource": {"resourceType": "Binary", "contentType": "application/xml", "data": b64(data)},
                "request": {"method": "POST", "url": "Binary"},
            }
        )
    entries += extra or []
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}  # fmt: skip


def visibility(code: str) -> tuple[str, str]:
    return (VISIBILITY, code)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def repo(tmp_path: Path, clock: Clock) -> AsyncIterator[SqliteFhirRepository]:
    r = SqliteFhirRepository(tmp_path / "fhir.db", clock=clock)
    await r.open()
    yield r
    await r.close()


@pytest.fixture
async def store(repo: SqliteFhirRepository) -> SqliteDocumentStore:
    s = SqliteDocumentStore(repo)
    await s.open()
    return s


@pytest.fixture
async def patient_id(repo: SqliteFhirRepository) -> str:
    """The patient of the tests, known by INS and IPP; another patient beside."""
    stored, _ = await repo.create(patient_resource())
    await repo.create(patient_resource(OTHER_INS, "100002", "Martin"))
    return str(stored["id"])


def make_client_fixture(settings: dict[str, Any] | None = None) -> Any:
    @pytest.fixture
    async def fixture(repo: SqliteFhirRepository, patient_id: str) -> AsyncIterator[Client]:
        app = build_app(
            FhirOnlyRuntime(repo), authenticator=TokenTable(TOKENS.values()), documents=settings or {}
        )
        async with TestClient(TestServer(app, host="127.0.0.1", port=0)) as c:
            yield c

    return fixture


client = make_client_fixture()
dmp_client = make_client_fixture({"mode": "dmp"})


async def publish(client: Client, bundle: dict[str, Any], who: str = "pro") -> tuple[int, dict[str, Any]]:
    resp = await client.post("/fhir", json=bundle, headers={**auth(who), "Content-Type": FHIR_JSON})
    return resp.status, await resp.json(content_type=None)


async def search(client: Client, query: str, who: str = "pro") -> tuple[int, dict[str, Any]]:
    resp = await client.get(f"/fhir/DocumentReference?{query}", headers=auth(who))
    return resp.status, await resp.json(content_type=None)


def ids(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", [])]


def location_id(entry: dict[str, Any]) -> str:
    return str(entry["response"]["location"]).split("/")[1]
