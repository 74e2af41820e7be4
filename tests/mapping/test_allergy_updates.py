"""ADT^A60 (update allergy information): each IAM → an AllergyIntolerance of the patient, keyed on
its allergen (HL7 V2-to-FHIR "IAM[AllergyIntolerance]"), written from the specification with a
French patient. Its statuses come from IAM-17 (table 0438) and IAM-6 (table 0206): a deletion
(IAM-6 D) keeps the allergy, marked entered-in-error, never deletes it. IAM-14/15 say who reported
it (the recorder); without them, IAM-23 who recorded it first."""

from __future__ import annotations

from typing import Any

import pytest

from tests.mapping.checked_conversion import IPP_OID, PID, convert, message, of_type, segment

CLINICAL = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"
VERIFICATION = "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification"
V2_0438 = "http://terminology.hl7.org/CodeSystem/v2-0438"
SNOMED = "http://snomed.info/sct"
# Dr Jeanne DUPONT, by her RPPS number (the national practitioner directory).
DUPONT = "10003456789^DUPONT^Jeanne^^^Dr^^^ASIP-SANTE-PS&1.2.250.1.71.4.2.1&ISO^L^^^RPPS"


def iam(set_id: int, allergen: str, action: str = "A", **fields: str) -> str:
    """An IAM: ``allergen`` code^text^system, ``action`` (table 0206), ``fields`` by position."""
    base = {1: str(set_id), 2: "FA^Allergie alimentaire^HL70127", 3: allergen, 6: f"{action}^^HL70206"}
    return segment("IAM", {**base, **{int(k[1:]): v for k, v in fields.items()}})


PEANUT = iam(
    1,
    "227.6^Arachide^L",
    f11="201805",
    f13="20270310160000",
    f14="ROUSSEAU^Julien",
    f15="SPO^Conjoint^HL70063",
    f17="C^Confirmée^HL70438",
    f27="91935009^Allergie à l'arachide^SCT",
)


def a60(*iams: str, control: str = "AL-1") -> str:
    return message("ADT^A60^ADT_A60", PID, *iams, control=control)


def allergies(result: Any) -> list[dict[str, Any]]:
    return [e["resource"] for e in of_type(result, "AllergyIntolerance")]


def test_a60_confirmed_allergy_reported_by_the_spouse() -> None:
    result = convert(a60(PEANUT))
    (allergy,) = allergies(result)
    assert allergy["clinicalStatus"]["coding"] == [
        {"system": CLINICAL, "code": "active", "display": "Active"}
    ]
    assert allergy["verificationStatus"]["coding"] == [
        {"system": VERIFICATION, "code": "confirmed", "display": "Confirmed"},
        {"system": V2_0438, "code": "C", "display": "Confirmée"},
    ]
    assert allergy["category"] == ["food"] and allergy["type"] == "allergy"
    assert allergy["code"]["coding"] == [
        {"code": "227.6", "display": "Arachide"},
        {"system": SNOMED, "code": "91935009", "display": "Allergie à l'arachide"},
    ]
    assert allergy["onsetDateTime"] == "2018-05"
    assert allergy["recordedDate"] == "2027-03-10T16:00:00+01:00"
    (patient,) = of_type(result, "Patient")
    assert allergy["patient"]["reference"] == patient["fullUrl"]
    (spouse,) = of_type(result, "RelatedPerson")
    assert allergy["recorder"]["reference"] == spouse["fullUrl"]
    assert spouse["resource"]["name"] == [{"family": "ROUSSEAU", "given": ["Julien"]}]
    assert spouse["resource"]["patient"]["reference"] == patient["fullUrl"]
    codes = {c["code"] for c in spouse["resource"]["relationship"][0]["coding"]}
    assert codes == {"SPO", "SPS"}  # the v2 code as sent and its V2-to-FHIR translation (v3 RoleCode)


def test_a60_deletion_keeps_the_allergy_marked_entered_in_error() -> None:
    result = convert(a60(iam(1, "227.6^Arachide^L", action="D")))
    (allergy,) = allergies(result)
    assert allergy["verificationStatus"]["coding"][0]["code"] == "entered-in-error"
    assert "clinicalStatus" not in allergy  # FHIR ait-2: none when entered in error
    assert all(e["request"]["method"] != "DELETE" for e in result.bundle["entry"])


@pytest.mark.parametrize(
    ("code", "clinical", "verification"),
    [
        ("I", "inactive", None),
        ("U", "active", "unconfirmed"),
        ("S", "active", "unconfirmed"),
        ("E", None, "entered-in-error"),
    ],
)
def test_a60_table_0438_sets_both_statuses(code: str, clinical: str | None, verification: str | None) -> None:
    result = convert(a60(iam(1, "227.6^Arachide^L", f17=f"{code}^^HL70438")))
    (allergy,) = allergies(result)
    assert allergy.get("clinicalStatus", {}).get("coding", [{}])[0].get("code") == clinical
    assert allergy.get("verificationStatus", {}).get("coding", [{}])[0].get("code") == verification


def test_a60_recorded_by_a_practitioner_when_nobody_reported_it() -> None:
    result = convert(a60(iam(2, "DA-1^Pénicilline^L", f23=DUPONT, f24="20270301101500")))
    (allergy,) = allergies(result)
    (doctor,) = of_type(result, "Practitioner")
    assert allergy["recorder"]["reference"] == doctor["fullUrl"]
    assert doctor["resource"]["name"][0]["family"] == "DUPONT"


def test_a60_reported_by_the_patient_herself() -> None:
    result = convert(a60(iam(3, "LA-2^Latex^L", f14="ROUSSEAU^Maëlle", f15="SEL^Soi-même^HL70063")))
    (allergy,) = allergies(result)
    (patient,) = of_type(result, "Patient")
    assert allergy["recorder"]["reference"] == patient["fullUrl"]
    assert of_type(result, "RelatedPerson") == []


def test_a60_several_allergies_keep_one_key_each() -> None:
    result = convert(a60(PEANUT, iam(2, "DA-1^Pénicilline^L", f2="DA^Allergie médicamenteuse^HL70127")))
    keys = [e["request"]["url"].rpartition("|")[2] for e in of_type(result, "AllergyIntolerance")]
    assert keys == ["227.6%5EL", "DA-1%5EL"]
    assert [a["category"] for a in allergies(result)] == [["food"], ["medication"]]


# -- what a repository holds after an allergy and its deletion --------------------------------------


async def test_a_deleted_allergy_stays_in_the_record_marked(repo) -> None:
    await repo.transaction(convert(a60(PEANUT)).bundle)
    await repo.transaction(convert(a60(iam(1, "227.6^Arachide^L", action="D"), control="AL-2")).bundle)
    (allergy,) = (await repo.search("AllergyIntolerance", [], count=10)).matches
    assert allergy["verificationStatus"]["coding"][0]["code"] == "entered-in-error"
    assert allergy["code"]["coding"][0]["code"] == "227.6"
    patients = (await repo.search("Patient", [("identifier", f"urn:oid:{IPP_OID}|778899")])).matches
    assert len(patients) == 1
