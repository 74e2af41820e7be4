"""The independent leaf checker (tests/hl7_leaves.py): its leaf enumeration, paths and evidence rules."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hl7_leaves import (
    Evidence,
    Leaf,
    conceptmap_codes,
    fhir_date_prefix,
    leaves,
    read,
    silent_leaves,
    unescape,
    unknown_paths,
)

HEADER = "MSH|^~\\&|APP|FAC^1.2.250.1.71.4.2.2.1^ISO|GW|GHT|20240306111154||ADT^A01^ADT_A01|C1|P|2.5"


def message(*segments: str, header: str = HEADER, end: str = "\r") -> bytes:
    return end.join([header, *segments]).encode() + end.encode()


def paths(raw: bytes, *, exempt: bool = False) -> list[str]:
    return [leaf.path for leaf in leaves(raw) if leaf.exempt == exempt]


def by_path(raw: bytes) -> dict[str, Leaf]:
    return {leaf.path: leaf for leaf in leaves(raw)}


# -- paths ----------------------------------------------------------------------------------


def test_paths_show_repetition_always_and_components_only_when_split() -> None:
    raw = message(
        "PID|1||123^^^HOSP&1.2.250.1&ISO^PI~456||DOE^JOHN||19800101|F|||^^PARIS^^75007||0102030405^PRN^PH",
    )
    assert paths(raw) == [
        "PID-1[1]",
        "PID-3[1].1",
        "PID-3[1].4.1",
        "PID-3[1].4.2",
        "PID-3[1].4.3",
        "PID-3[1].5",
        "PID-3[2]",
        "PID-5[1].1",
        "PID-5[1].2",
        "PID-7[1]",
        "PID-8[1]",
        "PID-11[1].3",
        "PID-11[1].5",
        "PID-13[1].1",
        "PID-13[1].2",
        "PID-13[1].3",
    ]


def test_segment_occurrence_is_shown_from_the_second_of_a_name() -> None:
    raw = message("OBX|1|ST|A||x", "NTE|1||note", "OBX|2|ST|B||y^z", "OBX|3|ST|C||w")
    got = paths(raw)
    assert got[:4] == ["OBX-1[1]", "OBX-2[1]", "OBX-3[1]", "OBX-5[1]"]
    assert "NTE-3[1]" in got
    assert [p for p in got if p.startswith(("OBX[2]-5", "OBX[3]-5"))] == [
        "OBX[2]-5[1].1",
        "OBX[2]-5[1].2",
        "OBX[3]-5[1]",
    ]


def test_a_trailing_separator_still_splits_the_repetition() -> None:
    # "abc^" has two components, so the leaf is .1; "x&" two subcomponents.
    raw = message("ZXY|abc^|x&^y")
    assert paths(raw) == ["ZXY-1[1].1", "ZXY-2[1].1.1", "ZXY-2[1].2"]


def test_a_shown_subcomponent_always_comes_with_its_component() -> None:
    assert paths(message("ZXY|a&b")) == ["ZXY-1[1].1.1", "ZXY-1[1].1.2"]


def test_whitespace_only_and_empty_pieces_are_no_leaves() -> None:
    raw = message("ZXY|  |^ ^|~~|a~ ~b")
    assert paths(raw) == ["ZXY-4[1]", "ZXY-4[3]"]


def test_leaf_keeps_raw_text_and_stripped_value() -> None:
    leaf = by_path(message("ZXY| padded "))["ZXY-1[1]"]
    assert (leaf.raw, leaf.value) == (" padded ", "padded")
    assert (leaf.segment, leaf.occurrence, leaf.field, leaf.repetition) == ("ZXY", 1, 1, 1)
    assert (leaf.component, leaf.subcomponent) == (None, None)


def test_previous_leaf_is_the_previous_subcomponent_or_component() -> None:
    leaf = by_path(message("PID|||1^^^A&1.2.3&ISO^PI~9^^^^ISO"))
    assert leaf["PID-3[1].4.3"].previous_path == "PID-3[1].4.2"
    assert leaf["PID-3[1].4.1"].previous_path is None
    assert leaf["PID-3[2].5"].previous_path == "PID-3[2].4"
    assert leaf["PID-3[1].1"].previous_path is None


# -- MSH ------------------------------------------------------------------------------------


def test_msh_1_and_2_are_never_leaves_and_header_fields_are_exempt() -> None:
    header = (
        "MSH|^~\\&|APP|FAC|GW|GHT|20240306111154|SECRET|ADT^A01^ADT_A01|C1|P|2.5|42|CONT|AL|NE|FRA"
        "|8859/15|FR|ALT|2.1^PROFILE"
    )
    raw = message(header=header)
    assert paths(raw, exempt=True) == [
        "MSH-3[1]",
        "MSH-4[1]",
        "MSH-5[1]",
        "MSH-6[1]",
        "MSH-7[1]",
        "MSH-9[1].1",
        "MSH-9[1].2",
        "MSH-9[1].3",
        "MSH-10[1]",
        "MSH-11[1]",
        "MSH-12[1]",
        "MSH-15[1]",
        "MSH-16[1]",
        "MSH-17[1]",
        "MSH-18[1]",
        "MSH-21[1].1",
        "MSH-21[1].2",
    ]
    assert paths(raw) == ["MSH-8[1]", "MSH-13[1]", "MSH-14[1]", "MSH-19[1]", "MSH-20[1]"]


def test_header_is_read_with_its_own_encoding_characters() -> None:
    raw = b"MSH#!*$@#APP#FAC!1.2.3#\rZXY#a!b*c@d#x$S$y\r"
    assert paths(raw) == ["ZXY-1[1].1", "ZXY-1[1].2", "ZXY-1[2].1.1", "ZXY-1[2].1.2", "ZXY-2[1]"]
    assert by_path(raw)["ZXY-2[1]"].value == "x!y"


def test_a_typographic_tilde_in_msh_2_is_taken_as_written() -> None:
    raw = message("PID|||1˜2", header="MSH|^˜\\&|APP|FAC|||20240306||ORU^R01|015|P|2.5")
    msg = read(raw)
    assert msg.separators.repetition == "˜"
    assert paths(raw) == ["PID-3[1]", "PID-3[2]"]


def test_truncation_character_is_no_separator() -> None:
    raw = message("ZXY|a#b^\\P\\", header="MSH|^~\\&#|APP|FAC|||20240306||ADT^A01|1|P|2.7")
    assert [(leaf.path, leaf.value) for leaf in leaves(raw) if not leaf.exempt] == [
        ("ZXY-1[1].1", "a#b"),
        ("ZXY-1[1].2", "#"),
    ]


# -- escapes, framing, charsets ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("A\\F\\B\\S\\C\\T\\D\\R\\E\\E\\", "A|B^C&D~E\\"),
        ("\\H\\bold\\N\\ text", "bold text"),
        ("line1\\.br\\line2", "line1\nline2"),
        ("x\\.sp\\y\\.in+2\\z\\.ce\\", "xyz"),
        ("\\X41C3A9\\", "Aé"),
        ("\\XC3\\", "\\XC3\\"),  # not UTF-8 on its own: kept
        ("\\Cxx\\\\Z12\\k", "\\Cxx\\k"),
        ("C:\\temp\\x", "C:\\temp\\x"),  # not a known sequence: verbatim
        ("lone \\ escape", "lone \\ escape"),
    ],
)
def test_unescape_resolves_basic_drops_formatting_keeps_the_rest(raw: str, value: str) -> None:
    assert unescape(raw, read(message()).separators) == value


def test_escaped_separators_do_not_split_leaves() -> None:
    raw = message("ZXY|a\\S\\b\\R\\c\\T\\d\\F\\e")
    (leaf,) = (leaf for leaf in leaves(raw) if not leaf.exempt)
    assert (leaf.path, leaf.raw, leaf.value) == ("ZXY-1[1]", "a\\S\\b\\R\\c\\T\\d\\F\\e", "a^b~c&d|e")


def test_a_leaf_of_formatting_only_is_non_empty_with_an_empty_value() -> None:
    leaf = by_path(message("ZXY|\\.br\\"))["ZXY-1[1]"]
    assert leaf.value == ""


@pytest.mark.parametrize("end", ["\r", "\n", "\r\n"])
def test_segment_terminators_and_bom_give_the_same_leaves(end: str) -> None:
    segments = ("PID|||1^^^A^PI||DOE", "", "ZXY|x")
    plain = message(*segments)
    assert leaves(b"\xef\xbb\xbf" + message(*segments, end=end)) == leaves(plain)


@pytest.mark.parametrize(
    ("charset", "encoding", "text"),
    [
        ("UNICODE UTF-8", "utf-8", "Zoé €"),
        ("8859/1", "latin-1", "Zoé ¤"),
        ("8859/15", "iso8859_15", "Zoé €"),
        ("", "utf-8", "Zoé €"),
        ("", "latin-1", "Zoé ¤"),
    ],
)
def test_bytes_are_decoded_by_msh_18(charset: str, encoding: str, text: str) -> None:
    header = f"MSH|^~\\&|APP|FAC|||20240306||ADT^A01|1|P|2.5|||||FRA|{charset}"
    raw = f"{header}\rZXY|{text}\r".encode(encoding)
    assert by_path(raw)["ZXY-1[1]"].value == text


def test_hex_escapes_decode_in_the_message_charset() -> None:
    header = "MSH|^~\\&|APP|FAC|||20240306||ADT^A01|1|P|2.5|||||FRA|8859/15"
    assert by_path(f"{header}\rZXY|\\XA4\\\r".encode("latin-1"))["ZXY-1[1]"].value == "€"


def test_a_message_without_msh_is_refused() -> None:
    with pytest.raises(ValueError, match="MSH"):
        leaves(b"PID|||1\r")


def test_reads_single_positions_for_acks() -> None:
    msg = read(
        b"MSH|^~\\&|GW|GHT|APP|FAC|20240306||ACK^A01^ACK|A1|P|2.5\rMSA|AR|C\\F\\1\rERR||MSH^1^2|102^x^HL70357|E\r"
    )
    assert msg.value("MSA", 2) == "C|1"
    assert msg.raw("MSH", 2) == "^~\\&"
    assert msg.value("ERR", 2, comp=3) == "2"
    assert msg.value("ERR", 3) == "102"
    assert msg.value("ERR", 9) == ""
    assert msg.value("ERR", 2, occurrence=2) == ""


# -- unknown paths ------------------------------------------------------------------------------


def test_unknown_paths_are_those_that_name_no_non_empty_leaf() -> None:
    raw = message("PID|||1^^^A^PI||DOE^JOHN|| ", "OBX|1|ST", "OBX|2|ST|X||v")
    report = [
        "PID-5[1].2",
        "PID-5",
        "PID-5[1]",
        "PID-8[1]",
        "OBX[2]-5[1]",
        "OBX-5[1]",
        "MSH-2[1]",
        "MSH-10[1]",
    ]
    assert unknown_paths(raw, report) == ["PID-5", "PID-5[1]", "PID-8[1]", "OBX-5[1]", "MSH-2[1]"]


# -- evidence -----------------------------------------------------------------------------------

BIRTHPLACE = "http://hl7.org/fhir/StructureDefinition/patient-birthPlace"


def bundle(*resources: dict[str, Any], request: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": r, "request": request or {"method": "POST", "url": r["resourceType"]}}
            for r in resources
        ],
    }


def silent(segment: str, resource: dict[str, Any], unmapped: tuple[str, ...] = (), **kw: Any) -> list[str]:
    return [leaf.path for leaf in silent_leaves(message(segment), bundle(resource, **kw), unmapped)]


def test_header_leaves_are_never_silent() -> None:
    assert silent("ZXY", {"resourceType": "Basic"}) == []


def test_rule_text_equal_or_at_token_boundaries_case_sensitive() -> None:
    resource = {"resourceType": "Patient", "name": [{"family": "DOE", "text": "Dr John DOE-SMITH, 3e"}]}
    assert silent("ZXY|DOE|John|SMITH|3e|Jo|ohn|john|DOE-SMITH, 3|doe", resource) == [
        "ZXY-5[1]",
        "ZXY-6[1]",
        "ZXY-7[1]",
        "ZXY-8[1]",
        "ZXY-9[1]",
    ]


def test_rule_text_compares_the_unescaped_value() -> None:
    resource = {"resourceType": "Patient", "address": [{"line": ["3 rue A & fils"]}]}
    assert silent("ZXY|3 rue A \\T\\ fils|\\H\\fils\\N\\", resource) == []


def test_rule_text_ignores_json_keys() -> None:
    assert silent("ZXY|family", {"resourceType": "Patient", "name": [{"family": "X"}]}) == ["ZXY-1[1]"]


def test_rule_number_equal_to_a_json_number() -> None:
    resource = {"resourceType": "Observation", "valueQuantity": {"value": 7.50, "unit": "x"}, "x": 12}
    assert silent("ZXY|7.5|+12|7.500|8|1.0.0", resource) == ["ZXY-4[1]", "ZXY-5[1]"]


def test_rule_number_is_not_fooled_by_booleans() -> None:
    assert silent("ZXY|1", {"resourceType": "Patient", "active": True}) == ["ZXY-1[1]"]


@pytest.mark.parametrize(
    ("hl7", "fhir"),
    [
        ("2024", "2024"),
        ("202403", "2024-03"),
        ("20240306", "2024-03-06"),
        ("2024030611", "2024-03-06T11"),
        ("202403061107", "2024-03-06T11:07"),
        ("20240306110754", "2024-03-06T11:07:54"),
        ("20240306110754.1234+0215", "2024-03-06T11:07:54"),
        ("202403061107-0500", "2024-03-06T11:07"),
        ("2024030", None),
        ("20240306T1107", None),
    ],
)
def test_fhir_form_of_hl7_dates(hl7: str, fhir: str | None) -> None:
    assert fhir_date_prefix(hl7) == fhir


def test_rule_date_is_a_prefix_of_a_json_string() -> None:
    resource = {"resourceType": "Encounter", "period": {"start": "2024-03-06T11:07:54+01:00"}, "x": "2023-01"}
    assert silent("ZXY|20240306110754.12+0100|202403061107|20230101|20240307", resource) == [
        "ZXY-3[1]",
        "ZXY-4[1]",
    ]


def test_rule_code_through_a_concept_map_target() -> None:
    # a code of the repository's own maps, with a text target
    source, target = next(
        (s, t) for s, targets in sorted(conceptmap_codes().items()) for t in targets if isinstance(t, str)
    )
    assert silent(f"ZXY|{source}", {"resourceType": "Patient", "gender": target}) == []
    assert silent(f"ZXY|{source}", {"resourceType": "Basic", "code": {"text": "zzz"}}) == ["ZXY-1[1]"]


def test_rule_hl7_table_name_through_its_code_system() -> None:
    coding = {"system": "http://terminology.hl7.org/CodeSystem/v2-0127", "code": "DA"}
    resource = {"resourceType": "AllergyIntolerance", "code": {"coding": [coding]}}
    # the table named, its code system written; another table, or a name that is no table, is not
    assert silent("ZXY|HL70127|HL70128|HL7127", resource) == ["ZXY-2[1]", "ZXY-3[1]"]


def test_conceptmap_codes_read_plain_and_wrapped_maps(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "gender:\n  F: female\n  N: {system: 'http://x', code: unknown}\n  01: one\n"
        "wrapped:\n  system: http://y\n  map:\n    Y: 'yes'\n    F: final\n"
        "flags:\n  J: true\n  NO: false\n  '00': 'true'\n",
        "utf-8",
    )
    (tmp_path / "notes.txt").write_text("ignored", "utf-8")
    assert conceptmap_codes(tmp_path) == {
        "F": frozenset({"female", "final"}),
        "N": frozenset({"unknown"}),
        "01": frozenset({"one"}),
        "Y": frozenset({"yes"}),
        "J": frozenset({True}),
        "NO": frozenset({False}),
        "00": frozenset({"true"}),
    }


def test_rule_code_with_a_boolean_target_needs_a_json_boolean(tmp_path: Path) -> None:
    (tmp_path / "flags.yaml").write_text("yes-no:\n  Y: true\n  N: false\n", "utf-8")
    codes = conceptmap_codes(tmp_path)
    evidence = Evidence({"resourceType": "Patient", "deceasedBoolean": False, "x": "true"}, codes)
    raw = message("PID|N|Y")
    by = {leaf.path: leaf for leaf in leaves(raw)}
    assert evidence.carried(by["PID-1[1]"], by)
    assert not evidence.carried(by["PID-2[1]"], by)


def test_repository_concept_maps_are_read() -> None:
    codes = conceptmap_codes()
    assert codes
    assert all(
        isinstance(k, str) and v and all(isinstance(t, str | bool) for t in v) for k, v in codes.items()
    )


def test_rule_qualifier_follows_the_leaf_before_it() -> None:
    resource = {"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.250.1", "value": "123"}]}
    assert silent("PID|||123^^^HOSP&1.2.250.1&ISO^PI", resource, ("PID-3[1].4.1", "PID-3[1].5")) == []
    # the OID is reported, not carried: its qualifier must be reported too
    assert silent("PID|||123^^^HOSP&1.2.250.9&ISO", resource, ("PID-3[1].4.1", "PID-3[1].4.2")) == [
        "PID-3[1].4.3"
    ]
    # component level (EI): the previous component
    assert silent("ZBE|123^HOSP^1.2.250.1^ISO", resource, ("ZBE-1[1].2",)) == []
    assert silent("ZBE|123^HOSP^^ISO", resource, ("ZBE-1[1].2",)) == ["ZBE-1[1].4"]
    # a qualifier first in its component has nothing before it
    assert silent("ZXY|ISO&x", resource, ("ZXY-1[1].1.2",)) == ["ZXY-1[1].1.1"]


def test_rule_birthplace_address_type() -> None:
    segment = "PID|||||||||||^^PARIS^^^^BDL"
    with_ext = {
        "resourceType": "Patient",
        "address": [{"city": "PARIS"}],
        "extension": [{"url": BIRTHPLACE, "valueAddress": {"city": "PARIS"}}],
    }
    without = {"resourceType": "Patient", "address": [{"city": "PARIS"}]}
    assert silent(segment, with_ext) == []
    assert silent(segment, without) == ["PID-11[1].7"]
    assert silent("ZXY|BDL", with_ext) == ["ZXY-1[1]"]  # BDL as an address type only


def test_rule_explicit_null_needs_the_clear_request_extension() -> None:
    resource = {"resourceType": "Patient", "telecom": [{"value": '""'}]}
    clear = {"method": "PUT", "url": "Patient?identifier=s|1", "extension": [{"url": "urn:passerelle:clear"}]}
    assert silent('PID|||||||||||||""', resource, request=clear) == []
    assert silent('PID|||||||||||||""', resource) == ["PID-13[1]"]
    resource_ext = {"resourceType": "Patient", "extension": [{"url": "urn:passerelle:clear"}]}
    assert silent('PID|||||||||||||""', resource_ext) == ["PID-13[1]"]  # on the request only


def test_reported_leaves_are_not_silent_and_formatting_only_leaves_must_be_reported() -> None:
    resource = {"resourceType": "Basic"}
    assert silent("ZXY|a|\\.br\\", resource) == ["ZXY-1[1]", "ZXY-2[1]"]
    assert silent("ZXY|a|\\.br\\", resource, ("ZXY-1[1]", "ZXY-2[1]")) == []
    # the report matches exact paths only: a field does not cover its leaves
    assert silent("ZXY|a^b", resource, ("ZXY-1", "ZXY-1[1]")) == ["ZXY-1[1].1", "ZXY-1[1].2"]


def test_evidence_text_search_finds_values_in_long_strings() -> None:
    blob = "QUJD" * 50_000 + "+A/"
    evidence = Evidence({"resourceType": "Binary", "data": blob}, codes={})
    assert evidence.text_found("A")  # between '+' and '/'
    assert not evidence.text_found("QUJE")


# -- round trip of random leaf trees ----------------------------------------------------------------

# ASCII punctuation a sender may use as separators (never '.', letters, digits or spaces).
SEPARATOR_POOL = "|^~\\&#!$%*+/:;=?@"
NAMES = ("PID", "OBX", "NTE", "ZXY", "PV1")
EXEMPT = {3, 4, 5, 6, 7, 9, 10, 11, 12, 15, 16, 17, 18, 21}
TEXT = st.text(st.sampled_from("ab Zé09 \t\n" + SEPARATOR_POOL), max_size=6)
Tree = list[list[list[list[str]]]]  # fields → repetitions → components → subcomponents


@dataclass(frozen=True)
class Seps:
    field: str
    component: str
    repetition: str
    escape: str
    subcomponent: str

    def escaped(self, text: str) -> str:
        e = self.escape
        names = {
            e: "E",
            self.field: "F",
            self.component: "S",
            self.subcomponent: "T",
            self.repetition: "R",
        }
        out = []
        for char in text:
            if char in names:
                out.append(f"{e}{names[char]}{e}")
            elif char == "\n":
                out.append(f"{e}.br{e}")
            else:
                out.append(char)
        return "".join(out)


@st.composite
def separators(draw: st.DrawFn) -> Seps:
    return Seps(*draw(st.lists(st.sampled_from(SEPARATOR_POOL), min_size=5, max_size=5, unique=True)))


def trees(max_fields: int) -> st.SearchStrategy[Tree]:
    subs = st.lists(TEXT, min_size=1, max_size=3)
    comps = st.lists(subs, min_size=1, max_size=3)
    reps = st.lists(comps, min_size=1, max_size=3)
    return st.lists(reps, max_size=max_fields)


def render(tree: Tree, seps: Seps) -> list[str]:
    return [
        seps.repetition.join(
            seps.component.join(seps.subcomponent.join(seps.escaped(t) for t in comp) for comp in rep)
            for rep in field
        )
        for field in tree
    ]


def expected(name: str, occurrence: int, first: int, tree: Tree, seps: Seps) -> list[tuple[str, str, str]]:
    prefix = name + (f"[{occurrence}]" if occurrence > 1 else "")
    out = []
    for n, field in enumerate(tree, first):
        for r, rep in enumerate(field, 1):
            for c, comp in enumerate(rep, 1):
                for s, text in enumerate(comp, 1):
                    raw = seps.escaped(text)
                    if raw.strip():
                        path = f"{prefix}-{n}[{r}]"
                        if len(rep) > 1 or len(comp) > 1:
                            path += f".{c}"
                        if len(comp) > 1:
                            path += f".{s}"
                        out.append((path, raw, text.strip()))
    return out


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seps=separators(),
    header=trees(6),
    body=st.lists(st.tuples(st.sampled_from(NAMES), trees(5)), max_size=6),
    end=st.sampled_from(["\r", "\n", "\r\n"]),
)
def test_enumerator_gives_back_every_non_empty_leaf_of_a_random_message(
    seps: Seps, header: Tree, body: list[tuple[str, Tree]], end: str
) -> None:
    enc = seps.component + seps.repetition + seps.escape + seps.subcomponent
    lines = [seps.field.join(["MSH", enc, *render(header, seps)])]
    want = expected("MSH", 1, 3, header, seps)
    counts: dict[str, int] = {}
    for name, tree in body:
        counts[name] = counts.get(name, 0) + 1
        lines.append(seps.field.join([name, *render(tree, seps)]))
        want += expected(name, counts[name], 1, tree, seps)
    raw = (end.join(lines) + end).encode()
    assert [(leaf.path, leaf.raw, leaf.value) for leaf in leaves(raw)] == want
    exempt = {leaf.path for leaf in leaves(raw) if leaf.exempt}
    assert exempt == {p for p, _, _ in want if p.startswith("MSH-") and int(p[4:].split("[")[0]) in EXEMPT}
    assert unknown_paths(raw, [p for p, _, _ in want]) == []
