"""Pending events and their cancels (HL7 v2 A14/A15/A16, A27/A26/A25; PAM FR "mouvements
prévisionnels": admission, mutation and sortie prévues, with their ZBE): one golden test per trigger,
written from the specification with a French patient, then what a repository holds after a pending
event and its cancel. A pending event plans (the visit or the movement is planned, with the place the
patient is to go to); its cancel withdraws the pending state and never deletes anything."""

from __future__ import annotations

from typing import Any

from gateway.mapping.validate import bundle_errors
from gateway.store.fhir import SqliteFhirRepository
from tests.mapping.checked_conversion import IPP_OID, convert, message, of_type, segment

AUTHORITY = f"CH-ARGONNE&{IPP_OID}&ISO"
IPP = f"urn:oid:{IPP_OID}"
PID = segment(
    "PID",
    {
        3: f"778899^^^{AUTHORITY}^PI",
        5: "ROUSSEAU^Maëlle^^^^^L",
        7: "19830214",
        8: "F",
        18: f"2027000812^^^{AUTHORITY}^AN",
    },
)
VISIT = f"V27-000812^^^{AUTHORITY}^VN"
MOVEMENT = f"MVT-4401^CH-ARGONNE^{IPP_OID}^ISO"
PLANNED_START = "http://hl7.org/fhir/5.0/StructureDefinition/extension-Encounter.plannedStartDate"
PLANNED_END = "http://hl7.org/fhir/5.0/StructureDefinition/extension-Encounter.plannedEndDate"
ESTIMATED_DISCHARGE = "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-estimated-discharge-date"
ZBE6 = "urn:passerelle:hl7v2-field:ZBE-6"


def pv1(**fields: str) -> str:
    """The stay in cardiology (room 204, bed 1), numbered by the hospital; ``fields`` by position
    (``f42`` for PV1-42)."""
    base = {2: "I", 3: "CARDIO^204^1", 19: VISIT, 44: "20270315080000"}
    return segment("PV1", {**base, **{int(k[1:]): v for k, v in fields.items()}})


def zbe(action: str, original: str = "", when: str = "20270316140000") -> str:
    return segment(
        "ZBE",
        {
            1: MOVEMENT,
            2: when,
            4: action,
            5: "N",
            **({6: original} if original else {}),
            7: "CARDIOLOGIE^^^^^^^^^4010",
        },
    )


def pending(trigger: str, structure: str, action: str, original: str = "", **pv1_fields: str) -> str:
    extra: list[str] = []
    if trigger in ("A14", "A27"):
        extra.append(segment("PV2", {8: "20270316090000"}))  # expected admit
    if trigger in ("A16", "A25"):
        extra.append(segment("PV2", {9: "20270320120000"}))  # expected discharge
    if trigger == "A26":  # the cancelled transfer names the place the patient was to go to
        extra.append(segment("PV2", {1: "USIC^12^2"}))
    return message(
        f"ADT^{trigger}^{structure}", PID, pv1(**pv1_fields), *extra, zbe(action, original), control=trigger
    )


def visit_of(result: Any) -> dict[str, Any]:
    visit, _movement = (e["resource"] for e in of_type(result, "Encounter"))
    return visit


def movement_of(result: Any) -> dict[str, Any]:
    _visit, movement = (e["resource"] for e in of_type(result, "Encounter"))
    return movement


def places(encounter: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (entry["location"].get("display", ""), entry["status"]) for entry in encounter.get("location", [])
    ]


# -- one golden test per trigger -------------------------------------------------------------------


def test_a14_pending_admit_plans_the_visit_and_its_place() -> None:
    result = convert(pending("A14", "ADT_A05", "INSERT"))
    visit, movement = visit_of(result), movement_of(result)
    assert visit["status"] == "planned"
    assert places(visit) == [("CARDIO / 204 / 1", "planned")]  # where the patient is to be admitted
    assert {"url": PLANNED_START, "valueDateTime": "2027-03-16T09:00:00+01:00"} in visit["extension"]
    assert movement["status"] == "planned"
    assert movement["period"] == {"start": "2027-03-16T14:00:00+01:00"}
    assert movement["partOf"]["reference"] == of_type(result, "Encounter")[0]["fullUrl"]
    (patient,) = of_type(result, "Patient")
    assert patient["resource"]["name"][0]["family"] == "ROUSSEAU"


def test_a15_pending_transfer_keeps_the_stay_and_plans_the_place_it_goes_to() -> None:
    result = convert(pending("A15", "ADT_A15", "INSERT", f42="USIC^12^2"))
    visit, movement = visit_of(result), movement_of(result)
    assert visit["status"] == "in-progress"
    assert places(visit) == [("CARDIO / 204 / 1", "active"), ("USIC / 12 / 2", "planned")]
    pending_place = visit["location"][1]["location"]["reference"]
    names = {e["fullUrl"]: e["resource"].get("name") for e in of_type(result, "Location")}
    assert names[pending_place] == "USIC / 12 / 2"
    assert movement["status"] == "planned"
    assert ("USIC / 12 / 2", "planned") in places(movement)


def test_a16_pending_discharge_keeps_the_stay_and_says_when_it_ends() -> None:
    result = convert(pending("A16", "ADT_A16", "INSERT"))
    visit, movement = visit_of(result), movement_of(result)
    assert visit["status"] == "in-progress"
    assert "end" not in visit.get("period", {})  # planned, not happened
    assert {"url": ESTIMATED_DISCHARGE, "valueDate": "2027-03-20"} in visit["extension"]
    assert {"url": PLANNED_END, "valueDateTime": "2027-03-20T12:00:00+01:00"} in visit["extension"]
    assert movement["status"] == "planned"


def test_a27_cancel_pending_admit_cancels_the_visit_that_was_to_begin() -> None:
    result = convert(pending("A27", "ADT_A21", "CANCEL", "A14", f42="USIC^12^2"))
    visit, movement = visit_of(result), movement_of(result)
    assert visit["status"] == "cancelled"
    assert ("USIC / 12 / 2", "reserved") not in places(visit)  # the pending place is withdrawn
    assert movement["status"] == "cancelled"  # it will not happen: not "entered-in-error"
    assert movement["extension"] == [{"url": ZBE6, "valueCode": "A14"}]
    assert all(e["request"]["method"] in ("PUT", "POST") for e in result.bundle["entry"])  # no DELETE


def test_a26_cancel_pending_transfer_withdraws_the_places_it_was_going_to() -> None:
    result = convert(pending("A26", "ADT_A21", "CANCEL", "A15", f42="USIC^12^2"))
    visit, movement = visit_of(result), movement_of(result)
    assert visit["status"] == "in-progress"
    assert places(visit) == [("CARDIO / 204 / 1", "active")]  # neither PV1-42 nor PV2-1 stays planned
    assert movement["status"] == "cancelled"
    assert movement["extension"] == [{"url": ZBE6, "valueCode": "A15"}]
    # the withdrawn place stays a known Location (reference data), so nothing is lost
    assert "USIC / 12 / 2" in {e["resource"].get("name") for e in of_type(result, "Location")}


def test_a25_cancel_pending_discharge_keeps_the_stay_going() -> None:
    result = convert(pending("A25", "ADT_A21", "CANCEL", "A16"))
    visit, movement = visit_of(result), movement_of(result)
    assert visit["status"] == "in-progress"
    assert movement["status"] == "cancelled"
    assert movement["extension"] == [{"url": ZBE6, "valueCode": "A16"}]


def test_a_sender_without_zbe_gets_the_visit_alone() -> None:
    """HL7 v2 without PAM FR (no ZBE, no French header): the visit carries the pending state."""
    text = "\r".join(
        [
            "MSH|^~\\&|ADT|NORTH-GENERAL|PASSERELLE|GHT|20270315093000||ADT^A15^ADT_A15|X-15|P|2.5"
            "||||||UNICODE UTF-8",
            PID,
            pv1(f42="ICU^12^2", f2="I"),
        ]
    )
    result = convert(text + "\r")
    (encounter,) = (e["resource"] for e in of_type(result, "Encounter"))
    assert encounter["status"] == "in-progress"
    assert places(encounter) == [("CARDIO / 204 / 1", "active"), ("ICU / 12 / 2", "planned")]


# -- what a repository holds after a pending event and its cancel ------------------------------------


async def write(repo: SqliteFhirRepository, text: str) -> None:
    result = convert(text)
    assert bundle_errors(result.bundle) == []
    await repo.transaction(result.bundle)


async def encounters(repo: SqliteFhirRepository) -> dict[str, dict[str, Any]]:
    found = (await repo.search("Encounter", [], count=100)).matches
    return {
        next(i["value"] for i in e["identifier"] if i["value"].startswith(("V27", "MVT"))): e for e in found
    }


async def test_a_cancelled_pending_admit_keeps_every_record_marked(repo) -> None:
    await write(repo, pending("A14", "ADT_A05", "INSERT"))
    await write(repo, pending("A27", "ADT_A21", "CANCEL", "A14"))
    stored = await encounters(repo)
    assert stored["V27-000812"]["status"] == "cancelled"
    assert stored["MVT-4401"]["status"] == "cancelled"
    patients = (await repo.search("Patient", [("identifier", f"{IPP}|778899")])).matches
    assert [p["name"][0]["family"] for p in patients] == ["ROUSSEAU"]


async def test_a_cancelled_pending_transfer_leaves_the_stay_where_it_was(repo) -> None:
    await write(repo, pending("A15", "ADT_A15", "INSERT", f42="USIC^12^2"))
    before = await encounters(repo)
    assert ("USIC / 12 / 2", "planned") in places(before["V27-000812"])
    await write(repo, pending("A26", "ADT_A21", "CANCEL", "A15", f42="USIC^12^2"))
    after = await encounters(repo)
    assert after["V27-000812"]["status"] == "in-progress"
    assert places(after["V27-000812"]) == [("CARDIO / 204 / 1", "active")]
    assert after["MVT-4401"]["status"] == "cancelled"


async def test_a_cancelled_pending_discharge_keeps_the_stay_in_progress(repo) -> None:
    await write(repo, pending("A16", "ADT_A16", "INSERT"))
    await write(repo, pending("A25", "ADT_A21", "CANCEL", "A16"))
    stored = await encounters(repo)
    assert stored["V27-000812"]["status"] == "in-progress"
    assert "end" not in stored["V27-000812"].get("period", {})
    assert stored["MVT-4401"]["status"] == "cancelled"
