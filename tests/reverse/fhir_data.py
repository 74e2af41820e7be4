"""FHIR requests authored for these tests: fictional French patients, as city-side software posts them."""

from __future__ import annotations

import base64
from typing import Any

IPP_SYSTEM = "urn:oid:1.2.250.1.71.4.2.2.1234"
VISIT_SYSTEM = "urn:oid:1.2.250.1.71.4.2.2.1234"
NIR_SYSTEM = "urn:oid:1.2.250.1.213.1.4.8"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
FR_0203 = "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0203"
RELIABILITY = "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-identity-reliability"
BIRTH_PLACE = "http://hl7.org/fhir/StructureDefinition/patient-birthPlace"
INSEE = "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-address-insee-code"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CDA = (
    '<?xml version="1.0" encoding="UTF-8"?><ClinicalDocument>Compte rendu : éléments</ClinicalDocument>'
).encode()


def patient(status: str = "VALI", *, with_ins: bool = True) -> dict[str, Any]:
    identifiers: list[dict[str, Any]] = [
        {
            "use": "usual",
            "type": {"coding": [{"system": V2_0203, "code": "PI"}]},
            "system": IPP_SYSTEM,
            "value": "100001",
        }
    ]
    if with_ins:
        identifiers.append(
            {
                "use": "official",
                "type": {"coding": [{"system": FR_0203, "code": "INS-NIR"}]},
                "system": NIR_SYSTEM,
                "value": "275041225012345",
            }
        )
    return {
        "resourceType": "Patient",
        "id": "pat-1",
        "meta": {"profile": ["https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-patient"]},
        "extension": [
            {
                "url": RELIABILITY,
                "extension": [{"url": "identityStatus", "valueCoding": {"code": status}}],
            },
            {
                "url": BIRTH_PLACE,
                "valueAddress": {
                    "city": "Besançon",
                    "country": "FRA",
                    "extension": [{"url": INSEE, "valueCoding": {"code": "25056"}}],
                },
            },
        ],
        "identifier": identifiers,
        "name": [
            {"use": "official", "family": "LEFÈVRE", "given": ["Françoise"]},
            {"use": "usual", "family": "D'ARCY^MARTIN", "given": ["Françoise"]},
        ],
        "gender": "female",
        "birthDate": "1975-04-12",
        "address": [
            {"line": ["12 rue des Écoles"], "city": "Besançon", "postalCode": "25000", "country": "FRA"}
        ],
        "telecom": [{"system": "phone", "value": "0381000000"}],
    }


def _entry(resource: dict[str, Any], url: str, method: str = "POST") -> dict[str, Any]:
    return {
        "fullUrl": url,
        "resource": resource,
        "request": {"method": method, "url": resource["resourceType"]},
    }


def encounter_bundle(status: str = "in-progress", *, end: str | None = None) -> dict[str, Any]:
    period: dict[str, str] = {"start": "2026-11-23T10:15:00+01:00"}
    if end:
        period["end"] = end
    encounter = {
        "resourceType": "Encounter",
        "status": status,
        "class": {"system": ACT_CODE, "code": "IMP"},
        "identifier": [{"system": VISIT_SYSTEM, "value": "V2026000123"}],
        "subject": {"reference": "urn:uuid:pat"},
        "period": period,
        "location": [{"location": {"display": "CARDIO"}}],
        "serviceType": {"coding": [{"code": "4012", "display": "Cardiologie"}]},
    }
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [_entry(patient(), "urn:uuid:pat"), _entry(encounter, "urn:uuid:enc")],
    }


def report_bundle() -> dict[str, Any]:
    observations = [
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": LOINC, "code": "2093-3", "display": "Cholestérol total"}]},
            "valueQuantity": {"value": 5.2, "unit": "mmol/L", "system": UCUM, "code": "mmol/L"},
            "referenceRange": [{"low": {"value": 3.5}, "high": {"value": 6.5}}],
            "interpretation": [{"coding": [{"code": "N"}]}],
            "effectiveDateTime": "2026-11-23T08:00:00+01:00",
            "subject": {"reference": "urn:uuid:pat"},
        },
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "Commentaire"},
            "valueString": "Prélèvement hémolysé | à refaire\nContrôle demandé",
            "subject": {"reference": "urn:uuid:pat"},
        },
    ]
    report = {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "identifier": [{"system": "urn:oid:1.2.250.1.71.4.2.2.4455", "value": "CMD-42"}],
        "code": {"coding": [{"system": LOINC, "code": "24331-1", "display": "Bilan lipidique"}]},
        "subject": {"reference": "urn:uuid:pat"},
        "effectiveDateTime": "2026-11-23T08:00:00+01:00",
        "issued": "2026-11-23T10:30:00+01:00",
        "result": [{"reference": "urn:uuid:obs1"}, {"reference": "urn:uuid:obs2"}],
    }
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            _entry(patient(), "urn:uuid:pat"),
            _entry(report, "urn:uuid:rep"),
            _entry(observations[0], "urn:uuid:obs1"),
            _entry(observations[1], "urn:uuid:obs2"),
        ],
    }


def _vital(code: str, display: str, value: float, unit: str, ucum: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"code": "vital-signs"}]}],
        "code": {"coding": [{"system": LOINC, "code": code, "display": display}]},
        "subject": {"reference": "urn:uuid:pat"},
        "effectiveDateTime": "2026-11-24T07:30:00+01:00",
        "device": {"display": "TENSIO-42"},
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": ucum},
    }


def device_bundle() -> dict[str, Any]:
    """A remote-monitoring platform's morning readings: heart rate, SpO2, weight, blood pressure, glucose."""
    pressure = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "85354-9", "display": "Pression artérielle"}]},
        "subject": {"reference": "urn:uuid:pat"},
        "effectiveDateTime": "2026-11-24T07:30:00+01:00",
        "device": {"display": "TENSIO-42"},
        "component": [
            {
                "code": {"coding": [{"system": LOINC, "code": "8480-6", "display": "Systolique"}]},
                "valueQuantity": {"value": 128, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"},
            },
            {
                "code": {"coding": [{"system": LOINC, "code": "8462-4", "display": "Diastolique"}]},
                "valueQuantity": {"value": 82, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"},
            },
        ],
    }
    observations = [
        _vital("8867-4", "Fréquence cardiaque", 72, "battements/min", "/min"),
        _vital("59408-5", "SpO2", 97, "%", "%"),
        _vital("29463-7", "Poids", 71.5, "kg", "kg"),
        pressure,
        _vital("2339-0", "Glycémie", 1.05, "g/L", "g/L"),
    ]
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            _entry(patient(), "urn:uuid:pat"),
            *(_entry(o, f"urn:uuid:obs{i}") for i, o in enumerate(observations)),
        ],
    }


def document_bundle(*, replaces: bool = False) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "status": "current",
        "docStatus": "final",
        "masterIdentifier": {"system": "urn:oid:1.2.250.1.213.1.1.9", "value": "DOC-2026-0042"},
        "type": {"coding": [{"system": LOINC, "code": "11490-0", "display": "Lettre de sortie"}]},
        "subject": {"reference": "urn:uuid:pat"},
        "date": "2026-11-25T16:00:00+01:00",
        "content": [{"attachment": {"contentType": "text/xml", "url": "urn:uuid:bin"}}],
    }
    if replaces:
        doc["masterIdentifier"] = {"system": "urn:oid:1.2.250.1.213.1.1.9", "value": "DOC-2026-0043"}
        doc["relatesTo"] = [
            {
                "code": "replaces",
                "target": {"identifier": {"system": "urn:oid:1.2.250.1.213.1.1.9", "value": "DOC-2026-0042"}},
            }
        ]
    binary = {"resourceType": "Binary", "contentType": "text/xml", "data": base64.b64encode(CDA).decode()}
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            _entry(patient(), "urn:uuid:pat"),
            _entry(doc, "urn:uuid:doc"),
            _entry(binary, "urn:uuid:bin"),
        ],
    }
