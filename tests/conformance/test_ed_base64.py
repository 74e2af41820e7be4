"""HL7-ED-001: base64 in OBX-5 of type ED (encoding Base64).

Canonical base64 passes; decodable but not canonical (whitespace, missing '=' padding) is a
warning; anything else is an error. The finding names the place (``OBX[3]-5.5``), never the data.
"""

from __future__ import annotations

import base64
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.hl7v2.base64check import ALPHABET, WHITESPACE, base64_issue
from conformance.hl7v2.validator import validate_hl7

RULE = "HL7-ED-001"
DOC = base64.b64encode(b"<ClinicalDocument>compte rendu</ClinicalDocument>").decode()


def message(third_obx_value: str, *, value_type: str = "ED") -> str:
    """A CI-SIS ORU^R01 whose third OBX carries ``third_obx_value`` as OBX-5."""
    lines = [
        "MSH|^~\\&|SIL|LABO|PFI|HOSP|20260105093000||ORU^R01^ORU_R01|MSG0002|P|2.5|||||FRA|UNICODE UTF-8"
        "|||2.1^CISIS_CDA_HL7_V2",
        "PID|||1234^^^HOSP&1.2.250.1.71.4.2.2.1234&ISO^PI||DUPONT^ANNE^^^^^L||19800101|F",
        "PV1|1|N",
        "ORC|NW",
        "OBR|1|||11502-2^CR d'examens biologiques^LN",
        f"OBX|1|ED|11502-2^CR d'examens biologiques^LN||^TEXT^XML^Base64^{DOC}||||||F",
        "PRT||UC||SB^^participation|801234567890^MARTIN^PAUL",
        "OBX|2|CWE|MASQUE_PS^Masqué aux professionnels de Santé^MetaDMPMSS||N||||||F",
        f"OBX|3|{value_type}|CORPSMAIL_PS^Corps du mail pour un PS^MetaDMPMSS||{third_obx_value}||||||F",
    ]
    return "\r".join(lines) + "\r"


def ed(data: str, encoding: str = "Base64") -> str:
    return f"^TEXT^^{encoding}^{data}"


def ed_findings(text: str) -> list[tuple[str, str, str]]:
    return [(f.rule, f.severity.value, f.location) for f in validate_hl7(text) if f.rule == RULE]


def test_canonical_base64_passes() -> None:
    assert ed_findings(message(ed(DOC))) == []
    assert [f for f in validate_hl7(message(ed(DOC))) if f.is_error] == []


def test_a_broken_base64_is_an_error_at_its_place_without_the_data() -> None:
    data = "Q2hlciBjb25mcsOocmUs!!IHZvdXM="
    findings = [f for f in validate_hl7(message(ed(data))) if f.rule == RULE]
    assert [(f.severity.value, f.location) for f in findings] == [("error", "OBX[3]-5.5")]
    assert data not in findings[0].message and "Q2hl" not in findings[0].message


def test_a_truncated_base64_is_an_error() -> None:
    # Cut by its last three characters ("A==" of "...A=="), 70 bytes' encoding leaves 4k+1 characters:
    # the last holds 6 bits, no decoder makes a byte of it.
    full = base64.b64encode(bytes(range(65, 65 + 70))).decode()
    assert full.endswith("==") and len(full[:-3]) % 4 == 1
    assert ed_findings(message(ed(full[:-3]))) == [(RULE, "error", "OBX[3]-5.5")]
    assert ed_findings(message(ed(full[:-2]))) == [(RULE, "warning", "OBX[3]-5.5")]  # only the padding cut


@pytest.mark.parametrize(
    "data",
    [
        "QUJDRA",  # "ABCD" without its "=="
        "QUJD RA==",  # a space inside
        "QUJD\\.br\\RA==",  # an escaped line break inside
        "QUJD\\X0A\\RA==",  # the same as a hex escape
    ],
)
def test_missing_padding_or_whitespace_is_a_warning(data: str) -> None:
    assert ed_findings(message(ed(data))) == [(RULE, "warning", "OBX[3]-5.5")]


@pytest.mark.parametrize(
    "data",
    [
        "QUJDRA=",  # incomplete padding: a warning
        "QR==",  # non-zero unused bits: decodable, not canonical
    ],
)
def test_other_decodable_forms_are_warnings(data: str) -> None:
    assert ed_findings(message(ed(data))) == [(RULE, "warning", "OBX[3]-5.5")]


@pytest.mark.parametrize(
    "data",
    [
        "QUJD-RA==",  # the URL-safe alphabet is not base64's
        "QU=JDRA==",  # '=' before the end
        "QUJDRA===",  # more padding than needed
        "QUJDR",  # a lone final character
        "QUJDRA\\F\\",  # an escaped field separator
        "QUJD&RA==",  # a subcomponent separator
        "QUJD^RA==",  # a component separator: data past ED-5
    ],
)
def test_what_no_decoder_reads_is_an_error(data: str) -> None:
    assert ed_findings(message(ed(data))) == [(RULE, "error", "OBX[3]-5.5")]


def test_a_second_repetition_is_located() -> None:
    value = ed(DOC) + "~" + ed("not*base64")
    assert ed_findings(message(value)) == [(RULE, "error", "OBX[3]-5[2].5")]


def test_the_first_obx_has_no_occurrence_in_its_location() -> None:
    text = message(ed(DOC)).replace(f"^Base64^{DOC}|", "^Base64^QUJD RA==|", 1)
    assert ed_findings(text) == [(RULE, "warning", "OBX-5.5")]


def test_other_encodings_and_types_are_not_base64() -> None:
    assert ed_findings(message(ed("plain text, not base64", encoding="A"))) == []
    assert ed_findings(message("not*base64", value_type="ST")) == []
    assert ed_findings(message(ed("not*base64", encoding="base64"))) == [(RULE, "error", "OBX[3]-5.5")]


def test_both_modes_check_it() -> None:
    assert [
        (f.rule, f.location) for f in validate_hl7(message(ed("a*b")), profile="v2.5") if f.rule == RULE
    ] == [(RULE, "OBX[3]-5.5")]


# -- properties ---------------------------------------------------------------------------------


def _oracle(text: str) -> str | None:
    """None (canonical), "warning" (decodable, not canonical) or "error", by other means."""
    compact = re.sub(f"[{re.escape(WHITESPACE)}]", "", text)
    m = re.fullmatch(r"([A-Za-z0-9+/]*)(=*)", compact)
    if m is None:
        return "error"
    body, pad = m.groups()
    needed = -len(body) % 4
    if len(body) % 4 == 1 or len(pad) > needed:
        return "error"
    decoded = base64.b64decode(body + "=" * needed)
    return None if base64.b64encode(decoded).decode() == text else "warning"


@settings(max_examples=400, deadline=None)
@given(
    data=st.binary(max_size=64),
    strip_padding=st.booleans(),
    spaces=st.lists(st.tuples(st.integers(min_value=0), st.sampled_from(list(WHITESPACE))), max_size=3),
)
def test_any_bytes_encoded_with_or_without_padding_and_whitespace(
    data: bytes, strip_padding: bool, spaces: list[tuple[int, str]]
) -> None:
    text = base64.b64encode(data).decode()
    padded = text.endswith("=")
    if strip_padding:
        text = text.rstrip("=")
    for at, char in spaces:
        cut = at % (len(text) + 1)
        text = text[:cut] + char + text[cut:]
    issue = base64_issue(text)
    non_canonical = (strip_padding and padded) or bool(spaces)
    assert (issue is None) == (not non_canonical)
    if issue is not None:
        assert issue[0] == "warning"  # encoded bytes are always decodable
    # the validator says the same, at the same place, for the same text sent in an ER7 message
    escaped = text.replace("\n", "\\X0A\\").replace("\r", "\\X0D\\")
    found = ed_findings(message(ed(escaped)))
    assert found == ([] if issue is None else [(RULE, issue[0], "OBX[3]-5.5")])


_TEXT = st.text(alphabet=st.sampled_from([*ALPHABET[:6], *ALPHABET[-4:], "=", " ", "\n", "-", "_", "é", "*"]))


@settings(max_examples=500, deadline=None)
@given(text=st.one_of(_TEXT, st.text(max_size=40)))
def test_any_text_never_raises_and_is_classified(text: str) -> None:
    issue = base64_issue(text)
    assert (issue[0] if issue else None) == _oracle(text)
    if issue is not None:
        assert len(text) < 8 or text not in issue[1]  # the defect is named, the data never shown
