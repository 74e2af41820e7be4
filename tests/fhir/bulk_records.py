"""A repository holding every resource type the shipped mappings produce, for the export tests:
two fictional French patients, their care, and documents (one masked from professionals, one
hidden from the patient) published through the document store. Plus the Bulk Data client steps."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
from aiohttp.test_utils import TestClient
from yarl import URL

from gateway.store.bulk import Exporter, ExportRequest, JobStatus
from gateway.store.documents import FEED, BaseDocumentStore
from gateway.store.fhir_common import FhirRepository
from tests.documents.conftest import (
    CDA,
    CONFIDENTIALITY,
    OTHER_INS,
    document,
    patient_resource,
    provide_bundle,
    visibility,
)

Client = TestClient[Any, Any]
IPP = "urn:oid:1.2.250.1.71.4.2.7"
RPPS = "urn:oid:1.2.250.1.71.4.2.1"  # IDNPS: "8" + RPPS
FINESS = "urn:oid:1.2.250.1.71.4.2.2"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
# Every type the shipped mappings write (mappings/*.yaml), and the document store's List.
MAPPED_TYPES = frozenset(
    {
        "Account",
        "AllergyIntolerance",
        "Appointment",
        "Binary",
        "CareTeam",
        "ChargeItem",
        "Condition",
        "Coverage",
        "Device",
        "DiagnosticReport",
        "DocumentReference",
        "Encounter",
        "Goal",
        "Immunization",
        "Location",
        "MedicationDispense",
        "MedicationRequest",
        "Observation",
        "Organization",
        "Patient",
        "Practitioner",
        "Procedure",
        "RelatedPerson",
        "ServiceRequest",
        "Specimen",
        "List",
    }
)


def _ref(target: str) -> dict[str, str]:
    return {"reference": target}


def care_records(patient: str, suffix: str) -> list[dict[str, Any]]:
    """One resource of each clinical type for ``patient`` (ids end with ``suffix``)."""
    subject = _ref(f"Patient/{patient}")
    enc = f"enc-{suffix}"
    code = {"coding": [{"system": LOINC, "code": "2345-7", "display": "Glucose"}]}
    return [
        {"resourceType": "Encounter", "id": enc, "status": "finished", "subject": subject,
         "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
         "serviceProvider": _ref("Organization/chu-besancon"),
         "location": [{"location": _ref("Location/cardio-101")}]},
        {"resourceType": "Observation", "id": f"obs-{suffix}", "status": "final", "code": code,
         "subject": subject, "encounter": _ref(f"Encounter/{enc}"),
         "valueQuantity": {"value": 5.4, "unit": "mmol/L"}, "performer": [_ref("Practitioner/dr-moreau")]},
        {"resourceType": "DiagnosticReport", "id": f"dr-{suffix}", "status": "final", "code": code,
         "subject": subject, "result": [_ref(f"Observation/obs-{suffix}")]},
        {"resourceType": "ServiceRequest", "id": f"sr-{suffix}", "status": "active", "intent": "order",
         "subject": subject, "code": code, "requester": _ref("Practitioner/dr-moreau")},
        {"resourceType": "Specimen", "id": f"spec-{suffix}", "subject": subject,
         "type": {"text": "Sang veineux"}},
        {"resourceType": "Condition", "id": f"cond-{suffix}", "subject": subject,
         "code": {"coding": [{"system": SNOMED, "code": "44054006", "display": "Diabète de type 2"}]}},
        {"resourceType": "AllergyIntolerance", "id": f"alg-{suffix}", "patient": subject,
         "code": {"text": "Pénicilline"}},
        {"resourceType": "Procedure", "id": f"proc-{suffix}", "status": "completed", "subject": subject,
         "code": {"text": "Échographie abdominale"}},
        {"resourceType": "Immunization", "id": f"imm-{suffix}", "status": "completed", "patient": subject,
         "vaccineCode": {"text": "Vaccin grippal"}, "occurrenceDateTime": "2024-10-15"},
        {"resourceType": "MedicationRequest", "id": f"mr-{suffix}", "status": "active", "intent": "order",
         "subject": subject, "medicationCodeableConcept": {"text": "Metformine 500 mg"}},
        {"resourceType": "MedicationDispense", "id": f"md-{suffix}", "status": "completed",
         "subject": subject,
         "medicationCodeableConcept": {"text": "Metformine 500 mg"},
         "authorizingPrescription": [_ref(f"MedicationRequest/mr-{suffix}")]},
        {"resourceType": "Appointment", "id": f"rdv-{suffix}", "status": "booked",
         "participant": [{"actor": subject, "status": "accepted"}]},
        {"resourceType": "Account", "id": f"acc-{suffix}", "status": "active", "subject": [subject]},
        {"resourceType": "ChargeItem", "id": f"chg-{suffix}", "status": "billable", "subject": subject,
         "code": {"text": "Consultation"}},
        {"resourceType": "Coverage", "id": f"cov-{suffix}", "status": "active", "beneficiary": subject,
         "payor": [_ref("Organization/cpam-doubs")]},
        {"resourceType": "CareTeam", "id": f"team-{suffix}", "subject": subject,
         "participant": [{"member": _ref("Practitioner/dr-moreau")}]},
        {"resourceType": "Goal", "id": f"goal-{suffix}", "lifecycleStatus": "active", "subject": subject,
         "description": {"text": "HbA1c sous 7 %"}},
        {"resourceType": "RelatedPerson", "id": f"rel-{suffix}", "patient": subject,
         "name": [{"family": "Lefèvre", "given": ["Jacques"]}]},
    ]  # fmt: skip


SHARED = [
    {"resourceType": "Practitioner", "id": "dr-moreau",
     "identifier": [{"system": RPPS, "value": "810001234567"}],
     "name": [{"family": "Moreau", "given": ["Hélène"]}]},
    {"resourceType": "Organization", "id": "chu-besancon",
     "identifier": [{"system": FINESS, "value": "250000015"}],
     "name": "CHU de Besançon"},
    {"resourceType": "Organization", "id": "cpam-doubs", "name": "CPAM du Doubs"},
    {"resourceType": "Location", "id": "cardio-101", "name": "Cardiologie, chambre 101"},
    {"resourceType": "Device", "id": "glucometre-1",
     "deviceName": [{"name": "Lecteur de glycémie", "type": "user-friendly-name"}]},
]  # fmt: skip


async def fill(repo: FhirRepository, store: BaseDocumentStore) -> dict[str, str]:
    """Write the records; the two patients' ids ("amelie", "paul"), and the documents' ids
    ("plain", "masked": MASQUE_PS, "hidden": INVISIBLE_PATIENT)."""
    amelie, _ = await repo.update("Patient", "amelie", patient_resource())
    await repo.update(
        "Patient", "amelie", {**patient_resource(), "telecom": [{"system": "phone", "value": "0381000000"}]}
    )
    await repo.update("Patient", "paul", patient_resource(OTHER_INS, "100002", "Martin"))
    for resource in SHARED + care_records("amelie", "a") + care_records("paul", "p"):
        await repo.update(resource["resourceType"], resource["id"], resource)
    await repo.update(
        "Observation",
        "obs-a",
        {**care_records("amelie", "a")[1], "valueQuantity": {"value": 6.1, "unit": "mmol/L"}},
    )
    await repo.update(
        "Group",
        "cohorte-diabete",
        {
            "resourceType": "Group",
            "type": "person",
            "actual": True,
            "member": [{"entity": _ref("Patient/paul")}],
        },
    )
    ids: dict[str, str] = {}
    variants = {
        "plain": ((), b"", "urn:oid:1.2.250.1.999.1.1"),
        "masked": ((visibility("MASQUE_PS"),), b" masque", "urn:oid:1.2.250.1.999.1.2"),
        "hidden": ((visibility("INVISIBLE_PATIENT"),), b" invisible", "urn:oid:1.2.250.1.999.1.3"),
    }
    for name, (labels, extra, master) in variants.items():
        data = CDA + extra
        doc = document(data=data, master=master, labels=((CONFIDENTIALITY, "N"), *labels))
        answer = await store.publish(provide_bundle(doc), FEED)
        locations = [str(e["response"]["location"]) for e in answer["entry"]]
        ids[name] = next(loc.split("/")[1] for loc in locations if loc.startswith("DocumentReference/"))
    ids["amelie"], ids["paul"] = str(amelie["id"]), "paul"
    return ids


async def export_everything(
    repo: Any, store: BaseDocumentStore, directory: Path
) -> dict[tuple[str, str], Any]:
    """Every resource as an unrestricted export writes it, by (type, id)."""
    exporter = Exporter(repo, directory, documents=store, page=7)
    job = await exporter.start(ExportRequest(owner="check", request="check", types=None))
    assert job.task is not None
    await job.task
    assert job.status is JobStatus.COMPLETE, job.error
    found: dict[tuple[str, str], Any] = {}
    for output in job.outputs:
        for line in (job.directory / output.name).read_bytes().splitlines():
            resource = orjson.loads(line)
            found[(resource["resourceType"], resource["id"])] = resource
    return found


def async_headers(token: Mapping[str, str]) -> dict[str, str]:
    return {**token, "Prefer": "respond-async", "Accept": "application/fhir+json"}


async def kick_off(client: Client, path: str, token: Mapping[str, str]) -> str:
    """The status URL's path of a new export."""
    resp = await client.get(path, headers=async_headers(token))
    assert resp.status == 202, await resp.text()
    return URL(resp.headers["Content-Location"]).path


async def manifest_of(client: Client, status_path: str, token: Mapping[str, str]) -> dict[str, Any]:
    for _ in range(500):
        resp = await client.get(status_path, headers=token)
        if resp.status == 200:
            body: dict[str, Any] = await resp.json()
            return body
        assert resp.status == 202, await resp.text()
        assert resp.headers["Retry-After"].isdigit() and "resources written" in resp.headers["X-Progress"]
        await asyncio.sleep(0.02)
    raise AssertionError("the export did not end")


async def download(
    client: Client, manifest: Mapping[str, Any], token: Mapping[str, str]
) -> dict[str, list[Any]]:
    """The manifest's files, by type, each line parsed."""
    out: dict[str, list[Any]] = {}
    for item in manifest["output"]:
        resp = await client.get(URL(item["url"]).path, headers={**token, "Accept": "application/fhir+ndjson"})
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("application/fhir+ndjson")
        lines = [orjson.loads(line) for line in (await resp.read()).splitlines()]
        assert len(lines) == item["count"]
        out.setdefault(item["type"], []).extend(lines)
    return out


async def bulk_export(client: Client, path: str, token: Mapping[str, str]) -> dict[str, list[Any]]:
    manifest = await manifest_of(client, await kick_off(client, path, token), token)
    return await download(client, manifest, token)
