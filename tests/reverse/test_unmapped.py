"""What the reverse mappings did not read is reported, by FHIR path; what they read never is."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.mapping import reverse_functions
from gateway.mapping.reverse import ReverseLibrary
from tests.reverse import fhir_data as d

ROOT = Path(__file__).resolve().parents[2]
LIB = ReverseLibrary.load(ROOT / "mappings" / "reverse", reverse_functions.available())
# One message time for both maps of a comparison: MSH-7 would differ across a second boundary.
NOW = datetime(2026, 3, 14, 9, 26, 53, tzinfo=UTC)

# Patient elements the reverse mapping has no field for (names from the R4 Patient resource).
UNUSED = ["maritalStatus", "multipleBirthInteger", "photo", "contact", "communication", "generalPractitioner"]
_value = st.one_of(
    st.text(min_size=1, max_size=8),
    st.integers(1, 9),
    st.fixed_dictionaries({"text": st.text(min_size=1, max_size=8)}),
    st.lists(st.fixed_dictionaries({"text": st.text(min_size=1, max_size=8)}), min_size=1, max_size=2),
)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(UNUSED), _value, min_size=1))
def test_extra_elements_are_reported_and_change_nothing(extra: dict[str, Any]) -> None:
    plain = LIB.map(d.patient(), control_id="U1", now=NOW)
    patient = {**d.patient(), **copy.deepcopy(extra)}
    result = LIB.map(patient, control_id="U1", now=NOW)
    assert [m.encode() for m in result.messages] == [m.encode() for m in plain.messages]
    assert set(result.unmapped) - set(plain.unmapped) == {f"Patient.{k}" for k in extra}


def test_what_a_rule_or_a_function_reads_is_not_reported() -> None:
    result = LIB.map(d.encounter_bundle(), control_id="U2")
    for read in ("Bundle.entry[0].resource.name", "Bundle.entry[0].resource.birthDate", ".period", ".status"):
        assert not any(u.endswith(read) or u == read for u in result.unmapped), read


def test_an_extension_no_rule_knows_is_reported_by_its_value() -> None:
    patient = d.patient()
    patient["extension"] = [
        *patient.get("extension", []),
        {"url": "https://example.org/fhir/StructureDefinition/unknown", "valueString": "x"},
    ]
    result = LIB.map(patient, control_id="U3")
    n = len(patient["extension"]) - 1
    assert f"Patient.extension[{n}].valueString" in result.unmapped
    assert not any(u.startswith("Patient.extension[0]") for u in result.unmapped)


def test_a_resource_of_the_bundle_no_rule_uses_is_reported_whole() -> None:
    bundle = d.report_bundle()
    bundle["entry"].append({"resource": {"resourceType": "Practitioner", "name": [{"family": "MARTIN"}]}})
    result = LIB.map(bundle, control_id="U4")
    assert f"Bundle.entry[{len(bundle['entry']) - 1}].resource (Practitioner): not read by any rule" in (
        result.unmapped
    )


def test_wanted_names_the_patients_referenced_by_id_only() -> None:
    obs = copy.deepcopy(d.device_bundle()["entry"][1]["resource"])
    obs["subject"] = {"reference": "https://city.example/fhir/Patient/p-42/_history/3"}
    assert LIB.wanted(obs) == [("Patient", "p-42")]
    assert LIB.wanted(d.report_bundle()) == []  # its Patient is in the request
    obs["subject"] = {"identifier": {"system": "urn:oid:1.2.3", "value": "9"}}
    assert LIB.wanted(obs) == []  # a logical reference: the identifier is enough


def test_a_known_patient_fills_pid() -> None:
    obs = copy.deepcopy(d.device_bundle()["entry"][1]["resource"])
    obs["subject"] = {"reference": "Patient/p-42"}
    patient = {**d.patient(), "id": "p-42"}
    msg = LIB.map(obs, control_id="U5", known={"Patient/p-42": patient}).messages[0]
    assert msg.get("PID-5.1") == "LEFÈVRE"
