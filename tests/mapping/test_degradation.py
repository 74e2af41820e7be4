"""Degrade, don't drop: an unknown code keeps its original coding, a required element left empty gets
FHIR's "unknown", a strict channel refuses instead; HL7's "" removes what is stored."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.errors import ValidationError
from gateway.engine.steps import FhirMapping
from gateway.hl7.er7 import Message
from gateway.mapping.validate import bundle_errors
from gateway.store.fhir import SqliteFhirRepository
from tests.mapping.test_adt import A01, LIB, MAPPINGS, segment
from tests.mapping.test_oru import oru
from tests.mapping.test_other_feeds import PID as SIU_PID

SIU_MSH = (
    "MSH|^~\\&|APP|CHU-EST|PASSERELLE|GHT|20261123110000||SIU^S12^SIU_S12|X1|P|2.5|||||FRA|UNICODE UTF-8"
)


def test_an_unknown_patient_class_keeps_its_code_in_its_hl7_table() -> None:
    # PV1-2 "P" (preadmit) is not in PAM FR's list: once it refused the whole message, patient included
    result = LIB.map(Message.parse(A01.replace("PV1||I|", "PV1||P|")))
    assert bundle_errors(result.bundle) == []
    visit = result.bundle["entry"][1]["resource"]
    assert visit["class"] == {"system": "http://terminology.hl7.org/CodeSystem/v2-0004", "code": "P"}
    assert any("PV1-2" in w and "'P'" in w and "kept as sent" in w for w in result.warnings)
    assert result.degraded
    assert "PV1-2[1]" not in result.unmapped  # the code reached the output


def test_a_required_status_left_empty_is_unknown_with_a_warning() -> None:
    obx = segment("OBX", {1: "1", 2: "NM", 3: "2823-3^Potassium^LN", 5: "4.1"})  # no OBX-11
    result = LIB.map(oru(obx))
    assert bundle_errors(result.bundle) == []
    observation = next(
        e["resource"] for e in result.bundle["entry"] if e["resource"]["resourceType"] == "Observation"
    )
    assert observation["status"] == "unknown"
    assert "Observation.status: required and not in the message; set to 'unknown'" in result.warnings


def test_an_unknown_status_code_is_reported_and_the_result_kept() -> None:
    obx = segment("OBX", {1: "1", 2: "NM", 3: "2823-3^Potassium^LN", 5: "4.1", 11: "Q"})
    result = LIB.map(oru(obx))
    assert bundle_errors(result.bundle) == []
    observation = next(
        e["resource"] for e in result.bundle["entry"] if e["resource"]["resourceType"] == "Observation"
    )
    assert observation["valueQuantity"]["value"] == 4.1
    assert observation["status"] == "unknown"
    assert "OBX-11[1]" in result.unmapped  # the code left out is in the report, not lost


@pytest.mark.parametrize(
    "value",
    ["12345678901234567890123", "0.12345678901234567890123", "-9223372036854775809"],
    ids=["integer-beyond-64-bits", "more-digits-than-a-double", "below-int64"],
)
def test_a_number_json_would_change_is_left_out_and_reported_never_rounded(value: str) -> None:
    obx = segment("OBX", {1: "1", 2: "NM", 3: "2823-3^Potassium^LN", 5: value, 11: "F"})
    result = LIB.map(oru(obx))
    observation = next(
        e["resource"] for e in result.bundle["entry"] if e["resource"]["resourceType"] == "Observation"
    )
    assert "valueQuantity" not in observation
    assert "OBX-5[1]" in result.unmapped
    assert any(d.location == "OBX[1]-5" for d in result.degraded)


@given(st.decimals(allow_nan=False, allow_infinity=False))
def test_every_number_kept_is_the_number_sent(number: Decimal) -> None:
    text = format(number, "f")
    obx = segment("OBX", {1: "1", 2: "NM", 3: "2823-3^Potassium^LN", 5: text, 11: "F"})
    result = LIB.map(oru(obx))
    observation = next(
        e["resource"] for e in result.bundle["entry"] if e["resource"]["resourceType"] == "Observation"
    )
    if "valueQuantity" in observation:
        assert Decimal(repr(observation["valueQuantity"]["value"])) == Decimal(text)
    else:
        assert result.degraded


@pytest.mark.parametrize("minutes", ["30.5", "0", "-15", "99999999999"])
def test_a_duration_that_is_no_positive_whole_number_is_reported(minutes: str) -> None:
    sch = segment(
        "SCH",
        {2: "RDV-9^AGENDA^1.2.250.1.71.4.2.2.4455^ISO", 9: minutes, 10: "min", 11: "^^^20261201093000"},
    )
    result = LIB.map(Message.parse("\r".join([SIU_MSH, SIU_PID, sch]) + "\r"))
    assert bundle_errors(result.bundle) == []
    appointment = next(
        e["resource"] for e in result.bundle["entry"] if e["resource"]["resourceType"] == "Appointment"
    )
    assert "minutesDuration" not in appointment
    assert "SCH-9[1]" in result.unmapped
    assert any(d.location == "SCH-9" for d in result.degraded)


def test_a_strict_channel_refuses_what_others_degrade() -> None:
    lenient = FhirMapping("lenient", {"directory": str(MAPPINGS)})
    strict = FhirMapping("strict", {"directory": str(MAPPINGS), "strict": True})
    message = Message.parse(A01.replace("PV1||I|", "PV1||P|"))
    assert lenient.screen(message) is None
    lenient.convert(message)
    refusal = strict.screen(message)
    assert isinstance(refusal, ValidationError)
    assert "PV1-2" in refusal.message
    with pytest.raises(ValidationError):
        strict.convert(message)


def test_a_message_is_never_refused_for_what_it_adds() -> None:
    extra = A01.replace("ZXY|1|", "ZZZ|un segment inconnu\rZXY|1|").replace("|VALI", "|VALI|||champ^en^plus")
    result = LIB.map(Message.parse(extra))
    assert bundle_errors(result.bundle) == []
    assert "ZZZ-1[1]" in result.unmapped


async def test_hl7_null_removes_what_the_identity_feed_had_set(tmp_path: Path) -> None:
    repo = SqliteFhirRepository(tmp_path / "fhir.db")
    await repo.open()
    try:
        await repo.transaction(LIB.map(Message.parse(A01)).bundle)
        # PID-13 "": the phone number is withdrawn; everything else stays as the A01 set it
        a31 = A01.replace("ADT^A01^ADT_A01", "ADT^A31^ADT_A05").replace("|0381000000|", '|""|')
        result = LIB.map(Message.parse(a31))
        patient_entry = result.bundle["entry"][0]
        assert {"url": "urn:passerelle:clear", "valueString": "telecom"} in patient_entry["request"][
            "extension"
        ]
        assert not any(u.startswith("PID-13") for u in result.unmapped)
        await repo.transaction(result.bundle)
        (patient,) = (await repo.search("Patient", [])).matches
        assert "telecom" not in patient
        assert patient["birthDate"] == "1975-04-25"
        assert len(patient["identifier"]) == 2
    finally:
        await repo.close()


@pytest.mark.parametrize("pid", [None, "PID|1", "PID|||||ROUSSEAU^Maëlle||19830214|F"])
def test_a_patient_no_identifier_names_is_refused_never_created_empty(pid: str | None) -> None:
    lines = [line for line in A01.rstrip("\r").split("\r") if not line.startswith("PID")]
    if pid is not None:
        lines.insert(2, pid)
    with pytest.raises(ValidationError) as info:
        LIB.map(Message.parse("\r".join(lines) + "\r"))
    assert info.value.location == "PID-3"
    assert info.value.hl7_error_code == "101"
