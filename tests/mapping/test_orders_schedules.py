"""OMG^O19 (general clinical order) through the orders mapping, and SIU^S16/S17/S26 (appointment
discontinued, deleted, patient did not show up) through the scheduling one. Golden cases written
from HL7 v2.5 chapters 4 (OMG_O19: ORC, [TQ1], OBR, [NTE], {OBX}) and 10 (SIU_S12), with the status
HL7 V2-to-FHIR's filler status map gives (Deleted → entered-in-error, Noshow → noshow)."""

from __future__ import annotations

import pytest

from gateway.core.errors import UnsupportedMessage
from tests.mapping.checked_conversion import ORDER_OID, PID, convert, key, message, of_type, segment


def test_omg_o19_a_general_clinical_order() -> None:
    orc = segment(
        "ORC",
        {
            1: "NW",
            2: f"CMD-120^SIH^{ORDER_OID}^ISO",
            4: f"GRP-7^SIH^{ORDER_OID}^ISO",
            9: "20270315093000",
            12: "10101010101^LEROY^Antoine^^^^^^ASIP-SANTE-PS&1.2.250.1.71.4.2.1&ISO^^^^RPPS",
        },
    )
    obr = segment("OBR", {1: "1", 4: "11524-6^ECG^LN", 7: "20270316080000"})
    supporting = segment("OBX", {1: "1", 2: "NM", 3: "8867-4^Fréquence cardiaque^LN", 5: "72", 11: "F"})
    result = convert(message("OMG^O19^OMG_O19", PID, orc, obr, "NTE|1||À jeun", supporting))
    assert result.mapping == "orders"
    (order,) = of_type(result, "ServiceRequest")
    assert key(order) == f"identifier=urn:oid:{ORDER_OID}|CMD-120"
    request = order["resource"]
    assert request["status"] == "active"
    assert request["requisition"]["value"] == "GRP-7"
    assert request["code"]["coding"][0]["code"] == "11524-6"
    assert request["occurrenceDateTime"] == "2027-03-16T08:00:00+01:00"
    assert request["note"] == [{"text": "À jeun"}]
    (observation,) = of_type(result, "Observation")  # the order's supporting observation
    assert observation["resource"]["valueQuantity"]["value"] == 72
    assert observation["resource"]["code"]["coding"][0]["code"] == "8867-4"
    assert request["supportingInfo"] == [{"reference": observation["fullUrl"]}]


SCH = segment(
    "SCH",
    {
        1: "DEM-31^DPI^1.2.250.1.71.4.2.2.7707^ISO",
        2: "RDV-88^AGENDA^1.2.250.1.71.4.2.2.7708^ISO",
        11: "^^^20270320100000^20270320103000",
    },
)


@pytest.mark.parametrize(
    ("trigger", "status"),
    [
        ("S12", "booked"),
        ("S15", "cancelled"),
        ("S16", "cancelled"),
        ("S17", "entered-in-error"),
        ("S26", "noshow"),
    ],
)
def test_an_appointment_status_follows_the_event(trigger: str, status: str) -> None:
    result = convert(message(f"SIU^{trigger}^SIU_S12", SCH, PID, segment("AIL", {1: "1", 3: "CS-CARDIO"})))
    (appointment,) = of_type(result, "Appointment")
    assert key(appointment) == "identifier=urn:oid:1.2.250.1.71.4.2.2.7708|RDV-88"
    assert appointment["resource"]["status"] == status
    assert appointment["resource"]["start"] == "2027-03-20T10:00:00+01:00"
    assert not [w for w in result.warnings if "siu-appointment-status" in w]


@pytest.mark.parametrize("trigger", ["S18", "S20", "S23", "S25"])
def test_partial_appointment_changes_and_slots_stay_refused(trigger: str) -> None:
    with pytest.raises(UnsupportedMessage):
        convert(message(f"SIU^{trigger}^SIU_S12", SCH, PID))
