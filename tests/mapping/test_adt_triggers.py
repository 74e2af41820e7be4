"""Every PAM FR ADT trigger the feed serves, each compared whole: Patient + visit + movement, with the
visit status the trigger gives and the movement marked (INSERT, UPDATE on Z99, CANCEL kept as
entered-in-error; a pending movement, A14–A16, planned, and its cancel, A25–A27, cancelled);
A28/A31 give the Patient alone."""

from __future__ import annotations

import copy

import pytest

from gateway.hl7.er7 import Message
from gateway.mapping.validate import bundle_errors
from tests.mapping.test_adt import A01, A01_BUNDLE, A01_UNMAPPED, LIB, normalized, segment

# (trigger, structure, ZBE-4, ZBE-6 original trigger, visit status, movement status)
MOVEMENTS = [
    ("A01", "ADT_A01", "INSERT", "", "in-progress", "in-progress"),
    ("A02", "ADT_A02", "INSERT", "", "in-progress", "in-progress"),
    ("A03", "ADT_A03", "INSERT", "", "finished", "in-progress"),
    ("A04", "ADT_A01", "INSERT", "", "in-progress", "in-progress"),
    ("A05", "ADT_A05", "INSERT", "", "planned", "in-progress"),
    ("A06", "ADT_A06", "INSERT", "", "in-progress", "in-progress"),
    ("A07", "ADT_A06", "INSERT", "", "in-progress", "in-progress"),
    ("A11", "ADT_A09", "CANCEL", "A01", "cancelled", "entered-in-error"),
    ("A12", "ADT_A12", "CANCEL", "A02", "in-progress", "entered-in-error"),
    ("A13", "ADT_A01", "CANCEL", "A03", "in-progress", "entered-in-error"),
    ("A21", "ADT_A21", "INSERT", "", "onleave", "in-progress"),
    ("A22", "ADT_A21", "INSERT", "", "in-progress", "in-progress"),
    ("A38", "ADT_A38", "CANCEL", "A05", "cancelled", "entered-in-error"),
    ("A52", "ADT_A52", "CANCEL", "A21", "in-progress", "entered-in-error"),
    ("A53", "ADT_A52", "CANCEL", "A22", "onleave", "entered-in-error"),
    ("A54", "ADT_A54", "INSERT", "", "in-progress", "in-progress"),
    ("A55", "ADT_A52", "CANCEL", "A54", "in-progress", "entered-in-error"),
    # the pending movements (PAM FR "mouvements prévisionnels") and their cancels: the pending
    # movement is planned, its cancel withdraws it (cancelled, never deleted); a cancelled pending
    # admit cancels the visit that was to begin, the others leave it in progress
    ("A14", "ADT_A05", "INSERT", "", "planned", "planned"),
    ("A15", "ADT_A15", "INSERT", "", "in-progress", "planned"),
    ("A16", "ADT_A16", "INSERT", "", "in-progress", "planned"),
    ("A27", "ADT_A21", "CANCEL", "A14", "cancelled", "cancelled"),
    ("A26", "ADT_A21", "CANCEL", "A15", "in-progress", "cancelled"),
    ("A25", "ADT_A21", "CANCEL", "A16", "in-progress", "cancelled"),
    # a movement's update says nothing of the visit: its status is set only where none is stored
    ("Z99", "ADT_A01", "UPDATE", "A01", None, "in-progress"),
    # ... and a pending movement it updates stays planned
    ("Z99", "ADT_A01", "UPDATE", "A15", None, "planned"),
]
# A pending admit's place is where the patient is to be admitted: planned, not occupied.
PLANNED_PLACE = {"A14"}


def message(trigger: str, structure: str, action: str, original: str) -> str:
    zbe = segment(
        "ZBE",
        {
            1: "MVT-7788^CHU-EST^1.2.250.1.71.4.2.2.4455^ISO",
            2: "20261123101500",
            4: action,
            5: "N",
            **({6: original} if original else {}),
            7: "CARDIOLOGIE^^^^^^^^^4010",
        },
    )
    text = A01.replace("ADT^A01^ADT_A01", f"ADT^{trigger}^{structure}")
    return "\r".join(zbe if line.startswith("ZBE") else line for line in text.split("\r"))


@pytest.mark.parametrize(("trigger", "structure", "action", "original", "visit", "movement"), MOVEMENTS)
def test_movement_trigger(
    trigger: str, structure: str, action: str, original: str, visit: str | None, movement: str
) -> None:
    result = LIB.map(Message.parse(message(trigger, structure, action, original)))
    assert bundle_errors(result.bundle) == []
    expected = copy.deepcopy(A01_BUNDLE)
    expected["entry"][1]["resource"]["status"] = visit or "unknown"
    if visit is None:
        request = expected["entry"][1]["request"]
        request["extension"] = [
            *request["extension"],
            {"url": "urn:passerelle:if-absent", "valueString": "status"},
        ]
    expected["entry"][2]["resource"]["status"] = movement
    if trigger in PLANNED_PLACE:
        for n in (1, 2):
            expected["entry"][n]["resource"]["location"][0]["status"] = "planned"
    if original:  # ZBE-6, the trigger an UPDATE or CANCEL acts on, is kept on the movement
        expected["entry"][2]["resource"]["extension"] = [
            {"url": "urn:passerelle:hl7v2-field:ZBE-6", "valueCode": original}
        ]
    assert normalized(result) == expected
    assert result.unmapped == A01_UNMAPPED


def test_discharge_closes_the_visit_period() -> None:
    text = message("A03", "ADT_A03", "INSERT", "").replace(
        "|20261123101500\rZBE", "|20261123101500|20261128160000\rZBE"
    )
    visit = LIB.map(Message.parse(text)).bundle["entry"][1]["resource"]
    assert visit["period"] == {"start": "2026-11-23T10:15:00+01:00", "end": "2026-11-28T16:00:00+01:00"}


@pytest.mark.parametrize("event", ["ADT^A28^ADT_A05", "ADT^A31^ADT_A05"])
def test_identity_triggers_give_the_patient_only(event: str) -> None:
    text = "\r".join(line for line in A01.split("\r") if not line.startswith(("PV1", "ZBE")))
    result = LIB.map(Message.parse(text.replace("ADT^A01^ADT_A01", event)))
    assert bundle_errors(result.bundle) == []
    assert normalized(result)["entry"] == A01_BUNDLE["entry"][:1]
