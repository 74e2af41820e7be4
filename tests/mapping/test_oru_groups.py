"""ORU^R01 with several order groups: each OBR its own DiagnosticReport, its own results and specimen;
the ordering provider (OBR-16) and the observer (OBX-16); embedded documents (OBX ED) as DocumentReference
+ Binary, Base64 PDF and plain text with escapes."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.hl7.er7 import Message
from gateway.mapping.validate import bundle_errors
from tests.mapping.test_adt import LIB, normalized, segment
from tests.mapping.test_oru import MSH, PID

PDF = b"%PDF-1.4 compte rendu"
DUPRE = "10003456789^DUPRÉ^Hélène^^^Dr^^^ASIP-SANTE-PS&1.2.250.1.71.4.2.1&ISO^D^^^RPPS"
MARTIN = "10007654321^MARTIN^Paul^^^^^^ASIP-SANTE-PS&1.2.250.1.71.4.2.1&ISO^D^^^RPPS"


def two_orders(pdf: bytes = PDF) -> str:
    """Authored: order 1 (lipids) with a result, a Base64 PDF report and an SPM; order 2 (creatinine)
    whose specimen is only named in OBR-15, with a plain-text note holding an escaped "&"."""
    return (
        "\r".join(
            [
                MSH,
                PID,
                segment("ORC", {1: "RE", 2: "PRESC-1^SIH^1.2.250.1.71.4.2.2.4455^ISO"}),
                segment(
                    "OBR",
                    {
                        1: "1",
                        2: "PRESC-1^SIH^1.2.250.1.71.4.2.2.4455^ISO",
                        3: "CMD-42^LABO^1.2.250.1.71.4.2.2.4455^ISO",
                        4: "24331-1^Bilan lipidique^LN",
                        7: "20261123080000",
                        16: DUPRE,
                        25: "F",
                    },
                ),
                segment(
                    "OBX",
                    {
                        1: "1",
                        2: "NM",
                        3: "2093-3^Cholestérol total^LN",
                        5: "5.2",
                        6: "mmol/L^^UCUM",
                        11: "F",
                        16: MARTIN,
                    },
                ),
                segment(
                    "OBX",
                    {
                        1: "2",
                        2: "ED",
                        3: "11502-2^CR d'examens biologiques^LN",
                        5: f"^application^pdf^Base64^{base64.b64encode(pdf).decode()}",
                        11: "F",
                        14: "20261123103000",
                    },
                ),
                segment(
                    "SPM",
                    {1: "1", 2: "SPM-77&LABO&1.2.250.1.71.4.2.2.4455&ISO", 4: "122555007^Sang veineux^SCT"},
                ),
                segment(
                    "OBR",
                    {
                        1: "2",
                        3: "CMD-43^LABO^1.2.250.1.71.4.2.2.4455^ISO",
                        4: "2160-0^Créatinine^LN",
                        15: "BLDV&Sang veineux&HL70070",
                        25: "P",
                    },
                ),
                segment(
                    "OBX", {1: "1", 2: "NM", 3: "2160-0^Créatinine^LN", 5: "72", 6: "µmol/L^^UCUM", 11: "P"}
                ),
                segment(
                    "OBX",
                    {
                        1: "2",
                        2: "ED",
                        3: "11502-2^Note^LN",
                        5: "^text^plain^A^Résultat \\T\\ commentaire",
                        11: "P",
                    },
                ),
            ]
        )
        + "\r"
    )


def test_two_order_groups_golden() -> None:
    result = LIB.map(Message.parse(two_orders()))
    assert bundle_errors(result.bundle) == []
    assert normalized(result)["entry"][1:] == EXPECTED
    # ORC-1 and the OBR set ids are reported, not lost; ORC-2 is OBR-2's number written again
    assert result.unmapped == [
        "ORC-1[1]",
        "OBR-1[1]",
        "SPM-1[1]",
        "OBR[2]-1[1]",
        "OBR[2]-15[1].1.3",
    ]
    assert result.warnings == []


def test_attachment_size_and_hash_are_those_of_the_bytes() -> None:
    entries = LIB.map(Message.parse(two_orders())).bundle["entry"]
    binary = next(e["resource"] for e in entries if e["resource"]["resourceType"] == "Binary")
    document = next(e["resource"] for e in entries if e["resource"]["resourceType"] == "DocumentReference")
    assert base64.b64decode(binary["data"]) == PDF
    attachment = document["content"][0]["attachment"]
    assert attachment["size"] == len(PDF)
    assert attachment["hash"] == base64.b64encode(hashlib.sha1(PDF).digest()).decode()  # noqa: S324
    assert attachment["url"] == f"Binary/{binary['id']}"


def test_a_replayed_document_keeps_its_ids() -> None:
    first = LIB.map(Message.parse(two_orders())).bundle["entry"]
    second = LIB.map(Message.parse(two_orders("%PDF-1.4 version corrigée".encode()))).bundle["entry"]
    requests = [e["request"] for e in first]
    assert requests == [e["request"] for e in second]  # same targets: the corrected PDF updates in place
    binary_urls = [r["url"] for r in requests if r["url"].startswith("Binary/")]
    assert len(set(binary_urls)) == 2


def test_a_document_that_does_not_decode_is_reported_and_the_rest_published() -> None:
    text = two_orders().replace(base64.b64encode(PDF).decode(), "pas du base64 !")
    result = LIB.map(Message.parse(text))
    assert any("not valid Base64" in w for w in result.warnings)
    assert bundle_errors(result.bundle) == []
    # no empty DocumentReference: the unreadable document stays whole in the unmapped report, the
    # other order's document and every result are published
    documents = [e for e in result.bundle["entry"] if e["resource"]["resourceType"] == "DocumentReference"]
    assert [d["resource"]["identifier"][0]["value"] for d in documents] == ["CMD-43-2"]
    assert {"OBX[2]-2[1]", "OBX[2]-5[1].2", "OBX[2]-5[1].5"} <= set(result.unmapped)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=4), min_size=1, max_size=5))
def test_each_report_lists_exactly_its_own_results(sizes: list[int]) -> None:
    segments = [MSH, PID]
    for g, size in enumerate(sizes, 1):
        segments.append(
            segment(
                "OBR", {1: str(g), 3: f"CMD-{g}^LABO^1.2.250.1.71.4.2.2.4455^ISO", 4: "X^Bilan^L", 25: "F"}
            )
        )
        segments += [
            segment("OBX", {1: str(i), 2: "ST", 3: f"X-{i}^Essai^L", 5: f"v{g}.{i}", 11: "F"})
            for i in range(1, size + 1)
        ]
    result = LIB.map(Message.parse("\r".join(segments) + "\r"))
    assert bundle_errors(result.bundle) == []
    by_url = {e["fullUrl"]: e["resource"] for e in result.bundle["entry"]}
    reports = [r for r in by_url.values() if r["resourceType"] == "DiagnosticReport"]
    assert [r["identifier"][0]["value"] for r in reports] == [f"CMD-{g}" for g in range(1, len(sizes) + 1)]
    for g, (report, size) in enumerate(zip(reports, sizes, strict=True), 1):
        values = [by_url[ref["reference"]]["valueString"] for ref in report.get("result", [])]
        assert values == [f"v{g}.{i}" for i in range(1, size + 1)]
        ids = [by_url[ref["reference"]]["identifier"][0]["value"] for ref in report.get("result", [])]
        assert ids == [f"CMD-{g}-{i}" for i in range(1, size + 1)]


EXPECTED: list[dict[str, Any]] = [
    {
        "fullUrl": "urn:uuid:1",
        "resource": {
            "resourceType": "Practitioner",
            "meta": {"profile": ["https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-practitioner"]},
            "identifier": [
                {
                    "type": {
                        "coding": [
                            {
                                "system": "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0203",
                                "code": "RPPS",
                            }
                        ]
                    },
                    "system": "https://rpps.esante.gouv.fr",
                    "value": "10003456789",
                    "assigner": {"display": "ASIP-SANTE-PS"},
                },
                {
                    "type": {
                        "coding": [
                            {
                                "system": "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0203",
                                "code": "IDNPS",
                            }
                        ]
                    },
                    "system": "urn:oid:1.2.250.1.71.4.2.1",
                    "value": "810003456789",
                    "assigner": {"display": "ASIP-SANTE-PS"},
                },
            ],
            "name": [{"family": "DUPRÉ", "given": ["Hélène"], "prefix": ["Dr"], "use": "usual"}],
        },
        "request": {
            "method": "PUT",
            "url": "Practitioner?identifier=urn:oid:1.2.250.1.71.4.2.1|810003456789",
            "extension": [{"url": "urn:passerelle:write-policy", "valueCode": "merge"}],
        },
    },
    {
        "fullUrl": "urn:uuid:2",
        "resource": {
            "resourceType": "Practitioner",
            "meta": {"profile": ["https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-practitioner"]},
            "identifier": [
                {
                    "type": {
                        "coding": [
                            {
                                "system": "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0203",
                                "code": "RPPS",
                            }
                        ]
                    },
                    "system": "https://rpps.esante.gouv.fr",
                    "value": "10007654321",
                    "assigner": {"display": "ASIP-SANTE-PS"},
                },
                {
                    "type": {
                        "coding": [
                            {
                                "system": "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0203",
                                "code": "IDNPS",
                            }
                        ]
                    },
                    "system": "urn:oid:1.2.250.1.71.4.2.1",
                    "value": "810007654321",
                    "assigner": {"display": "ASIP-SANTE-PS"},
                },
            ],
            "name": [{"family": "MARTIN", "given": ["Paul"], "use": "usual"}],
        },
        "request": {
            "method": "PUT",
            "url": "Practitioner?identifier=urn:oid:1.2.250.1.71.4.2.1|810007654321",
            "extension": [{"url": "urn:passerelle:write-policy", "valueCode": "merge"}],
        },
    },
    {
        "fullUrl": "urn:uuid:3",
        "resource": {
            "resourceType": "Specimen",
            "identifier": [
                {
                    "type": {
                        "coding": [
                            {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "PLAC"}
                        ]
                    },
                    "system": "urn:oid:1.2.250.1.71.4.2.2.4455",
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
            "subject": {"reference": "urn:uuid:0"},
        },
        "request": {
            "method": "PUT",
            "url": "Specimen?identifier=urn:oid:1.2.250.1.71.4.2.2.4455|SPM-77",
            "extension": [{"url": "urn:passerelle:write-policy", "valueCode": "merge"}],
        },
    },
    {
        "fullUrl": "urn:uuid:4",
        "resource": {
            "resourceType": "Specimen",
            "identifier": [
                {
                    "type": {
                        "coding": [
                            {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "FILL"}
                        ]
                    },
                    "system": "urn:oid:1.2.250.1.71.4.2.2.4455",
                    "value": "CMD-43",
                    "assigner": {"display": "LABO"},
                }
            ],
            "type": {"coding": [{"code": "BLDV", "display": "Sang veineux"}], "text": "Sang veineux"},
            "subject": {"reference": "urn:uuid:0"},
        },
        "request": {
            "method": "PUT",
            "url": "Specimen?identifier=urn:oid:1.2.250.1.71.4.2.2.4455|CMD-43",
            "extension": [{"url": "urn:passerelle:write-policy", "valueCode": "merge"}],
        },
    },
    {
        "fullUrl": "urn:uuid:5",
        "resource": {
            "resourceType": "ServiceRequest",
            "identifier": [
                {
                    "type": {
                        "coding": [
                            {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "PLAC"}
                        ]
                    },
                    "system": "urn:oid:1.2.250.1.71.4.2.2.4455",
                    "value": "PRESC-1",
                    "assigner": {"display": "SIH"},
                },
                {
                    "type": {
                        "coding": [
                            {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "FILL"}
                        ]
                    },
                    "system": "urn:oid:1.2.250.1.71.4.2.2.4455",
                    "value": "CMD-42",
                    "assigner": {"display": "LABO"},
                },
            ],
            "status": "completed",
            "intent": "order",
            "code": {
                "coding": [{"system": "http://loinc.org", "code": "24331-1", "display": "Bilan lipidique"}],
                "text": "Bilan lipidique",
            },
            "subject": {"reference": "urn:uuid:0"},
            "requester": {"reference": "urn:uuid:1"},
        },
        "request": {
            "method": "PUT",
            "url": "ServiceRequest?identifier=urn:oid:1.2.250.1.71.4.2.2.4455|PRESC-1",
            "extension": [{"url": "urn:passerelle:write-policy", "valueCode": "merge"}],
        },
    },
    {
        "fullUrl": "urn:uuid:6",
        "resource": {
            "resourceType": "ServiceRequest",
            "identifier": [
                {
                    "type": {
                        "coding": [
                            {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "FILL"}
                        ]
                    },
                    "system": "urn:oid:1.2.250.1.71.4.2.2.4455",
                    "value": "CMD-43",
                    "assigner": {"display": "LABO"},
                }
            ],
            "status": "active",
            "intent": "order",
            "code": {
                "coding": [{"system": "http://loinc.org", "code": "2160-0", "display": "Créatinine"}],
                "text": "Créatinine",
            },
            "subject": {"reference": "urn:uuid:0"},
        },
        "request": {
            "method": "PUT",
            "url": "ServiceRequest?identifier=urn:oid:1.2.250.1.71.4.2.2.4455|CMD-43",
            "extension": [{"url": "urn:passerelle:write-policy", "valueCode": "merge"}],
        },
    },
    {
        "fullUrl": "urn:uuid:7",
        "resource": {
            "resourceType": "Observation",
            "identifier": [
                {
                    "system": "urn:oid:1.2.250.1.71.4.2.2.4455",
                    "value": "CMD-42-1",
                    "assigner": {"display": "LABO"},
                }
            ],
            "status": "final",
            "code": {
                "coding": [{"system": "http://loinc.org", "code": "2093-3", "display": "Cholestérol total"}],
                "text": "Cholestérol total",
            },
            "valueQuantity": {
                "value": 5.2,
                "unit": "mmol/L",
                "system": "http://unitsofmeasure.org",
                "code": "mmol/L",
            },
            "subject": {"reference": "urn:uuid:0"},
            "performer": [{"reference": "urn:uuid:2"}],
            "specimen": {"reference": "urn:uuid:3"},
        },
        "request": {
            "method": "PUT",
            "url": "Observation?identifier=urn:oid:1.2.250.1.71.4.2.2.4455|CMD-42-1",
        },
    },
    {
        "fullUrl": "urn:uuid:8",
        "resource": {
            "resourceType": "Observation",
            "identifier": [
                {
                    "system": "urn:oid:1.2.250.1.71.4.2.2.4455",
                    "value": "CMD-43-1",
                    "assigner": {"display": "LABO"},
                }
            ],
            "status": "preliminary",
            "code": {
                "coding": [{"system": "http://loinc.org", "code": "2160-0", "display": "Créatinine"}],
                "text": "Créatinine",
            },
            "valueQuantity": {
                "value": 72,
                "unit": "µmol/L",
                "system": "http://unitsofmeasure.org",
                "code": "µmol/L",
            },
            "subject": {"reference": "urn:uuid:0"},
            "specimen": {"reference": "urn:uuid:4"},
        },
        "request": {
            "method": "PUT",
            "url": "Observation?identifier=urn:oid:1.2.250.1.71.4.2.2.4455|CMD-43-1",
        },
    },
    {
        "fullUrl": "urn:uuid:9",
        "resource": {
            "resourceType": "Binary",
            "contentType": "application/pdf",
            "data": "JVBERi0xLjQgY29tcHRlIHJlbmR1",
            "id": "doc-46a827039f441dc1e82a1a2161a19328d6305d46",
        },
        "request": {"method": "PUT", "url": "Binary/doc-46a827039f441dc1e82a1a2161a19328d6305d46"},
    },
    {
        "fullUrl": "urn:uuid:10",
        "resource": {
            "resourceType": "Binary",
            "contentType": "text/plain",
            "data": "UsOpc3VsdGF0ICYgY29tbWVudGFpcmU=",
            "id": "doc-13aa031e3b1c2249490f834abd909223d5803e5b",
        },
        "request": {"method": "PUT", "url": "Binary/doc-13aa031e3b1c2249490f834abd909223d5803e5b"},
    },
    {
        "fullUrl": "urn:uuid:11",
        "resource": {
            "resourceType": "DocumentReference",
            "identifier": [
                {
                    "system": "urn:oid:1.2.250.1.71.4.2.2.4455",
                    "value": "CMD-42-2",
                    "assigner": {"display": "LABO"},
                }
            ],
            "status": "current",
            "docStatus": "final",
            "type": {
                "coding": [
                    {"system": "http://loinc.org", "code": "11502-2", "display": "CR d'examens biologiques"}
                ],
                "text": "CR d'examens biologiques",
            },
            "subject": {"reference": "urn:uuid:0"},
            "date": "2026-11-23T10:30:00+01:00",
            "content": [
                {
                    "attachment": {
                        "contentType": "application/pdf",
                        "size": 21,
                        "hash": "3W8N5a8lu58bSw1z1QPrRQpUhh4=",
                        "url": "Binary/doc-46a827039f441dc1e82a1a2161a19328d6305d46",
                        "title": "CR d'examens biologiques",
                    }
                }
            ],
            "context": {"related": [{"reference": "urn:uuid:12"}]},
        },
        "request": {
            "method": "PUT",
            "url": "DocumentReference?identifier=urn:oid:1.2.250.1.71.4.2.2.4455|CMD-42-2",
        },
    },
    {
        "fullUrl": "urn:uuid:13",
        "resource": {
            "resourceType": "DocumentReference",
            "identifier": [
                {
                    "system": "urn:oid:1.2.250.1.71.4.2.2.4455",
                    "value": "CMD-43-2",
                    "assigner": {"display": "LABO"},
                }
            ],
            "status": "current",
            "docStatus": "preliminary",
            "type": {
                "coding": [{"system": "http://loinc.org", "code": "11502-2", "display": "Note"}],
                "text": "Note",
            },
            "subject": {"reference": "urn:uuid:0"},
            "date": "2026-11-23T11:00:00+01:00",  # MSH-7: this document has no OBX-14
            "content": [
                {
                    "attachment": {
                        "contentType": "text/plain",
                        "size": 23,
                        "hash": "1JxaMl78R/1SuOGW5bxPpB+1Kj8=",
                        "url": "Binary/doc-13aa031e3b1c2249490f834abd909223d5803e5b",
                        "title": "Note",
                    }
                }
            ],
            "context": {"related": [{"reference": "urn:uuid:14"}]},
        },
        "request": {
            "method": "PUT",
            "url": "DocumentReference?identifier=urn:oid:1.2.250.1.71.4.2.2.4455|CMD-43-2",
        },
    },
    {
        "fullUrl": "urn:uuid:12",
        "resource": {
            "resourceType": "DiagnosticReport",
            "identifier": [
                {
                    "type": {
                        "coding": [
                            {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "FILL"}
                        ]
                    },
                    "system": "urn:oid:1.2.250.1.71.4.2.2.4455",
                    "value": "CMD-42",
                    "assigner": {"display": "LABO"},
                },
                {
                    "type": {
                        "coding": [
                            {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "PLAC"}
                        ]
                    },
                    "system": "urn:oid:1.2.250.1.71.4.2.2.4455",
                    "value": "PRESC-1",
                    "assigner": {"display": "SIH"},
                },
            ],
            "basedOn": [{"reference": "urn:uuid:5"}],
            "status": "final",
            "code": {
                "coding": [{"system": "http://loinc.org", "code": "24331-1", "display": "Bilan lipidique"}],
                "text": "Bilan lipidique",
            },
            "effectiveDateTime": "2026-11-23T08:00:00+01:00",
            "subject": {"reference": "urn:uuid:0"},
            "specimen": [{"reference": "urn:uuid:3"}],
            "result": [{"reference": "urn:uuid:7"}],
            "presentedForm": [
                {
                    "contentType": "application/pdf",
                    "size": 21,
                    "hash": "3W8N5a8lu58bSw1z1QPrRQpUhh4=",
                    "url": "Binary/doc-46a827039f441dc1e82a1a2161a19328d6305d46",
                    "title": "CR d'examens biologiques",
                }
            ],
        },
        "request": {
            "method": "PUT",
            "url": "DiagnosticReport?identifier=urn:oid:1.2.250.1.71.4.2.2.4455|CMD-42",
        },
    },
    {
        "fullUrl": "urn:uuid:14",
        "resource": {
            "resourceType": "DiagnosticReport",
            "identifier": [
                {
                    "type": {
                        "coding": [
                            {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "FILL"}
                        ]
                    },
                    "system": "urn:oid:1.2.250.1.71.4.2.2.4455",
                    "value": "CMD-43",
                    "assigner": {"display": "LABO"},
                }
            ],
            "basedOn": [{"reference": "urn:uuid:6"}],
            "status": "preliminary",
            "code": {
                "coding": [{"system": "http://loinc.org", "code": "2160-0", "display": "Créatinine"}],
                "text": "Créatinine",
            },
            "subject": {"reference": "urn:uuid:0"},
            "specimen": [{"reference": "urn:uuid:4"}],
            "result": [{"reference": "urn:uuid:8"}],
            "presentedForm": [
                {
                    "contentType": "text/plain",
                    "size": 23,
                    "hash": "1JxaMl78R/1SuOGW5bxPpB+1Kj8=",
                    "url": "Binary/doc-13aa031e3b1c2249490f834abd909223d5803e5b",
                    "title": "Note",
                }
            ],
        },
        "request": {
            "method": "PUT",
            "url": "DiagnosticReport?identifier=urn:oid:1.2.250.1.71.4.2.2.4455|CMD-43",
        },
    },
]
