"""Sequences a hospital sends every day, mapped and written to a real repository: what it holds after.

Each was a data-safety bug: a lab's result written over another patient's, a thin result erasing the
INS, PROV → VALI giving two Patients, A31 → A40 → A47 → Z99 leaving two Patients with one IPP (and
the next messages DEAD), three vaccinations merged into one, five orders into one.
"""

from __future__ import annotations

from typing import Any

import pytest

from conformance.suite import DATA_DIR
from gateway.core.errors import Conflict, UnknownNamespace, ValidationError
from gateway.hl7.er7 import Message
from gateway.mapping.namespaces import Namespaces
from gateway.mapping.validate import bundle_errors
from gateway.store.fhir import SqliteFhirRepository
from tests.mapping.test_adt import LIB, segment

HOSPITAL = "1.2.250.1.71.4.2.2.1234"  # the fictional Hôpital Nord's identifier domain
IPP = f"urn:oid:{HOSPITAL}"
INS_NIR = "urn:oid:1.2.250.1.213.1.4.8"
SENDER = Namespaces(policy="sender")


async def write(repo: SqliteFhirRepository, text: str, namespaces: Namespaces | None = None) -> None:
    result = LIB.map(Message.parse(text.replace("\n", "\r")), namespaces=namespaces)
    assert bundle_errors(result.bundle) == []
    await repo.transaction(result.bundle)


async def found(repo: SqliteFhirRepository, kind: str, *params: tuple[str, str]) -> list[dict[str, Any]]:
    return list((await repo.search(kind, list(params), count=100)).matches)


def systems(resource: dict[str, Any]) -> dict[str, str]:
    return {i["system"]: i["value"] for i in resource.get("identifier", [])}


def msh(event: str, control_id: str, app: str = "SIH", facility: str = "HOPITAL-NORD") -> str:
    return f"MSH|^~\\&|{app}|{facility}|PASSERELLE|GHT|20261123101500||{event}|{control_id}|P|2.5"


def pid(ipp: str, *, ins: str = "", status: str = "VALI", rest: str = "") -> str:
    ids = f"{ipp}^^^HOPITAL-NORD&{HOSPITAL}&ISO^PI"
    if ins:
        ids += f"~{ins}^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.8&ISO^INS"
    return segment("PID", {3: ids, 32: status, **({5: rest} if rest else {})})


def oru(lab: str, lab_oid: str | None, patient: str, value: str) -> str:
    """A lab's potassium result; both labs number their orders from 456 (with no authority when
    ``lab_oid`` is None)."""
    filler = f"RES456^{lab}^{lab_oid}^ISO" if lab_oid else "RES456"
    return "\r".join(
        [
            msh("ORU^R01^ORU_R01", f"{lab}-1", app="SIL", facility=lab),
            pid(patient, rest="PATIENT^Anne"),
            segment("OBR", {1: "1", 3: filler, 4: "2823-3^Potassium^LN", 25: "F"}),
            segment("OBX", {1: "1", 2: "NM", 3: "2823-3^Potassium^LN", 5: value, 6: "mmol/L^^UCUM", 11: "F"}),
        ]
    )


async def test_two_labs_reusing_a_filler_number_never_touch_each_others_results(repo) -> None:
    await write(repo, oru("LABO-EST", "1.2.250.1.71.4.2.2.5551", "300001", "4.1"))
    await write(repo, oru("LABO-OUEST", "1.2.250.1.71.4.2.2.6662", "300002", "6.3"))
    observations = await found(repo, "Observation")
    assert len(observations) == 2
    by_patient = {}
    for obs in observations:
        patient = await repo.read("Patient", obs["subject"]["reference"].split("/")[1])
        assert patient is not None
        by_patient[systems(patient)[IPP]] = obs["valueQuantity"]["value"]
    assert by_patient == {"300001": 4.1, "300002": 6.3}
    assert len(await found(repo, "DiagnosticReport")) == 2


async def test_two_labs_without_authorities_are_told_apart_by_their_senders(repo) -> None:
    # the filler numbers carry no assigning authority: each lab's own namespace keys them
    await write(repo, oru("LABO-EST", None, "300001", "4.1"), SENDER)
    await write(repo, oru("LABO-OUEST", None, "300002", "6.3"), SENDER)
    values = sorted(o["valueQuantity"]["value"] for o in await found(repo, "Observation"))
    assert values == [4.1, 6.3]


def test_a_key_without_namespace_is_refused_by_default_naming_the_field() -> None:
    with pytest.raises(UnknownNamespace) as info:
        LIB.map(Message.parse(oru("LABO-EST", None, "300001", "4.1")))
    assert info.value.hl7_error_code == "103"
    assert info.value.location is not None and info.value.location.startswith("OBR-3")


A01 = "\r".join(
    [
        msh("ADT^A01^ADT_A01", "A01-1"),
        "EVN||20261123101500",
        "PID|||400001^^^HOPITAL-NORD&1.2.250.1.71.4.2.2.1234&ISO^PI~282032123456789^^^ASIP-SANTE-INS-NIR&"
        "1.2.250.1.213.1.4.8&ISO^INS||MARTIN^Lucie^Lucie Anne^^^^L||19820317|F|||3 place du Marché^^Dijon^^"
        "21000^FRA^H~^^Dijon^^^FRA^BDL^^21231|||||||||||||||||||||VALI",
        "PV1||I|CARDIO^101^1||||||||||||||||V-400001^^^HOPITAL-NORD&1.2.250.1.71.4.2.2.1234&ISO^VN",
    ]
)


async def test_a_thin_result_never_erases_what_the_identity_feed_set(repo) -> None:
    await write(repo, A01)
    thin = "\r".join(
        [
            msh("ORU^R01^ORU_R01", "R-1", app="SIL", facility="LABO-EST"),
            "PID|||400001^^^HOPITAL-NORD&1.2.250.1.71.4.2.2.1234&ISO^PI||MARTIN^L",
            segment("OBR", {1: "1", 3: "RES1^LABO^1.2.250.1.71.4.2.2.5551^ISO", 4: "X^Bilan^L", 25: "F"}),
            segment("OBX", {1: "1", 2: "ST", 3: "X^Essai^L", 5: "normal", 11: "F"}),
        ]
    )
    await write(repo, thin)
    (patient,) = await found(repo, "Patient")
    assert systems(patient) == {IPP: "400001", INS_NIR: "282032123456789"}
    assert patient["birthDate"] == "1982-03-17"
    assert patient["name"][0]["given"] == ["Lucie"]  # the result's "L" did not replace the name
    assert patient["address"][0]["city"] == "Dijon"
    assert any(e["url"].endswith("patient-birthPlace") for e in patient["extension"])
    assert patient["meta"]["versionId"] == "1"  # a result feed only names the Patient


async def test_prov_then_vali_updates_one_patient(repo) -> None:
    prov = A01.replace("|VALI", "|PROV")
    await write(repo, prov)
    (patient,) = await found(repo, "Patient")
    assert INS_NIR not in systems(patient)  # PAM FR: no INS without VALI
    await write(repo, A01.replace("ADT^A01^ADT_A01", "ADT^A31^ADT_A05"))
    (patient,) = await found(repo, "Patient")
    assert systems(patient) == {IPP: "400001", INS_NIR: "282032123456789"}
    statuses = [e for e in patient["extension"] if e["url"].endswith("identity-reliability")]
    assert statuses[0]["extension"][0]["valueCoding"]["code"] == "VALI"


async def test_merge_then_identifier_change_then_movement_update_keep_one_patient_per_ipp(repo) -> None:
    # the shipped conformance data, in the order that once left two Patients with one IPP
    for name in ("a01-admission", "a31-ins-qualified", "a40-merge", "a47-ins-change", "z99-update-movement"):
        await write(repo, (DATA_DIR / "hl7" / f"{name}.hl7").read_text("utf-8"))
    survivors = await found(repo, "Patient", ("identifier", f"{IPP}|200001"))
    assert len(survivors) == 1
    (survivor,) = survivors
    # A47 moved the INS on the same Patient: the new one, not the old one; A40 erased nothing
    assert systems(survivor) == {IPP: "200001", INS_NIR: "282032123456790"}
    assert survivor["address"][0]["city"] == "Dijon"
    (merged,) = await found(repo, "Patient", ("identifier", f"{IPP}|200099"))
    assert merged["active"] is False
    assert merged["link"] == [{"other": {"reference": f"Patient/{survivor['id']}"}, "type": "replaced-by"}]
    assert survivor["link"] == [{"other": {"reference": f"Patient/{merged['id']}"}, "type": "replaces"}]


async def test_an_identifier_change_between_two_known_patients_is_refused_not_guessed(repo) -> None:
    await write(repo, A01)
    other = A01.replace("400001", "400002").replace("282032123456789", "282032123456700")
    await write(repo, other)
    # A47 "400002 becomes 400001": both are known, as two people: a merge, not a change
    a47 = "\r".join(
        [
            msh("ADT^A47^ADT_A30", "A47-1"),
            pid("400001", status="PROV"),
            "MRG|400002^^^HOPITAL-NORD&1.2.250.1.71.4.2.2.1234&ISO^PI",
        ]
    )
    with pytest.raises(Conflict):
        await write(repo, a47)
    assert len(await found(repo, "Patient")) == 2


async def test_a_merge_of_a_patient_into_itself_is_refused_and_leaves_it_active(repo) -> None:
    await write(repo, A01)
    a40 = "\r".join(
        [
            msh("ADT^A40^ADT_A39", "A40-SELF"),
            pid("400001", status="PROV"),
            "MRG|400001^^^HOPITAL-NORD&1.2.250.1.71.4.2.2.1234&ISO^PI",
        ]
    )
    with pytest.raises(ValidationError, match="refused"):
        LIB.map(Message.parse(a40))
    (patient,) = await found(repo, "Patient")
    assert patient.get("active", True) is True


VXU = "\r".join(
    [
        msh("VXU^V04^VXU_V04", "V-1"),
        pid("500001", status="PROV", rest="DURAND^Paul"),
        *(
            line
            for n, (vaccine, day) in enumerate(
                [
                    ("3421012^VAXIGRIPTETRA^L", "20241012"),
                    ("3400937^REPEVAX^L", "20250110"),
                    ("3421012^VAXIGRIPTETRA^L", "20251015"),
                ],
                1,
            )
            for line in (
                segment("ORC", {1: "RE", 3: f"VAC-{n}^SIH^{HOSPITAL}^ISO"}),
                segment("RXA", {1: "0", 2: "1", 3: day, 5: vaccine, 20: "CP"}),
            )
        ),
    ]
)


async def test_each_vaccination_is_its_own_immunization(repo) -> None:
    await write(repo, VXU)
    immunizations = await found(repo, "Immunization")
    assert sorted(i["occurrenceDateTime"] for i in immunizations) == [
        "2024-10-12",
        "2025-01-10",
        "2025-10-15",
    ]
    assert sorted(systems(i)[IPP] for i in immunizations) == ["VAC-1", "VAC-2", "VAC-3"]
    await write(repo, VXU)  # the same history sent again: the same three, updated in place
    assert len(await found(repo, "Immunization")) == 3


async def test_each_order_is_its_own_service_request_and_a_cancel_revokes_only_its_own(repo) -> None:
    orders = []
    for n, (control, code) in enumerate(
        [("NW", "2823-3^Potassium^LN"), ("NW", "2951-2^Sodium^LN"), ("CA", "2160-0^Créatinine^LN"),
         ("NW", "718-7^Hémoglobine^LN"), ("NW", "777-3^Plaquettes^LN")],
        1,
    ):  # fmt: skip
        orders += [
            segment("ORC", {1: control, 2: f"CMD-{n}^SIH^{HOSPITAL}^ISO"}),
            segment("OBR", {1: str(n), 2: f"CMD-{n}^SIH^{HOSPITAL}^ISO", 4: code}),
        ]
    oml = "\r".join([msh("OML^O21^OML_O21", "O-1"), pid("600001", status="PROV", rest="LEROY^Inès"), *orders])
    await write(repo, oml)
    requests = {systems(r)[IPP]: r for r in await found(repo, "ServiceRequest")}
    assert sorted(requests) == [f"CMD-{n}" for n in range(1, 6)]
    assert [requests[f"CMD-{n}"]["status"] for n in range(1, 6)] == [
        "active",
        "active",
        "revoked",
        "active",
        "active",
    ]
    assert requests["CMD-2"]["code"]["coding"][0]["code"] == "2951-2"


async def test_a_result_message_for_two_patients_gives_each_patient_only_their_own_results(repo) -> None:
    """ORU^R01 repeats its PATIENT_RESULT group: every result of the second PID is that patient's."""
    text = "\r".join(
        [
            msh("ORU^R01^ORU_R01", "LAB-2P", app="SIL", facility="LABO-EST"),
            pid("300011", rest="PREMIER^Anne"),
            segment(
                "OBR", {1: "1", 3: "RES1^LABO-EST^1.2.250.1.71.4.2.2.5551^ISO", 4: "2823-3^Potassium^LN"}
            ),
            segment("OBX", {1: "1", 2: "NM", 3: "2823-3^Potassium^LN", 5: "4.1", 6: "mmol/L^^UCUM", 11: "F"}),
            pid("300022", rest="SECOND^Paul"),
            segment("OBR", {1: "1", 3: "RES2^LABO-EST^1.2.250.1.71.4.2.2.5551^ISO", 4: "2951-2^Sodium^LN"}),
            segment("OBX", {1: "1", 2: "NM", 3: "2951-2^Sodium^LN", 5: "140", 6: "mmol/L^^UCUM", 11: "F"}),
        ]
    )
    await write(repo, text)
    patients = {systems(p)[IPP]: p["id"] for p in await found(repo, "Patient")}
    assert set(patients) == {"300011", "300022"}
    by_code = {
        o["code"]["coding"][0]["code"]: o["subject"]["reference"] for o in await found(repo, "Observation")
    }
    assert by_code == {"2823-3": f"Patient/{patients['300011']}", "2951-2": f"Patient/{patients['300022']}"}
    reports = {
        r["code"]["coding"][0]["code"]: r["subject"]["reference"]
        for r in await found(repo, "DiagnosticReport")
    }
    assert reports == {"2823-3": f"Patient/{patients['300011']}", "2951-2": f"Patient/{patients['300022']}"}


async def test_one_doctor_sent_by_idnps_then_by_rpps_is_one_practitioner(repo) -> None:
    """IDNPS = 8 + RPPS: both forms name one person (once two Practitioners, then every later
    message naming the doctor refused as ambiguous)."""
    by_rpps = "10003456789^DUPRÉ^Hélène^^^^^^ASIP-SANTE-PS&1.2.250.1.71.4.2.1&ISO^D^^^RPPS"
    by_idnps = "810003456789^DUPRÉ^Hélène^^^^^^ASIP-SANTE-PS&1.2.250.1.71.4.2.1&ISO^D^^^IDNPS"
    for n, xcn in enumerate((by_idnps, by_rpps, by_idnps), 1):
        visit = segment("PV1", {2: "I", 7: xcn, 19: f"V-{n}^^^HOPITAL-NORD&{HOSPITAL}&ISO^VN"})
        await write(repo, "\r".join([msh("ADT^A01^ADT_A01", f"DOC-{n}"), pid("700001"), visit]))
    (practitioner,) = await found(repo, "Practitioner")
    assert systems(practitioner) == {
        "https://rpps.esante.gouv.fr": "10003456789",
        "urn:oid:1.2.250.1.71.4.2.1": "810003456789",
    }
