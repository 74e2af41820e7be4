"""SIU → Appointment, ORM/OML → ServiceRequest + Practitioner, VXU → Immunization."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.hl7.er7 import Message
from gateway.mapping.validate import bundle_errors
from tests.mapping.test_adt import LIB, normalized, segment

PID = "PID|||552233^^^CHU-EST&1.2.250.1.71.4.2.2.4455&ISO^PI||GÉRARD^Zoé^^^^^L||19750425|F"
OID = "urn:oid:1.2.250.1.71.4.2.2.4455"


def mapped(event: str, *segments: str) -> dict[str, Any]:
    msh = f"MSH|^~\\&|APP|CHU-EST|PASSERELLE|GHT|20261123110000||{event}|X1|P|2.5|||||FRA|UNICODE UTF-8"
    result = LIB.map(Message.parse("\r".join([msh, PID, *segments]) + "\r"))
    assert bundle_errors(result.bundle) == []
    return dict(normalized(result))


@pytest.mark.parametrize(("trigger", "status"), [("S12", "booked"), ("S14", "booked"), ("S15", "cancelled")])
def test_siu_appointment(trigger: str, status: str) -> None:
    bundle = mapped(
        f"SIU^{trigger}^SIU_S12",
        segment(
            "SCH",
            {
                2: "RDV-9^AGENDA^1.2.250.1.71.4.2.2.4455^ISO",
                7: "CS^Consultation de suivi^L",
                11: "^^^20261201093000^20261201100000",
            },
        ),
        segment("AIL", {3: "CS-CARDIO"}),
    )
    appointment = bundle["entry"][1]
    assert appointment["request"] == {
        "method": "PUT",
        "url": f"Appointment?identifier={OID}|RDV-9",
    }  # replace
    assert appointment["resource"]["status"] == status
    assert appointment["resource"]["start"] == "2026-12-01T09:30:00+01:00"
    assert appointment["resource"]["end"] == "2026-12-01T10:00:00+01:00"
    assert appointment["resource"]["participant"][0] == {
        "actor": {"reference": "urn:uuid:0"},
        "status": "accepted",
    }


@pytest.mark.parametrize("event", ["ORM^O01^ORM_O01", "OML^O21^OML_O21"])
def test_orders_make_a_service_request_and_its_requester(event: str) -> None:
    bundle = mapped(
        event,
        segment(
            "ORC",
            {
                1: "NW",
                2: "CMD-77^SIH^1.2.250.1.71.4.2.2.4455^ISO",
                9: "20261123100000",
                12: "10000000001^MARTIN^Paul^^^^^^ASIP-SANTE-PS&1.2.250.1.71.4.2.1&ISO^^^^RPPS",
            },
        ),
        segment("OBR", {4: "24331-1^Bilan lipidique^LN", 7: "20261124080000"}),
    )
    practitioner, order = (e["resource"] for e in bundle["entry"][1:])
    assert [(i["system"], i["value"]) for i in practitioner["identifier"]] == [
        ("https://rpps.esante.gouv.fr", "10000000001"),
        ("urn:oid:1.2.250.1.71.4.2.1", "810000000001"),  # its national id, IDNPS = 8 + RPPS
    ]
    assert practitioner["name"] == [{"family": "MARTIN", "given": ["Paul"]}]
    assert order["status"] == "active"
    assert order["intent"] == "order"
    assert order["requester"] == {"reference": "urn:uuid:1"}
    assert order["code"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "24331-1",
        "display": "Bilan lipidique",
    }


def test_vxu_immunization() -> None:
    bundle = mapped(
        "VXU^V04^VXU_V04",
        segment("ORC", {1: "RE", 3: "VAC-3^SIH^1.2.250.1.71.4.2.2.4455^ISO"}),
        segment(
            "RXA",
            {
                1: "0",
                2: "1",
                3: "20261110103000",
                5: "3421012^VAXIGRIPTETRA^L",
                6: "0.5",
                7: "mL",
                15: "LOT-AB12",
                20: "CP",
            },
        ),
    )
    immunization = bundle["entry"][1]["resource"]
    assert immunization["status"] == "completed"
    assert immunization["occurrenceDateTime"] == "2026-11-10T10:30:00+01:00"
    assert immunization["doseQuantity"] == {"value": 0.5, "unit": "mL"}
    assert immunization["lotNumber"] == "LOT-AB12"
    assert immunization["patient"] == {"reference": "urn:uuid:0"}


LOINC = "http://loinc.org"


def test_siu_golden() -> None:
    bundle = mapped(
        "SIU^S12^SIU_S12",
        segment(
            "SCH",
            {
                2: "RDV-9^AGENDA^1.2.250.1.71.4.2.2.4455^ISO",
                7: "CS^Consultation de suivi^L",
                11: "^^^20261201093000^20261201100000",
            },
        ),
        segment("AIL", {3: "CS-CARDIO"}),
    )
    assert bundle["entry"][1:] == [
        {
            "fullUrl": "urn:uuid:1",
            "resource": {
                "resourceType": "Appointment",
                "identifier": [
                    {
                        "system": "urn:oid:1.2.250.1.71.4.2.2.4455",
                        "value": "RDV-9",
                        "assigner": {"display": "AGENDA"},
                        "type": {
                            "coding": [
                                {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "FILL"}
                            ]
                        },
                    }
                ],
                "status": "booked",
                "reasonCode": [
                    {
                        "coding": [{"code": "CS", "display": "Consultation de suivi"}],
                        "text": "Consultation de suivi",
                    }
                ],
                "start": "2026-12-01T09:30:00+01:00",
                "end": "2026-12-01T10:00:00+01:00",
                "participant": [
                    {"actor": {"reference": "urn:uuid:0"}, "status": "accepted"},
                    {"actor": {"display": "CS-CARDIO"}, "status": "accepted"},
                ],
            },
            "request": {
                "method": "PUT",
                "url": "Appointment?identifier=urn:oid:1.2.250.1.71.4.2.2.4455|RDV-9",
            },
        }
    ]


def test_orm_golden() -> None:
    bundle = mapped(
        "ORM^O01^ORM_O01",
        segment(
            "ORC",
            {
                1: "NW",
                2: "CMD-77^SIH^1.2.250.1.71.4.2.2.4455^ISO",
                9: "20261123100000",
                12: "10000000001^MARTIN^Paul^^^^^^ASIP-SANTE-PS&1.2.250.1.71.4.2.1&ISO^^^^RPPS",
            },
        ),
        segment("OBR", {4: "24331-1^Bilan lipidique^LN", 7: "20261124080000"}),
    )
    assert bundle["entry"][1:] == [
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
                        "value": "10000000001",
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
                        "value": "810000000001",
                        "assigner": {"display": "ASIP-SANTE-PS"},
                    },
                ],
                "name": [{"family": "MARTIN", "given": ["Paul"]}],
            },
            "request": {
                "method": "PUT",
                "url": "Practitioner?identifier=urn:oid:1.2.250.1.71.4.2.1|810000000001",
                "extension": [{"url": "urn:passerelle:write-policy", "valueCode": "merge"}],
            },
        },
        {
            "fullUrl": "urn:uuid:2",
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
                        "value": "CMD-77",
                        "assigner": {"display": "SIH"},
                    }
                ],
                "status": "active",
                "intent": "order",
                "code": {
                    "coding": [
                        {"system": "http://loinc.org", "code": "24331-1", "display": "Bilan lipidique"}
                    ],
                    "text": "Bilan lipidique",
                },
                "subject": {"reference": "urn:uuid:0"},
                "authoredOn": "2026-11-23T10:00:00+01:00",
                "requester": {"reference": "urn:uuid:1"},
                "occurrenceDateTime": "2026-11-24T08:00:00+01:00",
            },
            "request": {
                "method": "PUT",
                "url": "ServiceRequest?identifier=urn:oid:1.2.250.1.71.4.2.2.4455|CMD-77",
                "extension": [{"url": "urn:passerelle:write-policy", "valueCode": "merge"}],
            },
        },
    ]


def test_vxu_golden() -> None:
    bundle = mapped(
        "VXU^V04^VXU_V04",
        segment("ORC", {1: "RE", 3: "VAC-3^SIH^1.2.250.1.71.4.2.2.4455^ISO"}),
        segment(
            "RXA",
            {
                1: "0",
                2: "1",
                3: "20261110103000",
                5: "3421012^VAXIGRIPTETRA^L",
                6: "0.5",
                7: "mL",
                15: "LOT-AB12",
                20: "CP",
            },
        ),
        segment("RXR", {1: "IM^Intramusculaire^L"}),
    )
    assert bundle["entry"][1:] == [
        {
            "fullUrl": "urn:uuid:1",
            "resource": {
                "resourceType": "Immunization",
                "identifier": [
                    {
                        "type": {
                            "coding": [
                                {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "FILL"}
                            ]
                        },
                        "system": "urn:oid:1.2.250.1.71.4.2.2.4455",
                        "value": "VAC-3",
                        "assigner": {"display": "SIH"},
                    }
                ],
                "status": "completed",
                "vaccineCode": {
                    "coding": [{"code": "3421012", "display": "VAXIGRIPTETRA"}],
                    "text": "VAXIGRIPTETRA",
                },
                "patient": {"reference": "urn:uuid:0"},
                "occurrenceDateTime": "2026-11-10T10:30:00+01:00",
                "doseQuantity": {"value": 0.5, "unit": "mL"},
                "lotNumber": "LOT-AB12",
                "route": {
                    "coding": [{"code": "IM", "display": "Intramusculaire"}],
                    "text": "Intramusculaire",
                },
            },
            "request": {
                "method": "PUT",
                "url": "Immunization?identifier=urn:oid:1.2.250.1.71.4.2.2.4455|VAC-3",
            },
        }
    ]
