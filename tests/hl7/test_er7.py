"""The ER7 codec: separators, escapes, parsing, paths, building and serializing.

Every message here is written for these tests; all patients are fictional.
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest

from gateway.core.errors import EncodingError, ParseError
from gateway.hl7 import er7
from gateway.hl7 import path as hl7_path
from gateway.hl7.er7 import DEFAULT_SEPARATORS, Message, Separators, escape, unescape

MSH = (
    "MSH|^~\\&|GAM|CHU_FICTIF|PASSERELLE|CHU_FICTIF|20240315103000||ADT^A01^ADT_A01|MSG0001|P"
    "|2.5^FRA^2.10|||AL|NE|FRA|UNICODE UTF-8|FRA"
)
SEGMENTS = [
    MSH,
    "EVN||20240315103000|||DUPONT^Dupont^Jean",
    "PID|||123456^^^CHU_FICTIF&1.2.250.1.999.1&ISO^PI~284077512345678^^^INS-NIR&1.2.250.1.213.1.4.8&ISO^INS"
    "||LEFÈVRE^Françoise^^^Mme^^L~MARTIN^Françoise^^^^^D||19840715|F|||12 rue des Écoles^^Besançon^^25000",
    "PV1||I|CARDIO^101^1^CHU_FICTIF",
    "OBX|1|NM|TAILLE||165|cm",
    "OBX|2|NM|POIDS||58|kg",
    "OBX|3|TX|COMMENTAIRE||Patiente \\T\\ famille \\F\\ \\E\\ ok\\.br\\ligne 2",
    "ZBE|MVT0001^CHU_FICTIF|20240315103000||INSERT|N",
]
TEXT = "\r".join(SEGMENTS) + "\r"


@pytest.fixture
def msg() -> Message:
    return Message.parse(TEXT)


# -- separators --------------------------------------------------------------


def test_default_separators() -> None:
    assert Separators("|", "^", "~", "\\", "&") == DEFAULT_SEPARATORS
    assert DEFAULT_SEPARATORS.encoding_characters == "^~\\&"
    assert Separators(truncation="#").encoding_characters == "^~\\&#"


def test_separators_are_hashable_and_replaceable() -> None:
    other = dataclasses.replace(DEFAULT_SEPARATORS, component="!")
    assert other.encoding_characters == "!~\\&"
    assert {DEFAULT_SEPARATORS: 1}[Separators()] == 1
    assert "_escapes" not in repr(DEFAULT_SEPARATORS)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"component": "|"},  # duplicate
        {"subcomponent": "~"},
        {"truncation": "&"},
        {"field": "A"},  # letters/digits clash with names and escapes
        {"escape": "X"},
        {"repetition": "1"},
        {"component": "."},  # clashes with \.br\
        {"field": " "},
        {"field": "||"},
        {"field": ""},
        {"component": "é"},  # MSH-2 is read from raw bytes: ASCII only
        {"field": "\r"},
    ],
)
def test_invalid_separators(kwargs: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="separator"):
        Separators(**kwargs)


# -- escapes -----------------------------------------------------------------

ESCAPES = [
    ("|", "\\F\\"),
    ("^", "\\S\\"),
    ("&", "\\T\\"),
    ("~", "\\R\\"),
    ("\\", "\\E\\"),
    ("\n", "\\.br\\"),
    ("\r", "\\X0D\\"),
]


@pytest.mark.parametrize(("plain", "escaped"), ESCAPES)
def test_each_escape_both_ways(plain: str, escaped: str) -> None:
    assert escape(f"a{plain}b") == f"a{escaped}b"
    assert unescape(f"a{escaped}b") == f"a{plain}b"


def test_escape_everything_at_once() -> None:
    value = "Dupont|Durand^A&B~C\\D\nE\rF"
    escaped = escape(value)
    assert escaped == "Dupont\\F\\Durand\\S\\A\\T\\B\\R\\C\\E\\D\\.br\\E\\X0D\\F"
    assert unescape(escaped) == value


def test_escape_plain_text_is_unchanged() -> None:
    assert escape("Françoise Lefèvre") == "Françoise Lefèvre"
    assert unescape("Françoise Lefèvre") == "Françoise Lefèvre"
    assert escape("") == unescape("") == ""


def test_truncation_escape_only_with_a_truncation_character() -> None:
    seps = Separators(truncation="#")
    assert escape("n°#12", seps) == "n°\\P\\12"
    assert unescape("n°\\P\\12", seps) == "n°#12"
    # Without it, '#' is plain text and \P\ an unknown sequence, kept verbatim.
    assert escape("n°#12") == "n°#12"
    assert unescape("n°\\P\\12") == "n°\\P\\12"


def test_custom_separators_escape() -> None:
    seps = Separators("!", "@", "*", "$", "%")
    assert escape("a!b@c*d$e%f|g^h", seps) == "a$F$b$S$c$R$d$E$e$T$f|g^h"
    assert unescape("a$F$b$S$c$R$d$E$e$T$f|g^h", seps) == "a!b@c*d$e%f|g^h"
    assert unescape("x$.br$y$X0D$", seps) == "x\ny\r"


@pytest.mark.parametrize(
    ("escaped", "codec", "plain"),
    [
        ("\\XC3A7\\", "utf-8", "ç"),  # multi-byte UTF-8
        ("Fran\\XC3A7\\oise", "utf-8", "Françoise"),
        ("\\XE282AC\\", "utf-8", "€"),
        ("\\XE7\\", "latin-1", "ç"),
        ("\\Xe7\\", "latin-1", "ç"),  # lower-case hex
        ("\\XA4\\", "iso8859_15", "€"),
        ("\\X0D0A\\", "ascii", "\r\n"),
        ("\\X41424344\\", "utf-8", "ABCD"),
    ],
)
def test_hex_escapes(escaped: str, codec: str, plain: str) -> None:
    assert unescape(escaped, codec=codec) == plain


@pytest.mark.parametrize(
    "verbatim",
    [
        "\\XE7\\",  # not valid UTF-8 on its own
        "\\XC3\\",
        "\\X\\",  # no digits
        "\\XABC\\",  # odd number of digits
        "\\XZZ\\",  # not hex
        "\\XC3 A7\\",  # bytes.fromhex would accept the space: we do not
        "\\H\\",
        "\\N\\",
        "\\C2842\\",
        "\\M2442\\",
        "\\M244241\\",
        "\\Z01\\",
        "\\.sp\\",
        "\\.sp+2\\",
        "\\.in+4\\",
        "\\.ti-2\\",
        "\\.ce\\",
        "\\.fi\\",
        "\\.nf\\",
        "\\\\",  # empty sequence
        "\\f\\",  # names are case-sensitive
        "\\.BR\\",
    ],
)
def test_other_sequences_are_kept_verbatim(verbatim: str) -> None:
    assert unescape(f"a{verbatim}b") == f"a{verbatim}b"


@pytest.mark.parametrize("value", ["a\\b", "\\", "abc\\", "\\F", "x\\.br", "\\H\\gras\\N\\ et \\"])
def test_lone_escape_characters_are_literal(value: str) -> None:
    assert unescape(value) == value


def test_sequences_after_a_verbatim_one() -> None:
    assert unescape("\\H\\gras\\N\\\\F\\") == "\\H\\gras\\N\\|"
    assert unescape("\\.sp\\\\T\\") == "\\.sp\\&"


def test_hex_uses_the_message_codec() -> None:
    text = "MSH|^~\\&|A|B|||||ADT^A01|1|P|2.5||||||8859/1\rNTE|1||Fran\\XE7\\oise\r"
    assert Message.parse(text).get("NTE-3") == "Françoise"
    utf8 = text.replace("8859/1", "UNICODE UTF-8").replace("\\XE7\\", "\\XC3A7\\")
    assert Message.parse(utf8).get("NTE-3") == "Françoise"


# -- parsing -------------------------------------------------------------------


def test_parse_structure(msg: Message) -> None:
    assert [s.name for s in msg.segments] == ["MSH", "EVN", "PID", "PV1", "OBX", "OBX", "OBX", "ZBE"]
    pid = msg.segment("PID")
    assert pid is not None
    assert pid.name == "PID"
    assert pid.field(1) == ""
    assert pid.field(5) == "LEFÈVRE^Françoise^^^Mme^^L~MARTIN^Françoise^^^^^D"
    assert pid.field(99) == ""
    assert len(pid) == 11
    assert pid.fields()[2] == pid.field(3)
    assert str(pid) == SEGMENTS[2]
    assert pid.to_er7() == SEGMENTS[2]


def test_msh_numbering(msg: Message) -> None:
    msh = msg.segment("MSH")
    assert msh is not None
    assert msh.field(1) == "|"
    assert msh.field(2) == "^~\\&"
    assert msh.field(3) == "GAM"
    assert msh.field(9) == "ADT^A01^ADT_A01"
    assert msh.field(18) == "UNICODE UTF-8"
    assert len(msh) == 19
    assert msh.fields()[:3] == ["|", "^~\\&", "GAM"]
    assert msh.to_er7() == MSH


def test_segment_repr_has_no_content(msg: Message) -> None:
    assert repr(msg.segment("PID")) == "<Segment PID fields=11>"
    text = repr(msg)
    assert "ADT^A01" in text
    assert "MSG0001" in text
    assert "LEFÈVRE" not in text


def test_field_zero_is_refused(msg: Message) -> None:
    pid = msg.segment("PID")
    assert pid is not None
    with pytest.raises(ValueError, match="start at 1"):
        pid.field(0)


def test_header_properties(msg: Message) -> None:
    assert msg.separators == DEFAULT_SEPARATORS
    assert msg.charset == "UNICODE UTF-8"
    assert msg.codec == "utf-8"
    assert msg.message_type == "ADT"
    assert msg.trigger == "A01"
    assert msg.structure == "ADT_A01"
    assert msg.control_id == "MSG0001"
    assert msg.processing_id == "P"
    assert msg.version == "2.5"
    assert msg.sending_application == "GAM"
    assert msg.sending_facility == "CHU_FICTIF"
    assert msg.receiving_application == "PASSERELLE"
    assert msg.receiving_facility == "CHU_FICTIF"
    assert msg.accept_ack_type == "AL"
    assert msg.application_ack_type == "NE"


def test_header_properties_when_absent_or_composite() -> None:
    msg = Message.parse("MSH|^~\\&|APP&1.2.3&ISO^X|FAC\\T\\ILITY|||||ADT|ID^X")
    assert msg.sending_application == "APP&1.2.3&ISO"  # not a leaf: raw
    assert msg.sending_facility == "FAC&ILITY"  # unescaped
    assert msg.message_type == "ADT"
    assert msg.trigger == ""
    assert msg.structure == ""
    assert msg.control_id == "ID^X"  # a field holding components: raw
    assert msg.version == ""
    assert msg.accept_ack_type == ""
    assert msg.application_ack_type == ""
    assert msg.receiving_application == ""


def test_header_properties_first_repetition() -> None:
    msg = Message.parse("MSH|^~\\&|GAM~OTHER||||||ADT^A01~ORU^R01")
    assert msg.sending_application == "GAM"
    assert msg.message_type == "ADT"
    assert msg.trigger == "A01"


@pytest.mark.parametrize("terminator", ["\n", "\r\n"])
def test_lf_and_crlf_terminators(terminator: str) -> None:
    text = terminator.join(SEGMENTS) + terminator
    msg = Message.parse(text)
    assert msg.to_er7() == TEXT
    assert msg.get("PID-5.2") == "Françoise"
    decoded = Message.decode(text.encode("utf-8"))
    assert decoded.to_er7() == TEXT
    assert decoded.encode() == text.encode("utf-8")  # unchanged: the bytes as received
    decoded.set("MSH-10", "MSG0002")
    assert decoded.encode() == TEXT.replace("MSG0001", "MSG0002").encode("utf-8")


def test_mixed_terminators() -> None:
    text = SEGMENTS[0] + "\r\n" + SEGMENTS[1] + "\n" + SEGMENTS[2] + "\r" + SEGMENTS[3]
    assert Message.parse(text).to_er7() == "\r".join(SEGMENTS[:4])


def test_exact_round_trip_with_and_without_final_terminator() -> None:
    assert Message.parse(TEXT).to_er7() == TEXT
    assert Message.parse(TEXT.rstrip("\r")).to_er7() == TEXT.rstrip("\r")
    raw = TEXT.rstrip("\r").encode("utf-8")
    assert Message.decode(raw).encode() == raw
    only_msh = MSH.encode("ascii")
    assert Message.decode(only_msh).encode() == only_msh
    assert Message.decode(only_msh + b"\r").to_er7() == MSH + "\r"


def test_blank_lines_are_ignored() -> None:
    text = "\r\n" + SEGMENTS[0] + "\r\r" + SEGMENTS[1] + "\r  \r" + SEGMENTS[2] + "\r\r\n \t\r\n"
    msg = Message.parse(text)
    assert [s.name for s in msg.segments] == ["MSH", "EVN", "PID"]
    assert msg.to_er7() == "\r".join(SEGMENTS[:3]) + "\r"
    assert Message.decode(text.encode("utf-8")).to_er7() == msg.to_er7()


def test_trailing_whitespace_line_without_terminator() -> None:
    msg = Message.parse(SEGMENTS[0] + "\r" + SEGMENTS[1] + "\r   ")
    assert msg.to_er7() == SEGMENTS[0] + "\r" + SEGMENTS[1] + "\r"


def test_segment_without_fields() -> None:
    msg = Message.parse(MSH + "\rZFA\rPID|||1")
    zfa = msg.segment("ZFA")
    assert zfa is not None
    assert len(zfa) == 0
    assert zfa.field(1) == ""
    assert msg.get("PID-3") == "1"
    last = Message.parse(MSH + "\rZFA")
    assert last.to_er7() == MSH + "\rZFA"
    assert last.segment("ZFA") is not None


def test_z_segments_and_digits_in_names() -> None:
    msg = Message.parse(MSH + "\rZ01|a\rPD1|b\rZBE|c\r")
    assert msg.get("Z01-1") == "a"
    assert msg.get("PD1-1") == "b"


def test_truncation_character_in_msh2() -> None:
    msg = Message.parse("MSH|^~\\&#|GAM|CHU_FICTIF|||||ADT^A01|1|P|2.7\rNTE|1||n\\P\\5 #")
    assert msg.separators.truncation == "#"
    assert msg.separators.encoding_characters == "^~\\&#"
    assert msg.get("MSH-2") == "^~\\&#"
    assert msg.get("MSH-3") == "GAM"
    assert msg.get("NTE-3") == "n#5 #"


def test_custom_separators_message() -> None:
    text = "MSH!@*$%!GAM!CHU@X!!!!!ADT@A01!1!P!2.5\rPID!!!123@@@CHU*456@@@INS!!A$F$B@C%D"
    msg = Message.parse(text)
    assert msg.separators == Separators("!", "@", "*", "$", "%")
    assert msg.get("MSH-1") == "!"
    assert msg.get("MSH-2") == "@*$%"
    assert msg.message_type == "ADT"
    assert msg.get("PID-3[2].1") == "456"
    assert msg.get("PID-5.1") == "A!B"
    assert msg.get("PID-5.2.2") == "D"
    assert msg.to_er7() == text
    msg.set("PID-5.3", "x!y")
    assert msg.to_er7().endswith("A$F$B@C%D@x$F$y")


def test_decode_accepts_bytearray_and_memoryview() -> None:
    raw = TEXT.encode("utf-8")
    assert Message.decode(bytearray(raw)).encode() == raw
    assert Message.decode(memoryview(raw)).get("PID-5.2") == "Françoise"


# -- malformed ER7 -------------------------------------------------------------

BAD = [
    ("", "MSH"),
    ("   \r\n", "MSH"),
    ("xx" + TEXT, "MSH"),  # leading junk
    ("\x0bMSH|^~\\&|A", "MSH"),  # an MLLP start byte left in
    ("  MSH|^~\\&|A", "MSH"),  # junk on the MSH line itself
    ("PID|||1\r" + TEXT, "MSH"),  # not starting with MSH
    ("FHS|^~\\&|A\rBHS|^~\\&\r" + TEXT, "MSH"),  # batches are not taken
    ("MSH", "MSH-2"),
    ("MSH|", "MSH-2"),
    ("MSH|^~\\", "MSH-2"),  # shorter than MSH|^~\&
    ("MSH|^~\\|A|B", "MSH-2"),  # three encoding characters
    ("MSH|^~\\&#!|A", "MSH-2"),  # six
    ("MSH|^^\\&|A", "MSH-2"),  # duplicate
    ("MSH|^~\\|||A", "MSH-2"),  # cut short by the field separator
    ("MSH|^~A&|A", "MSH-2"),  # a letter
    ("MSH|^~.&|A", "MSH-2"),
    ("MSHA^~\\&A", "MSH-1"),  # a letter as field separator
    ("MSH ^~\\& A", "MSH-1"),
    (MSH + "\rpid|||1", "segment 2"),  # lower case
    (MSH + "\rPI|||1", "segment 2"),  # too short
    (MSH + "\rPIDX|||1", "segment 2"),  # too long
    (MSH + "\r1ID|||1", "segment 2"),  # must start with a letter
    (MSH + "\rEVN|1\r PID|||1", "segment 3"),
    (MSH + "\rEVN|1\rPID^||1", "segment 3"),
    (MSH + "\rPÏD|||1", "segment 2"),
    (MSH + "\r\x1c\r", "segment 2"),  # an MLLP end byte left in
    (MSH + "\rEVN|1\r" + MSH, "MSH[2]"),  # a second MSH
]


@pytest.mark.parametrize(("text", "location"), BAD)
def test_parse_errors(text: str, location: str) -> None:
    with pytest.raises(ParseError) as info:
        Message.parse(text)
    assert info.value.location == location
    assert info.value.message


@pytest.mark.parametrize(("text", "location"), BAD)
def test_decode_errors(text: str, location: str) -> None:
    with pytest.raises(ParseError) as info:
        Message.decode(text.encode("utf-8"))
    assert info.value.location == location


def test_leading_junk_is_told_apart_from_missing_msh() -> None:
    with pytest.raises(ParseError, match="before the MSH"):
        Message.parse("garbage" + TEXT)
    with pytest.raises(ParseError, match="does not start with an MSH"):
        Message.parse("PID|||1\r")
    with pytest.raises(ParseError, match="empty"):
        Message.decode(b"")


def test_parse_error_texts_carry_no_content() -> None:
    with pytest.raises(ParseError) as info:
        Message.parse(MSH + "\rDupont Françoise|||1")
    assert "Dup" not in info.value.message
    assert "Fran" not in info.value.message


# -- paths -----------------------------------------------------------------------


def test_get_repetitions_components_subcomponents(msg: Message) -> None:
    assert msg.get("PID-3") == "123456^^^CHU_FICTIF&1.2.250.1.999.1&ISO^PI"  # composite: raw
    assert msg.get("PID-3[1]") == msg.get("PID-3")
    assert msg.get("PID-3.1") == "123456"
    assert msg.get("PID-3[2].1") == "284077512345678"
    assert msg.get("PID-3[2].5") == "INS"
    assert msg.get("PID-3[2].4") == "INS-NIR&1.2.250.1.213.1.4.8&ISO"  # holds subcomponents: raw
    assert msg.get("PID-3[2].4.1") == "INS-NIR"
    assert msg.get("PID-3[2].4.2") == "1.2.250.1.213.1.4.8"
    assert msg.get("PID-3.4.3") == "ISO"
    assert msg.get("PID-5[2].1") == "MARTIN"
    assert msg.get("PID-5.1.1") == "LEFÈVRE"  # a subcomponent path on a simple component
    assert msg.get("PID-11.3") == "Besançon"


def test_get_absent_things_is_empty(msg: Message) -> None:
    assert msg.get("PID-3[3]") == ""
    assert msg.get("PID-3[3].1") == ""
    assert msg.get("PID-3.9") == ""
    assert msg.get("PID-3.4.4") == ""
    assert msg.get("PID-3.1.2") == ""
    assert msg.get("PID-8[2]") == ""
    assert msg.get("PID-8.2") == ""
    assert msg.get("PID-99") == ""
    assert msg.get("PID[2]-1") == ""
    assert msg.get("NK1-1") == ""
    assert msg.get("MSH[2]-3") == ""
    assert msg.get_raw("NK1-1") == ""


def test_get_unescapes_leaves_and_get_raw_does_not(msg: Message) -> None:
    assert msg.get("OBX[3]-5") == "Patiente & famille | \\ ok\nligne 2"
    assert msg.get_raw("OBX[3]-5") == "Patiente \\T\\ famille \\F\\ \\E\\ ok\\.br\\ligne 2"


def test_segment_occurrences(msg: Message) -> None:
    assert msg.get("OBX-3") == "TAILLE"
    assert msg.get("OBX[1]-3") == "TAILLE"
    assert msg.get("OBX[2]-3") == "POIDS"
    assert msg.get("OBX[3]-2") == "TX"
    assert msg.get("OBX[4]-2") == ""
    obx2 = msg.segment("OBX", 2)
    assert obx2 is not None
    assert obx2.field(5) == "58"
    assert msg.segment("OBX", 4) is None
    assert msg.segment("NK1") is None
    assert [s.field(1) for s in msg.segments_named("OBX")] == ["1", "2", "3"]
    assert msg.segments_named("NK1") == []
    assert msg.segment("PID") is msg.segment("PID")  # made once, then kept


def test_msh1_msh2(msg: Message) -> None:
    assert msg.get("MSH-1") == "|"
    assert msg.get("MSH-2") == "^~\\&"
    assert msg.get_raw("MSH-2") == "^~\\&"
    assert msg.get("MSH-2[1]") == "^~\\&"
    assert msg.repetitions("MSH-2") == ["^~\\&"]
    assert msg.get("MSH-3") == "GAM"
    assert msg.get("MSH-9.2") == "A01"
    assert msg.get("MSH-12.2") == "FRA"
    for path in ("MSH-2.1", "MSH-1.1", "MSH-2[2]", "MSH-2.1.1"):
        with pytest.raises(ValueError, match="separators"):
            msg.get(path)
    for path in ("MSH-1", "MSH-2"):
        with pytest.raises(ValueError, match="cannot be set"):
            msg.set(path, "#")
    with pytest.raises(ValueError, match="single MSH"):
        msg.set("MSH[2]-3", "x")


@pytest.mark.parametrize(
    "path",
    [
        "PID",
        "PID-",
        "pid-3",
        "PID-0",
        "PID-3[0]",
        "PID[0]-3",
        "PID-3.0",
        "PID-3.1.0",
        "PID-3..1",
        "PID-3.1.2.3",
        "PID-x",
        "PIDD-3",
        "1ID-3",
        "PID-3[1",
        "PID -3",
        "PID-3\n",
        "PID-٣",  # a non-ASCII digit
        "",
    ],
)
def test_bad_paths_are_programming_errors(msg: Message, path: str) -> None:
    with pytest.raises(ValueError, match="path"):
        msg.get(path)
    with pytest.raises(ValueError, match="path"):
        msg.set(path, "x")


def test_repetitions(msg: Message) -> None:
    assert msg.repetitions("PID-3") == [
        "123456^^^CHU_FICTIF&1.2.250.1.999.1&ISO^PI",
        "284077512345678^^^INS-NIR&1.2.250.1.213.1.4.8&ISO^INS",
    ]
    assert msg.repetitions("PID-7") == ["19840715"]
    assert msg.repetitions("PID-2") == []
    assert msg.repetitions("PID-40") == []
    assert msg.repetitions("NK1-2") == []
    assert msg.repetitions("OBX[2]-5") == ["58"]
    with pytest.raises(ValueError, match="field path"):
        msg.repetitions("PID-3[1]")
    with pytest.raises(ValueError, match="field path"):
        msg.repetitions("PID-3.1")


def test_set_leaf_escapes(msg: Message) -> None:
    msg.set("PID-5.2", "Françoise|Marie^Élodie")
    assert msg.get_raw("PID-5.2") == "Françoise\\F\\Marie\\S\\Élodie"
    assert msg.get("PID-5.2") == "Françoise|Marie^Élodie"
    assert msg.get("PID-5[2].1") == "MARTIN"  # the other repetition is kept
    seg = SEGMENTS[2].replace("^Françoise^^^Mme", "^Françoise\\F\\Marie\\S\\Élodie^^^Mme", 1)
    assert msg.to_er7() == TEXT.replace(SEGMENTS[2], seg)


def test_set_grows_fields_repetitions_components(msg: Message) -> None:
    msg.set("PV1-19", "V0001")
    assert msg.get_raw("PV1-19") == "V0001"
    assert msg.segment("PV1") is not None
    assert msg.to_er7().split("\r")[3] == "PV1||I|CARDIO^101^1^CHU_FICTIF" + "|" * 16 + "V0001"
    msg.set("PID-3[4].4.2", "1.2.250")
    assert msg.repetitions("PID-3")[2:] == ["", "^^^&1.2.250"]
    assert msg.get("PID-3[4].4.2") == "1.2.250"
    msg.set("EVN-5.4.3", "X")
    assert msg.get_raw("EVN-5") == "DUPONT^Dupont^Jean^&&X"


def test_set_subcomponent_inside_existing(msg: Message) -> None:
    msg.set("PID-3.4.2", "9.9.9")
    assert msg.get_raw("PID-3") == "123456^^^CHU_FICTIF&9.9.9&ISO^PI"
    assert msg.get("PID-3[2].4.2") == "1.2.250.1.213.1.4.8"


def test_set_whole_first_repetition_keeps_the_others(msg: Message) -> None:
    msg.set_raw("PID-3", "654321^^^CHU_FICTIF^PI")
    assert msg.repetitions("PID-3")[0] == "654321^^^CHU_FICTIF^PI"
    assert len(msg.repetitions("PID-3")) == 2


def test_set_repetitions_replaces_the_field(msg: Message) -> None:
    msg.set_repetitions("PID-3", ["1^^^A^PI", "2^^^B^INS", "3^^^C^NH"])
    assert msg.get("PID-3[3].5") == "NH"
    msg.set_repetitions("PID-30", ["Y"])
    assert msg.get("PID-30") == "Y"
    msg.set_repetitions("PID-3", [])
    assert msg.repetitions("PID-3") == []
    with pytest.raises(ValueError, match="repetition separator"):
        msg.set_repetitions("PID-3", ["a~b"])
    with pytest.raises(ValueError, match="field path"):
        msg.set_repetitions("PID-3.1", ["a"])
    with pytest.raises(ValueError, match="cannot be set"):
        msg.set_repetitions("MSH-2", ["a"])


def test_set_raw_refuses_structure_breakers(msg: Message) -> None:
    for value in ("a|b", "a\rb", "a\nb"):
        with pytest.raises(ValueError, match="raw value"):
            msg.set_raw("PID-5.2", value)
    msg.set_raw("PID-5.2", "A^B")  # raw: the caller meant two components
    assert msg.get("PID-5.3") == "B"


def test_set_on_a_missing_segment_appends_it(msg: Message) -> None:
    msg.set("NK1-2.1", "LEFÈVRE")
    assert msg.to_er7().endswith("\rZBE|MVT0001^CHU_FICTIF|20240315103000||INSERT|N\rNK1||LEFÈVRE\r")
    msg.set("ZFV[2]-1", "x")
    assert msg.to_er7().endswith("\rNK1||LEFÈVRE\rZFV\rZFV|x\r")
    assert msg.get("ZFV[2]-1") == "x"
    assert len(msg.segments_named("ZFV")) == 2


def test_set_msh_fields_updates_properties(msg: Message) -> None:
    msg.set("MSH-9.2", "A08")
    msg.set("MSH-10", "MSG0002")
    assert msg.trigger == "A08"
    assert msg.control_id == "MSG0002"
    assert msg.to_er7().startswith(MSH.replace("ADT^A01", "ADT^A08").replace("MSG0001", "MSG0002") + "\r")


def test_reads_on_partially_split_segments_stay_right(msg: Message) -> None:
    # PID-3 cuts the segment only up to field 3; later reads and writes must see the rest.
    assert msg.get("PID-3.1") == "123456"
    pid = msg.segment("PID")
    assert pid is not None
    assert pid.field(11) == "12 rue des Écoles^^Besançon^^25000"
    assert msg.get("PID-8") == "F"
    msg.set("PID-8", "M")
    assert msg.get("PID-11.3") == "Besançon"
    assert msg.to_er7().split("\r")[2] == SEGMENTS[2].replace("|F|", "|M|")
    fresh = Message.parse(TEXT)
    assert fresh.get("PID-3.1") == "123456"
    assert len(fresh.segment("PID") or []) == 11
    assert fresh.to_er7() == TEXT


def test_modify_then_read_segment_lookups(msg: Message) -> None:
    msg.set("OBX[2]-5", "59")
    assert msg.get("OBX[2]-5") == "59"
    assert msg.get("OBX[3]-3") == "COMMENTAIRE"
    assert msg.to_er7().count("\rOBX|") == 3
    # After to_er7() the cached text is used again for look-ups.
    assert msg.get("OBX[2]-5") == "59"
    assert msg.get("ZBE-4") == "INSERT"


def test_unmodified_encode_returns_the_received_bytes() -> None:
    raw = TEXT.encode("utf-8")
    msg = Message.decode(raw)
    msg.get("PID-5.2")
    msg.segments  # noqa: B018 - reading does not count as a change
    assert msg.encode() is raw
    msg.set("PID-8", "F")  # the same value: still a change, re-encoded
    out = msg.encode()
    assert out == raw
    assert out is not raw


def test_parse_then_encode_uses_the_codec() -> None:
    msg = Message.parse(TEXT)
    assert msg.encode() == TEXT.encode("utf-8")


# -- building ------------------------------------------------------------------


def ack_segments(seps: Separators = DEFAULT_SEPARATORS, msh18: str = "") -> list[list[str]]:
    msh = ["MSH", seps.encoding_characters, "PASSERELLE", "CHU_FICTIF", "GAM", "CHU_FICTIF"]
    msh += ["20240315103001", "", "ACK^A01^ACK", "ACK0001", "P", "2.5"]
    if msh18:
        msh += ["", "", "", "", "", msh18]
    return [msh, ["MSA", "AA", "MSG0001"]]


def test_from_segments_builds_an_ack() -> None:
    msg = Message.from_segments(ack_segments())
    assert msg.to_er7() == (
        "MSH|^~\\&|PASSERELLE|CHU_FICTIF|GAM|CHU_FICTIF|20240315103001||ACK^A01^ACK|ACK0001|P|2.5\r"
        "MSA|AA|MSG0001\r"
    )
    assert msg.get("MSH-1") == "|"
    assert msg.get("MSH-2") == "^~\\&"
    assert msg.message_type == "ACK"
    assert msg.control_id == "ACK0001"
    assert msg.get("MSA-2") == "MSG0001"
    assert msg.charset == "UNICODE UTF-8"
    assert msg.codec == "utf-8"
    assert Message.decode(msg.encode(), default_charset="UNICODE UTF-8").to_er7() == msg.to_er7()


def test_from_segments_charset() -> None:
    assert Message.from_segments(ack_segments(), charset="8859/1").codec == "latin-1"
    assert Message.from_segments(ack_segments(msh18="8859/15")).codec == "iso8859_15"
    assert Message.from_segments(ack_segments(msh18="8859/15"), charset="8859/15").charset == "8859/15"
    with pytest.raises(ValueError, match="disagrees"):
        Message.from_segments(ack_segments(msh18="8859/15"), charset="8859/1")
    with pytest.raises(EncodingError):
        Message.from_segments(ack_segments(msh18="KOI8-R"))


def test_from_segments_with_other_separators_and_tuples() -> None:
    seps = Separators("!", "@", "*", "$", "%")
    msg = Message.from_segments((tuple(s) for s in ack_segments(seps)), seps)
    assert msg.to_er7().startswith("MSH!@*$%!PASSERELLE!")
    assert Message.parse(msg.to_er7()).separators == seps


@pytest.mark.parametrize(
    ("segments", "match"),
    [
        ([], "at least"),
        ([["MSA", "AA"]], "first segment"),
        ([["MSH", "^~\\&"], ["MSH", "^~\\&"]], "first segment"),
        ([["MSH", "|^~\\&"]], "MSH-2"),
        ([["MSH"]], "MSH-2"),
        ([["MSH", "^~\\&"], []], "sequence"),
        ([["MSH", "^~\\&"], "MSA|AA"], "sequence"),
        ([["MSH", "^~\\&"], ["msa", "AA"]], "segment name"),
        ([["MSH", "^~\\&", "A|B"]], "MSH-3"),
        ([["MSH", "^~\\&"], ["NTE", "1", "", "a\rb"]], "NTE-3"),
    ],
)
def test_from_segments_mistakes(segments: list[list[str]], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Message.from_segments(segments)


# -- internals that keep memory bounded ------------------------------------------


def test_caches_stay_bounded() -> None:
    for i in range(10000):
        er7._parse_path(f"PID-{i + 1}")
    info = hl7_path.parse.cache_info()
    assert info.maxsize is not None and info.currsize <= info.maxsize
    punct = "!#$%'()*+,-/:;<=>?@[]^_`{|}~\"&\\"
    for a in punct:
        for b in punct[:12]:
            with contextlib.suppress(ParseError):
                Message.parse(f"MSH{a}{b}~\\&{a}A")
    assert len(er7._seps_cache) <= 256
    # The usual separators were cached from the start: a peer sending odd ones cannot evict them.
    assert er7._seps_fast["|^~\\&|"] is DEFAULT_SEPARATORS


def test_segments_without_fields_are_still_truthy() -> None:
    msg = Message.parse(MSH + "\rPID\rPID", default_charset="UNICODE UTF-8")
    first = msg.segment("PID")
    assert first is not None
    assert len(first) == 0
    assert first
    msg.set("PID-3", "1")  # goes to the first PID, not a new or the last one
    assert msg.to_er7() == MSH + "\rPID|||1\rPID"


def test_charset_name_escaped_when_a_separator_occurs_in_it() -> None:
    # With '/' as field separator, "8859/1" can only be written escaped.
    text = "MSH/^~\\&/GAM/CHU//////////////8859\\F\\1\rPID///Fran\xe7oise"
    raw = text.encode("latin-1")
    msg = Message.decode(raw)
    assert msg.charset == "8859/1"
    assert msg.get("PID-3") == "Françoise"
    assert Message.parse(text).codec == "latin-1"
    out = msg.encode("8859/15")
    assert b"/8859\\F\\15\r" in out
    assert Message.decode(out).charset == "8859/15"
