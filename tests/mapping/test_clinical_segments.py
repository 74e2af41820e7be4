"""The visit and the patient's own segments in every feed that carries them (mappings/clinical_segments.yaml):
an ORU, an order, an appointment or a document names the visit (PV1) and may carry next of kin, allergies,
diagnoses, insurance; each becomes the same resource the ADT makes, created when unknown and never changed
by a feed that does not own it. Golden cases written from HL7 v2.5 (ORU_R01, OML_O21, SIU_S12, MDM_T02
structures) and HL7 V2-to-FHIR's segment maps, with a fictional French hospital."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.core.errors import ConfigError
from gateway.mapping import catalog
from gateway.mapping.engine import Library
from tests.mapping.checked_conversion import IPP_OID, PID, convert, key, message, of_type, segment

VISIT_OID = "1.2.250.1.71.4.2.2.7709"  # the hospital's visit numbers (NDA)
PV1 = segment(
    "PV1",
    {
        1: "1",
        2: "I",
        3: "CARDIO^204^2^CH-ARGONNE",
        7: "10101010101^LEROY^Antoine^^^Dr^^^ASIP-SANTE-PS&1.2.250.1.71.4.2.1&ISO^^^^RPPS",
        19: f"V-2027-118^^^CH-ARGONNE&{VISIT_OID}&ISO^VN",
        44: "20270314081500",
    },
)
NK1 = segment("NK1", {1: "1", 2: "ROUSSEAU^Hugo", 3: "SPO^Conjoint^HL70063", 5: "0612345678"})
AL1 = segment(
    "AL1", {1: "1", 2: "DA^Médicament^HL70127", 3: "J01CA04^Amoxicilline^ATC", 4: "SV^Sévère^HL70128"}
)
DG1 = segment("DG1", {1: "1", 3: "I21.9^Infarctus aigu du myocarde^I10", 6: "F"})
OBR = segment("OBR", {1: "1", 3: "RES-77^LABO^1.2.250.1.71.4.2.2.7703^ISO", 4: "2951-2^Sodium^LN", 25: "F"})
RESULT = segment("OBX", {1: "1", 2: "NM", 3: "2951-2^Sodium^LN", 5: "141", 6: "mmol/L", 11: "F"})


def test_a_result_names_the_visit_and_carries_the_patients_segments() -> None:
    result = convert(message("ORU^R01^ORU_R01", PID, NK1, AL1, PV1, DG1, OBR, RESULT))
    (visit,) = of_type(result, "Encounter")
    assert key(visit) == f"identifier=urn:oid:{VISIT_OID}|V-2027-118"
    # the ADT owns the visit: a result creates it when unknown and never updates it
    assert visit["request"]["method"] == "POST"
    assert visit["resource"]["status"] == "unknown"  # the visit's status is the ADT's to say
    assert result.degraded == []  # said so, not defaulted: a strict channel takes the result
    assert visit["resource"]["class"]["code"] == "IMP"
    (place,) = of_type(result, "Location")
    assert visit["resource"]["location"][0]["location"]["reference"] == place["fullUrl"]
    (observation,) = of_type(result, "Observation")  # the result, not an ADT-style OBX
    assert observation["resource"]["valueQuantity"]["value"] == 141
    assert observation["resource"]["encounter"] == {"reference": visit["fullUrl"]}
    (report,) = of_type(result, "DiagnosticReport")
    assert report["resource"]["encounter"] == {"reference": visit["fullUrl"]}
    (spouse,) = of_type(result, "RelatedPerson")
    assert spouse["resource"]["name"] == [{"family": "ROUSSEAU", "given": ["Hugo"]}]
    assert spouse["request"]["method"] == "POST"  # created, never changed by the laboratory
    (allergy,) = of_type(result, "AllergyIntolerance")
    assert allergy["resource"]["code"]["coding"][0]["code"] == "J01CA04"
    assert allergy["resource"]["criticality"] == "high"
    (diagnosis,) = of_type(result, "Condition")
    assert diagnosis["resource"]["code"]["coding"][0]["code"] == "I21.9"
    assert diagnosis["resource"]["encounter"] == {"reference": visit["fullUrl"]}


def test_an_order_refers_to_its_supporting_observation_and_its_visit() -> None:
    orc = segment("ORC", {1: "NW", 2: "CMD-9^SIH^1.2.250.1.71.4.2.2.7702^ISO"})
    obr = segment("OBR", {1: "1", 4: "11524-6^ECG^LN"})
    weight = segment("OBX", {1: "1", 2: "NM", 3: "29463-7^Poids^LN", 5: "71.5", 6: "kg", 11: "F"})
    result = convert(message("OML^O21^OML_O21", PID, PV1, orc, obr, weight))
    (order,) = of_type(result, "ServiceRequest")
    (visit,) = of_type(result, "Encounter")
    (observation,) = of_type(result, "Observation")
    assert observation["resource"]["valueQuantity"]["value"] == 71.5
    assert order["resource"]["supportingInfo"] == [{"reference": observation["fullUrl"]}]
    assert order["resource"]["encounter"] == {"reference": visit["fullUrl"]}


def test_a_mother_named_by_the_pid_is_one_related_person_per_child() -> None:
    mother = f"445566^^^CH-ARGONNE&{IPP_OID}&ISO^PI"
    child = {5: "ROUSSEAU^Maëlle^^^^^L", 6: "MARTIN^Claire", 7: "20270101", 8: "F", 21: mother}
    first = segment("PID", {3: f"778899^^^CH-ARGONNE&{IPP_OID}&ISO^PI"} | child)
    second = segment("PID", {3: f"778900^^^CH-ARGONNE&{IPP_OID}&ISO^PI"} | child)
    keys = []
    for pid in (first, second):
        result = convert(message("ORU^R01^ORU_R01", pid, OBR, RESULT))
        (relative,) = of_type(result, "RelatedPerson")
        assert relative["resource"]["relationship"][0]["coding"][0]["code"] == "MTH"
        assert relative["resource"]["name"] == [{"family": "MARTIN", "given": ["Claire"]}]
        assert {"system": f"urn:oid:{IPP_OID}", "value": "445566"} in [
            {k: i[k] for k in ("system", "value")} for i in relative["resource"]["identifier"]
        ]
        keys.append(key(relative))
    # the mother's own number is no key: it would move her RelatedPerson from one child to the other
    assert keys[0] != keys[1]


def test_an_appointments_place_is_a_location() -> None:
    sch = segment(
        "SCH", {2: "RDV-88^AGENDA^1.2.250.1.71.4.2.2.7708^ISO", 11: "^^^20270320100000^20270320103000"}
    )
    ail = segment("AIL", {1: "1", 3: "CS-CARDIO^Box 3^^CH-ARGONNE"})
    result = convert(message("SIU^S12^SIU_S12", sch, PID, PV1, ail))
    (appointment,) = of_type(result, "Appointment")
    places = {e["fullUrl"]: e["resource"]["name"] for e in of_type(result, "Location")}
    (booked,) = [p for p in appointment["resource"]["participant"] if "display" in p["actor"]]
    assert places[booked["actor"]["reference"]] == "CS-CARDIO / Box 3"


def test_a_documents_obx_stay_its_content() -> None:
    txa = segment(
        "TXA", {1: "1", 2: "CR^Compte rendu^LN", 3: "TX", 12: "DOC-5^^1.2.250.1.71.4.2.2.7710^ISO", 17: "AU"}
    )
    body = segment(
        "OBX", {1: "1", 2: "TX", 3: "CR^Compte rendu^LN", 5: "Patiente vue en consultation", 11: "F"}
    )
    result = convert(message("MDM^T02^MDM_T02", "EVN|T02|20270315093000", PID, PV1, txa, body))
    assert of_type(result, "Observation") == []
    (document,) = of_type(result, "DocumentReference")
    (visit,) = of_type(result, "Encounter")
    assert document["resource"]["context"]["encounter"] == [{"reference": visit["fullUrl"]}]


def library(tmp_path: Path, feed: str) -> Library:
    (tmp_path / "conceptmaps").mkdir()
    (tmp_path / "shared.yaml").write_text(
        "name: shared\nevents: []\nresources:\n  - {key: patient, type: Patient, rules: []}\n"
        "  - {key: visit, type: Encounter, rules: [{set: subject, ref: patient}]}\n"
    )
    (tmp_path / "feed.yaml").write_text(feed)
    return Library.load(tmp_path, catalog.available())


def test_an_included_file_gives_the_keys_the_feed_does_not_define(tmp_path: Path) -> None:
    lib = library(
        tmp_path,
        "name: feed\nevents: [ORU^R01]\ninclude: [shared]\nresources:\n"
        "  - {key: patient, type: Patient, rules: [{set: active, const: true}]}\n"
        "  - {key: report, type: DiagnosticReport, rules: [{set: encounter, ref: visit}]}\n",
    )
    (feed,) = [m for m in lib.mappings if m.name == "feed"]
    assert [(r.key, r.where.rsplit("/", 1)[1].split(":")[0]) for r in feed.resources] == [
        ("patient", "feed.yaml"),  # the feed's own patient, not the included one
        ("report", "feed.yaml"),
        ("visit", "shared.yaml"),
    ]


@pytest.mark.parametrize(
    ("header", "key"),
    [
        ("include: [nowhere]", "include"),
        ("include: [shared]\nexclude: [missing]", "exclude"),
        ("include: shared", "include"),
        ("exclude: [visit]", "ref"),  # excluded, so the report's reference names nothing
    ],
)
def test_a_bad_include_is_refused_with_file_and_key(tmp_path: Path, header: str, key: str) -> None:
    feed = (
        f"name: feed\nevents: [ORU^R01]\n{header}\nresources:\n"
        "  - {key: report, type: DiagnosticReport, rules: [{set: encounter, ref: visit}]}\n"
    )
    if key == "ref":
        feed = feed.replace("exclude: [visit]", "include: [shared]\nexclude: [visit]")
    with pytest.raises(ConfigError) as info:
        library(tmp_path, feed)
    assert info.value.key == key
    assert str(info.value.file).endswith("feed.yaml")
