"""Property tests of the ER7 codec (hypothesis).

- escaping: ``unescape(escape(v)) == v`` for any text and any separators;
- byte-exact round trip of generated messages in every charset, with every
  leaf readable back through its path;
- fuzzing: parse/decode of anything raises nothing but ParseError/EncodingError.
"""

from __future__ import annotations

import contextlib
import string
from dataclasses import dataclass

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.core.errors import EncodingError, ParseError
from gateway.hl7.charsets import CHARSETS
from gateway.hl7.er7 import DEFAULT_SEPARATORS, Message, Separators, escape, unescape

# No example database: nothing written into the work tree.
SETTINGS = settings(database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Characters HL7 senders use as separators, plus other ASCII punctuation the codec allows.
SEPARATOR_POOL = "|^~\\&#!$%*+/:;=?@[]{}<>`'\",_-()"

ASCII_TEXT = string.ascii_letters + string.digits + " .,;:!?'\"()-+/*=%$#@[]{}<>_`|^~\\&\t\n\r"
LATIN1_EXTRA = "éèêëàâäçôöùûüîïÿÉÈÊÀÂÇÔÙÛÎÏ«»°±§µ¤¦¨´¸¼½¾"
# 8859-15 replaces ¤¦¨´¸¼½¾ of 8859-1 with €ŠšŽžŒœŸ.
LATIN9_EXTRA = "éèêëàâäçôöùûüîïÿÉÈÊÀÂÇÔÙÛÎÏ«»°±§µ€ŠšŽžŒœŸ"
ALPHABETS = {
    "ASCII": ASCII_TEXT,
    "8859/1": ASCII_TEXT + LATIN1_EXTRA,
    "8859/15": ASCII_TEXT + LATIN9_EXTRA,
}


@st.composite
def separators(draw: st.DrawFn) -> Separators:
    chars = draw(st.lists(st.sampled_from(SEPARATOR_POOL), min_size=5, max_size=6, unique=True))
    return Separators(chars[0], chars[1], chars[2], chars[3], chars[4], chars[5] if len(chars) == 6 else None)


def texts(charset: str, max_size: int = 12) -> st.SearchStrategy[str]:
    if charset == "UNICODE UTF-8":
        # French text often.
        return st.one_of(
            st.text(max_size=max_size),  # any character but lone surrogates, which no codec writes
            st.text(ALPHABETS["8859/15"], max_size=max_size),
        )
    return st.text(ALPHABETS[charset], max_size=max_size)


# -- escaping -----------------------------------------------------------------


@SETTINGS
@given(st.text())
@example("\\F\\|\\")
@example("\r\n\\.br\\")
@example("\\X0D\\")
def test_unescape_inverts_escape(value: str) -> None:
    escaped = escape(value)
    assert "\r" not in escaped
    assert "\n" not in escaped
    assert unescape(escape(value)) == value


@SETTINGS
@given(st.text(st.sampled_from(SEPARATOR_POOL + "abcé\r\n.XP0D"), max_size=40), separators())
def test_unescape_inverts_escape_for_any_separators(value: str, seps: Separators) -> None:
    escaped = escape(value, seps)
    for char in (seps.field, seps.component, seps.repetition, seps.subcomponent, seps.truncation):
        if char is not None:
            assert char not in escaped
    assert unescape(escaped, seps) == value


@SETTINGS
@given(st.text(), st.sampled_from(sorted(set(CHARSETS.values()))))
def test_unescape_never_raises(value: str, codec: str) -> None:
    unescape(value, DEFAULT_SEPARATORS, codec)
    unescape(value, Separators(truncation="#"), codec)


# -- generated messages ------------------------------------------------------------


@dataclass
class Generated:
    text: str
    charset: str
    msh18: str  # as written in MSH-18 ("" when the default applies)
    seps: Separators
    leaves: dict[str, str]  # path -> unescaped value


NAMES = ["PID", "PV1", "OBX", "NTE", "ZBE", "ZFA", "EVN", "PD1", "Z01"]


@st.composite
def messages(draw: st.DrawFn) -> Generated:
    charset = draw(st.sampled_from(sorted(CHARSETS)))
    if charset not in ALPHABETS and charset != "UNICODE UTF-8":
        charset = "8859/1"  # the other 8859 parts: same ASCII story, covered by the decoding tests
    seps = draw(separators())
    leaves: dict[str, str] = {}

    def field_text(path: str) -> str:
        reps = []
        for r in range(1, draw(st.integers(1, 3)) + 1):
            comps = []
            for c in range(1, draw(st.integers(1, 3)) + 1):
                subs = []
                for s in range(1, draw(st.integers(1, 2)) + 1):
                    value = draw(texts(charset))
                    leaves[f"{path}[{r}].{c}.{s}"] = value
                    subs.append(escape(value, seps))
                comps.append(seps.subcomponent.join(subs))
            reps.append(seps.component.join(comps))
        return seps.repetition.join(reps)

    msh18 = draw(st.sampled_from([charset, "", f" {charset} "]))
    ascii_header = draw(st.booleans())  # ASCII MSH takes decode()'s fast path
    header = []
    for n in range(3, 18):
        if ascii_header:
            value = draw(st.text(ALPHABETS["ASCII"], max_size=8))
            leaves[f"MSH-{n}[1].1.1"] = value
            header.append(escape(value, seps))
        else:
            header.append(field_text(f"MSH-{n}"))
    # escape(): '/' or '-' may be separators here, and they occur in charset names.
    lines = [seps.field.join(["MSH", seps.encoding_characters, *header, escape(msh18, seps)])]
    seen: dict[str, int] = {}
    for name in draw(st.lists(st.sampled_from(NAMES), max_size=6)):
        seen[name] = seen.get(name, 0) + 1
        fields = [field_text(f"{name}[{seen[name]}]-{n}") for n in range(1, draw(st.integers(0, 4)) + 1)]
        lines.append(seps.field.join([name, *fields]))
    text = "\r".join(lines) + ("\r" if draw(st.booleans()) else "")
    return Generated(text, charset, msh18.strip(), seps, leaves)


@SETTINGS
@given(messages())
def test_decode_encode_is_byte_exact(gen: Generated) -> None:
    raw = gen.text.encode(CHARSETS[gen.charset])
    msg = Message.decode(raw, default_charset=gen.charset)
    assert msg.separators == gen.seps
    assert msg.charset == gen.charset
    assert msg.encode() == raw
    assert msg.to_er7() == gen.text
    for path, value in gen.leaves.items():
        assert msg.get(path) == value, path
    # A real re-serialization gives the same bytes too.
    msg.set_raw("MSH-3", msg.get_raw("MSH-3"))
    assert msg.encode() == raw


@SETTINGS
@given(messages(), st.sampled_from(["\n", "\r\n"]))
def test_other_terminators_give_the_same_message(gen: Generated, terminator: str) -> None:
    text = gen.text.replace("\r", terminator)
    msg = Message.parse(text, default_charset=gen.charset)
    assert msg.to_er7() == gen.text
    decoded = Message.decode(text.encode(CHARSETS[gen.charset]), default_charset=gen.charset)
    assert decoded.to_er7() == gen.text
    for path, value in list(gen.leaves.items())[:20]:
        assert decoded.get(path) == value, path


@SETTINGS
@given(
    messages(),
    st.sampled_from(["PID", "ZBE", "OBX", "MSH"]),
    st.integers(1, 2),
    st.integers(3, 12),
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(1, 2),
    st.text(max_size=10),
)
def test_set_then_get(
    gen: Generated, name: str, occ: int, fld: int, rep: int, comp: int, sub: int, value: str
) -> None:
    msg = Message.parse(gen.text, default_charset="UNICODE UTF-8")
    if name == "MSH":
        occ = 1
    path = f"{name}[{occ}]-{fld}[{rep}].{comp}.{sub}"
    same_field = f"MSH-{fld}[" if name == "MSH" else f"{name}[{occ}]-{fld}["
    others = {p: v for p, v in gen.leaves.items() if not p.startswith(same_field)}
    msg.set(path, value)
    assert msg.get(path) == value
    again = Message.parse(msg.to_er7(), default_charset="UNICODE UTF-8")
    assert again.get(path) == value
    for p, v in others.items():
        assert again.get(p) == v, p


# -- fuzzing ---------------------------------------------------------------------

FUZZ_SETTINGS = settings(SETTINGS, max_examples=300)
PREFIXES = [b"", b"MSH|^~\\&|", b"MSH|^~\\&|A|B|C|D|E||ADT^A01|1|P|2.5||||||", b"\xef\xbb\xbfMSH|^~\\&#|"]


@FUZZ_SETTINGS
@given(st.sampled_from(PREFIXES), st.binary(max_size=300))
@example(b"MSH|^~\\&|A|B|C|D|E||ADT^A01|1|P|2.5||||||", b"UNICODE UTF-8\r\xff")
@example(b"", b"\r\n\r\nMSH|^~\\&\r")
@example(b"", b"MSH|^~\\&|" + b"|" * 16 + b"\xe9")
def test_decode_anything(prefix: bytes, tail: bytes) -> None:
    for default in ("ASCII", "UNICODE UTF-8", "8859/1"):
        try:
            msg = Message.decode(prefix + tail, default_charset=default)
        except (ParseError, EncodingError):
            continue
        _exercise(msg)


@FUZZ_SETTINGS
@given(
    st.sampled_from(["", "MSH|^~\\&|", "MSH|^~\\&|A|B|C|D|E||ADT^A01|1|P|2.5||||||UNICODE UTF-8|"]), st.text()
)
@example("", "MSH|^~\\&\rPID\r\r \n")
@example("MSH|^~\\&|", "\rMSH|^~\\&")
def test_parse_anything(prefix: str, tail: str) -> None:
    try:
        msg = Message.parse(prefix + tail, default_charset="UNICODE UTF-8")
    except (ParseError, EncodingError):
        return
    _exercise(msg)


NOISE = ["MSH", "|", "^~\\&", "PID", "\r", "\n", "~", "^", "&", "\\", "é", " ", "1", "#", "X0D", "\ufeff"]


@FUZZ_SETTINGS
@given(st.lists(st.sampled_from(NOISE)))
def test_parse_structured_noise(pieces: list[str]) -> None:
    try:
        msg = Message.parse("".join(pieces), default_charset="UNICODE UTF-8")
    except (ParseError, EncodingError):
        return
    _exercise(msg)


def _exercise(msg: Message) -> None:
    """Whatever parsed must also read, serialize and re-parse without surprises."""
    for seg in msg.segments:
        seg.fields()
    _ = (msg.message_type, msg.trigger, msg.control_id, msg.accept_ack_type, msg.version)
    msg.get("PID-3[2].4.2")
    msg.get("MSH-9.2")
    msg.repetitions("PID-3")
    text = msg.to_er7()
    assert Message.parse(text, default_charset=msg.charset).to_er7() == text
    with contextlib.suppress(EncodingError):  # e.g. parse()d text the charset cannot write
        msg.encode()
