"""The ADT triggers beyond PAM FR's movements: A08 (update patient information), A09 / A10 (tracking),
A45 (move a visit to another account), and the ones refused with their reason (A29, A41, A44). One
golden test per trigger, written from HL7 v2 and V2-to-FHIR with French identities, then what a
repository holds after them. Identity safety first: no trigger deletes, blanks or moves a patient's
record to another patient."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.core.errors import Conflict, UnsupportedMessage, ValidationError
from gateway.hl7.er7 import Message
from gateway.store.fhir import SqliteFhirRepository
from tests.mapping.checked_conversion import IPP_OID, LIB, NAMESPACES, convert, key, of_type, segment

AUTHORITY = f"CH-ARGONNE&{IPP_OID}&ISO"
IPP = f"urn:oid:{IPP_OID}"
IF_ABSENT = {"url": "urn:passerelle:if-absent", "valueString": "status"}


def msh(event: str, control: str, *, french: bool = False) -> str:
    """MSH of the Centre hospitalier d'Argonne; ``french``: declared PAM FR (MSH-12, MSH-17, MSH-21)."""
    if french:
        tail = "P|2.5^FRA^2.11|||||FRA|UNICODE UTF-8|||2.11^IHE_FRANCE-2.11-PAM"
    else:
        tail = "P|2.5||||||UNICODE UTF-8"
    return f"MSH|^~\\&|SIL|CH-ARGONNE|PASSERELLE|GHT-EST|20270315093000||{event}|{control}|{tail}"


def pid(ipp: str = "778899", family: str = "ROUSSEAU", given: str = "Maëlle", nda: str = "2027000812") -> str:
    return segment(
        "PID",
        {
            3: f"{ipp}^^^{AUTHORITY}^PI",
            5: f"{family}^{given}^^^^^L",
            7: "19830214",
            8: "F",
            11: "12 rue des Tilleuls^^Verdun^^55100^FRA^H",
            18: f"{nda}^^^{AUTHORITY}^AN",
        },
    )


def pv1(visit: str = "V27-000812", **fields: str) -> str:
    base = {2: "I", 3: "CARDIO^204^1", 19: f"{visit}^^^{AUTHORITY}^VN", 44: "20270315080000"}
    return segment("PV1", {**base, **{int(k[1:]): v for k, v in fields.items()}})


def text(*lines: str) -> str:
    return "\r".join(lines) + "\r"


def places(encounter: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (entry["location"].get("display", ""), entry["status"]) for entry in encounter.get("location", [])
    ]


# -- A08 -------------------------------------------------------------------------------------------


def test_a08_updates_the_patient_and_leaves_the_visit_status_as_stored() -> None:
    result = convert(text(msh("ADT^A08^ADT_A01", "U-08"), pid(), pv1()))
    (patient,) = of_type(result, "Patient")
    assert patient["resource"]["name"][0] == {"family": "ROUSSEAU", "given": ["Maëlle"], "use": "official"}
    assert patient["resource"]["address"][0]["city"] == "Verdun"
    assert patient["request"]["method"] == "PUT"  # merged into the stored Patient, never replaced
    (visit,) = of_type(result, "Encounter")
    # V2-to-FHIR: A08 does not convey the visit's status ("unknown"): written only where none is stored
    assert visit["resource"]["status"] == "unknown"
    assert IF_ABSENT in visit["request"]["extension"]
    assert key(visit) == f"identifier={IPP}|V27-000812"


def test_a08_from_a_pam_fr_sender_is_refused_as_pam_fr_does_not_use_it() -> None:
    message = Message.parse(text(msh("ADT^A08^ADT_A01", "U-08F", french=True), pid(), pv1()))
    with pytest.raises(UnsupportedMessage) as refused:
        LIB.map(message, namespaces=NAMESPACES)
    assert "PAM FR does not use A08" in refused.value.message
    assert "A31" in refused.value.message and "Z99" in refused.value.message
    assert refused.value.location == "MSH-9"


def test_a_pam_fr_movement_segment_marks_a_french_sender_too() -> None:
    zbe = segment("ZBE", {1: f"MVT-1^CH-ARGONNE^{IPP_OID}^ISO", 2: "20270315093000", 4: "INSERT"})
    message = Message.parse(text(msh("ADT^A08^ADT_A01", "U-08Z"), pid(), pv1(), zbe))
    with pytest.raises(UnsupportedMessage):
        LIB.map(message, namespaces=NAMESPACES)


# -- A09 / A10 ---------------------------------------------------------------------------------------


def test_a09_patient_departing_to_a_temporary_place() -> None:
    result = convert(text(msh("ADT^A09^ADT_A09", "T-09"), pid(), pv1(f6="CARDIO^203^2", f11="RADIO^SALLE-3")))
    (visit,) = (e["resource"] for e in of_type(result, "Encounter"))
    assert visit["status"] == "in-progress"
    assert places(visit) == [
        ("CARDIO / 204 / 1", "active"),
        ("CARDIO / 203 / 2", "completed"),
        ("RADIO / SALLE-3", "active"),
    ]
    names = {e["resource"]["name"] for e in of_type(result, "Location")}
    assert names == {"CARDIO / 204 / 1", "CARDIO / 203 / 2", "RADIO / SALLE-3"}


def test_a10_patient_arriving_back_from_a_temporary_place() -> None:
    result = convert(text(msh("ADT^A10^ADT_A10", "T-10"), pid(), pv1(f43="RADIO^SALLE-3")))
    (visit,) = (e["resource"] for e in of_type(result, "Encounter"))
    assert visit["status"] == "in-progress"
    assert places(visit) == [("CARDIO / 204 / 1", "active"), ("RADIO / SALLE-3", "completed")]


# -- A45 ---------------------------------------------------------------------------------------------


def a45(*, prior_patient: str = "778899", nda: str = "2027000812", visit: str = "V27-000812") -> str:
    """Visit ``visit`` moves from account 2027000801 to ``nda``; MRG-1 names its prior patient."""
    mrg = segment(
        "MRG",
        {
            **({1: f"{prior_patient}^^^{AUTHORITY}^PI"} if prior_patient else {}),
            3: f"2027000801^^^{AUTHORITY}^AN",
            5: f"{visit}^^^{AUTHORITY}^VN",
        },
    )
    return text(msh("ADT^A45^ADT_A45", "M-45"), pid(nda=nda), mrg, pv1(visit))


def test_a45_moves_the_visit_to_the_account_of_pid_18() -> None:
    result = convert(a45())
    (visit,) = of_type(result, "Encounter")
    assert key(visit) == f"identifier={IPP}|V27-000812"  # found by the number it had (MRG-5)
    identifiers = {(i["type"]["coding"][0]["code"], i["value"]) for i in visit["resource"]["identifier"]}
    assert identifiers == {("VN", "V27-000812"), ("AN", "2027000812")}
    assert visit["resource"]["subject"]["reference"] == of_type(result, "Patient")[0]["fullUrl"]
    assert "status" not in visit["resource"] or IF_ABSENT in visit["request"]["extension"]
    assert "MRG-3[1].1" in result.unmapped  # the account left: no Account resource is kept


def test_a45_never_moves_a_visit_to_another_patient() -> None:
    message = Message.parse(a45(prior_patient="665544"))
    with pytest.raises(ValidationError) as refused:
        LIB.map(message, namespaces=NAMESPACES)
    assert refused.value.location == "MRG-1"
    assert "never moves a visit between patients" in refused.value.message


def test_a45_with_several_visits_moves_each_in_its_group() -> None:
    second = segment(
        "MRG",
        {1: f"778899^^^{AUTHORITY}^PI", 3: f"2027000801^^^{AUTHORITY}^AN", 5: f"V27-000813^^^{AUTHORITY}^VN"},
    )
    result = convert(a45().rstrip("\r") + "\r" + second + "\r" + pv1("V27-000813", f3="CARDIO^205^1") + "\r")
    visits = of_type(result, "Encounter")
    assert [key(v) for v in visits] == [f"identifier={IPP}|V27-000812", f"identifier={IPP}|V27-000813"]
    assert [places(v["resource"]) for v in visits] == [
        [("CARDIO / 204 / 1", "active")],
        [("CARDIO / 205 / 1", "active")],
    ]


# -- refused with their reason ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        ("ADT^A29^ADT_A21", "never does"),
        ("ADT^A41^ADT_A39", "cannot be written faithfully"),
        ("ADT^A44^ADT_A43", "move records between patients"),
    ],
)
def test_triggers_that_would_delete_or_move_records_are_refused_with_their_reason(
    event: str, reason: str
) -> None:
    message = Message.parse(text(msh(event, "R-1"), pid()))
    with pytest.raises(UnsupportedMessage) as refused:
        LIB.map(message, namespaces=NAMESPACES)
    assert reason in refused.value.message
    assert LIB.why_unsupported(event.rsplit("^", 1)[0]) == refused.value.message


# -- what a repository holds after them ------------------------------------------------------------


async def write(repo: SqliteFhirRepository, message: str) -> None:
    await repo.transaction(convert(message).bundle)


async def visits(repo: SqliteFhirRepository) -> list[dict[str, Any]]:
    return list((await repo.search("Encounter", [], count=100)).matches)


async def test_an_a08_keeps_the_status_an_admission_stored(repo) -> None:
    await write(repo, text(msh("ADT^A01^ADT_A01", "U-01"), pid(), pv1()))
    await write(repo, text(msh("ADT^A08^ADT_A01", "U-08"), pid(family="ROUSSEAU-MARTIN"), pv1()))
    (visit,) = await visits(repo)
    assert visit["status"] == "in-progress"
    (patient,) = (await repo.search("Patient", [("identifier", f"{IPP}|778899")])).matches
    assert patient["name"][0]["family"] == "ROUSSEAU-MARTIN"


async def test_an_a45_gives_the_visit_its_new_account_and_keeps_its_patient(repo) -> None:
    await write(repo, text(msh("ADT^A01^ADT_A01", "U-01"), pid(nda="2027000801"), pv1()))
    (before,) = await visits(repo)
    await write(repo, a45())
    (after,) = await visits(repo)
    accounts = [i["value"] for i in after["identifier"] if i["type"]["coding"][0]["code"] == "AN"]
    assert accounts == ["2027000812"]  # the new account replaced the old one of its namespace
    assert after["id"] == before["id"] and after["subject"] == before["subject"]
    assert after["status"] == "in-progress"  # A45 says nothing of the status: the stored one stays


async def test_an_a45_without_mrg_1_still_never_takes_another_patients_visit(repo) -> None:
    await write(repo, text(msh("ADT^A01^ADT_A01", "U-01"), pid(ipp="665544", family="LEMAIRE"), pv1()))
    with pytest.raises(Conflict):
        await write(repo, a45(prior_patient=""))
    (visit,) = await visits(repo)
    (owner,) = (await repo.search("Patient", [("identifier", f"{IPP}|665544")])).matches
    assert visit["subject"]["reference"] == f"Patient/{owner['id']}"
