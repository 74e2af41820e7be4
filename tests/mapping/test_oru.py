"""ORU^R01 → DiagnosticReport + Observations + Specimen: golden output and every OBX value type."""

from __future__ import annotations

import pytest

from gateway.hl7.er7 import Message
from gateway.mapping.validate import bundle_errors
from tests.mapping.test_adt import LIB, normalized, segment

MSH = (
    "MSH|^~\\&|LABO|CHU-EST|PASSERELLE|GHT|20261123110000||ORU^R01^ORU_R01|R-0001|P|2.5|||||FRA|UNICODE UTF-8"
)
PID = "PID|||552233^^^CHU-EST&1.2.250.1.71.4.2.2.4455&ISO^PI||GÉRARD^Zoé^^^^^L||19750425|F"
OID = "urn:oid:1.2.250.1.71.4.2.2.4455"
MERGE = [{"url": "urn:passerelle:write-policy", "valueCode": "merge"}]
OBR = segment(
    "OBR",
    {
        1: "1",
        3: "CMD-42^LABO^1.2.250.1.71.4.2.2.4455^ISO",
        4: "24331-1^Bilan lipidique^LN",
        7: "20261123080000",
        22: "20261123103000+0100",
        25: "F",
    },
)


def oru(*obx: str, spm: str | None = None) -> Message:
    return Message.parse("\r".join([MSH, PID, OBR, *obx, *([spm] if spm else [])]) + "\r")


def test_oru_golden_bundle() -> None:
    msg = oru(
        segment(
            "OBX",
            {
                1: "1",
                2: "NM",
                3: "2093-3^Cholestérol total^LN",
                5: "5.2",
                6: "mmol/L^^UCUM",
                7: "3.5-6.5",
                8: "N",
                11: "F",
                14: "20261123080000",
            },
        ),
        spm=segment(
            "SPM",
            {
                1: "1",
                2: "SPM-77&LABO&1.2.250.1.71.4.2.2.4455&ISO",
                4: "122555007^Sang veineux^SCT",
                17: "20261123075500",
            },
        ),
    )
    result = LIB.map(msg)
    assert bundle_errors(result.bundle) == []
    loinc, ucum = "http://loinc.org", "http://unitsofmeasure.org"
    filler = {
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "FILL"}]},
        "system": OID,
        "value": "CMD-42",
        "assigner": {"display": "LABO"},
    }
    entries = normalized(result)["entry"]
    # the Patient is only named by a result feed: created when absent, never overwritten
    assert entries[0]["request"] == {
        "method": "POST",
        "url": "Patient",
        "ifNoneExist": f"identifier={OID}|552233",
    }
    assert entries[1:] == [
        {
            "fullUrl": "urn:uuid:1",
            "resource": {
                "resourceType": "Specimen",
                "identifier": [
                    {
                        "type": {
                            "coding": [
                                {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "PLAC"}
                            ]
                        },
                        "system": OID,
                        "value": "SPM-77",
                        "assigner": {"display": "LABO"},
                    }
                ],
                "type": {
                    "coding": [
                        {"system": "http://snomed.info/sct", "code": "122555007", "display": "Sang veineux"}
                    ],
                    "text": "Sang veineux",
                },
                "collection": {"collectedDateTime": "2026-11-23T07:55:00+01:00"},
                "subject": {"reference": "urn:uuid:0"},
            },
            "request": {"method": "PUT", "url": f"Specimen?identifier={OID}|SPM-77", "extension": MERGE},
        },
        {
            "fullUrl": "urn:uuid:2",
            "resource": {
                "resourceType": "ServiceRequest",
                "identifier": [filler],
                "status": "completed",
                "intent": "order",
                "code": {
                    "coding": [{"system": loinc, "code": "24331-1", "display": "Bilan lipidique"}],
                    "text": "Bilan lipidique",
                },
                "subject": {"reference": "urn:uuid:0"},
            },
            "request": {
                "method": "PUT",
                "url": f"ServiceRequest?identifier={OID}|CMD-42",
                "extension": MERGE,
            },
        },
        {
            "fullUrl": "urn:uuid:3",
            "resource": {
                "resourceType": "Observation",
                # the result's key: its order's filler number in that number's namespace, and its set id
                "identifier": [{"system": OID, "value": "CMD-42-1", "assigner": {"display": "LABO"}}],
                "status": "final",
                "code": {
                    "coding": [{"system": loinc, "code": "2093-3", "display": "Cholestérol total"}],
                    "text": "Cholestérol total",
                },
                "valueQuantity": {"value": 5.2, "unit": "mmol/L", "system": ucum, "code": "mmol/L"},
                "referenceRange": [
                    {
                        "low": {"value": 3.5, "unit": "mmol/L", "system": ucum, "code": "mmol/L"},
                        "high": {"value": 6.5, "unit": "mmol/L", "system": ucum, "code": "mmol/L"},
                    }
                ],
                "interpretation": [
                    {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                                "code": "N",
                            }
                        ]
                    }
                ],
                "effectiveDateTime": "2026-11-23T08:00:00+01:00",
                "subject": {"reference": "urn:uuid:0"},
                "specimen": {"reference": "urn:uuid:1"},
            },
            "request": {"method": "PUT", "url": f"Observation?identifier={OID}|CMD-42-1"},
        },
        {
            "fullUrl": "urn:uuid:4",
            "resource": {
                "resourceType": "DiagnosticReport",
                "identifier": [filler],
                "basedOn": [{"reference": "urn:uuid:2"}],
                "status": "final",
                "code": {
                    "coding": [{"system": loinc, "code": "24331-1", "display": "Bilan lipidique"}],
                    "text": "Bilan lipidique",
                },
                "effectiveDateTime": "2026-11-23T08:00:00+01:00",
                "issued": "2026-11-23T10:30:00+01:00",
                "subject": {"reference": "urn:uuid:0"},
                "specimen": [{"reference": "urn:uuid:1"}],
                "result": [{"reference": "urn:uuid:3"}],
            },
            "request": {"method": "PUT", "url": f"DiagnosticReport?identifier={OID}|CMD-42"},
        },
    ]
    assert result.unmapped == ["OBR-1[1]", "SPM-1[1]"]
    assert result.warnings == []


@pytest.mark.parametrize(
    ("kind", "value", "expected"),
    [
        ("NM", "42", {"valueQuantity": {"value": 42, "unit": "mmol/L"}}),
        ("SN", ">=^10", {"valueQuantity": {"value": 10, "unit": "mmol/L", "comparator": ">="}}),
        (
            "SN",
            "^10^-^20",
            {"valueRange": {"low": {"value": 10, "unit": "mmol/L"}, "high": {"value": 20, "unit": "mmol/L"}}},
        ),
        ("SN", "^1^:^128", {"valueRatio": {"numerator": {"value": 1}, "denominator": {"value": 128}}}),
        ("ST", "positif", {"valueString": "positif"}),
        ("TX", "ligne 1~ligne 2", {"valueString": "ligne 1\nligne 2"}),
        ("FT", "première\\.br\\seconde", {"valueString": "première\nseconde"}),
        (
            "CE",
            "10828004^Positif^SCT",
            {
                "valueCodeableConcept": {
                    "coding": [
                        {"system": "http://snomed.info/sct", "code": "10828004", "display": "Positif"}
                    ],
                    "text": "Positif",
                }
            },
        ),
        ("CX", "ABC123^^^LABO", {"valueString": "ABC123"}),
        ("DT", "20261120", {"valueDateTime": "2026-11-20"}),
        ("TS", "202611201230+0100", {"valueDateTime": "2026-11-20T12:30:00+01:00"}),
    ],
    ids=["NM", "SN-comparator", "SN-range", "SN-ratio", "ST", "TX", "FT", "CE", "CX", "DT", "TS"],
)
def test_each_obx_value_type(kind: str, value: str, expected: dict[str, object]) -> None:
    obx = segment("OBX", {1: "1", 2: kind, 3: "X-1^Essai^L", 5: value, 6: "mmol/L", 11: "F"})
    result = LIB.map(oru(obx))
    observation = next(
        e["resource"] for e in result.bundle["entry"] if e["resource"]["resourceType"] == "Observation"
    )
    got = {k: v for k, v in observation.items() if k.startswith("value")}
    assert got == expected
    assert bundle_errors(result.bundle) == []


@pytest.mark.parametrize(
    ("kind", "value", "warning"),
    [
        ("NM", "beaucoup", "not a number"),
        ("ED", "^application^pdf^Base64^%%%", "not valid Base64"),
        ("XYZ", "?", "not mapped"),
    ],
)
def test_values_that_cannot_be_mapped_are_reported(kind: str, value: str, warning: str) -> None:
    obx = segment("OBX", {1: "1", 2: kind, 3: "X-1^Essai^L", 5: value, 11: "F"})
    result = LIB.map(oru(obx))
    assert any(warning in w for w in result.warnings)
