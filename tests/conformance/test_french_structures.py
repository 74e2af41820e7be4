"""The French message structures (conformance/hl7v2/french_structures.json) in the HL7v2 validator.

CI-SIS "Transmission de documents CDA en HL7v2" (and its LPS companion): ORU^R01 in v2.5 and
MDM^T02/T04/T10 in v2.6, each with PRT pre-adopted from v2.9 right after the OBX that carries
the document. Messages written here, not taken from the ANS corpus (test_ans_corpus_validation.py).
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest

from conformance.hl7v2 import french
from conformance.hl7v2.structure import Node
from conformance.hl7v2.validator import validate_hl7

CISIS = "2.1^CISIS_CDA_HL7_V2"
DOC = "^TEXT^XML^Base64^PENsaW5pY2FsRG9jdW1lbnQvPg=="  # <ClinicalDocument/>
PID = "PID|||1234^^^HOSP&1.2.250.1.71.4.2.2.1234&ISO^PI||DUPONT^ANNE^^^^^L||19800101|F"
PV1 = "PV1|1|N"
PRT_SENDER = (
    "PRT||UC||SB^^participation|801234567890^MARTIN^PAUL^^^^^^ASIP-SANTE-PS&1.2.250.1.71.4.2.1&ISO^D^^^IDNPS"
)
PRT_MAIL = "PRT||UC||RCT^^participation|||||||||||^^X.400^destinataire@test.mssante.fr"
META = (
    "OBX|{n}|CWE|MASQUE_PS^Masqué aux professionnels de Santé^MetaDMPMSS||N^^expandedYes-NoIndicator||||||F"
)


def msh(kind: str, version: str, profile: str | None) -> str:
    fields = ["MSH", "^~\\&", "SIL", "LABO", "PFI", "HOSP", "20260105093000", "", kind, "MSG0001", "P"]
    fields += [version, "", "", "", "", "FRA", "UNICODE UTF-8", "", ""]
    if profile is not None:
        fields.append(profile)
    return "|".join(fields)


def oru(profile: str | None = CISIS, *, order: list[str] | None = None) -> str:
    body = order or [
        "OBX|1|ED|11502-2^CR d'examens biologiques^LN||" + DOC + "||||||F",
        PRT_SENDER,
        PRT_MAIL,
        META.format(n=2),
    ]
    lines = [
        msh("ORU^R01^ORU_R01", "2.5", profile),
        PID,
        PV1,
        "ORC|NW",
        "OBR|1|||11502-2^CR d'examens biologiques^LN",
        *body,
    ]
    return "\r".join(lines) + "\r"


def mdm(kind: str = "MDM^T02^MDM_T02", profile: str | None = CISIS, *, pid: str = PID) -> str:
    lines = [
        msh(kind, "2.6", profile),
        "EVN||20260105093000",
        pid,
        PV1,
        "TXA|1|11502-2|TEXT|20260105092000||||||||1.2.250.1.71.4.2.2.1234.42|||||AU",
        "OBX|1|ED|11502-2^CR d'examens biologiques^LN||" + DOC + "||||||F",
        PRT_SENDER,
        PRT_MAIL,
        META.format(n=2),
    ]
    return "\r".join(lines) + "\r"


def errors(text: str, profile: str = "pam-fr") -> set[tuple[str, str]]:
    return {(f.rule, f.location) for f in validate_hl7(text, profile=profile) if f.is_error}


# -- the French structures accept what the specifications define -------------------------------


def test_a_cisis_oru_with_prt_after_the_document_obx_conforms() -> None:
    assert errors(oru()) == set()


@pytest.mark.parametrize("kind", ["MDM^T02^MDM_T02", "MDM^T04^MDM_T02", "MDM^T10^MDM_T02"])
def test_a_cisis_mdm_with_prt_after_the_document_obx_conforms(kind: str) -> None:
    assert errors(mdm(kind)) == set()


@pytest.mark.parametrize("profile", ["1.2^CISIS_CDA_HL7_V1", "2.0^CISIS_CDA_HL7_V2", "1.1^CISIS_CDA_HL7_LPS"])
def test_each_cisis_profile_gets_the_mdm_structure(profile: str) -> None:
    assert errors(mdm(profile=profile)) == set()


def test_the_profile_namespace_is_read_without_surrounding_spaces() -> None:
    # The volet's own MSH example writes "2.1^ CISIS_CDA_HL7_V2".
    assert errors(oru("2.1^ CISIS_CDA_HL7_V2")) == set()


def test_an_mdm_without_msh93_is_found_by_its_type() -> None:
    # MDM^T10 alone: v2.5 has no MDM_T10 structure; the French table maps T10 to MDM_T02.
    assert errors(mdm("MDM^T10")) == set()


def test_a_message_without_msh21_is_found_by_its_type() -> None:
    assert errors(oru(profile=None)) == set()
    assert errors(mdm(profile=None)) == set()


def test_mdm_segments_follow_v26() -> None:
    # PID-38 (production class code) repeats in v2.6, not in v2.5.
    pid = PID + "|" * (38 - 8) + "A~B"
    assert pid.split("|")[38] == "A~B"
    assert errors(mdm(pid=pid)) == set()
    assert ("HL7-FLD-002", "PID-38") in errors(mdm(pid=pid), profile="v2.5")


# -- what they still refuse -------------------------------------------------------------------


def test_a_prt_before_the_obx_is_out_of_place() -> None:
    order = [PRT_SENDER, "OBX|1|ED|11502-2^CR^LN||" + DOC + "||||||F", META.format(n=2)]
    assert ("HL7-SEG-002", "PRT") in errors(oru(order=order))


def test_a_prt_field_rule_applies() -> None:
    # PRT-4 (role of participation) is required; PRT had no field rules before (v2.5 has no PRT).
    text = oru().replace(PRT_SENDER, "PRT||UC|||801234567890^MARTIN^PAUL")
    assert errors(text) == {("HL7-FLD-001", "PRT-4")}


def test_another_profile_in_msh21_keeps_v25() -> None:
    assert ("HL7-SEG-002", "PRT") in errors(oru("LAB-3^IHE"))


def test_the_lps_profile_has_no_oru() -> None:
    assert ("HL7-SEG-002", "PRT") in errors(oru("1.1^CISIS_CDA_HL7_LPS"))


def test_the_v25_mode_keeps_v25() -> None:
    assert ("HL7-SEG-002", "PRT") in errors(oru(), profile="v2.5")
    assert ("HL7-SEG-002", "PRT") in errors(mdm(), profile="v2.5")


def test_pam_fr_adt_is_not_loosened() -> None:
    adt = "\r".join(
        [
            msh("ADT^A28^ADT_A05", "2.5^FRA^2.11", "2.11^IHE_FRANCE-2.11-PAM"),
            "EVN||20260105093000",
            PID,
            PRT_SENDER,
            PV1,
        ]
    )
    assert ("HL7-SEG-002", "PRT") in errors(adt)


# -- the table ----------------------------------------------------------------------------------


def _group(nodes: tuple[Node, ...], name: str) -> Node | None:
    for node in nodes:
        if node.name == name:
            return node
        found = _group(node.children, name)
        if found is not None:
            return found
    return None


@pytest.mark.parametrize("name", sorted(french.table().by_structure))
def test_each_entry_builds_with_its_segments_where_the_source_puts_them(name: str) -> None:
    entry = french.table().by_structure[name]
    assert entry.source and entry.profiles and entry.types
    for extra in entry.inserts:
        group = _group(entry.nodes, extra.group)
        assert group is not None
        names = [c.name for c in group.children]
        assert names[names.index(extra.after) + 1] == extra.segment


def test_the_table_agrees_with_hl7apy_where_a_later_version_has_prt() -> None:
    # hl7apy's v2.7+ ORU_R01 has PRT right after the OBSERVATION's OBX, where the CI-SIS puts it;
    # v2.5, v2.5.1 and v2.6 have none, and no hl7apy version has PRT in MDM_T02 (hence the table).
    def observation(version: str, structure: str, group: str) -> list[str]:
        module = importlib.import_module(f"hl7apy.v{version}.messages")
        found: list[str] = []

        def walk(children: Any) -> None:
            for name, sub, _card, kind in children:
                if kind == "GRP":
                    if name == group:
                        found.extend(c[0] for c in sub[1])
                    walk(sub[1])

        walk(module.MESSAGES[structure][1])
        return found

    for version in ("2_7", "2_8", "2_8_2"):
        names = observation(version, "ORU_R01", "ORU_R01_OBSERVATION")
        assert names[names.index("OBX") + 1] == "PRT"
    for version in ("2_5", "2_5_1", "2_6"):
        assert "PRT" not in observation(version, "ORU_R01", "ORU_R01_OBSERVATION")
    for version in ("2_5", "2_6", "2_7", "2_8", "2_8_2"):
        assert "PRT" not in observation(version, "MDM_T02", "MDM_T02_OBSERVATION")
    entry = french.table().by_structure["ORU_R01"]
    assert [(i.group, i.after, i.segment) for i in entry.inserts] == [("ORU_R01_OBSERVATION", "OBX", "PRT")]
