"""PAM FR ADT → FR Core Patient/Encounter: golden output, INS rule, unmapped content, mapping errors."""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.fhir.registry import default_registry
from gateway.core.errors import ConfigError, UnsupportedMessage, ValidationError
from gateway.hl7.er7 import Message, escape
from gateway.mapping import catalog
from gateway.mapping.engine import Library, MappingResult
from gateway.mapping.validate import bundle_errors

MAPPINGS = Path(__file__).parents[2] / "mappings"
OID = "urn:oid:1.2.250.1.71.4.2.2.4455"  # the fictional CHU-EST's identifier domain
LIB = Library.load(MAPPINGS, catalog.available())


def segment(name: str, fields: dict[int, str]) -> str:
    """A segment from its non-empty fields by position, so that no pipe is miscounted."""
    return "|".join([name, *(fields.get(n, "") for n in range(1, max(fields) + 1))])


# Authored for this test: a fictional patient, PAM FR 2.11 shapes, INS qualified (VALI), birthplace BDL,
# birth and used names, an escaped "&" in the street, a Z segment the mappings do not know.
A01 = (
    "\r".join(
        [
            "MSH|^~\\&|DXCARE|CHU-EST|PASSERELLE|GHT|20261123101500||ADT^A01^ADT_A01|A01-0001|P|2.5^FRA^2.11|||||FRA"
            "|UNICODE UTF-8|||2.11^IHE_FRANCE-2.11-PAM",
            "EVN||20261123101500",
            "PID|||552233^^^CHU-EST&1.2.250.1.71.4.2.2.4455&ISO^PI~275042512345678^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.8"
            "&ISO^INS||GÉRARD^Zoé^Zoé Marie^^Mme^^L~MARTIN-GÉRARD^Zoé^^^^^D||19750425|F|||"
            "3 rue des Tanneurs \\T\\ fils^^Besançon"
            "^^25000^FRA^H~^^Besançon^^^FRA^BDL^^25056||0381000000|||||||||||||||||||VALI",
            segment(
                "PV1",
                {
                    2: "I",
                    3: "CARDIO^101^1",
                    19: "V26-000456^^^CHU-EST&1.2.250.1.71.4.2.2.4455&ISO^VN",
                    44: "20261123101500",
                },
            ),
            segment(
                "ZBE",
                {
                    1: "MVT-7788^CHU-EST^1.2.250.1.71.4.2.2.4455^ISO",
                    2: "20261123101500",
                    4: "INSERT",
                    5: "N",
                    7: "CARDIOLOGIE^^^^^^^^^4010",
                },
            ),
            "ZXY|1|something the mappings do not know",
        ]
    )
    + "\r"
)


def mapped(text: str) -> MappingResult:
    return LIB.map(Message.parse(text))


def normalized(result: MappingResult) -> Any:
    """The bundle with its urn:uuid fullUrls named by order, so that it can be compared whole."""
    data = orjson.dumps(result.bundle).decode()
    for n, uid in enumerate(dict.fromkeys(re.findall(r"urn:uuid:[0-9a-f-]{36}", data))):
        data = data.replace(uid, f"urn:uuid:{n}")
    return orjson.loads(data)


# What A01 carries that no rule puts into FHIR: the recorded time, the historic flag and the unknown
# Z segment (the room and bed of PV1-3 are its Location now).
A01_UNMAPPED = ["EVN-2[1]", "ZBE-5[1]", "ZXY-1[1]", "ZXY-2[1]"]

# ADT is the identity feed: its Patient and Encounters are merged into what is stored.
MERGE = [{"url": "urn:passerelle:write-policy", "valueCode": "merge"}]

# The Encounter.location entry of PV1-3: its Location (urn:uuid:2), active, from the movement's time.
PLACE_ENTRY: dict[str, Any] = {
    "location": {"reference": "urn:uuid:2", "display": "CARDIO / 101 / 1"},
    "status": "active",
    "period": {"start": "2026-11-23T10:15:00+01:00"},
}

BIRTH_LIST_GIVEN_NAME = (
    "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-patient-birth-list-given-name"
)

A01_BUNDLE: dict[str, Any] = {
    "resourceType": "Bundle",
    "type": "transaction",
    "entry": [
        {
            "fullUrl": "urn:uuid:0",
            "resource": {
                "resourceType": "Patient",
                "meta": {
                    "profile": [
                        "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-patient",
                        "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-patient-ins",
                    ]
                },
                "identifier": [
                    {
                        "value": "552233",
                        "system": "urn:oid:1.2.250.1.71.4.2.2.4455",
                        "type": {
                            "coding": [
                                {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "PI"}
                            ]
                        },
                        "use": "usual",
                        "assigner": {"display": "CHU-EST"},
                    },
                    {
                        "use": "official",
                        "type": {
                            "coding": [
                                {
                                    "system": "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0203",
                                    "code": "INS-NIR",
                                }
                            ]
                        },
                        "system": "urn:oid:1.2.250.1.213.1.4.8",
                        "value": "275042512345678",
                        "assigner": {"display": "ASIP-SANTE-INS-NIR"},
                    },
                ],
                "name": [
                    {
                        "family": "GÉRARD",
                        "given": ["Zoé"],
                        "extension": [{"url": BIRTH_LIST_GIVEN_NAME, "valueString": "Zoé Marie"}],
                        "prefix": ["Mme"],
                        "use": "official",
                    },
                    {"family": "MARTIN-GÉRARD", "given": ["Zoé"], "use": "usual"},
                ],
                "gender": "female",
                "birthDate": "1975-04-25",
                "address": [
                    {
                        "line": ["3 rue des Tanneurs & fils"],
                        "city": "Besançon",
                        "postalCode": "25000",
                        "country": "FRA",
                        "use": "home",
                    }
                ],
                "extension": [
                    {
                        "url": "http://hl7.org/fhir/StructureDefinition/patient-birthPlace",
                        "valueAddress": {
                            "city": "Besançon",
                            "extension": [
                                {
                                    "url": "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-address-insee-code",
                                    "valueCoding": {
                                        "system": "https://mos.esante.gouv.fr/NOS/TRE_R13-CommuneOM/FHIR/TRE-R13-CommuneOM",
                                        "code": "25056",
                                    },
                                }
                            ],
                            "country": "FRA",
                        },
                    },
                    {
                        "url": "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-identity-reliability",
                        "extension": [
                            {
                                "url": "identityStatus",
                                "valueCoding": {
                                    "system": "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0445",
                                    "code": "VALI",
                                },
                            }
                        ],
                    },
                ],
                "telecom": [{"value": "0381000000", "system": "phone", "use": "home"}],
            },
            "request": {
                "method": "PUT",
                "url": "Patient?identifier=urn:oid:1.2.250.1.71.4.2.2.4455|552233",
                "extension": MERGE,
            },
        },
        {
            "fullUrl": "urn:uuid:1",
            "resource": {
                "resourceType": "Encounter",
                "identifier": [
                    {
                        "value": "V26-000456",
                        "system": "urn:oid:1.2.250.1.71.4.2.2.4455",
                        "type": {
                            "coding": [
                                {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "VN"}
                            ]
                        },
                        "assigner": {"display": "CHU-EST"},
                    }
                ],
                "status": "in-progress",
                "class": {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                    "code": "IMP",
                    "display": "inpatient encounter",
                },
                "subject": {"reference": "urn:uuid:0"},
                "period": {"start": "2026-11-23T10:15:00+01:00"},
                # PV1-3, one Location for the place (point of care, room, bed), from ZBE-2
                "location": [PLACE_ENTRY],
            },
            "request": {
                "method": "PUT",
                "url": "Encounter?identifier=urn:oid:1.2.250.1.71.4.2.2.4455|V26-000456",
                "extension": MERGE,
            },
        },
        {
            "fullUrl": "urn:uuid:3",
            "resource": {
                "resourceType": "Encounter",
                "identifier": [
                    {
                        "value": "MVT-7788",
                        "system": "urn:oid:1.2.250.1.71.4.2.2.4455",
                        "assigner": {"display": "CHU-EST"},
                    }
                ],
                "status": "in-progress",
                "class": {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                    "code": "IMP",
                    "display": "inpatient encounter",
                },
                "subject": {"reference": "urn:uuid:0"},
                "partOf": {"reference": "urn:uuid:1"},
                "period": {"start": "2026-11-23T10:15:00+01:00"},
                # the place, then the medical unit of ZBE-7 (PAM FR), each a Location
                "location": [
                    PLACE_ENTRY,
                    {
                        "location": {"reference": "urn:uuid:4", "display": "CARDIOLOGIE"},
                        "status": "active",
                        "period": {"start": "2026-11-23T10:15:00+01:00"},
                    },
                ],
                "serviceType": {
                    "coding": [{"code": "4010", "display": "CARDIOLOGIE"}],
                    "text": "CARDIOLOGIE",
                },
            },
            "request": {
                "method": "PUT",
                "url": "Encounter?identifier=urn:oid:1.2.250.1.71.4.2.2.4455|MVT-7788",
                "extension": MERGE,
            },
        },
        # The place of PV1-3, keyed on its hierarchy (point of care ^ room ^ bed) in the namespace
        # of the establishment that numbers the visit (PV1-3 names no facility).
        {
            "fullUrl": "urn:uuid:2",
            "resource": {
                "resourceType": "Location",
                "identifier": [{"system": "urn:oid:1.2.250.1.71.4.2.2.4455", "value": "CARDIO^101^1"}],
                "name": "CARDIO / 101 / 1",
                "mode": "instance",
                "physicalType": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/location-physical-type",
                            "code": "bd",
                            "display": "Bed",
                        }
                    ]
                },
            },
            "request": {
                "method": "PUT",
                "url": "Location?identifier=urn:oid:1.2.250.1.71.4.2.2.4455|CARDIO%5E101%5E1",
                "extension": MERGE,
            },
        },
        # The medical unit (UF) of ZBE-7, keyed on its code (XON-10).
        {
            "fullUrl": "urn:uuid:4",
            "resource": {
                "resourceType": "Location",
                "identifier": [{"system": "urn:oid:1.2.250.1.71.4.2.2.4455", "value": "4010"}],
                "name": "CARDIOLOGIE",
                "mode": "instance",
            },
            "request": {
                "method": "PUT",
                "url": "Location?identifier=urn:oid:1.2.250.1.71.4.2.2.4455|4010",
                "extension": MERGE,
            },
        },
    ],
}


def test_a01_golden_bundle() -> None:
    result = mapped(A01)
    assert bundle_errors(result.bundle) == []
    assert normalized(result) == A01_BUNDLE
    assert result.warnings == []
    # nothing silently lost: every leaf no rule put into the Bundle is reported, down to the
    # unknown Z segment
    assert result.unmapped == A01_UNMAPPED


def test_ins_without_vali_is_dropped_with_a_warning() -> None:
    result = mapped(A01.replace("|VALI\r", "|PROV\r"))
    patient = result.bundle["entry"][0]["resource"]
    systems = [i.get("system") for i in patient["identifier"]]
    assert "urn:oid:1.2.250.1.213.1.4.8" not in systems
    assert any("INS" in w and "VALI" in w for w in result.warnings)
    status = patient["extension"][1]["extension"][0]["valueCoding"]["code"]
    assert status == "PROV"


def test_cancellations_mark_and_keep() -> None:
    a11 = A01.replace("ADT^A01^ADT_A01", "ADT^A11^ADT_A09").replace("|INSERT|", "|CANCEL|")
    result = mapped(a11)
    visit, movement = (e["resource"] for e in result.bundle["entry"][1:3])
    assert visit["status"] == "cancelled"
    assert movement["status"] == "entered-in-error"  # kept and marked, not deleted
    assert bundle_errors(result.bundle) == []


def test_identity_feed_without_visit_gives_only_the_patient() -> None:
    a28 = "\r".join(seg for seg in A01.split("\r") if not seg.startswith(("PV1", "ZBE"))).replace(
        "ADT^A01^ADT_A01", "ADT^A28^ADT_A05"
    )
    result = mapped(a28)
    assert [e["resource"]["resourceType"] for e in result.bundle["entry"]] == ["Patient"]


def test_zoneless_times_are_read_in_paris_time_with_daylight_saving() -> None:
    summer = A01.replace("|20261123101500||INSERT|", "|20260715101500||INSERT|")
    movement = mapped(summer).bundle["entry"][2]["resource"]
    assert movement["period"]["start"] == "2026-07-15T10:15:00+02:00"


def test_an_event_without_mapping_is_unsupported() -> None:
    with pytest.raises(UnsupportedMessage):
        mapped(A01.replace("ADT^A01^ADT_A01", "ADT^A44^ADT_A43"))


@pytest.mark.parametrize(
    ("text", "key", "line", "reason"),
    [
        (
            "name: x\nevents: [ADT^A01]\nresources:\n  - key: p\n    type: Patient\n    rulez: []\n",
            "rulez",
            4,
            "unknown key",
        ),
        (
            "name: x\nevents: [ADT^A01]\nresources:\n  - key: p\n    type: Patient\n    rules:\n"
            "      - {set: gender, from: PID-8, map: nope}\n",
            "map",
            7,
            "no concept map",
        ),
        (
            "name: x\nevents: [ADT^A01]\nresources:\n  - key: p\n    type: Patient\n    rules:\n"
            "      - {set: gender, fn: nope}\n",
            "fn",
            7,
            "no function",
        ),
        (
            "name: x\nevents: [ADT^A01]\nresources:\n  - key: p\n    type: Patient\n    rules:\n"
            "      - {set: gender, from: PID8}\n",
            "from",
            7,
            "ER7 path",
        ),
        (
            "name: x\nevents: [ADT^A01]\nresources:\n  - key: p\n    type: Patient\n    rules:\n"
            "      - {set: subject, ref: visit}\n",
            "ref",
            7,
            "no resource",
        ),
    ],
    ids=["unknown-key", "unknown-concept-map", "unknown-function", "bad-path", "bad-ref"],
)
def test_a_bad_mapping_file_is_refused_with_file_key_and_line(
    tmp_path: Path, text: str, key: str, line: int, reason: str
) -> None:
    (tmp_path / "conceptmaps").mkdir()
    (tmp_path / "conceptmaps" / "maps.yaml").write_text("g: {F: female}\n")
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        Library.load(tmp_path, catalog.available())
    err = info.value
    assert err.file == str(tmp_path / "bad.yaml")
    assert (err.key, err.line) == (key, line)
    assert reason in err.reason


names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=20)


@settings(max_examples=60, deadline=None)
@given(
    family=names,
    given_name=names,
    ipp=st.from_regex(r"[0-9A-Z]{1,12}", fullmatch=True),
    birth=st.dates(min_value=date(1900, 1, 1)).map(lambda d: d.strftime("%Y%m%d")),
)
def test_any_patient_identity_maps_to_valid_fhir_and_reads_back(
    family: str, given_name: str, ipp: str, birth: str
) -> None:
    name = f"{escape(family)}^{escape(given_name)}^^^^^L"
    pid = f"PID|||{ipp}^^^CHU-EST&1.2.250.1.71.4.2.2.4455&ISO^PI||{name}||{birth}|M"
    text = A01.split("\r")[0] + "\r" + pid + "\r"
    result = mapped(text.replace("ADT^A01^ADT_A01", "ADT^A28^ADT_A05"))
    patient = result.bundle["entry"][0]["resource"]
    assert patient["identifier"][0]["value"] == ipp
    if family.strip():
        assert patient["name"][0]["family"] == family
    assert patient["birthDate"] == f"{birth[:4]}-{birth[4:6]}-{birth[6:]}"
    assert bundle_errors(result.bundle) == []


def test_zfa_and_zfd_are_kept_whole_not_dropped() -> None:
    zfa = segment("ZFA", {1: "ACTIF", 9: "IO", 11: "INC"})  # DMP status, feeding and consultation consents
    zfd = segment(
        "ZFD", {4: "N", 5: "CN", 6: "20261120"}
    )  # birth date corrected?, collection mode, INSi date
    text = A01.replace("ZXY|1|", f"{zfa}\r{zfd}\rZXY|1|")
    result = mapped(text)
    patient = result.bundle["entry"][0]["resource"]
    kept = {e["url"]: e["extension"] for e in patient["extension"] if e["url"].startswith("urn:passerelle:")}
    assert kept["urn:passerelle:hl7v2-segment:ZFA"] == [
        {"url": "ZFA-1", "valueString": "ACTIF"},
        {"url": "ZFA-9", "valueString": "IO"},
        {"url": "ZFA-11", "valueString": "INC"},
    ]
    assert kept["urn:passerelle:hl7v2-segment:ZFD"] == [
        {"url": "ZFD-4", "valueString": "N"},
        {"url": "ZFD-5", "valueString": "CN"},
        {"url": "ZFD-6", "valueString": "20261120"},
    ]
    assert not any(u.startswith(("ZFA", "ZFD")) for u in result.unmapped)
    assert bundle_errors(result.bundle) == []


def identity_event(event: str, mrg: str) -> str:
    lines = [seg for seg in A01.split("\r") if seg.startswith(("MSH", "EVN", "PID"))]
    lines[0] = lines[0].replace("ADT^A01^ADT_A01", event)
    return "\r".join([*lines, f"MRG|{mrg}"]) + "\r"


def test_a40_merge_links_both_records_and_keeps_the_merged_one() -> None:
    result = mapped(identity_event("ADT^A40^ADT_A39", "440011^^^CHU-EST&1.2.250.1.71.4.2.2.4455&ISO^PI"))
    assert bundle_errors(result.bundle) == []
    survivor, merged = normalized(result)["entry"]
    assert survivor["resource"]["link"] == [{"other": {"reference": "urn:uuid:1"}, "type": "replaces"}]
    assert merged["resource"]["active"] is False
    assert merged["resource"]["link"] == [{"other": {"reference": "urn:uuid:0"}, "type": "replaced-by"}]
    # merged, not replaced: the merged record keeps what it held, the survivor its demographics
    assert merged["request"] == {
        "method": "PUT",
        "url": "Patient?identifier=urn:oid:1.2.250.1.71.4.2.2.4455|440011",
        "extension": MERGE,
    }
    assert survivor["request"]["extension"] == MERGE
    assert not any(u.startswith("MRG") for u in result.unmapped)


def test_a40_without_a_record_to_merge_creates_no_patient() -> None:
    result = mapped(identity_event("ADT^A40^ADT_A39", ""))
    (survivor,) = result.bundle["entry"]
    assert "link" not in survivor["resource"]
    assert survivor["resource"].get("active", True) is True


def test_a40_naming_the_merged_record_by_its_ins_alone_is_refused() -> None:
    """Merging "whoever holds this INS" into the survivor would be a guess at identity."""
    ins = "282032123456789^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.8&ISO^INS"
    with pytest.raises(ValidationError) as info:
        mapped(identity_event("ADT^A40^ADT_A39", ins))
    assert info.value.location == "MRG-1"
    # with a local identifier beside it, the merge goes by that one; the INS is reported
    result = mapped(
        identity_event("ADT^A40^ADT_A39", f"440011^^^CHU-EST&1.2.250.1.71.4.2.2.4455&ISO^PI~{ins}")
    )
    merged = result.bundle["entry"][1]
    assert merged["request"]["url"] == "Patient?identifier=urn:oid:1.2.250.1.71.4.2.2.4455|440011"
    assert all("213.1.4.8" not in i["system"] for i in merged["resource"]["identifier"])
    assert any("merged record's INS" in w for w in result.warnings)
    assert any(u.startswith("MRG-1[2]") for u in result.unmapped)


@pytest.mark.parametrize("statuses", ["PROV~VALI", "~DOUB~VALI"])
def test_the_ins_travels_only_when_the_status_carried_is_vali(statuses: str) -> None:
    """Several PID-32 codes: the one the extension carries decides, not any VALI further on."""
    result = mapped(A01.replace("|VALI\r", f"|{statuses}\r"))
    patient = result.bundle["entry"][0]["resource"]
    assert all("INS" not in str(i.get("type")) for i in patient["identifier"])
    (reliability,) = (e for e in patient["extension"] if e["url"].endswith("identity-reliability"))
    assert reliability["extension"][0]["valueCoding"]["code"] == statuses.strip("~").split("~")[0]


def test_a47_finds_the_patient_by_its_former_identifier() -> None:
    result = mapped(identity_event("ADT^A47^ADT_A30", "998877^^^CHU-EST&1.2.250.1.71.4.2.2.4455&ISO^PI"))
    assert bundle_errors(result.bundle) == []
    (entry,) = result.bundle["entry"]
    # found by the old IPP (or the new one, should it be known already), now carrying the new one
    # from PID-3; found by both as two different Patients is a merge, refused by the repository
    assert entry["request"] == {
        "method": "PUT",
        "url": f"Patient?identifier={OID}|998877,{OID}|552233",
        "extension": MERGE,
    }
    assert entry["resource"]["identifier"][0]["value"] == "552233"
    # the criteria carry the old identifier's system and value only: its type and its
    # authority's name are reported, not counted as kept
    assert [u for u in result.unmapped if u.startswith("MRG")] == [
        "MRG-1[1].4.1",
        "MRG-1[1].4.3",
        "MRG-1[1].5",
    ]


def test_validation_verdicts_are_stable_across_calls() -> None:
    good = {
        "resourceType": "Bundle",
        "entry": [{"resource": {"resourceType": "Encounter", "status": "planned", "class": {"code": "AMB"}}}],
    }
    bad = {
        "resourceType": "Bundle",
        "entry": [{"resource": {"resourceType": "Encounter", "status": "planned"}}],
    }
    for _ in range(2):  # no state carried between calls changes a verdict
        assert bundle_errors(good) == []
        assert bundle_errors(bad) == ["Bundle.entry[0].resource.class: Field required"]


def test_the_ins_profile_is_claimed_only_with_what_it_requires() -> None:
    """fr-core-patient-ins when the INS travels (VALI) with the birth given names (PID-5.3 of the L
    name); without them the Patient stays fr-core-patient and the message says why."""
    ins_profile = "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-patient-ins"
    patient = mapped(A01).bundle["entry"][0]["resource"]
    assert ins_profile in patient["meta"]["profile"]
    assert [f for f in default_registry().validate(patient) if f.is_error] == []
    without = mapped(A01.replace("GÉRARD^Zoé^Zoé Marie^^Mme^^L", "GÉRARD^Zoé^^^Mme^^L"))
    assert ins_profile not in without.bundle["entry"][0]["resource"]["meta"]["profile"]
    assert any("fr-core-patient-ins not claimed" in w for w in without.warnings)
    prov = mapped(A01.replace("|VALI\r", "|PROV\r"))
    assert ins_profile not in prov.bundle["entry"][0]["resource"]["meta"]["profile"]
