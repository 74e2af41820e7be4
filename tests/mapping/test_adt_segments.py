"""An admission that carries the patient's whole file (HL7 v2.5 ADT_A01: NK1, PV1, PV2, OBX, AL1, DG1,
PR1, GT1, IN1, ROL) → one resource per segment, keyed within the patient or the visit, as HL7
V2-to-FHIR's segment maps say (mappings/segments.yaml names the sheets) and FR Core's roles for a
contact. A fictional French patient of a fictional hospital; the nomenclatures are French (CCAM,
CIM-10 as ICD-10, ATC, LOINC, UCUM)."""

from __future__ import annotations

from typing import Any

from tests.mapping.checked_conversion import IPP_OID, PID, convert, key, message, of_type, segment

VISIT_OID = "1.2.250.1.71.4.2.2.7709"
CPAM_OID = "1.2.250.1.71.4.2.2.7711"  # the insurer's own numbering (fictional)
RPPS = "ASIP-SANTE-PS&1.2.250.1.71.4.2.1&ISO^^^^RPPS"
TRE_R260 = "https://mos.esante.gouv.fr/NOS/TRE_R260-HL7RoleClass/FHIR/TRE-R260-HL7RoleClass"
PATIENT_SCOPE = f"urn:passerelle:patient:urn:oid:{IPP_OID}:778899"
VISIT_SCOPE = f"urn:passerelle:visit:urn:oid:{VISIT_OID}:V-2027-118"

SEGMENTS = [
    "EVN||20270314081500",
    PID,
    segment(
        "NK1",
        {1: "1", 2: "ROUSSEAU^Hugo", 3: "SPO^Conjoint^HL70063", 5: "0612345678", 7: "C^Urgence^HL70131"},
    ),
    segment("NK1", {1: "2", 2: "ROUSSEAU^Inès", 3: "CHD^Enfant^HL70063", 7: "N^Proche^HL70131"}),
    segment(
        "PV1",
        {
            1: "1",
            2: "I",
            3: "CARDIO^204^2^CH-ARGONNE",
            6: "URG^B12^1^CH-ARGONNE",
            7: f"10101010101^LEROY^Antoine^^^Dr^^^{RPPS}",
            19: f"V-2027-118^^^CH-ARGONNE&{VISIT_OID}&ISO^VN",
            44: "20270314081500",
        },
    ),
    segment("OBX", {1: "1", 2: "NM", 3: "29463-7^Poids^LN", 5: "71.5", 6: "kg^^UCUM", 11: "F"}),
    segment(
        "AL1", {1: "1", 2: "DA^Médicament^HL70127", 3: "J01CA04^Amoxicilline^ATC", 4: "SV^Sévère^HL70128"}
    ),
    segment("DG1", {1: "1", 3: "I21.9^Infarctus aigu du myocarde^I10", 5: "20270314"}),
    segment(
        "PR1",
        {
            1: "1",
            3: "DDQH009^Coronarographie^CCAM",
            5: "20270315103000",
            11: f"20202020202^BERNARD^Lucie^^^Dr^^^{RPPS}",
        },
    ),
    segment("GT1", {1: "1", 3: "ROUSSEAU^Hugo", 5: "12 rue des Lilas^^Verdun^^55100^FRA"}),
    segment(
        "IN1",
        {
            1: "1",
            2: "AMO^Assurance maladie obligatoire",
            3: f"CPAM-55^^^CPAM-MEUSE&{CPAM_OID}&ISO",
            4: "CPAM de la Meuse",
            17: "SEL",
            36: "2830255123456",
        },
    ),
    segment("ROL", {2: "AD", 3: "PP^Médecin traitant^HL70443", 4: f"30303030303^FAURE^Paul^^^Dr^^^{RPPS}"}),
]


def one(result: Any, kind: str) -> dict[str, Any]:
    (entry,) = of_type(result, kind)
    return entry


def test_each_segment_is_its_resource_keyed_within_its_patient_or_visit() -> None:
    result = convert(message("ADT^A01^ADT_A01", *SEGMENTS))
    patient = of_type(result, "Patient")[0]["fullUrl"]
    visit = next(e for e in of_type(result, "Encounter") if "V-2027-118" in key(e))
    # NK1: each contact its RelatedPerson, its relationship (table 0063) and, for a French
    # reader, its FR Core role: C → personne à prévenir, N → personne de confiance
    spouse, child = of_type(result, "RelatedPerson")[:2]
    assert key(spouse) == f"identifier={PATIENT_SCOPE}:related-person|1"
    assert spouse["resource"]["patient"] == {"reference": patient}
    roles = [c for r in spouse["resource"]["relationship"] for c in r["coding"]]
    assert {"system": TRE_R260, "code": "ECON", "display": "personne à prévenir en cas d'urgence"} in roles
    assert {
        "system": "http://terminology.hl7.org/CodeSystem/v2-0063",
        "code": "SPO",
        "display": "Conjoint",
    } in roles
    assert "0612345678" in str(spouse["resource"]["telecom"])
    assert any(c["code"] == "NOK" for r in child["resource"]["relationship"] for c in r["coding"])
    # GT1: the guarantor, a RelatedPerson of its own kind
    guarantor = of_type(result, "RelatedPerson")[2]
    assert key(guarantor) == f"identifier={PATIENT_SCOPE}:guarantor|1"
    assert guarantor["resource"]["address"][0]["city"] == "Verdun"
    # IN1: the coverage, its insurer found again by its own number, the patient insured himself
    coverage, insurer = one(result, "Coverage"), one(result, "Organization")
    assert key(insurer) == f"identifier=urn:oid:{CPAM_OID}|CPAM-55"
    assert insurer["resource"]["name"] == "CPAM de la Meuse"
    assert coverage["resource"]["payor"][0]["reference"] == insurer["fullUrl"]
    assert coverage["resource"]["beneficiary"] == coverage["resource"]["subscriber"] == {"reference": patient}
    assert coverage["resource"]["class"][0]["value"] == "AMO"
    # AL1: keyed on its allergen, so the same allergy sent in another order keeps its key
    allergy = one(result, "AllergyIntolerance")["resource"]
    assert allergy["code"]["coding"][0] == {
        "system": "http://www.whocc.no/atc",
        "code": "J01CA04",
        "display": "Amoxicilline",
    }
    assert allergy["category"] == ["medication"] and allergy["criticality"] == "high"
    # DG1 and PR1: within the visit (diagnosis 1 of one stay is never diagnosis 1 of another)
    condition, procedure = one(result, "Condition"), one(result, "Procedure")
    assert key(condition) == f"identifier={VISIT_SCOPE}:condition|1"
    assert condition["resource"]["code"]["coding"][0]["system"] == "http://hl7.org/fhir/sid/icd-10"
    assert condition["resource"]["encounter"] == {"reference": visit["fullUrl"]}
    assert key(procedure) == f"identifier={VISIT_SCOPE}:procedure|1"
    assert (
        procedure["resource"]["code"]["coding"][0]["system"] == "https://smt.esante.gouv.fr/terminologie-ccam"
    )
    assert procedure["resource"]["status"] == "unknown"  # the guide: "if not clear, use unknown"
    assert procedure["resource"]["performedDateTime"] == "2027-03-15T10:30:00+01:00"
    # OBX in an ADT: an observation of the patient, in UCUM
    weight = one(result, "Observation")["resource"]
    assert weight["valueQuantity"] == {
        "value": 71.5,
        "unit": "kg",
        "system": "http://unitsofmeasure.org",
        "code": "kg",
    }
    # ROL: the care team of the patient, its member found by the RPPS
    team = one(result, "CareTeam")["resource"]
    assert team["subject"] == {"reference": patient}
    assert team["participant"][0]["role"][0]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/v2-0443",
        "code": "PP",
        "display": "Médecin traitant",
    }
    # PV1-3 and PV1-6: one Location per place, in the visit's list with the right status
    places = {e["fullUrl"]: e["resource"]["name"] for e in of_type(result, "Location")}
    statuses = {places[p["location"]["reference"]]: p["status"] for p in visit["resource"]["location"]}
    assert statuses == {"CARDIO / 204 / 2": "active", "URG / B12 / 1": "completed"}


def test_the_same_file_sent_again_writes_the_same_keys() -> None:
    first = convert(message("ADT^A01^ADT_A01", *SEGMENTS))
    again = convert(message("ADT^A01^ADT_A01", *SEGMENTS, control="M-17-2"))  # sent again, later
    wanted = (
        "RelatedPerson",
        "Coverage",
        "AllergyIntolerance",
        "Condition",
        "Procedure",
        "CareTeam",
        "Location",
    )
    assert [key(e) for kind in wanted for e in of_type(first, kind)] == [
        key(e) for kind in wanted for e in of_type(again, kind)
    ]


def test_another_patients_contact_is_another_resource() -> None:
    other = PID.replace("778899", "778900")
    mine = convert(message("ADT^A01^ADT_A01", *SEGMENTS))
    theirs = convert(message("ADT^A01^ADT_A01", *[other if s == PID else s for s in SEGMENTS]))
    assert key(of_type(mine, "RelatedPerson")[0]) != key(of_type(theirs, "RelatedPerson")[0])
    assert key(one(mine, "Coverage")) != key(one(theirs, "Coverage"))
    assert key(one(mine, "Organization")) == key(one(theirs, "Organization"))  # one insurer for both
