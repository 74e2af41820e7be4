"""Independent leaf accounting: which non-empty leaves of an HL7v2 message a FHIR Bundle lost.

This checker is written apart from the mapping engine on purpose: it imports nothing from
``gateway`` and splits ER7 itself with plain string operations, so it cannot share the engine's
mistakes. The engine's *unmapped report* must use the leaf paths defined here, exactly.

Reading a message
-----------------
- A UTF-8 byte-order mark is skipped. Bytes are decoded by MSH-18: ``UNICODE UTF-8`` → utf-8,
  ``8859/1`` → latin-1, ``8859/15`` → iso8859_15, ``ASCII`` → ascii; empty or unknown → utf-8,
  else latin-1.
- Segments end with CR, LF or CRLF; blank lines are ignored. The field separator is MSH's fourth
  character and the encoding characters are MSH-2 as written (component, repetition, escape,
  subcomponent, optional truncation), whatever they are.

Leaves and their paths
----------------------
- Every field splits into repetitions, components and subcomponents; each piece that is not
  split further is a leaf. A leaf is non-empty when its raw text stripped of whitespace is not
  empty; only non-empty leaves are listed.
- Path: segment name, ``[n]`` when it is the n-th segment of that name in the message (n > 1),
  ``-field``, ``[repetition]`` always, ``.component`` when the repetition has more than one
  component, ``.subcomponent`` when that component has more than one subcomponent:
  ``PID-8[1]``, ``PID-13[1].4``, ``PID-3[1].4.2``, ``OBX[3]-5[1].2``. A shown subcomponent
  always comes with its component (``ZXY-1[1].1.2`` for ``a&b``), so that no path is ambiguous.
- MSH-1 and MSH-2 are never leaves; MSH-3 is the first field after the encoding characters.
  The gateway itself reads MSH-3,4,5,6,7,9,10,11,12,15,16,17,18,21 (routing, dedupe, ACK):
  their leaves are listed with ``exempt=True`` and never count as silent.
- A leaf's value is its raw text unescaped, then stripped: ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\`` (and
  ``\\P\\`` with a truncation character) become the message's separators, ``\\.br\\`` a newline,
  ``\\Xhh..\\`` the bytes decoded in the message's charset; formatting and charset escapes
  (``\\H\\ \\N\\ \\.sp\\ \\.in\\ \\.ti\\ \\.sk\\ \\.ce\\ \\.fi\\ \\.nf\\ \\C..\\ \\M..\\ \\Z..\\``) are
  dropped; anything else is kept verbatim.

Evidence that a leaf reached the Bundle
---------------------------------------
A leaf that is neither exempt nor listed in the unmapped report is *silent* unless one of
these holds:

1. Text: its value equals a JSON string value anywhere in the Bundle, or occurs inside one at
   token boundaries (the characters just before and after it are not letters or digits);
   case-sensitive.
2. Number: a value matching ``^[+-]?\\d+(\\.\\d+)?$`` equals (numerically) a JSON number of the
   Bundle.
3. Date/time: a value ``YYYY[MM[DD[HH[MM[SS[.S+]]]]]][+/-ZZZZ]`` whose FHIR form
   ``YYYY[-MM[-DD[THH[:MM[:SS]]]]]``, as far as the value goes (fractional seconds and zone
   ignored), is a prefix of a JSON string of the Bundle.
4. Code: the value is a source code of a concept map in ``mappings/conceptmaps/*.yaml`` and one
   of its target codes equals a JSON string of the Bundle (a boolean target, as Y/N indicators
   have, a JSON boolean). A map is ``source → target`` where the target is a string, a boolean
   or a dict with ``code``; a map may be wrapped as ``{system: ..., map: {...}}``.
5. Qualifier: a universal-id type (``ISO DNS URI URL UUID GUID HCD L M N x400 x500 Random``) is
   carried when the leaf just before it (the previous subcomponent; for a component-level leaf,
   the previous component) is non-empty and itself carried by these rules. ``BDL`` as an address
   type (component 7) is carried when the Bundle holds an extension with url
   ``http://hl7.org/fhir/StructureDefinition/patient-birthPlace``.
6. Explicit null: a leaf whose value is ``""`` is carried when an entry's ``request`` holds an
   extension with url ``urn:passerelle:clear``; no other rule applies to it.
7. Range: numbers joined by ``-`` (``70-80``, a reference range) are carried when each number is
   a JSON number of the Bundle.
8. Value type: OBX-2 (HL7 table 0125) is carried by the value it types: ``ED`` when the Bundle
   holds an attachment (an object with ``contentType``), any other type when it holds a
   ``value[x]`` element. The parts of an ED value (OBX-5 components 2-4: type, subtype,
   encoding) are carried when an attachment's ``contentType`` holds the subtype (case-insensitive),
   the type with it (``TEXT^XML`` may become ``application/xml``), and the encoding with any
   attachment.
9. HL7 table name: a coding system named ``HL7nnnn`` (HL7 table 0396: the HL7 table nnnn) is
   carried when a JSON string of the Bundle is its code system ``http://terminology.hl7.org/
   CodeSystem/v2-nnnn``.

A leaf whose value is empty after unescaping (only ``\\.br\\``, say) can only be reported.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml

CONCEPTMAPS = Path(__file__).resolve().parents[1] / "mappings" / "conceptmaps"

# Header fields the gateway reads for routing, deduplication and the ACK.
EXEMPT_MSH_FIELDS = frozenset({3, 4, 5, 6, 7, 9, 10, 11, 12, 15, 16, 17, 18, 21})

UNIVERSAL_ID_TYPES = frozenset(
    {"ISO", "DNS", "URI", "URL", "UUID", "GUID", "HCD", "L", "M", "N", "x400", "x500", "Random"}
)
BIRTHPLACE_URL = "http://hl7.org/fhir/StructureDefinition/patient-birthPlace"
CLEAR_URL = "urn:passerelle:clear"
EXPLICIT_NULL = '""'

CODECS = {"UNICODE UTF-8": "utf-8", "8859/1": "latin-1", "8859/15": "iso8859_15", "ASCII": "ascii"}
BOM = b"\xef\xbb\xbf"

NUMBER = re.compile(r"[+-]?\d+(\.\d+)?")
HL7_TABLE = re.compile(r"HL7(\d{4})")
RANGE = re.compile(r"[+-]?\d+(?:\.\d+)?\s*-\s*[+-]?\d+(?:\.\d+)?")
NUMBERS = re.compile(r"(?<![\d.])[+-]?\d+(?:\.\d+)?|(?<=-)\d+(?:\.\d+)?")
HL7_DATE = re.compile(
    r"(?P<y>\d{4})(?:(?P<mo>\d{2})(?:(?P<d>\d{2})(?:(?P<h>\d{2})(?:(?P<mi>\d{2})"
    r"(?:(?P<s>\d{2})(?:\.\d+)?)?)?)?)?)?(?:[+-]\d{4})?"
)
# Formatting (\H\ \N\ \.sp\ ...) and charset (\C..\ \M..\) escapes, and locally defined ones (\Z..\).
_DROPPED_ESCAPE = re.compile(
    r"H|N|\.(?:sp|in|ti|sk)[+-]?\d*|\.(?:ce|fi|nf)|C[0-9A-Fa-f]{4}|M[0-9A-Fa-f]{6}|Z.*"
)
_HEX_ESCAPE = re.compile(r"X((?:[0-9A-Fa-f]{2})+)")


@dataclass(frozen=True, slots=True)
class Separators:
    field: str
    component: str | None
    repetition: str | None
    escape: str | None
    subcomponent: str | None
    truncation: str | None = None

    @classmethod
    def from_msh2(cls, field: str, msh2: str) -> Separators:
        chars: list[str | None] = [*msh2[:5], None, None, None, None, None]
        return cls(field, chars[0], chars[1], chars[2], chars[3], chars[4])


def _split(text: str, sep: str | None) -> list[str]:
    return text.split(sep) if sep else [text]


def unescape(text: str, seps: Separators, codec: str = "utf-8") -> str:
    """Resolve the escape sequences of one leaf (see the module docstring)."""
    e = seps.escape
    if not e or e not in text:
        return text
    names = {"F": seps.field, "S": seps.component, "T": seps.subcomponent, "R": seps.repetition, "E": e}
    if seps.truncation:
        names["P"] = seps.truncation
    out: list[str] = []
    pos = 0
    while True:
        start = text.find(e, pos)
        end = text.find(e, start + 1) if start >= 0 else -1
        if end < 0:
            break  # no escape left, or a lone escape character: literal
        name = text[start + 1 : end]
        out.append(text[pos:start])
        replaced = names.get(name)
        if replaced is None and name == ".br":
            replaced = "\n"
        if replaced is None and (hexa := _HEX_ESCAPE.fullmatch(name)):
            try:
                replaced = bytes.fromhex(hexa.group(1)).decode(codec)
            except UnicodeDecodeError:
                replaced = None
        if replaced is None and _DROPPED_ESCAPE.fullmatch(name):
            replaced = ""
        out.append(text[start : end + 1] if replaced is None else replaced)
        pos = end + 1
    out.append(text[pos:])
    return "".join(out)


@dataclass(frozen=True, slots=True)
class Segment:
    name: str
    occurrence: int  # 1 for the first segment of this name in the message
    fields: tuple[str, ...]  # fields[n] is field n; for MSH fields[1] is MSH-1 and fields[2] MSH-2


@dataclass(frozen=True, slots=True)
class Er7:
    """A message split on its own separators: enough to enumerate leaves and read an ACK."""

    text: str
    codec: str
    separators: Separators
    segments: tuple[Segment, ...]

    def segment(self, name: str, occurrence: int = 1) -> Segment | None:
        for seg in self.segments:
            if seg.name == name and seg.occurrence == occurrence:
                return seg
        return None

    def raw(
        self, name: str, field: int, rep: int = 1, comp: int = 1, sub: int = 1, occurrence: int = 1
    ) -> str:
        """The raw text at a position ('' when absent); MSH-1 and MSH-2 are returned whole."""
        seg = self.segment(name, occurrence)
        if seg is None or field >= len(seg.fields) or field < 1:
            return ""
        value = seg.fields[field]
        if name == "MSH" and field <= 2:
            return value
        seps = self.separators
        for sep, index in ((seps.repetition, rep), (seps.component, comp), (seps.subcomponent, sub)):
            parts = _split(value, sep)
            if index > len(parts):
                return ""
            value = parts[index - 1]
        return value

    def value(
        self, name: str, field: int, rep: int = 1, comp: int = 1, sub: int = 1, occurrence: int = 1
    ) -> str:
        return unescape(
            self.raw(name, field, rep, comp, sub, occurrence), self.separators, self.codec
        ).strip()


def _codec_name(msh18: str, seps: Separators) -> str | None:
    name = _split(_split(msh18, seps.repetition)[0], seps.component)[0].strip().upper()
    return CODECS.get(name)


def _decode(body: bytes) -> tuple[str, str]:
    """(text, codec) of a message body (no BOM), by its MSH-18."""
    end = min((i for i in (body.find(b"\r"), body.find(b"\n")) if i >= 0), default=len(body))
    head = body[:end].decode("latin-1")
    codec = None
    if head.startswith("MSH") and len(head) > 3:
        parts = head.split(head[3])
        if len(parts) > 17:
            codec = _codec_name(parts[17], Separators.from_msh2(head[3], parts[1]))
    for candidate in [codec] if codec else ["utf-8", "latin-1"]:
        try:
            return body.decode(candidate), candidate
        except UnicodeDecodeError:
            continue
    # The gateway refuses such bytes; the checker still reads what it can.
    return body.decode(codec or "utf-8", errors="replace"), codec or "utf-8"


def read(raw: bytes) -> Er7:
    """Split a message; raises ValueError when it does not start with an MSH segment."""
    body = raw[len(BOM) :] if raw.startswith(BOM) else raw
    text, codec = _decode(body)
    lines = [line for line in re.split(r"\r\n|\r|\n", text) if line.strip()]
    if not lines or not lines[0].startswith("MSH") or len(lines[0]) < 4:
        raise ValueError("the message does not start with an MSH segment")
    fs = lines[0][3]
    seps = Separators.from_msh2(fs, lines[0][4:].split(fs, 1)[0])
    counts: dict[str, int] = {}
    segments = []
    for line in lines:
        parts = line.split(fs)
        name = parts[0]
        if name == "MSH":
            parts.insert(1, fs)  # so that parts[n] is MSH-n
        counts[name] = counts.get(name, 0) + 1
        segments.append(Segment(name, counts[name], tuple(parts)))
    return Er7(text, codec, seps, tuple(segments))


@dataclass(frozen=True, slots=True)
class Leaf:
    path: str
    raw: str  # the text as written, escapes included
    value: str  # unescaped, then stripped
    segment: str
    occurrence: int
    field: int
    repetition: int
    component: int | None  # None when the repetition has a single component
    subcomponent: int | None  # None when the component has a single subcomponent
    exempt: bool  # a header field the gateway reads itself

    @property
    def previous_path(self) -> str | None:
        """The leaf just before this one: the previous subcomponent, else the previous component."""
        base = self.path.rsplit("]", 1)[0] + "]"
        if self.subcomponent is not None:
            return f"{base}.{self.component}.{self.subcomponent - 1}" if self.subcomponent > 1 else None
        if self.component is not None and self.component > 1:
            return f"{base}.{self.component - 1}"
        return None


def _leaves_of(msg: Er7) -> Iterator[Leaf]:
    seps = msg.separators
    for seg in msg.segments:
        prefix = seg.name + (f"[{seg.occurrence}]" if seg.occurrence > 1 else "")
        for n in range(1, len(seg.fields)):
            if seg.name == "MSH" and n <= 2:
                continue
            exempt = seg.name == "MSH" and n in EXEMPT_MSH_FIELDS
            for r, rep in enumerate(_split(seg.fields[n], seps.repetition), 1):
                comps = _split(rep, seps.component)
                for c, comp in enumerate(comps, 1):
                    subs = _split(comp, seps.subcomponent)
                    for s, sub in enumerate(subs, 1):
                        if not sub.strip():
                            continue
                        path = f"{prefix}-{n}[{r}]"
                        subcomponent = s if len(subs) > 1 else None
                        # a shown subcomponent needs its component, or "-1[1].2" would read as one
                        component = c if len(comps) > 1 or subcomponent is not None else None
                        if component is not None:
                            path += f".{c}"
                        if subcomponent is not None:
                            path += f".{s}"
                        value = unescape(sub, seps, msg.codec).strip()
                        yield Leaf(
                            path, sub, value, seg.name, seg.occurrence, n, r, component, subcomponent, exempt
                        )


def leaves(raw: bytes) -> list[Leaf]:
    """Every non-empty leaf of the message, in message order (MSH header leaves flagged exempt)."""
    return list(_leaves_of(read(raw)))


def unknown_paths(raw: bytes, unmapped: Collection[str]) -> list[str]:
    """Paths of the unmapped report that are no non-empty leaf of the message (invented paths)."""
    known = {leaf.path for leaf in leaves(raw)}
    return [p for p in dict.fromkeys(unmapped) if p not in known]


# -- concept maps ---------------------------------------------------------------------------


Target = str | bool  # a code, or a boolean (Y/N indicators map to true/false)


class _CodeLoader(yaml.SafeLoader):
    """Mapping keys as written (a code 01 or Y stays a string); values typed (true is a boolean)."""


def _construct_codes(loader: _CodeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    return {
        (k.value if isinstance(k, yaml.ScalarNode) else loader.construct_object(k, deep=True)): (
            loader.construct_object(v, deep=True)
        )
        for k, v in node.value
    }


_CodeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_codes)


def _target_code(target: Any) -> Target | None:
    if isinstance(target, dict):
        target = target.get("code")
    if isinstance(target, bool) or (isinstance(target, str) and target.strip()):
        return target
    if isinstance(target, int | float):
        return str(target)
    return None


def conceptmap_codes(directory: Path = CONCEPTMAPS) -> dict[str, frozenset[Target]]:
    """Source code → the target codes it has in any concept map of ``directory``."""
    return dict(_conceptmap_codes(directory))


@functools.cache
def _conceptmap_codes(directory: Path) -> tuple[tuple[str, frozenset[Target]], ...]:
    codes: dict[str, set[Target]] = {}
    for path in sorted(directory.glob("*.yaml")):
        data = yaml.load(path.read_text("utf-8"), Loader=_CodeLoader)  # noqa: S506 - a SafeLoader
        if not isinstance(data, dict):
            continue
        for body in data.values():
            entries = (
                body.get("map") if isinstance(body, dict) and isinstance(body.get("map"), dict) else body
            )
            if not isinstance(entries, dict):
                continue
            for source, target in entries.items():
                code = _target_code(target)
                if code is not None:
                    codes.setdefault(str(source), set()).add(code)
    return tuple((k, frozenset(v)) for k, v in sorted(codes.items()))


# -- evidence -------------------------------------------------------------------------------


def _walk(node: Any, key: str | None = None) -> Iterator[tuple[str | None, Any]]:
    """(key it is held under, value) for every value of a JSON tree; list items keep their list's key."""
    yield key, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)


def _extension_urls(node: Any) -> set[str]:
    return {
        v["url"]
        for k, v in _walk(node)
        if k in ("extension", "modifierExtension") and isinstance(v, dict) and isinstance(v.get("url"), str)
    }


def fhir_date_prefix(value: str) -> str | None:
    """The FHIR form of an HL7 date/time as far as it goes; None when it is no HL7 date/time."""
    m = HL7_DATE.fullmatch(value)
    if m is None:
        return None
    out = m["y"]
    if m["mo"]:
        out += "-" + m["mo"]
    if m["d"]:
        out += "-" + m["d"]
    if m["h"]:
        out += "T" + m["h"]
    if m["mi"]:
        out += ":" + m["mi"]
    if m["s"]:
        out += ":" + m["s"]
    return out


class Evidence:
    """What a Bundle shows, indexed once, to tell for each leaf whether it reached the Bundle."""

    def __init__(
        self, bundle: Mapping[str, Any], codes: Mapping[str, frozenset[Target]] | None = None
    ) -> None:
        strings: list[str] = []
        numbers: set[Decimal] = set()
        self.booleans: set[bool] = set()
        for _, v in _walk(bundle):
            if isinstance(v, str):
                strings.append(v)
            elif isinstance(v, bool):
                self.booleans.add(v)
            elif isinstance(v, int | float):
                numbers.add(Decimal(repr(v)) if isinstance(v, float) else Decimal(v))
        self.strings = set(strings)
        # One NUL-separated text: a value is searched once, a NUL never being a letter or digit.
        self.text = "\0" + "\0".join(strings) + "\0"
        self.numbers = numbers
        self.codes = conceptmap_codes() if codes is None else codes
        self.birthplace = BIRTHPLACE_URL in _extension_urls(bundle)
        keys = {k for k, _ in _walk(bundle) if k}
        self.values = any(k.startswith("value") and k[5:6].isupper() for k in keys)
        types = [
            v["contentType"].lower()
            for _, v in _walk(bundle)
            if isinstance(v, dict) and isinstance(v.get("contentType"), str)
        ]
        self.content_types = "\0".join(types)
        self.attachments = bool(types)
        self.clear = any(
            CLEAR_URL in _extension_urls(entry.get("request"))
            for entry in bundle.get("entry", [])
            if isinstance(entry, dict)
        )

    def text_found(self, value: str) -> bool:
        if value in self.strings:
            return True
        text, size = self.text, len(value)
        at = text.find(value)
        while at >= 0:
            # the text starts and ends with NUL, so both neighbours exist
            if not text[at - 1].isalnum() and not text[at + size].isalnum():
                return True
            at = text.find(value, at + 1)
        return False

    def carried(self, leaf: Leaf, by_path: Mapping[str, Leaf]) -> bool:
        value = leaf.value
        if not value:
            return False
        if value == EXPLICIT_NULL:
            return self.clear
        if self.text_found(value):
            return True
        if NUMBER.fullmatch(value):
            try:
                if Decimal(value) in self.numbers:
                    return True
            except InvalidOperation:
                pass
        prefix = fhir_date_prefix(value)
        if prefix is not None and "\0" + prefix in self.text:
            return True
        for code in self.codes.get(value, ()):
            if code in (self.booleans if isinstance(code, bool) else self.strings):
                return True
        if value in UNIVERSAL_ID_TYPES:
            before = by_path.get(leaf.previous_path or "")
            if before is not None and self.carried(before, by_path):
                return True
        if RANGE.fullmatch(value) and all(Decimal(n) in self.numbers for n in NUMBERS.findall(value)):
            return True
        if leaf.segment == "OBX" and self._typed(leaf, by_path):
            return True
        table = HL7_TABLE.fullmatch(value)
        if table is not None and f"http://terminology.hl7.org/CodeSystem/v2-{table.group(1)}" in self.strings:
            return True
        return value == "BDL" and leaf.component == 7 and leaf.subcomponent is None and self.birthplace

    def _typed(self, leaf: Leaf, by_path: Mapping[str, Leaf]) -> bool:
        """Rule 8: OBX-2, and the type, subtype and encoding of an ED value."""
        if leaf.field == 2:
            return self.attachments if leaf.value == "ED" else self.values
        prefix = leaf.path.split("-", 1)[0]
        kind = by_path.get(f"{prefix}-2[1]")
        if leaf.field != 5 or kind is None or kind.value != "ED" or not self.attachments:
            return False
        if leaf.component == 3:
            return leaf.value.lower() in self.content_types
        if leaf.component == 2:  # the MIME family may be normalised (TEXT^XML is application/xml)
            subtype = by_path.get(leaf.path.rsplit(".", 1)[0] + ".3")
            return leaf.value.lower() in self.content_types or (
                subtype is not None and subtype.value.lower() in self.content_types
            )
        return leaf.component == 4


def silent_leaves(
    raw: bytes,
    bundle: Mapping[str, Any],
    unmapped: Collection[str],
    *,
    codes: Mapping[str, frozenset[Target]] | None = None,
) -> list[Leaf]:
    """The non-exempt leaves neither listed in the unmapped report nor carried into the Bundle.

    ``codes`` are the concept maps' codes (default: this checkout's, see ``conceptmap_codes``).
    """
    reported = set(unmapped)
    found = leaves(raw)
    by_path = {leaf.path: leaf for leaf in found}
    evidence = Evidence(bundle, codes)
    return [
        leaf
        for leaf in found
        if not leaf.exempt and leaf.path not in reported and not evidence.carried(leaf, by_path)
    ]
