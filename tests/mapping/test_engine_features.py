"""Engine features the feeds rely on: one repetition (PV1-7[1]), a resource's scope, groups, several
conditions, merged duplicates, a stable id for Binary, and the FR Core release the output targets."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.core.errors import ConfigError
from gateway.hl7.er7 import Message
from gateway.mapping import catalog
from gateway.mapping.engine import Library
from gateway.mapping.validate import bundle_errors
from tests.mapping.test_adt import A01, LIB, segment


def library(tmp_path: Path, text: str) -> Library:
    (tmp_path / "conceptmaps").mkdir(exist_ok=True)
    (tmp_path / "conceptmaps" / "maps.yaml").write_text("g: {F: female}\n")
    (tmp_path / "feed.yaml").write_text(text)
    return Library.load(tmp_path, catalog.available())


def test_identity_statuses_follow_the_fr_core_release() -> None:
    # FICT (fictitious identity) is a code of table 0445 in FR Core 2.2.0, not in 2.1.0
    text = A01.replace("|VALI\r", "|FICT\r").replace("^^^ASIP-SANTE-INS-NIR", "^^^ASIP-SANTE-X")
    old = LIB.map(Message.parse(text), fr_core_version="2.1.0")
    new = LIB.map(Message.parse(text), fr_core_version="2.2.0")
    urls = [e["url"] for e in old.bundle["entry"][0]["resource"].get("extension", [])]
    assert "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-identity-reliability" not in urls
    assert any("FICT not carried by the FR Core 2.1.0" in w for w in old.warnings)
    (status,) = (
        e
        for e in new.bundle["entry"][0]["resource"]["extension"]
        if e["url"].endswith("identity-reliability")
    )
    assert status["extension"][0]["valueCoding"]["code"] == "FICT"
    assert bundle_errors(new.bundle) == []


def test_extra_identity_codes_are_reported() -> None:
    result = LIB.map(Message.parse(A01.replace("|VALI\r", "|VALI~HOMD\r")))
    assert any("PID-32: HOMD not carried" in w for w in result.warnings)


def test_the_step_refuses_an_unknown_fr_core_release(tmp_path: Path) -> None:
    from gateway.engine.steps import FhirMapping

    assert FhirMapping.CONFIG_SCHEMA["properties"]["fr_core_version"] == {"enum": ["2.1.0", "2.2.0"]}
    step = FhirMapping(
        "m", {"directory": str(Path(__file__).parents[2] / "mappings"), "fr_core_version": "2.2.0"}
    )
    assert step.fr_core_version == "2.2.0"


FEED = """
name: feed
events: [ADT^A01]
groups: [OBR]
resources:
  - key: doctor
    type: Practitioner
    identity: identifier
    scope: "PV1-7[1]"
    when: [{from: ".1", present: true}, {from: ".13", in: [RPPS]}]
    rules:
      - {set: "identifier[0].system", const: "https://rpps.esante.gouv.fr"}
      - {set: "identifier[0].value", from: ".1"}
  - key: same_doctor
    type: Practitioner
    identity: identifier
    scope: "PV1-17[1]"
    rules:
      - {set: "identifier[0].system", const: "https://rpps.esante.gouv.fr"}
      - {set: "identifier[0].value", from: ".1"}
  - key: visit
    type: Encounter
    rules:
      - {set: status, const: planned}
      - {set: class.code, const: IMP}
      - {set: "participant[0].individual", ref: doctor}
      - {set: "participant[1].individual", ref: same_doctor}
"""


def test_scope_conditions_and_merged_duplicates(tmp_path: Path) -> None:
    lib = library(tmp_path, FEED)
    xcn = "10003456789^DUPRÉ^Hélène^^^^^^^^^^RPPS"
    pv1 = segment("PV1", {2: "I", 7: f"{xcn}~999^X", 17: xcn})
    msg = Message.parse(f"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|1|P|2.5\r{pv1}\r")
    result = lib.map(msg)
    entries = result.bundle["entry"]
    # the same doctor twice: one entry, and both references lead to it
    assert [e["request"]["url"] for e in entries] == [
        "Practitioner?identifier=https://rpps.esante.gouv.fr|10003456789",
        "Encounter",
    ]
    kept = entries[0]["fullUrl"]
    assert entries[1]["resource"]["participant"] == [
        {"individual": {"reference": kept}},
        {"individual": {"reference": kept}},
    ]
    assert result.warnings == ["PV1-7: only repetition 1 is mapped; 1 more in the unmapped report"]
    # a condition of the list fails (ADELI, not RPPS): no resource, the reference goes with it
    other = lib.map(Message.parse(msg.to_er7().replace("^RPPS~", "^ADELI~", 1)))
    assert [e["request"]["url"] for e in other.bundle["entry"]] == [
        "Practitioner?identifier=https://rpps.esante.gouv.fr|10003456789",
        "Encounter",
    ]
    assert len(other.bundle["entry"][1]["resource"]["participant"]) == 1


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("name: x\nevents: [ADT^A01]\nresources:\n  - {key: p, type: Patient, scope: PID-3.1}\n", "scope"),
        ("name: x\nevents: [ADT^A01]\ngroups: [obr]\nresources: []\n", "groups"),
    ],
)
def test_bad_scope_or_groups_are_refused(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        library(tmp_path, text)
    assert info.value.key == key


def test_a_library_error_is_reported_by_type_never_by_its_text() -> None:
    from gateway.mapping.engine import RuleError, rule_failure

    # int("DUPONT") would say "invalid literal for int() with base 10: 'DUPONT'": patient data
    with pytest.raises(ValueError, match="DUPONT") as info:
        int("DUPONT")
    assert rule_failure(info.value) == "ValueError"
    assert rule_failure(RuleError("bad ER7 path 'PID-'")) == "bad ER7 path 'PID-'"
