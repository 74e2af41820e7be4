"""ER7, the HL7v2 "pipe and hat" encoding: a lazy, exact and fast codec.

Design, because this sits on the hot path of the MLLP server:

- ``Message.parse`` / ``Message.decode`` only validate the MSH header and the
  segment names, and split the text into segment lines. A segment's fields are
  split the first time it is read; repetitions, components and subcomponents
  are split only for the path that asks for them.
- An unmodified message keeps its input: ``to_er7()`` returns the parsed text
  (when it used ``\\r`` terminators) and ``encode()`` the very bytes received.
- Only the ASCII-compatible charsets of :mod:`gateway.hl7.charsets` are known,
  so MSH-18 can be read from the raw bytes before decoding them.

Paths are ``SEG[occ]-FIELD[rep].COMP.SUB`` (``PID-3[2].4.2``, ``OBX[3]-5``,
``MSH-9.2``); occurrence and repetition are 1-based and default to 1, so a path
always addresses one repetition. MSH numbering follows HL7: MSH-1 is the field
separator and MSH-2 the encoding characters; both are atomic (no repetition or
component addressing) and read-only.

Errors: malformed ER7 raises ``ParseError`` and charset problems
``EncodingError`` (both carry a location); a bad path or a bad argument is a
programming error and raises ``ValueError``. Error texts give positions, never
message content, so they can go into logs and ACKs without patient data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from dataclasses import field as _dc_field
from typing import Final

from gateway.core.errors import EncodingError, ParseError, SegmentSequenceError
from gateway.hl7.charsets import CHARSETS, DEFAULT_CHARSET, codec_for
from gateway.hl7.path import parse as parse_path

__all__ = [
    "DEFAULT_SEPARATORS",
    "Message",
    "Segment",
    "Separators",
    "escape",
    "unescape",
]

_BOM: Final = b"\xef\xbb\xbf"
# What makes a line blank; the same set bytes.strip() uses, so decode() and
# parse() agree on it.
_BLANK: Final = " \t\r\n\x0b\x0c"
_BLANK_B: Final = b" \t\r\n\x0b\x0c"
_NAME: Final = re.compile(r"[A-Z][A-Z0-9]{2}")
_HEX: Final = re.compile(r"(?:[0-9A-Fa-f]{2})+")
# A plain dict: a little faster than the read-only mapping on the hot path.
_CODECS: Final[dict[str, str]] = dict(CHARSETS)
# The charset of a message built by from_segments() when neither MSH-18 nor `charset` names one.
_BUILD_CHARSET: Final = "UNICODE UTF-8"


def _separator_ok(char: str) -> bool:
    # ASCII punctuation only: letters and digits would clash with segment names
    # and escape sequences (\F\, \X0D\), '.' with \.br\, and non-ASCII with the
    # MSH-18 sniffing done on raw bytes.
    return (
        len(char) == 1 and char.isascii() and char.isprintable() and not char.isalnum() and char not in " ."
    )


@dataclass(frozen=True, slots=True)
class Separators:
    """The field separator (MSH-1) and the encoding characters (MSH-2)."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    # v2.7+ fifth encoding character ('#'), when MSH-2 has one.
    truncation: str | None = None
    # Precomputed once per instance: escape() and unescape() are called per value.
    _escapes: dict[int, str] = _dc_field(init=False, repr=False, compare=False)
    _unescapes: dict[str, str] = _dc_field(init=False, repr=False, compare=False)
    _specials: re.Pattern[str] = _dc_field(init=False, repr=False, compare=False)
    _odd_line: re.Pattern[str] = _dc_field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        chars = [self.field, self.component, self.repetition, self.escape, self.subcomponent]
        if self.truncation is not None:
            chars.append(self.truncation)
        for char in chars:
            if not _separator_ok(char):
                raise ValueError(f"invalid separator {char!r}: one ASCII punctuation character, not '.'")
        if len(set(chars)) != len(chars):
            raise ValueError("separators must all differ")
        e = self.escape
        escapes = {
            ord(self.field): f"{e}F{e}",
            ord(self.component): f"{e}S{e}",
            ord(self.subcomponent): f"{e}T{e}",
            ord(self.repetition): f"{e}R{e}",
            ord(e): f"{e}E{e}",
            ord("\n"): f"{e}.br{e}",
            # A bare CR would end the segment; HL7 has no named escape for it.
            ord("\r"): f"{e}X0D{e}",
        }
        unescapes = {
            "F": self.field,
            "S": self.component,
            "T": self.subcomponent,
            "R": self.repetition,
            "E": e,
            ".br": "\n",
        }
        if self.truncation is not None:
            escapes[ord(self.truncation)] = f"{e}P{e}"
            unescapes["P"] = self.truncation
        specials = re.compile("[" + re.escape("".join(chr(c) for c in escapes)) + "]")
        object.__setattr__(self, "_escapes", escapes)
        object.__setattr__(self, "_unescapes", unescapes)
        object.__setattr__(self, "_specials", specials)
        # Finds a CR not followed by a segment name (other than MSH) and the field
        # separator or another CR. One C-level scan validates every segment name
        # on the fast path; a hit (also a blank line, or a field-less last
        # segment) sends the parser to the slow path, which decides exactly.
        odd = r"\r(?!(?!MSH)[A-Z][A-Z0-9][A-Z0-9][" + re.escape(self.field) + r"\r])"
        object.__setattr__(self, "_odd_line", re.compile(odd))

    @property
    def encoding_characters(self) -> str:
        """The MSH-2 value, e.g. ``^~\\&`` (``^~\\&#`` with a truncation character)."""
        return self.component + self.repetition + self.escape + self.subcomponent + (self.truncation or "")


DEFAULT_SEPARATORS: Final = Separators()


def escape(value: str, seps: Separators = DEFAULT_SEPARATORS) -> str:
    """Escape text for an ER7 leaf (HL7 v2.5 §2.7).

    Separators become ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` (and ``\\P\\`` with a
    truncation character), ``\\n`` becomes ``\\.br\\`` and ``\\r`` ``\\X0D\\``.
    """
    if seps._specials.search(value) is None:
        return value
    return value.translate(seps._escapes)


def unescape(value: str, seps: Separators = DEFAULT_SEPARATORS, codec: str = "utf-8") -> str:
    """Resolve the escape sequences of an ER7 leaf.

    ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` (``\\P\\`` with a truncation character),
    ``\\.br\\`` → ``\\n`` and ``\\Xhh..\\`` (bytes decoded with ``codec``) are
    resolved. Other sequences (``\\H\\``, ``\\N\\``, ``\\Cxxyy\\``, ``\\Zxx\\``,
    ``\\.sp\\``...) and undecodable ``\\X..\\`` are kept verbatim; an
    unterminated escape character is kept literally. Never raises on content.
    """
    e = seps.escape
    if e not in value:
        return value
    names = seps._unescapes
    out: list[str] = []
    pos = 0
    find = value.find
    while True:
        start = find(e, pos)
        if start < 0:
            break
        end = find(e, start + 1)
        if end < 0:
            break  # lone escape character: literal
        name = value[start + 1 : end]
        text = names.get(name)
        if text is None and name[:1] == "X":
            text = _hex_text(name[1:], codec)
        if text is None:
            out.append(value[pos : end + 1])  # unknown or formatting sequence: verbatim
        else:
            out.append(value[pos:start])
            out.append(text)
        pos = end + 1
    out.append(value[pos:])
    return "".join(out)


def _hex_text(digits: str, codec: str) -> str | None:
    if _HEX.fullmatch(digits) is None:
        return None
    try:
        return bytes.fromhex(digits).decode(codec)
    except UnicodeDecodeError:
        return None


_PathKey = tuple[str, int, int, int | None, int | None, int | None]


def _parse_path(path: str) -> _PathKey:
    """``"PID[2]-3[1].4.2"`` → ``("PID", 2, 3, 1, 4, 2)``; repetition is None when not written."""
    loc = parse_path(path)
    return (loc.segment, loc.occurrence or 1, loc.field, loc.repetition, loc.component, loc.subcomponent)


def _put(text: str, chain: Sequence[tuple[str, int]], value: str) -> str:
    """Replace item ``chain[0][1]`` of ``text`` split on ``chain[0][0]``, recursively; grows as needed."""
    if not chain:
        return value
    sep, index = chain[0]
    items = text.split(sep)
    if len(items) < index:
        items.extend([""] * (index - len(items)))
    items[index - 1] = _put(items[index - 1], chain[1:], value)
    return sep.join(items)


class Segment:
    """One segment; its fields are split on first access.

    ``field(n)`` is 1-based and HL7-numbered, so for MSH ``field(1)`` is the
    field separator and ``field(2)`` the encoding characters. Segments are
    changed through ``Message.set``/``set_raw``, which keep the message's
    serialization in step.
    """

    __slots__ = ("_partial", "_parts", "_seps", "_text", "name")

    def __init__(self, text: str, seps: Separators, parts: list[str] | None = None) -> None:
        self.name: str = text[:3]
        # Invariant: at least one of _text / _parts is set; _text is None once changed.
        self._text: str | None = text
        self._parts: list[str] | None = parts
        # True while the last item of _parts is the unsplit rest of the segment: a
        # read of PID-3 need not cut the thirty fields after it.
        self._partial = False
        self._seps = seps
        if parts is None and self.name == "MSH":
            self._split()  # MSH is never partially split: its numbering is shifted by one

    def _split(self) -> list[str]:
        """All fields, HL7-numbered (parts[n] is field n)."""
        parts = self._parts
        if parts is None:
            fs = self._seps.field
            parts = self._text.split(fs) if self._text is not None else [self.name]
            if self.name == "MSH":
                parts.insert(1, fs)  # so that parts[n] is MSH-n
            self._parts = parts
        elif self._partial:
            parts.extend(parts.pop().split(self._seps.field))
            self._partial = False
        return parts

    def _field(self, n: int) -> str:
        parts = self._parts
        text = self._text
        if parts is None and text is not None:
            # Cut only up to field n; the rest stays one string until asked for.
            parts = self._parts = text.split(self._seps.field, n + 1)
            self._partial = len(parts) > n + 1
        elif parts is None or (self._partial and n >= len(parts) - 1):
            parts = self._split()
        try:
            return parts[n]
        except IndexError:
            return ""

    def _join(self) -> str:
        parts = self._parts
        if parts is None:
            return self._text or self.name
        if self.name == "MSH":
            return self._seps.field.join([parts[0], *parts[2:]])
        return self._seps.field.join(parts)  # also right while partial: the rest is joined back as it was

    def field(self, n: int) -> str:
        """Raw (escaped) text of field ``n``; ``""`` when absent."""
        if n < 1:
            raise ValueError("field numbers start at 1")
        return self._field(n)

    def fields(self) -> list[str]:
        """Raw texts of fields 1..len(self)."""
        return self._split()[1:]

    def __len__(self) -> int:
        """Number of fields, the name excluded (MSH-1 and MSH-2 included for MSH)."""
        return len(self._split()) - 1

    def __bool__(self) -> bool:
        # A segment without fields ("ZFA") is still a segment: never falsy.
        return True

    def to_er7(self) -> str:
        """The segment's ER7 text, without terminator."""
        text = self._text
        return text if text is not None else self._join()

    __str__ = to_er7

    def __repr__(self) -> str:
        # No field content: segments hold patient data and reprs end up in logs.
        return f"<Segment {self.name} fields={len(self)}>"

    def _get(self, fld: int, rep: int | None, comp: int | None, sub: int | None) -> str:
        # self._field(fld), inlined: this is the path every get() takes.
        parts = self._parts
        text = self._text
        if parts is None and text is not None:
            parts = self._parts = text.split(self._seps.field, fld + 1)
            self._partial = len(parts) > fld + 1
        elif parts is None or (self._partial and fld >= len(parts) - 1):
            parts = self._split()
        try:
            value = parts[fld]
        except IndexError:
            return ""
        if fld <= 2 and self.name == "MSH":
            _check_msh_atomic(fld, rep, comp, sub)
            return value
        if not value:
            return value
        seps = self._seps
        # maxsplit = index: only the items up to the wanted one are cut.
        sep = seps.repetition
        if sep in value:
            index = rep or 1
            items = value.split(sep, index)
            value = items[index - 1] if index <= len(items) else ""
        elif rep is not None and rep > 1:
            return ""
        if comp is None:
            return value
        sep = seps.component
        if sep in value:
            items = value.split(sep, comp)
            value = items[comp - 1] if comp <= len(items) else ""
        elif comp > 1:
            return ""
        if sub is None:
            return value
        sep = seps.subcomponent
        if sep in value:
            items = value.split(sep, sub)
            return items[sub - 1] if sub <= len(items) else ""
        return value if sub == 1 else ""

    def _set(self, fld: int, rep: int | None, comp: int | None, sub: int | None, value: str) -> None:
        parts = self._split()
        if len(parts) <= fld:
            parts.extend([""] * (fld + 1 - len(parts)))
        seps = self._seps
        chain = [(seps.repetition, rep or 1)]
        if comp is not None:
            chain.append((seps.component, comp))
            if sub is not None:
                chain.append((seps.subcomponent, sub))
        parts[fld] = _put(parts[fld], chain, value)
        self._text = None


def _check_msh_atomic(fld: int, rep: int | None, comp: int | None, sub: int | None) -> None:
    if comp is not None or sub is not None or (rep is not None and rep != 1):
        raise ValueError(f"MSH-{fld} holds the separators and has no repetitions or components")


# ---------------------------------------------------------------------------
# Parsing helpers


# fs + MSH-2 → Separators; and, for the hot path, head[3:9] → Separators when those
# six characters decide the header on their own ("|^~\&|", or "|^~\&" ending it).
# Seeded with the usual separators, so a peer sending odd ones cannot crowd them out.
_seps_cache: dict[str, Separators] = {"|^~\\&": DEFAULT_SEPARATORS}
_seps_fast: dict[str, Separators] = {"|^~\\&|": DEFAULT_SEPARATORS, "|^~\\&": DEFAULT_SEPARATORS}


def _header_separators(head: str) -> Separators:
    """Separators from the MSH line (cached: nearly every sender uses ``|^~\\&``)."""
    seps = _seps_fast.get(head[3:9])
    return seps if seps is not None else _read_separators(head)


def _read_separators(head: str) -> Separators:
    fs = head[3:4]
    end = head.find(fs, 4) if fs else -1
    key = head[3:end] if end >= 0 else head[3:]
    seps = _seps_cache.get(key)
    if seps is not None:
        return seps
    if len(head) < 8:
        raise ParseError("MSH segment too short: it must start with MSH|^~\\& or the like", location="MSH-2")
    if not _separator_ok(fs):
        raise ParseError("invalid field separator in MSH-1", location="MSH-1")
    enc = key[1:]
    if len(enc) not in (4, 5):
        raise ParseError("MSH-2 must hold 4 encoding characters (5 with truncation)", location="MSH-2")
    try:
        seps = Separators(fs, enc[0], enc[1], enc[2], enc[3], enc[4] if len(enc) == 5 else None)
    except ValueError as exc:
        raise ParseError(f"invalid encoding characters in MSH-2: {exc}", location="MSH-2") from exc
    if len(_seps_cache) < 256:  # bounded: a hostile peer could send endless variants
        _seps_cache[key] = seps
        if len(key) == 5:
            _seps_fast[head[3:9]] = seps
    return seps


def _no_msh_error(rest: str) -> ParseError:
    if not rest.strip(_BLANK):
        return SegmentSequenceError("empty message", location="MSH")
    if "MSH" in rest:
        return SegmentSequenceError("data before the MSH segment", location="MSH")
    return SegmentSequenceError("message does not start with an MSH segment", location="MSH")


def _skip_blank_lines(text: str) -> str:
    """``text`` from its first non-blank line, which must start with MSH."""
    pos = 0
    while True:
        end = text.find("\r", pos)
        line = text[pos:] if end < 0 else text[pos:end]
        if line.strip(_BLANK) or end < 0:
            break
        pos = end + 1
    rest = text[pos:]
    if not rest.startswith("MSH"):
        raise _no_msh_error(rest)
    return rest


def _clean_lines(text: str, fs: str) -> tuple[list[str], bool]:
    """Slow path: drop blank lines, check every segment name; (lines, had a final terminator)."""
    raw_lines = text.split("\r")
    lines: list[str] = []
    last = 0
    for i, line in enumerate(raw_lines):
        if i and not line.strip(_BLANK):
            continue
        if i:
            name = line[:3]
            if _NAME.fullmatch(name) is None or line[3:4] not in ("", fs):
                raise ParseError(
                    f"segment {len(lines) + 1}: invalid segment name (3 uppercase letters or digits)",
                    location=f"segment {len(lines) + 1}",
                )
            if name == "MSH":
                raise ParseError("a second MSH segment: batches are not supported", location="MSH[2]")
        lines.append(line)
        last = i
    return lines, last < len(raw_lines) - 1


def _sniff_header(body: bytes) -> tuple[str, Separators | None, list[str] | None]:
    """Read MSH-18 (first repetition, stripped; "" when empty) from the raw bytes.

    Also returns, when ``body`` starts with an ASCII MSH line, its separators and
    its fields split as the text parser would: decode() hands them on so the
    header is validated and split once.
    """
    start = 0
    if not body.startswith(b"MSH"):
        rest = body.lstrip(_BLANK_B)
        start = len(body) - len(rest)
        # Only whole blank lines may precede MSH.
        if not rest.startswith(b"MSH") or body[start - 1 : start] not in (b"\r", b"\n"):
            raise _no_msh_error(rest.decode("latin-1"))
    end = body.find(b"\r", start)
    if end < 0:
        end = len(body)
    if b"\n" in body:  # one C scan; LF-terminated messages are the exception
        newline = body.find(b"\n", start, end)
        if newline >= 0:
            end = newline
    # latin-1 never fails and keeps one character per byte; MSH-1/MSH-2 are ASCII.
    head = body[start:end].decode("latin-1")
    seps = _seps_fast.get(head[3:9]) or _read_separators(head)
    parts = head.split(seps.field)  # parts[k] is MSH-(k+1)
    value = parts[17] if len(parts) > 17 else ""
    if value not in _CODECS:
        value = _charset_name(value, seps)
    # An ASCII header reads the same in every known charset, so these parts are final.
    if start or not head.isascii():
        return value, None, None
    return value, seps, parts


def _charset_name(value: str, seps: Separators) -> str:
    """The character set name in an MSH-18 value: first repetition, unescaped, spaces stripped, ASCII."""
    if seps.repetition in value:
        value = value.split(seps.repetition, 1)[0]
    if seps.escape in value:  # "8859\F\1" when '/' is the field separator
        value = unescape(value, seps, "ascii")
    value = value.strip(" ")
    if not value.isascii():
        raise EncodingError("MSH-18 is not ASCII", location="MSH-18")
    return value


def _decode_error(body: bytes, exc: UnicodeDecodeError, charset: str, offset: int) -> EncodingError:
    # The offset and the field, never the bytes: they may be patient data.
    where = _where_bytes(body, exc.start)
    text = f"byte at offset {exc.start + offset} is not valid {charset}{where}"
    return EncodingError(text, location="MSH-18")


def _where_text(text: str, pos: int, fs: str) -> str:
    """' (PID-5)': the field a character offset falls in, for error texts."""
    line_start = text.rfind("\r", 0, pos) + 1
    return _where(text[line_start : line_start + 3], text.count(fs, line_start, pos), pos - line_start)


def _where_bytes(body: bytes, pos: int) -> str:
    """The same for a byte offset in raw bytes (CR or LF terminators)."""
    line_start = max(body.rfind(b"\r", 0, pos), body.rfind(b"\n", 0, pos)) + 1
    msh = body.find(b"MSH")
    fs = body[msh + 3 : msh + 4] if msh >= 0 else b""
    if not fs:
        return ""
    name = body[line_start : line_start + 3].decode("latin-1")
    return _where(name, body.count(fs, line_start, pos), pos - line_start)


def _where(name: str, separators_before: int, column: int) -> str:
    if _NAME.fullmatch(name) is None:
        return ""
    # MSH-1 is the first field separator itself, so MSH fields count one more.
    fld = separators_before + (1 if name == "MSH" else 0)
    return f" ({name}-{fld})" if column >= 3 and fld else f" ({name})"


# ---------------------------------------------------------------------------


# HL7 batch envelopes (file and batch headers and trailers) wrap messages and belong to none.
_ENVELOPE = (b"FHS", b"BHS", b"BTS", b"FTS")


def split_messages(data: bytes) -> list[bytes]:
    """A file may hold several messages, one per MSH, in a batch envelope or not (FHS/BHS/BTS/FTS
    are left out); line ends of any kind become \\r."""
    text = data.replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    messages: list[bytes] = []
    for segment in text.split(b"\r"):
        if not segment.strip() or segment.lstrip(b"\xef\xbb\xbf")[:3] in _ENVELOPE:
            continue
        if segment.startswith(b"MSH") or not messages:
            messages.append(segment + b"\r")
        else:
            messages[-1] += segment + b"\r"
    return messages


class Message:
    """One HL7v2 message.

    ``charset`` is the MSH-18 name used to decode (the default's name when
    MSH-18 is empty) and ``codec`` the Python codec for it.
    """

    __slots__ = (
        "_lines",
        "_msh_parts",
        "_objs",
        "_raw",
        "_stale",
        "_text",
        "_trailing",
        "charset",
        "codec",
        "separators",
    )

    separators: Separators
    charset: str
    codec: str
    _lines: list[str]  # segment texts; an entry is stale while its Segment is modified (see _sync)
    _objs: list[Segment | None]  # Segment objects, made on demand
    # The MSH is always split (its header is read on every message); its Segment,
    # made on demand, shares this list. HL7-numbered: MSH-1 at index 1.
    _msh_parts: list[str]
    _text: str | None  # cached to_er7() output, None once modified
    _raw: bytes | None  # the decoded bytes, None once modified
    _trailing: bool  # the input ended with a segment terminator
    _stale: bool  # some Segment changed since _lines was last refreshed

    # -- construction -------------------------------------------------------

    @classmethod
    def _from_lines(
        cls,
        lines: list[str],
        seps: Separators,
        msh_parts: list[str],
        trailing: bool,
        text: str | None,
        charset: str = "",
        codec: str = "",
        raw: bytes | None = None,
    ) -> Message:
        msg = cls.__new__(cls)
        msg.separators = seps
        msg.charset = charset
        msg.codec = codec
        msg._lines = lines
        msg._msh_parts = msh_parts
        msg._objs = [None] * len(lines)
        msg._text = text
        msg._raw = raw
        msg._trailing = trailing
        msg._stale = False
        return msg

    @classmethod
    def _parse_text(
        cls,
        text: str,
        seps: Separators | None = None,
        msh_parts: list[str] | None = None,
        charset: str = "",
        codec: str = "",
        raw: bytes | None = None,
    ) -> Message:
        """Split ``text`` into segments; decode() passes ``seps``/``msh_parts`` when it has read them."""
        canonical = True  # does "\r".join(lines) (+ "\r") give back `text`?
        if "\n" in text:
            text = text.replace("\r\n", "\r").replace("\n", "\r")
            canonical = False
        if msh_parts is None and not text.startswith("MSH"):  # decode() checked it when it passes parts
            text = _skip_blank_lines(text[1:] if text.startswith("\ufeff") else text)
            canonical = False
        end = text.find("\r")
        if seps is None:
            seps = _header_separators(text if end < 0 else text[:end])
        if end < 0:
            lines, trailing = [text], False
        else:
            trailing = text.endswith("\r")
            if seps._odd_line.search(text, end, len(text) - 1 if trailing else len(text)) is None:
                lines = text.split("\r")
                if trailing:
                    lines.pop()
            else:
                lines, trailing = _clean_lines(text, seps.field)
                canonical = False
        if msh_parts is None:
            msh_parts = lines[0].split(seps.field)
        msh_parts.insert(1, seps.field)  # so that msh_parts[n] is MSH-n
        return cls._from_lines(
            lines, seps, msh_parts, trailing, text if canonical else None, charset, codec, raw
        )

    @classmethod
    def parse(cls, text: str, *, default_charset: str = DEFAULT_CHARSET) -> Message:
        """Parse ER7 text; segment terminators may be CR, LF or CRLF; blank lines are ignored.

        ``default_charset`` (an MSH-18 name) applies when MSH-18 is empty; it
        sets ``charset``/``codec``, used by ``encode()`` and ``\\X..\\`` escapes.
        """
        msg = cls._parse_text(text)
        name = msg._msh18() or default_charset.strip(" ")
        msg.codec = codec_for(name)
        msg.charset = name
        return msg

    @classmethod
    def decode(
        cls, raw: bytes | bytearray | memoryview, *, default_charset: str = DEFAULT_CHARSET
    ) -> Message:
        """Decode wire bytes: MSH-18 is read from the bytes first, then the whole is decoded strictly.

        A UTF-8 BOM is skipped. An empty MSH-18 means ``default_charset``. A
        bytearray or memoryview (an MLLP buffer) is copied to bytes first.
        Undecodable bytes raise ``EncodingError`` giving their offset (never the bytes).
        """
        if type(raw) is not bytes:
            raw = bytes(raw)
        # Fast path, the way nearly every message arrives: MSH first, CR terminators,
        # an ASCII MSH line with usual separators. Anything else takes the general
        # path below, which gives the same result (and the precise errors).
        end = raw.find(b"\r")
        if end >= 8 and raw.startswith(b"MSH") and b"\n" not in raw:
            head = raw[:end].decode("latin-1")
            seps = _seps_fast.get(head[3:9])
            if seps is not None and head.isascii():
                msh_parts = head.split(seps.field)
                try:
                    name = msh_parts[17]
                except IndexError:
                    name = ""
                if name not in _CODECS:
                    name = _charset_name(name, seps) or default_charset.strip(" ")
                codec = _CODECS.get(name) or codec_for(name)
                try:
                    text = raw.decode(codec)
                except UnicodeDecodeError as exc:
                    raise _decode_error(raw, exc, name, 0) from exc
                # The MSH line is ASCII, so its CR is at the same index in the text.
                trailing = raw.endswith(b"\r")
                if seps._odd_line.search(text, end, len(text) - 1 if trailing else len(text)) is None:
                    lines = text.split("\r")
                    if trailing:
                        lines.pop()
                    msh_parts.insert(1, seps.field)
                    return cls._from_lines(lines, seps, msh_parts, trailing, text, name, codec, raw)
        offset = 3 if raw.startswith(_BOM) else 0
        body = raw[offset:] if offset else raw
        name, known_seps, known_parts = _sniff_header(body)
        name = name or default_charset.strip(" ")
        codec = _CODECS.get(name) or codec_for(name)
        try:
            text = body.decode(codec)
        except UnicodeDecodeError as exc:
            raise _decode_error(body, exc, name, offset) from exc
        return cls._parse_text(text, known_seps, known_parts, name, codec, raw)

    @classmethod
    def from_segments(
        cls,
        segments: Iterable[Sequence[str]],
        separators: Separators = DEFAULT_SEPARATORS,
        charset: str | None = None,
    ) -> Message:
        """Build a message from ``[name, field1, field2, ...]`` items of RAW (already escaped) texts.

        For MSH the field separator is implied and the first item after the name is
        MSH-2: ``["MSH", seps.encoding_characters, msh3, msh4, ...]`` — the segment
        is simply the items joined with the field separator, as for any other.
        ``charset`` is the MSH-18 name to use when the MSH carries none (default
        "UNICODE UTF-8"); it must agree with MSH-18 when both are given.
        Mistakes are programming errors: ``ValueError``.
        """
        fs = separators.field
        lines: list[str] = []
        for item in segments:
            position = len(lines) + 1
            if isinstance(item, str) or not item:
                raise ValueError(f"segment {position}: expected a sequence [name, field1, ...]")
            name = item[0]
            if _NAME.fullmatch(name) is None:
                raise ValueError(f"segment {position}: invalid segment name {name!r}")
            if (position == 1) != (name == "MSH"):
                raise ValueError("the first segment, and only it, must be MSH")
            if position == 1 and (len(item) < 2 or item[1] != separators.encoding_characters):
                raise ValueError("MSH: the item after the name must be MSH-2, separators.encoding_characters")
            for n, text in enumerate(item[1:], 1):
                if fs in text or "\r" in text or "\n" in text:
                    number = n + 1 if position == 1 else n
                    raise ValueError(f"{name}-{number}: raw field holds the field separator or a CR/LF")
            lines.append(fs.join(item))
        if not lines:
            raise ValueError("a message needs at least an MSH segment")
        msh_parts = lines[0].split(fs)
        msh_parts.insert(1, fs)
        msg = cls._from_lines(lines, separators, msh_parts, True, None)
        msh18 = msg._msh18()
        wanted = charset.strip(" ") if charset is not None else ""
        if msh18 and wanted and wanted != msh18:
            raise ValueError(f"charset {wanted!r} disagrees with MSH-18 {msh18!r}")
        name = msh18 or wanted or _BUILD_CHARSET
        msg.codec = codec_for(name)
        msg.charset = name
        return msg

    def without(self, names: frozenset[str] = frozenset()) -> Message:
        """A copy of this message, less the segments named in ``names`` (never the MSH): changes
        to either leave the other as it was."""
        kept = [
            # MSH items start at MSH-2: the field separator is implied by the separators.
            [seg.name, *(seg.fields()[1:] if seg.name == "MSH" else seg.fields())]
            for seg in self.segments
            if seg.name == "MSH" or seg.name not in names
        ]
        return Message.from_segments(kept, self.separators, charset=self.charset)

    # -- output -------------------------------------------------------------

    def _sync(self) -> None:
        """Bring _lines up to date with modified segments."""
        if self._stale:
            lines = self._lines
            for i, seg in enumerate(self._objs):
                if seg is not None and seg._text is None:
                    seg._text = seg._join()
                    lines[i] = seg._text
            self._stale = False

    def _changed(self) -> None:
        self._text = None
        self._raw = None
        self._stale = True

    def to_er7(self) -> str:
        """The message as ER7 text, segments ended by CR.

        An unmodified message parsed from CR-terminated text gives that text back
        exactly; the final terminator is kept or omitted as in the input.
        """
        self._sync()
        text = self._text
        if text is None:
            text = "\r".join(self._lines)
            if self._trailing:
                text += "\r"
            self._text = text
        return text

    def encode(self, charset: str | None = None) -> bytes:
        """Wire bytes.

        Unmodified and ``charset`` None: the exact bytes decoded (BOM and line
        ends included). Otherwise ``to_er7()`` encoded with ``codec``, or with the
        codec of ``charset`` (an MSH-18 name), which is then written to MSH-18 of
        the output only (this message is left unchanged).
        """
        if charset is None:
            if self._raw is not None:
                return self._raw
            name, codec, text = self.charset, self.codec, self.to_er7()
        else:
            name = charset.strip(" ")
            codec = codec_for(name)
            text = self._er7_with_charset(name)
        try:
            return text.encode(codec)
        except UnicodeEncodeError as exc:
            char = ord(text[exc.start])
            where = _where_text(text, exc.start, self.separators.field)
            raise EncodingError(
                f"character U+{char:04X} at offset {exc.start}{where} cannot be encoded in {name}",
                location="MSH-18",
            ) from exc

    def _er7_with_charset(self, name: str) -> str:
        self._sync()
        parts = list(self._msh_parts)
        if len(parts) <= 18:
            parts.extend([""] * (19 - len(parts)))
        parts[18] = escape(name, self.separators)
        lines = [self.separators.field.join([parts[0], *parts[2:]]), *self._lines[1:]]
        return "\r".join(lines) + ("\r" if self._trailing else "")

    def __repr__(self) -> str:
        # Header identifiers only: no patient data in reprs.
        return (
            f"<Message {self.message_type}^{self.trigger} control_id={self.control_id!r} "
            f"segments={len(self._lines)} charset={self.charset!r}>"
        )

    # -- segments -----------------------------------------------------------

    def _segment_at(self, index: int) -> Segment:
        seg = self._objs[index]
        if seg is None:
            parts = self._msh_parts if index == 0 else None
            seg = self._objs[index] = Segment(self._lines[index], self.separators, parts)
        return seg

    @property
    def segments(self) -> Sequence[Segment]:
        """All segments, in order (a new list: adding to it does not change the message)."""
        return [self._segment_at(i) for i in range(len(self._lines))]

    def segment(self, name: str, occurrence: int = 1) -> Segment | None:
        """The ``occurrence``-th (1-based) segment called ``name``, or None."""
        if len(name) != 3 or occurrence < 1:
            raise ValueError(f"bad segment name or occurrence: {name!r}, {occurrence}")
        return self._find(name, occurrence)

    def _find(self, name: str, occurrence: int) -> Segment | None:
        if name == "MSH":
            return self._segment_at(0) if occurrence == 1 else None
        text = self._text
        if text is not None:
            # While cached, the text is exactly the lines joined by CR, and no data holds a
            # CR: a C-level search for CR+NAME beats a Python loop over the lines.
            needle = "\r" + name
            pos = text.find(needle)
            while pos >= 0:
                occurrence -= 1
                if not occurrence:
                    index = text.count("\r", 0, pos) + 1
                    seg = self._objs[index]
                    if seg is None:
                        seg = self._objs[index] = Segment(self._lines[index], self.separators)
                    return seg
                pos = text.find(needle, pos + 4)
            return None
        for i, line in enumerate(self._lines):
            # Names never change, so even a stale line tells the name.
            if line.startswith(name):
                occurrence -= 1
                if not occurrence:
                    return self._segment_at(i)
        return None

    def segments_named(self, name: str) -> list[Segment]:
        if len(name) != 3:
            raise ValueError(f"bad segment name {name!r}")
        return [self._segment_at(i) for i, line in enumerate(self._lines) if line.startswith(name)]

    def _append_segments(self, name: str, occurrence: int) -> Segment:
        # set() on a missing segment creates it (and any missing earlier occurrences) at the end.
        missing = occurrence - len(self.segments_named(name))
        for _ in range(missing):
            self._lines.append(name)
            self._objs.append(None)
        self._changed()
        return self._segment_at(len(self._lines) - 1)

    # -- paths --------------------------------------------------------------

    def _value(self, seg: Segment, fld: int, rep: int | None, comp: int | None, sub: int | None) -> str:
        raw = seg._get(fld, rep, comp, sub)
        if not raw or (fld <= 2 and seg.name == "MSH"):
            return raw
        seps = self.separators
        if sub is None and (seps.subcomponent in raw or (comp is None and seps.component in raw)):
            return raw  # not a leaf: unescaping would make its structure ambiguous
        if seps.escape in raw:
            return unescape(raw, seps, self.codec)
        return raw

    def get(self, path: str) -> str:
        """The unescaped value at ``path``; ``""`` when absent.

        When the addressed element is not a leaf (a field or repetition holding
        components or subcomponents, a component holding subcomponents), its RAW
        text is returned instead, since unescaping it would lose its structure.
        MSH-1 and MSH-2 are returned as they are.
        """
        seg_name, occ, fld, rep, comp, sub = _parse_path(path)
        seg = self._find(seg_name, occ)
        if seg is None:
            return ""
        return self._value(seg, fld, rep, comp, sub)

    def get_raw(self, path: str) -> str:
        """The raw (escaped) text at ``path``; ``""`` when absent."""
        seg_name, occ, fld, rep, comp, sub = _parse_path(path)
        seg = self._find(seg_name, occ)
        if seg is None:
            return ""
        return seg._get(fld, rep, comp, sub)

    def set(self, path: str, value: str) -> None:
        """Escape ``value`` and store it at ``path`` (see ``set_raw``)."""
        self.set_raw(path, escape(value, self.separators))

    def set_raw(self, path: str, value: str) -> None:
        """Store raw ``value`` at ``path``, growing the segment, field, repetitions and components as needed.

        Without ``[rep]`` the first repetition is replaced, the others kept
        (``set_repetitions`` replaces a whole field). A missing segment is
        appended at the end of the message. MSH-1/MSH-2 cannot be set.
        """
        seg_name, occ, fld, rep, comp, sub = _parse_path(path)
        seps = self.separators
        if seps.field in value or "\r" in value or "\n" in value:
            raise ValueError("a raw value cannot hold the field separator or a line break: use set()")
        seg = self._writable(seg_name, occ, fld)
        seg._set(fld, rep, comp, sub, value)
        self._changed()

    def _writable(self, seg_name: str, occ: int, fld: int) -> Segment:
        if seg_name == "MSH":
            if occ != 1:
                raise ValueError("a message has a single MSH")
            if fld <= 2:
                raise ValueError("MSH-1 and MSH-2 (the separators) cannot be set")
            return self._segment_at(0)
        seg = self.segment(seg_name, occ)
        return seg if seg is not None else self._append_segments(seg_name, occ)

    def repetitions(self, path: str) -> list[str]:
        """Raw repetitions of the field at ``path`` (``SEG[occ]-FIELD``); ``[]`` when empty."""
        seg_name, occ, fld, rep, comp, _ = _parse_path(path)
        if rep is not None or comp is not None:
            raise ValueError(f"repetitions() takes a field path such as PID-3, not {path!r}")
        seg = self.segment(seg_name, occ)
        if seg is None:
            return []
        value = seg.field(fld)
        if not value:
            return []
        if seg_name == "MSH" and fld <= 2:
            return [value]
        return value.split(self.separators.repetition)

    def set_repetitions(self, path: str, values: Sequence[str]) -> None:
        """Replace the whole field at ``path`` (``SEG[occ]-FIELD``) with these RAW repetitions."""
        seg_name, occ, fld, rep, comp, _ = _parse_path(path)
        if rep is not None or comp is not None:
            raise ValueError(f"set_repetitions() takes a field path such as PID-3, not {path!r}")
        seps = self.separators
        for value in values:
            if seps.field in value or seps.repetition in value or "\r" in value or "\n" in value:
                raise ValueError("a raw repetition cannot hold the field or repetition separator or a CR/LF")
        seg = self._writable(seg_name, occ, fld)
        parts = seg._split()
        if len(parts) <= fld:
            parts.extend([""] * (fld + 1 - len(parts)))
        parts[fld] = seps.repetition.join(values)
        seg._text = None
        self._changed()

    # -- header shortcuts (unescaped, first repetition) -----------------------

    def _msh18(self) -> str:
        parts = self._msh_parts
        value = parts[18] if len(parts) > 18 else ""
        return value if value in _CODECS else _charset_name(value, self.separators)

    def _header(self, value: str, comp: int) -> str:
        """get("MSH-n[.comp]") for an MSH field value that is not purely alphanumeric."""
        seps = self.separators
        if seps.repetition in value:
            value = value.split(seps.repetition, 1)[0]
        if comp:
            if seps.component in value:
                items = value.split(seps.component, comp)
                value = items[comp - 1] if comp <= len(items) else ""
            elif comp > 1:
                return ""
        elif seps.component in value:
            return value
        if seps.subcomponent in value:
            return value
        if seps.escape in value:
            return unescape(value, seps, self.codec)
        return value

    # The header is read on every message, so each property reads its field
    # directly; an alphanumeric value holds no separator nor escape (both are
    # punctuation) and is returned as is.

    @property
    def sending_application(self) -> str:
        """MSH-3.1, unescaped ("" when absent)."""
        try:
            value = self._msh_parts[3]
        except IndexError:
            return ""
        return value if value.isalnum() or not value else self._header(value, 1)

    @property
    def sending_facility(self) -> str:
        """MSH-4.1, unescaped ("" when absent)."""
        try:
            value = self._msh_parts[4]
        except IndexError:
            return ""
        return value if value.isalnum() or not value else self._header(value, 1)

    @property
    def receiving_application(self) -> str:
        """MSH-5.1, unescaped ("" when absent)."""
        try:
            value = self._msh_parts[5]
        except IndexError:
            return ""
        return value if value.isalnum() or not value else self._header(value, 1)

    @property
    def receiving_facility(self) -> str:
        """MSH-6.1, unescaped ("" when absent)."""
        try:
            value = self._msh_parts[6]
        except IndexError:
            return ""
        return value if value.isalnum() or not value else self._header(value, 1)

    @property
    def message_type(self) -> str:
        """MSH-9.1, unescaped ("" when absent)."""
        try:
            value = self._msh_parts[9]
        except IndexError:
            return ""
        return value if value.isalnum() or not value else self._header(value, 1)

    @property
    def trigger(self) -> str:
        """MSH-9.2, unescaped ("" when absent)."""
        try:
            value = self._msh_parts[9]
        except IndexError:
            return ""
        return "" if value.isalnum() or not value else self._header(value, 2)

    @property
    def structure(self) -> str:
        """MSH-9.3, unescaped ("" when absent)."""
        try:
            value = self._msh_parts[9]
        except IndexError:
            return ""
        return "" if value.isalnum() or not value else self._header(value, 3)

    @property
    def control_id(self) -> str:
        """MSH-10, unescaped ("" when absent)."""
        try:
            value = self._msh_parts[10]
        except IndexError:
            return ""
        return value if value.isalnum() or not value else self._header(value, 0)

    @property
    def processing_id(self) -> str:
        """MSH-11.1, unescaped ("" when absent)."""
        try:
            value = self._msh_parts[11]
        except IndexError:
            return ""
        return value if value.isalnum() or not value else self._header(value, 1)

    @property
    def version(self) -> str:
        """MSH-12.1, unescaped ("" when absent)."""
        try:
            value = self._msh_parts[12]
        except IndexError:
            return ""
        return value if value.isalnum() or not value else self._header(value, 1)

    @property
    def accept_ack_type(self) -> str:
        """MSH-15, unescaped ("" when absent)."""
        try:
            value = self._msh_parts[15]
        except IndexError:
            return ""
        return value if value.isalnum() or not value else self._header(value, 0)

    @property
    def application_ack_type(self) -> str:
        """MSH-16, unescaped ("" when absent)."""
        try:
            value = self._msh_parts[16]
        except IndexError:
            return ""
        return value if value.isalnum() or not value else self._header(value, 0)
