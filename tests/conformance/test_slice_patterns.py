"""Slices' fixed and pattern values (FHIR-FIXED-001, FHIR-PATTERN-001) on the INS identifiers.

fr-core-patient-ins (profiles/, as FR Core's FRCorePatientINSProfile) fixes, per INS slice, the
system (the OID), the type (fr-core-cs-v2-0203 code) and for INS-NIA the use: INS-NIR …1.4.8,
INS-NIA …1.4.9 (use temp), INS-NIR-TEST …1.4.10, INS-NIR-DEMO …1.4.11. An identifier whose
OID is a slice's but whose type is another's is an error naming that slice and element.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from conformance.fhir.registry import Registry, default_registry
from conformance.suite import DATA_DIR

CS = "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0203"
OID = "urn:oid:1.2.250.1.213.1.4."
PATIENT_INS = orjson.loads((DATA_DIR / "fhir" / "patient-ins.json").read_bytes())
# (slice, OID suffix, type code, use)
SLICES = [
    ("INS-NIR", "8", "INS-NIR", "official"),
    ("INS-NIA", "9", "INS-NIA", "temp"),
    ("INS-NIR-TEST", "10", "INS-NIR-TEST", "official"),
    ("INS-NIR-DEMO", "11", "INS-NIR-DEMO", "official"),
]
WRONG = [(s, oid, other, use) for s, oid, _, use in SLICES for _, _, other, _ in SLICES if other != s]


def patient(oid: str, code: str | None, use: str) -> dict[str, Any]:
    resource: dict[str, Any] = copy.deepcopy(PATIENT_INS)
    identifier: dict[str, Any] = {"use": use, "system": OID + oid, "value": "275042512345642"}
    if code is not None:
        identifier["type"] = {"coding": [{"system": CS, "code": code}]}
    resource["identifier"][0] = identifier
    return resource


def errors(resource: dict[str, Any], registry: Registry | None = None) -> list[tuple[str, str, str]]:
    found = (registry or default_registry()).validate(resource)
    return [(f.rule, f.location, f.message) for f in found if f.is_error]


def test_the_shipped_profile_fixes_what_fr_core_fixes() -> None:
    ins = default_registry().profile("fr-core-patient-ins")
    assert ins is not None
    identifier = ins.root.children["identifier"]
    for name, oid, code, use in SLICES:
        sub = identifier.slices[name]
        assert sub.children["system"].fixed == OID + oid
        assert sub.children["type"].pattern == {"coding": [{"system": CS, "code": code}]}
        if name != "INS-NIR":  # INS-NIR's use is bound to a value set (official, old), not fixed
            assert sub.children["use"].fixed == use


@pytest.mark.parametrize(("name", "oid", "code", "use"), SLICES, ids=[s[0] for s in SLICES])
def test_each_ins_oid_typed_rightly_passes(name: str, oid: str, code: str, use: str) -> None:
    assert errors(patient(oid, code, use)) == []


@pytest.mark.parametrize(("name", "oid", "code", "use"), WRONG, ids=[f"{w[0]}-typed-{w[2]}" for w in WRONG])
def test_each_ins_oid_typed_wrongly_is_an_error_naming_the_slice(
    name: str, oid: str, code: str, use: str
) -> None:
    found = errors(patient(oid, code, use))
    assert [(rule, where) for rule, where, _ in found] == [("FHIR-PATTERN-001", "Patient.identifier[0].type")]
    assert found[0][2].startswith(f"Patient.identifier:{name}.type:")


@pytest.mark.parametrize(("name", "oid", "code", "use"), SLICES, ids=[s[0] for s in SLICES])
def test_an_ins_oid_without_a_type_is_an_error_naming_the_slice(
    name: str, oid: str, code: str, use: str
) -> None:
    found = errors(patient(oid, None, use))
    assert [(rule, where) for rule, where, _ in found] == [("FHIR-CARD-001", "Patient.identifier[0].type")]
    assert found[0][2].startswith(f"Patient.identifier:{name}.type:")


def test_a_fixed_use_is_enforced_on_the_slice() -> None:
    found = errors(patient("9", "INS-NIA", "usual"))
    assert ("FHIR-FIXED-001", "Patient.identifier[0].use") in {(r, w) for r, w, _ in found}
    assert any(m.startswith("Patient.identifier:INS-NIA.use:") for _, _, m in found)


def test_an_identifier_of_no_slice_stays_free_under_open_slicing() -> None:
    resource = copy.deepcopy(PATIENT_INS)
    resource["identifier"].append({"system": "urn:oid:1.2.250.1.71.4.2.2.9999", "value": "X1"})
    assert errors(resource) == []


def test_a_pattern_identifier_on_the_slice_fixes_its_discriminator(tmp_path: Path) -> None:
    # The discriminator's value given by a patternIdentifier on the slice itself, not on .system
    sd = {
        "resourceType": "StructureDefinition",
        "id": "pattern-ids",
        "url": "https://example.org/pattern-ids",
        "type": "Patient",
        "baseDefinition": "http://hl7.org/fhir/StructureDefinition/Patient",
        "differential": {
            "element": [
                {
                    "id": "Patient.identifier",
                    "path": "Patient.identifier",
                    "slicing": {"discriminator": [{"type": "value", "path": "system"}], "rules": "open"},
                },
                {
                    "id": "Patient.identifier:ndp",
                    "path": "Patient.identifier",
                    "sliceName": "ndp",
                    "patternIdentifier": {
                        "system": "urn:oid:1.2.250.1.176.1.2",
                        "type": {"coding": [{"system": CS, "code": "NDP"}]},
                    },
                },
            ]
        },
    }
    (tmp_path / "StructureDefinition-pattern-ids.json").write_text(json.dumps(sd))
    registry = Registry(tmp_path)
    typed: dict[str, Any] = {"system": "urn:oid:1.2.250.1.176.1.2", "value": "123"}
    resource: dict[str, Any] = {"resourceType": "Patient", "identifier": [typed]}
    typed["type"] = {"coding": [{"system": CS, "code": "NDP"}]}
    assert registry.validate(resource, ["pattern-ids"]) == []
    typed["type"] = {"coding": [{"system": CS, "code": "INS-NIR"}]}
    found = [(f.rule, f.location, f.message) for f in registry.validate(resource, ["pattern-ids"])]
    assert [(r, w) for r, w, _ in found] == [("FHIR-PATTERN-001", "Patient.identifier[0]")]
    assert found[0][2].startswith("Patient.identifier:ndp:")
