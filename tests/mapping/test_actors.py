"""Practitioners (XCN with RPPS / ADELI / IDNPS) and organisations (FINESS EJ/EG) shaped to FR Core."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.hl7.er7 import Message, escape
from gateway.mapping.validate import bundle_errors
from tests.mapping.test_adt import A01, LIB, normalized, segment

FR_0203 = "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0203"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
PRACTITIONER = {"profile": ["https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-practitioner"]}
ORGANIZATION = {"profile": ["https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-organization"]}
OID = "urn:oid:1.2.250.1.71.4.2.2.4455"

DUPRE = "10003456789^DUPRÉ^Hélène^^^Dr^^^ASIP-SANTE-PS&1.2.250.1.71.4.2.1&ISO^D^^^RPPS"
# Authored: the legal entity (FINESS EJ, HD-3 M) sends for its site (FINESS EG, HD-3 N, in PV1-3.4);
# the attending doctor (RPPS) is also the admitting one; a second attending repetition; the referring
# nurse by ADELI.
PV1 = segment(
    "PV1",
    {
        2: "I",
        3: "CARDIO^101^1^Hôpital Jean Minjoz&250000023&N",
        7: DUPRE + "~10009876543^AUTRE^Jean^^^^^^ASIP-SANTE-PS&1.2.250.1.71.4.2.1&ISO^D^^^RPPS",
        8: "259012345^LE GALL^Anaïs^^^^^^ASIP-SANTE-PS&1.2.250.1.71.4.2.1&ISO^D^^^ADELI",
        17: DUPRE,
        19: "V26-000456^^^CHU-EST&1.2.250.1.71.4.2.2.4455&ISO^VN",
        44: "20261123101500",
    },
)


def a01_with_actors() -> str:
    lines = A01.split("\r")
    lines[0] = lines[0].replace("|DXCARE|CHU-EST|", "|DXCARE|CHU Besançon^250000015^M|")
    return "\r".join(PV1 if line.startswith("PV1") else line for line in lines)


def role(code: str, display: str, ref: str) -> dict[str, Any]:
    return {
        "type": [{"coding": [{"system": PARTICIPATION, "code": code, "display": display}]}],
        "individual": {"reference": ref},
    }


MERGE = [{"url": "urn:passerelle:write-policy", "valueCode": "merge"}]
ANS = {"display": "ASIP-SANTE-PS"}


def national(kind: str, value: str, system: str | None) -> dict[str, Any]:
    ident: dict[str, Any] = {
        "type": {"coding": [{"system": FR_0203, "code": kind}]},
        "value": value,
        "assigner": ANS,
    }
    if system:
        ident["system"] = system
    return ident


def finess(kind: str, value: str) -> dict[str, Any]:
    return {
        "use": "official",
        "type": {"coding": [{"system": FR_0203, "code": kind}]},
        "system": "https://finess.esante.gouv.fr",
        "value": value,
    }


def test_adt_doctors_and_organisations_golden() -> None:
    result = LIB.map(Message.parse(a01_with_actors()))
    assert bundle_errors(result.bundle) == []
    entries = normalized(result)["entry"]
    assert [e["resource"]["resourceType"] for e in entries] == [
        "Patient",
        "Practitioner",
        "Practitioner",
        "Organization",
        "Organization",
        "Encounter",
        "Encounter",
        "Location",
        "Location",
    ]
    assert entries[1:5] == [
        {
            "fullUrl": "urn:uuid:1",
            "resource": {
                "resourceType": "Practitioner",
                "meta": PRACTITIONER,
                # the RPPS and its national id (IDNPS = 8 + RPPS)
                "identifier": [
                    national("RPPS", "10003456789", "https://rpps.esante.gouv.fr"),
                    national("IDNPS", "810003456789", "urn:oid:1.2.250.1.71.4.2.1"),
                ],
                "name": [{"family": "DUPRÉ", "given": ["Hélène"], "prefix": ["Dr"], "use": "usual"}],
            },
            "request": {
                "method": "PUT",
                "url": "Practitioner?identifier=urn:oid:1.2.250.1.71.4.2.1|810003456789",
                "extension": MERGE,
            },
        },
        {
            "fullUrl": "urn:uuid:2",
            "resource": {
                "resourceType": "Practitioner",
                "meta": PRACTITIONER,
                # FR Core 2.1.0 gives ADELI no system: typed, none invented; its national id
                # (IDNPS = 0 + ADELI) is the namespaced key
                "identifier": [
                    national("IDNPS", "0259012345", "urn:oid:1.2.250.1.71.4.2.1"),
                    national("ADELI", "259012345", None),
                ],
                "name": [{"family": "LE GALL", "given": ["Anaïs"], "use": "usual"}],
            },
            "request": {
                "method": "PUT",
                "url": "Practitioner?identifier=urn:oid:1.2.250.1.71.4.2.1|0259012345",
                "extension": MERGE,
            },
        },
        {
            "fullUrl": "urn:uuid:3",
            "resource": {
                "resourceType": "Organization",
                "meta": ORGANIZATION,
                "identifier": [finess("FINEG", "250000023")],
                "name": "Hôpital Jean Minjoz",
                "partOf": {"reference": "urn:uuid:4"},
            },
            "request": {
                "method": "PUT",
                "url": "Organization?identifier=https://finess.esante.gouv.fr|250000023",
                "extension": MERGE,
            },
        },
        {
            "fullUrl": "urn:uuid:4",
            "resource": {
                "resourceType": "Organization",
                "meta": ORGANIZATION,
                "identifier": [finess("FINEJ", "250000015")],
                "name": "CHU Besançon",
            },
            "request": {
                "method": "PUT",
                "url": "Organization?identifier=https://finess.esante.gouv.fr|250000015",
                "extension": MERGE,
            },
        },
    ]
    visit, movement = entries[5]["resource"], entries[6]["resource"]
    # the admitting doctor is the attending one: one Practitioner entry, referenced twice
    assert visit["participant"] == [
        role("ATND", "attender", "urn:uuid:1"),
        role("REF", "referrer", "urn:uuid:2"),
        role("ADM", "admitter", "urn:uuid:1"),
    ]
    assert visit["serviceProvider"] == {"reference": "urn:uuid:3"}
    assert movement["participant"] == [role("ATND", "attender", "urn:uuid:1")]
    # the second attending repetition is not dropped silently: warned of, and in the report
    assert result.warnings == [
        "PV1-7: only repetition 1 is mapped; 1 more in the unmapped report",
        # the place of PV1-3 is named within its site, whose FINESS gives its namespace
        "PV1-3[1].4: assigning authority Hôpital Jean Minjoz&250000023&N has no OID; system derived from "
        "its FINESS (declare it in namespaces.authorities of config.yaml)",
    ]
    second = ["PV1-7[2].1", "PV1-7[2].2", "PV1-7[2].3", "PV1-7[2].9.1", "PV1-7[2].9.2", "PV1-7[2].9.3"]
    assert result.unmapped == [
        "EVN-2[1]",
        *second,
        "PV1-7[2].10",
        "PV1-7[2].13",
        "ZBE-5[1]",
        "ZXY-1[1]",
        "ZXY-2[1]",
    ]


def test_a_doctor_without_number_is_named_not_created() -> None:
    text = a01_with_actors().replace(
        "259012345^LE GALL^Anaïs^^^^^^ASIP-SANTE-PS&1.2.250.1.71.4.2.1&ISO^D^^^ADELI", "^LE GALL^Anaïs"
    )
    result = LIB.map(Message.parse(text))
    assert bundle_errors(result.bundle) == []
    kinds = [e["resource"]["resourceType"] for e in result.bundle["entry"]]
    assert kinds.count("Practitioner") == 1  # a resource without identifier would duplicate on replay
    visit = result.bundle["entry"][4]["resource"]
    assert visit["participant"][1] == {
        "type": [{"coding": [{"system": PARTICIPATION, "code": "REF", "display": "referrer"}]}],
        "individual": {"display": "LE GALL"},
    }


def test_without_site_the_sender_provides_the_service() -> None:
    text = a01_with_actors().replace("CARDIO^101^1^Hôpital Jean Minjoz&250000023&N", "CARDIO^101^1")
    bundle = normalized(LIB.map(Message.parse(text)))
    organisations = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "Organization"]
    assert [o["resource"]["identifier"] for o in organisations] == [[finess("FINEJ", "250000015")]]
    visit = next(e for e in bundle["entry"] if e["request"]["url"].endswith("V26-000456"))
    assert visit["resource"]["serviceProvider"] == {"reference": organisations[0]["fullUrl"]}


def test_a_local_sender_name_makes_no_organisation() -> None:
    result = LIB.map(Message.parse(A01))  # MSH-4 "CHU-EST": a name, no national identifier
    assert "Organization" not in [e["resource"]["resourceType"] for e in result.bundle["entry"]]
    assert "serviceProvider" not in result.bundle["entry"][1]["resource"]


def test_idnps_and_local_identifiers() -> None:
    idnps = "810003456789^DUPRÉ^Hélène^^^^^^ASIP-SANTE-PS&1.2.250.1.71.4.2.1&ISO^D^^^IDNPS"
    local = "M-778^ROUX^Léa^^^^^^CHU-EST&1.2.250.1.71.4.2.2.4455&ISO^D^^^EI"
    for xcn, expected in (
        (
            idnps,
            # an IDNPS that is 8 + an RPPS says so: the RPPS too, as when the RPPS is sent
            [
                national("RPPS", "10003456789", "https://rpps.esante.gouv.fr"),
                national("IDNPS", "810003456789", "urn:oid:1.2.250.1.71.4.2.1"),
            ],
        ),
        (
            local,
            [
                {
                    "system": OID,
                    "value": "M-778",
                    "type": {
                        "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "EI"}]
                    },
                    "assigner": {"display": "CHU-EST"},
                }
            ],
        ),
    ):
        pv1 = segment("PV1", {2: "I", 7: xcn, 19: "V26-1^^^CHU-EST&1.2.250.1.71.4.2.2.4455&ISO^VN"})
        text = "\r".join(pv1 if line.startswith("PV1") else line for line in A01.split("\r"))
        result = LIB.map(Message.parse(text))
        assert bundle_errors(result.bundle) == []
        (practitioner,) = (
            e for e in result.bundle["entry"] if e["resource"]["resourceType"] == "Practitioner"
        )
        assert practitioner["resource"]["identifier"] == expected


def mapped(event: str, *segments: str) -> dict[str, Any]:
    msh = f"MSH|^~\\&|APP|CHU-EST|PASSERELLE|GHT|20261123110000||{event}|X1|P|2.5|||||FRA|UNICODE UTF-8"
    pid = "PID|||552233^^^CHU-EST&1.2.250.1.71.4.2.2.4455&ISO^PI||GÉRARD^Zoé^^^^^L||19750425|F"
    result = LIB.map(Message.parse("\r".join([msh, pid, *segments]) + "\r"))
    assert bundle_errors(result.bundle) == []
    return dict(normalized(result))


def test_siu_staff_golden() -> None:
    bundle = mapped(
        "SIU^S12^SIU_S12",
        segment(
            "SCH", {2: "RDV-9^AGENDA^1.2.250.1.71.4.2.2.4455^ISO", 11: "^^^20261201093000^20261201100000"}
        ),
        segment("AIP", {1: "1", 3: DUPRE, 4: "ATND^Praticien^L"}),
        segment("AIP", {1: "2", 3: "^MOREAU^Élise", 4: "NUR^Infirmière^L"}),
    )
    assert bundle["entry"][1] == {
        "fullUrl": "urn:uuid:1",
        "resource": {
            "resourceType": "Practitioner",
            "meta": PRACTITIONER,
            "identifier": [
                national("RPPS", "10003456789", "https://rpps.esante.gouv.fr"),
                national("IDNPS", "810003456789", "urn:oid:1.2.250.1.71.4.2.1"),
            ],
            "name": [{"family": "DUPRÉ", "given": ["Hélène"], "prefix": ["Dr"], "use": "usual"}],
        },
        "request": {
            "method": "PUT",
            "url": "Practitioner?identifier=urn:oid:1.2.250.1.71.4.2.1|810003456789",
            "extension": MERGE,
        },
    }
    appointment = bundle["entry"][2]["resource"]
    assert appointment["participant"] == [
        {"actor": {"reference": "urn:uuid:0"}, "status": "accepted"},
        {
            "type": [{"coding": [{"code": "ATND", "display": "Praticien"}], "text": "Praticien"}],
            "actor": {"reference": "urn:uuid:1"},
            "status": "accepted",
        },
        {
            "type": [{"coding": [{"code": "NUR", "display": "Infirmière"}], "text": "Infirmière"}],
            "actor": {"display": "MOREAU"},
            "status": "accepted",
        },
    ]


xcn_names = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zs")), min_size=1, max_size=15
)


@settings(max_examples=50, deadline=None)
@given(
    number=st.from_regex(r"[0-9]{11}", fullmatch=True),
    family=xcn_names,
    given_name=xcn_names,
    kind=st.sampled_from(["RPPS", "ADELI", "IDNPS"]),
)
def test_any_ordering_provider_gives_a_valid_fr_core_practitioner(
    number: str, family: str, given_name: str, kind: str
) -> None:
    xcn = (
        f"{number}^{escape(family)}^{escape(given_name)}^^^^^^ASIP-SANTE-PS&1.2.250.1.71.4.2.1&ISO^D^^^{kind}"
    )
    bundle = mapped(
        "ORM^O01^ORM_O01",
        segment("ORC", {1: "NW", 2: "CMD-77^SIH^1.2.250.1.71.4.2.2.4455^ISO", 12: xcn}),
        segment("OBR", {4: "24331-1^Bilan lipidique^LN"}),
    )
    practitioner = bundle["entry"][1]["resource"]
    kinds = {i["type"]["coding"][0]["code"]: i for i in practitioner["identifier"]}
    assert kinds[kind]["value"] == number
    assert (
        kinds[kind].get("system")
        == {
            "RPPS": "https://rpps.esante.gouv.fr",
            "IDNPS": "urn:oid:1.2.250.1.71.4.2.1",
            "ADELI": None,
        }[kind]
    )
    # every number also gives its national id, the namespaced key of the others
    prefix = {"RPPS": "8", "IDNPS": "", "ADELI": "0"}[kind]
    assert kinds["IDNPS"] == national("IDNPS", prefix + number, "urn:oid:1.2.250.1.71.4.2.1")
    assert practitioner["name"][0]["family"] == family
    assert bundle["entry"][2]["resource"]["requester"] == {"reference": "urn:uuid:1"}
