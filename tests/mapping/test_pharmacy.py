"""RDE^O11/O25 and RDS^O13 → MedicationRequest (per order group) and MedicationDispense (per RXD).
Golden cases written from HL7 v2.5 chapter 4 (RDE_O11: ORC, [RXO {RXR} {RXC}], RXE, {TQ1}, {RXR},
{RXC}; RDS_O13: …, RXD, {RXR}, {RXC}) and HL7 V2-to-FHIR's RXO and RXR maps, for a fictional
hospital pharmacy (PUI) and a French prescriber (RPPS)."""

from __future__ import annotations

from tests.mapping.checked_conversion import ORDER_OID, PID, convert, key, message, of_type, segment

PHARMACY_OID = "1.2.250.1.71.4.2.2.7704"  # the pharmacy's order numbers
RPPS = "10101010101"


def orc(placer: str = "CMD-90", filler: str | None = "PH-12", **more: str) -> str:
    fields = {1: "NW", 2: f"{placer}^SIH^{ORDER_OID}^ISO", 5: "IP", 9: "20270315093000"}
    if filler:
        fields[3] = f"{filler}^PUI^{PHARMACY_OID}^ISO"
    fields[12] = f"{RPPS}^LEROY^Antoine^^^^^^ASIP-SANTE-PS&1.2.250.1.71.4.2.1&ISO^^^^RPPS"
    return segment("ORC", {**fields, **{int(k[1:]): v for k, v in more.items()}})


RXO = segment("RXO", {1: "3400930000001^Amoxicilline 500 mg gélule^L", 2: "1", 4: "gél^gélule^L", 9: "G"})
RXE = segment(
    "RXE",
    {
        2: "3400930000001^Amoxicilline 500 mg gélule^L",
        3: "1",
        4: "2",
        5: "{gel}^gélule^UCUM",
        10: "12",
        11: "{gel}^gélule^UCUM",
        12: "0",
        15: "ORD-0077",
        19: "3^{gel}&gélule&UCUM",
    },
)
TQ1 = segment(
    "TQ1", {1: "1", 7: "20270315100000", 8: "20270319100000", 9: "R^Routine^HL70485", 11: "Pendant le repas"}
)
RXR = segment("RXR", {1: "PO^Voie orale^HL70162"})


def test_rde_o11_an_encoded_order() -> None:
    result = convert(message("RDE^O11^RDE_O11", PID, orc(), RXO, RXE, TQ1, RXR))
    (request,) = of_type(result, "MedicationRequest")
    order = request["resource"]
    # keyed on the pharmacy's number (ORC-3); its prescription and placer numbers are identifiers
    assert request["request"]["url"] == f"MedicationRequest?identifier=urn:oid:{PHARMACY_OID}|PH-12"
    assert request["request"]["extension"] == [{"url": "urn:passerelle:write-policy", "valueCode": "merge"}]
    assert [
        (i.get("type", {}).get("coding", [{}])[0].get("code"), i["value"]) for i in order["identifier"]
    ] == [
        ("FILL", "PH-12"),
        (None, "ORD-0077"),
        ("PLAC", "CMD-90"),
    ]
    assert order["identifier"][1]["system"] == "https://ch-argonne.example/fhir/id/prescription"
    assert order["status"] == "active"  # ORC-5 IP
    assert order["intent"] == "filler-order"
    assert order["priority"] == "routine"
    assert order["medicationCodeableConcept"] == {
        "coding": [{"code": "3400930000001", "display": "Amoxicilline 500 mg gélule"}],
        "text": "Amoxicilline 500 mg gélule",
    }
    assert order["requester"] == {"reference": "urn:uuid:1"}
    assert order["authoredOn"] == "2027-03-15T09:30:00+01:00"
    ucum = {"unit": "gélule", "system": "http://unitsofmeasure.org", "code": "{gel}"}
    assert order["dosageInstruction"] == [
        {
            "timing": {
                "repeat": {
                    "boundsPeriod": {"start": "2027-03-15T10:00:00+01:00", "end": "2027-03-19T10:00:00+01:00"}
                }
            },
            "text": "Pendant le repas",
            "doseAndRate": [{"doseRange": {"low": {"value": 1, **ucum}, "high": {"value": 2, **ucum}}}],
            "maxDosePerPeriod": {
                "numerator": {"value": 3, **ucum},
                "denominator": {"value": 1, "unit": "d", "system": "http://unitsofmeasure.org", "code": "d"},
            },
            "route": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v2-0162",
                        "code": "PO",
                        "display": "Voie orale",
                    }
                ],
                "text": "Voie orale",
            },
        }
    ]
    assert order["dispenseRequest"] == {"quantity": {"value": 12, **ucum}, "numberOfRepeatsAllowed": 0}
    assert order["substitution"]["allowedCodeableConcept"]["coding"][0]["code"] == "G"


def test_an_rxo_alone_is_the_original_order() -> None:
    result = convert(message("RDE^O11^RDE_O11", PID, orc(filler=None), RXO, RXR))
    (request,) = of_type(result, "MedicationRequest")
    order = request["resource"]
    assert key(request) == f"identifier=urn:oid:{ORDER_OID}|CMD-90"
    assert order["intent"] == "original-order"
    assert order["dosageInstruction"][0]["doseAndRate"] == [
        {
            "type": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/dose-rate-type",
                        "code": "ordered",
                        "display": "Ordered",
                    }
                ]
            },
            "doseRange": {"low": {"value": 1, "unit": "gélule"}},
        }
    ]


def test_a_compound_is_a_contained_medication_with_its_components() -> None:
    base = segment("RXC", {1: "B", 2: "3400891234567^Glucose 5 % 250 mL^L", 3: "250", 4: "mL^mL^UCUM"})
    additive = segment("RXC", {1: "A", 2: "3400897654321^Chlorure de potassium^L", 3: "1", 4: "g^g^UCUM"})
    result = convert(message("RDE^O11^RDE_O11", PID, orc(), RXE, RXR, base, additive))
    order = of_type(result, "MedicationRequest")[0]["resource"]
    assert "medicationCodeableConcept" not in order
    assert order["medicationReference"] == {"reference": "#compound"}
    (medication,) = order["contained"]
    assert medication["code"]["coding"][0]["code"] == "3400930000001"
    assert [i["itemCodeableConcept"]["coding"][0]["code"] for i in medication["ingredient"]] == [
        "3400891234567",
        "3400897654321",
    ]
    assert "RXC-3[1]" in result.unmapped  # the amounts have no place without a ratio's denominator


def test_an_order_status_follows_orc_5_else_orc_1() -> None:
    cancelled = convert(message("RDE^O11^RDE_O11", PID, orc(c5="CA"), RXE))
    assert of_type(cancelled, "MedicationRequest")[0]["resource"]["status"] == "cancelled"
    stopped = convert(message("RDE^O11^RDE_O11", PID, orc(c1="DC", c5=""), RXE))
    assert of_type(stopped, "MedicationRequest")[0]["resource"]["status"] == "stopped"


def test_rde_o25_refill_request_is_served() -> None:
    assert convert(message("RDE^O25^RDE_O11", PID, orc(), RXE)).mapping == "pharmacy"


RXD = segment(
    "RXD",
    {
        1: "1",
        2: "3400930000001^Amoxicilline 500 mg gélule^L",
        3: "20270315110000",
        4: "12",
        5: "{gel}^gélule^UCUM",
        7: "ORD-0077",
        9: "À prendre au cours des repas",
        10: "20202020202^GIRARD^Claire^^^^^^ASIP-SANTE-PS&1.2.250.1.71.4.2.1&ISO^^^^RPPS",
    },
)


def test_rds_o13_a_dispense_of_its_order() -> None:
    result = convert(message("RDS^O13^RDS_O13", PID, orc(filler=None), RXO, RXE, RXR, RXD, RXR))
    (request,) = of_type(result, "MedicationRequest")
    # no pharmacy number: the order is found by its prescription number, then the dispense by it
    assert key(request) == "identifier=https://ch-argonne.example/fhir/id/prescription|ORD-0077"
    (dispense,) = of_type(result, "MedicationDispense")
    assert key(dispense) == "identifier=https://ch-argonne.example/fhir/id/prescription|ORD-0077-1"
    assert dispense["request"]["method"] == "PUT"  # replace
    item = dispense["resource"]
    assert item["status"] == "unknown"  # the dispense message says nothing of it
    assert item["authorizingPrescription"] == [{"reference": request["fullUrl"]}]
    assert item["whenHandedOver"] == "2027-03-15T11:00:00+01:00"
    assert item["quantity"] == {
        "value": 12,
        "unit": "gélule",
        "system": "http://unitsofmeasure.org",
        "code": "{gel}",
    }
    assert item["note"] == [{"text": "À prendre au cours des repas"}]
    assert item["dosageInstruction"][0]["route"]["coding"][0]["code"] == "PO"
    (dispenser,) = [
        e
        for e in of_type(result, "Practitioner")
        if e["fullUrl"] == item["performer"][0]["actor"]["reference"]
    ]
    assert {i["value"] for i in dispenser["resource"]["identifier"]} == {"20202020202", "820202020202"}
    assert any("MedicationDispense.status" in w for w in result.warnings)


def test_one_placer_order_encoded_as_two_pharmacy_orders() -> None:
    """Two order groups of one RDS name the same placer order: two pharmacy orders (two prescription
    numbers), two dispenses; nothing is keyed on the shared placer number."""
    second_rxe = RXE.replace("ORD-0077", "ORD-0078").replace("3400930000001", "3400930000002")
    second_rxd = RXD.replace("ORD-0077", "ORD-0078").replace("3400930000001", "3400930000002")
    text = message(
        "RDS^O13^RDS_O13", PID, orc(filler=None), RXE, RXD, orc(filler=None), second_rxe, second_rxd
    )
    result = convert(text)
    assert [key(e).rsplit("|", 1)[1] for e in of_type(result, "MedicationRequest")] == [
        "ORD-0077",
        "ORD-0078",
    ]
    assert [key(e).rsplit("|", 1)[1] for e in of_type(result, "MedicationDispense")] == [
        "ORD-0077-1",
        "ORD-0078-1",
    ]


def test_a_dispense_naming_another_prescription_says_so() -> None:
    other = RXD.replace("ORD-0077", "ORD-0099")
    result = convert(message("RDS^O13^RDS_O13", PID, orc(), RXE, other))
    item = of_type(result, "MedicationDispense")[0]["resource"]
    assert item["authorizingPrescription"][1] == {
        "identifier": {"system": "https://ch-argonne.example/fhir/id/prescription", "value": "ORD-0099"},
        "type": "MedicationRequest",
    }
