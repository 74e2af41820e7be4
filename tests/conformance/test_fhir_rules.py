"""FHIR profile rules: for each, a conforming resource and a broken one, with the exact rule and location."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.fhir.fhirpath import compile_fast
from conformance.fhir.registry import Registry, default_registry, reference_fhirpath
from conformance.findings import operation_outcome
from conformance.mhd import _Doc, build_iti65
from conformance.suite import DATA_DIR

FR = "https://hl7.fr/ig/fhir/core/StructureDefinition/"
PATIENT_INS = orjson.loads((DATA_DIR / "fhir" / "patient-ins.json").read_bytes())
PATIENT_ID = {"system": "urn:oid:1.2.250.1.213.1.4.10", "value": "282032123456789"}

ENCOUNTER = {
    "resourceType": "Encounter",
    "meta": {"profile": [FR + "fr-core-encounter"]},
    "identifier": [
        {
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "VN"}]},
            "system": "urn:oid:1.2.250.1.71.4.2.2.1234",
            "value": "V2026000500",
        }
    ],
    "status": "in-progress",
    "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
    "subject": {"reference": "Patient/pat-ins-1"},
    "period": {"start": "2026-11-23T10:15:00+01:00"},
}
PRACTITIONER = {
    "resourceType": "Practitioner",
    "meta": {"profile": [FR + "fr-core-practitioner"]},
    "identifier": [
        {
            "type": {
                "coding": [
                    {"system": "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0203", "code": "IDNPS"}
                ]
            },
            "system": "urn:oid:1.2.250.1.71.4.2.1",
            "value": "810000000001",
        },
        {"system": "https://rpps.esante.gouv.fr", "value": "10000000001"},
    ],
}
ORGANIZATION = {
    "resourceType": "Organization",
    "meta": {"profile": [FR + "fr-core-organization"]},
    "identifier": [
        {
            "type": {
                "coding": [
                    {"system": "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0203", "code": "IDNST"}
                ]
            },
            "system": "urn:oid:1.2.250.1.71.4.2.2",
            "value": "1210000001",
        },
        {"system": "https://finess.esante.gouv.fr", "value": "210000001"},
    ],
    "name": "Hôpital Nord",
}


def bundle() -> dict[str, Any]:
    return build_iti65(PATIENT_ID, _Doc("doc1"))


Change = Callable[[dict[str, Any]], None]


def _set(path: list[Any], value: Any) -> Change:
    def change(r: dict[str, Any]) -> None:
        node: Any = r
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return change


def _del(path: list[Any]) -> Change:
    def change(r: dict[str, Any]) -> None:
        node: Any = r
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return change


BASES: dict[str, Callable[[], dict[str, Any]]] = {
    "patient": lambda: copy.deepcopy(PATIENT_INS),
    "encounter": lambda: copy.deepcopy(ENCOUNTER),
    "practitioner": lambda: copy.deepcopy(PRACTITIONER),
    "organization": lambda: copy.deepcopy(ORGANIZATION),
    "bundle": bundle,
    "list": lambda: bundle()["entry"][0]["resource"],
}

# (base, change, rule, location)
BROKEN: list[tuple[str, Change, str, str]] = [
    ("patient", _del(["birthDate"]), "FHIR-CARD-001", "Patient.birthDate"),
    ("patient", _del(["extension", 1]), "FHIR-CARD-001", "Patient.extension"),
    ("patient", _del(["name", 0, "extension"]), "FHIR-CARD-001", "Patient.name[0].extension"),
    ("patient", _set(["name", 0, "given"], ["Françoise", "Marie"]), "FHIR-CARD-001", "Patient.name[0].given"),
    (
        "patient",
        _set(["extension", 0, "extension", 1, "valueDate"], "15/01/2026"),
        "FHIR-TYPE-001",
        "Patient.extension[0].extension[1].valueDate",
    ),
    (
        "patient",
        _set(["extension", 0, "extension", 1], {"url": "validationDate", "valueString": "x"}),
        "FHIR-TYPE-001",
        "Patient.extension[0].extension[1].valueString",
    ),
    ("patient", _set(["identifier", 0, "use"], "usual"), "fr-core-1", "Patient"),
    ("patient", _set(["identifier", 1, "use"], "official"), "fr-core-2", "Patient"),
    ("list", _set(["code", "coding", 0, "code"], "folder"), "FHIR-PATTERN-001", "List.code"),
    ("list", _set(["mode"], "snapshot"), "FHIR-FIXED-001", "List.mode"),
    (
        "patient",
        _set(["identifier", 0, "value"], "27504251234564"),
        "pas-ins-value",
        "Patient.identifier[0].value",
    ),
    ("patient", _set(["gender"], "other"), "FHIR-BIND-001", "Patient.gender"),
    (
        "patient",
        _set(["extension", 0, "extension", 0, "valueCoding", "code"], "OK"),
        "FHIR-BIND-001",
        "Patient.extension[0].extension[0].valueCoding",
    ),
    (
        "patient",
        _set(["extension", 1, "valueAddress", "extension", 0, "valueCoding", "code"], "2500"),
        "pas-insee-1",
        "Patient.extension[1].valueAddress.extension[0].valueCoding",
    ),
    ("patient", _set(["identifier", 1, "use"], "secondary"), "FHIR-FIXED-001", "Patient.identifier[1].use"),
    ("encounter", _del(["period"]), "FHIR-CARD-001", "Encounter.period"),
    ("encounter", _set(["period", "end"], "2026-11-22T10:15:00+01:00"), "pas-enc-1", "Encounter.period"),
    (
        "practitioner",
        _set(["identifier", 0], dict(PRACTITIONER["identifier"][1])),
        "FHIR-CARD-001",
        "Practitioner.identifier",
    ),
    (
        "practitioner",
        _set(["identifier", 1, "value"], "1234"),
        "pas-rpps-1",
        "Practitioner.identifier[1].value",
    ),
    (
        "organization",
        _set(["identifier", 0, "value"], "9210000001"),
        "pas-idnst-1",
        "Organization.identifier[0].value",
    ),
    (
        "organization",
        _set(["identifier", 1, "value"], "21"),
        "pas-finess-1",
        "Organization.identifier[1].value",
    ),
    ("bundle", _set(["type"], "batch"), "FHIR-FIXED-001", "Bundle.type"),
    ("bundle", _del(["entry", 0]), "FHIR-CARD-001", "Bundle.entry"),
    ("bundle", _del(["entry", 2, "request"]), "pdsm-bdl-1", "Bundle"),
    (
        "bundle",
        _del(["entry", 1, "resource", "custodian"]),
        "FHIR-CARD-001",
        "Bundle.entry[1].resource.custodian",
    ),
    (
        "bundle",
        _set(["entry", 1, "resource", "content", 0, "attachment", "hash"], "abcd"),
        "pdsm-hash-1",
        "Bundle.entry[1].resource.content[0].attachment.hash",
    ),
    (
        "bundle",
        _del(["entry", 1, "resource", "context", "period", "start"]),
        "FHIR-CARD-001",
        "Bundle.entry[1].resource.context.period.start",
    ),
    (
        "bundle",
        _set(["entry", 1, "resource", "status"], "entered-in-error"),
        "FHIR-BIND-001",
        "Bundle.entry[1].resource.status",
    ),
    (
        "bundle",
        _set(["entry", 0, "resource", "code", "coding", 0, "code"], "folder"),
        "FHIR-CARD-001",
        "Bundle.entry",
    ),
    (
        "bundle",
        _del(["entry", 0, "resource", "extension", 1]),
        "FHIR-CARD-001",
        "Bundle.entry[0].resource.extension",
    ),
]


def found(resource: dict[str, Any], *profiles: str) -> set[tuple[str, str]]:
    return {(f.rule, f.location) for f in default_registry().validate(resource, profiles) if f.is_error}


@pytest.mark.parametrize("name", sorted(BASES))
def test_conforming_examples_pass(name: str) -> None:
    assert found(BASES[name]()) == set()


@pytest.mark.parametrize(
    ("base", "change", "rule", "location"), BROKEN, ids=[f"{b[2]}@{b[3]}" for b in BROKEN]
)
def test_each_rule_is_reported_with_its_location(base: str, change: Change, rule: str, location: str) -> None:
    resource = BASES[base]()
    change(resource)
    assert (rule, location) in found(resource)


def test_extensible_binding_is_a_warning(tmp_path: Path) -> None:
    sd = json.loads((Path("profiles") / "StructureDefinition-fr-core-encounter.json").read_text())
    sd["id"], sd["url"] = "local-encounter", "https://example.org/local-encounter"
    sd["differential"]["element"].append(
        {
            "id": "Encounter.status",
            "path": "Encounter.status",
            "binding": {"strength": "extensible", "valueSet": "urn:passerelle:valueset:pdsm-document-status"},
        }
    )
    for name in ("ValueSet-pdsm-document-status.json",):
        (tmp_path / name).write_text((Path("profiles") / name).read_text())
    (tmp_path / "StructureDefinition-local-encounter.json").write_text(json.dumps(sd))
    registry = Registry(tmp_path)  # a new SD dropped into a directory is a new profile
    findings = registry.validate(copy.deepcopy(ENCOUNTER), ["local-encounter"])
    assert [(f.rule, f.severity.value, f.location) for f in findings] == [
        ("FHIR-BIND-002", "warning", "Encounter.status")
    ]


def test_closed_slicing_and_base_model_and_unknown_profile(tmp_path: Path) -> None:
    sd = {
        "resourceType": "StructureDefinition",
        "id": "closed-ids",
        "url": "https://example.org/closed-ids",
        "type": "Practitioner",
        "baseDefinition": "http://hl7.org/fhir/StructureDefinition/Practitioner",
        "differential": {
            "element": [
                {
                    "id": "Practitioner.identifier",
                    "path": "Practitioner.identifier",
                    "slicing": {"discriminator": [{"type": "value", "path": "system"}], "rules": "closed"},
                },
                {
                    "id": "Practitioner.identifier:rpps",
                    "path": "Practitioner.identifier",
                    "sliceName": "rpps",
                },
                {
                    "id": "Practitioner.identifier:rpps.system",
                    "path": "Practitioner.identifier.system",
                    "fixedUri": "https://rpps.esante.gouv.fr",
                },
            ]
        },
    }
    (tmp_path / "StructureDefinition-closed-ids.json").write_text(json.dumps(sd))
    registry = Registry(tmp_path)
    practitioner = copy.deepcopy(PRACTITIONER)
    del practitioner["meta"]
    assert ("FHIR-SLICE-001", "Practitioner.identifier[0]") in {
        (f.rule, f.location) for f in registry.validate(practitioner, ["closed-ids"])
    }
    practitioner["birthDate"] = "23/11/1970"
    assert "FHIR-BASE-001" in {f.rule for f in registry.validate(practitioner)}
    practitioner["meta"] = {"profile": ["https://example.org/unknown"]}
    assert ("FHIR-PROFILE-001", "warning") in {
        (f.rule, f.severity.value) for f in registry.validate(practitioner)
    }


def test_operation_outcome_carries_severity_code_expression_and_rule() -> None:
    resource = copy.deepcopy(PATIENT_INS)
    del resource["birthDate"]
    outcome = operation_outcome(default_registry().validate(resource))
    issue = outcome["issue"][0]
    assert outcome["resourceType"] == "OperationOutcome"
    assert issue["severity"] == "error" and issue["code"] == "required"
    assert issue["expression"] == ["Patient.birthDate"]
    assert issue["details"]["coding"][0]["code"] == "FHIR-CARD-001"
    assert operation_outcome([])["issue"][0]["severity"] == "information"


INVARIANTS = [
    c["expression"]
    for path in sorted(Path("profiles").glob("StructureDefinition-*.json"))
    for e in json.loads(path.read_text())["differential"]["element"]
    for c in e.get("constraint", [])
]
idents = st.fixed_dictionaries(
    {},
    optional={
        "use": st.sampled_from(["official", "usual", "temp", "old"]),
        "system": st.sampled_from(
            [
                "urn:oid:1.2.250.1.213.1.4.8",
                "urn:oid:1.2.250.1.213.1.4.9",
                "urn:oid:1.2.250.1.213.1.4.10",
                "x",
            ]
        ),
        "value": st.from_regex(r"[0-9AB]{0,16}", fullmatch=True),
    },
)
patients = st.fixed_dictionaries(
    {"resourceType": st.just("Patient")},
    optional={
        "identifier": st.lists(idents, max_size=3),
        "extension": st.lists(
            st.builds(
                lambda code: {
                    "url": FR + "fr-core-identity-reliability",
                    "extension": [{"url": "identityStatus", "valueCoding": {"code": code}}],
                },
                st.sampled_from(["VALI", "PROV", "QUAL"]),
            ),
            max_size=1,
        ),
    },
)


@settings(max_examples=100, deadline=None)
@given(
    patients,
    st.sampled_from([x for x in INVARIANTS if x.startswith(("(extension", "identifier"))]),
)
def test_compiled_fhirpath_agrees_with_fhirpathpy(patient: dict[str, Any], expression: str) -> None:
    assert compile_fast(expression)(patient, None) == reference_fhirpath(expression)(patient, {})


@settings(max_examples=100, deadline=None)
@given(
    st.text(max_size=20),
    st.sampled_from([x for x in INVARIANTS if x.startswith(("matches", "length"))]),
)
def test_compiled_string_invariants_agree_with_fhirpathpy(value: str, expression: str) -> None:
    assert compile_fast(expression)(value, None) == reference_fhirpath(expression)(value, {})
