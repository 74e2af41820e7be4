"""HL7 v2.5 message structures, compiled once from hl7apy's definitions into small checkers.

hl7apy is the reference for what v2.5 says (segment order, groups, cardinalities, required
and repeating fields, data types) but parsing with it costs milliseconds per message. Here its
tables are read once per structure and turned into plain tuples; messages are read with the
ER7 codec of :mod:`gateway.hl7.er7`.

v2.5 is the default. The French specifications that use another version or pre-adopt a
later segment (conformance/hl7v2/french.py) ask for a structure of another hl7apy version
(``version="2.6"``) with segments inserted into its groups (``inserts``).

Z segments are local by definition (HL7 v2.5 §2.5.2): the structure walk skips them, and the
PAM FR rules check the ones that profile defines.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from conformance.findings import Finding, Severity

# Rule ids (documented in conformance/rules.md).
SEG_MISSING: Final = "HL7-SEG-001"
SEG_UNEXPECTED: Final = "HL7-SEG-002"
FLD_REQUIRED: Final = "HL7-FLD-001"
FLD_REPEAT: Final = "HL7-FLD-002"
FLD_TYPE: Final = "HL7-FLD-003"

_UNBOUNDED: Final = 1 << 30

# Formats of the primitive types worth checking (HL7 v2.5 §2.A); the others are free text or coded.
_DTM: Final = r"\d{4}(?:\d{2}(?:\d{2}(?:\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,4})?)?)?)?)?)?(?:[+-]\d{4})?"
_FORMATS: Final[dict[str, re.Pattern[str]]] = {
    "NM": re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"),
    "SI": re.compile(r"\d{1,4}"),
    "DT": re.compile(r"\d{4}(?:\d{2}(?:\d{2})?)?"),
    "DTM": re.compile(_DTM),
    "TM": re.compile(r"\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,4})?)?)?(?:[+-]\d{4})?"),
}


@dataclass(frozen=True, slots=True)
class SegmentSpec:
    """What v2.5 says of one segment's fields (1-based, MSH numbered as in HL7)."""

    name: str
    required: tuple[int, ...]
    single: frozenset[int]  # fields that may not repeat
    # (field, component or 0 for the whole field, type) for the typed leaves checked
    typed: tuple[tuple[int, int, str], ...]


@dataclass(frozen=True, slots=True)
class Node:
    """A segment (``children`` empty) or a group in a message structure."""

    name: str
    min: int
    max: int
    children: tuple[Node, ...] = ()
    first: frozenset[str] = frozenset()  # segment names that can open this node

    @property
    def is_group(self) -> bool:
        return bool(self.children)


def _card(card: tuple[int, int]) -> tuple[int, int]:
    low, high = card
    return low, (_UNBOUNDED if high == -1 else high)


@dataclass(frozen=True, slots=True)
class Insert:
    """A segment a profile adds to a group of the base structure, right after one of its segments."""

    group: str  # hl7apy's group name, e.g. ORU_R01_OBSERVATION
    after: str  # the segment of that group it follows
    segment: str
    min: int = 0
    max: int = -1  # -1: unbounded


def _build(children: Sequence[Any], inserts: tuple[Insert, ...] = (), group: str = "") -> tuple[Node, ...]:
    nodes: list[Node] = []
    for name, sub, card, kind in children:
        low, high = _card(card)
        if kind == "GRP":
            kids = _build(sub[1], inserts, name)
            nodes.append(Node(name, low, high, kids, _first_of(kids)))
        else:
            nodes.append(Node(name, low, high, (), frozenset((name,))))
            for extra in inserts:
                if extra.group == group and extra.after == name:
                    lo, hi = _card((extra.min, extra.max))
                    nodes.append(Node(extra.segment, lo, hi, (), frozenset((extra.segment,))))
    return tuple(nodes)


def _module(version: str, kind: str) -> Any:
    # "2.5" → hl7apy.v2_5.messages; "2.8.2" → hl7apy.v2_8_2.segments
    return importlib.import_module(f"hl7apy.v{version.replace('.', '_')}.{kind}")


def _first_of(children: Sequence[Node]) -> frozenset[str]:
    # The segments that can start a sequence: up to and including its first required child.
    names: set[str] = set()
    for child in children:
        names |= child.first
        if child.min:
            break
    return frozenset(names)


@functools.cache
def message_structure(
    name: str, version: str = "2.5", inserts: tuple[Insert, ...] = ()
) -> tuple[Node, ...] | None:
    """The structure called ``name`` (``ADT_A01``) in ``version``, ``inserts`` added; None when absent."""
    definition = _module(version, "messages").MESSAGES.get(name)
    if definition is None:
        return None
    nodes = _build(definition[1], inserts)
    missing = [i for i in inserts if not _has_insert(nodes, i)]
    if missing:
        raise ValueError(f"{name} {version}: no group {missing[0].group} with a {missing[0].after}")
    return nodes


def _has_insert(nodes: Sequence[Node], extra: Insert) -> bool:
    for node in nodes:
        if node.name == extra.group:
            names = [c.name for c in node.children]
            return extra.after in names and extra.segment in names
        if node.is_group and _has_insert(node.children, extra):
            return True
    return False


def structure_known(name: str, version: str = "2.5") -> bool:
    return name in _module(version, "messages").MESSAGES


@functools.cache
def segment_spec(name: str, version: str = "2.5") -> SegmentSpec | None:
    """Field rules of segment ``name`` in ``version``, or None for a segment it does not define."""
    definition = _module(version, "segments").SEGMENTS.get(name)
    if definition is None:
        return None
    required: list[int] = []
    single: set[int] = set()
    typed: list[tuple[int, int, str]] = []
    for fname, fdef, card, _kind in definition[1]:
        number = int(fname.rsplit("_", 1)[1])
        low, high = _card(card)
        if low >= 1 and not (name == "MSH" and number <= 2):
            required.append(number)
        if high == 1:
            single.add(number)
        if fdef[0] == "leaf":
            if fdef[2] in _FORMATS:
                typed.append((number, 0, fdef[2]))
        elif fdef[2] == "TS":
            typed.append((number, 1, "DTM"))
    return SegmentSpec(name, tuple(required), frozenset(single), tuple(typed))


class _Walk:
    """Greedy match of segment names against a structure; HL7 structures are built to allow it."""

    __slots__ = ("findings", "names", "pos")

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.pos = 0
        self.findings: list[Finding] = []

    def sequence(self, nodes: Sequence[Node], context: str) -> None:
        names = self.names
        for node in nodes:
            count = 0
            while self.pos < len(names) and names[self.pos] in node.first:
                if count >= node.max:
                    break
                if node.is_group:
                    start = self.pos
                    self.sequence(node.children, node.name)
                    if self.pos == start:  # nothing consumed: avoid looping on an empty group
                        break
                else:
                    self.pos += 1
                count += 1
            if count < node.min:
                where = names[self.pos - 1] if self.pos else "MSH"
                wanted = node.name if not node.is_group else "/".join(sorted(node.first))
                self.findings.append(
                    Finding(
                        SEG_MISSING,
                        Severity.ERROR,
                        wanted if not node.is_group else node.name,
                        f"required {'segment' if not node.is_group else 'group'} {wanted} missing "
                        f"in {context} (expected after {where})",
                        "required",
                    )
                )


def check_segments(structure_name: str, nodes: tuple[Node, ...], names: list[str]) -> list[Finding]:
    """Structure findings for the message's segment names (Z segments already removed)."""
    walk = _Walk(names)
    walk.sequence(nodes, structure_name)
    findings = walk.findings
    if walk.pos < len(names):
        name = names[walk.pos]
        occurrence = names[: walk.pos + 1].count(name)
        findings.append(
            Finding(
                SEG_UNEXPECTED,
                Severity.ERROR,
                f"{name}[{occurrence}]" if occurrence > 1 else name,
                f"segment {name} not allowed here by {structure_name} "
                f"(segment {walk.pos + 1} of the message, Z segments not counted)",
                "structure",
            )
        )
    return findings


def type_ok(datatype: str, value: str) -> bool:
    return _FORMATS[datatype].fullmatch(value) is not None
