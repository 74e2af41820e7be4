"""Declarative HL7v2 → FHIR mappings: YAML rules, concept maps, named functions.

A mapping file (``mappings/*.yaml``) says which events it serves and which
resources it builds. Each resource has rules; a rule reads an ER7 path and sets
a FHIR element::

    name: pam-fr-adt
    events: ["ADT^A01", "ADT^A04"]
    resources:
      - key: patient                  # other rules refer to it as {ref: patient}
        type: Patient
        identity: identifier          # found again by this element's namespaced system|value
        key: [PI]                     # which identifier, by type, when several carry a system
        required: {gender: unknown}   # a required element the message leaves empty: this, and a warning
        rules:
          - set: gender
            from: PID-8
            map: hl7-0001-gender      # a concept map (mappings/conceptmaps/*.yaml)
          - set: identifier[]         # [] appends one element per repetition
            each: PID-3               # repetitions; inner "from" paths are relative (".1", ".4.2")
            rules:
              - {set: "", fn: cx_identifier, kind: patient}   # namespaced (gateway.mapping.namespaces)
          - set: birthDate
            from: PID-7
            fn: hl7_date              # a named Python function (gateway.mapping.functions)
          - set: extension[]
            fn: identity_reliability  # functions may read the whole message
            when: {from: PID-32, not_in: ["", "VIDE"]}

Mapping code never touches sockets or databases.

**Every leaf is accounted for.** A value counts as mapped only when a rule (or a function) put it
into the output; reading it for a condition does not count. Every non-empty leaf (segment
occurrence, repetition, component, subcomponent) that no rule put anywhere is listed in the
unmapped report by its full path (``OBX[3]-5[1].2``, see :mod:`gateway.hl7.path`).

**How a resource meets the stored one** is its write policy (:mod:`gateway.mapping.ownership`):
``merge`` (a conditional PUT the repository merges), ``replace`` (a conditional PUT) or
``create`` (a POST with ``ifNoneExist``). Its key is always a namespaced identifier.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import orjson

from gateway.core.errors import ConfigError, UnsupportedMessage, ValidationError
from gateway.hl7 import path as er7_path
from gateway.hl7.er7 import Message, Segment, unescape
from gateway.mapping.namespaces import Authority, Namespaces, Resolved, is_kind
from gateway.mapping.ownership import FILE as OWNERSHIP_FILE
from gateway.mapping.ownership import POLICIES, Ownership
from gateway.mapping.rules import (
    AllOf,
    ConceptMap,
    Condition,
    RuleError,
    When,
    check_keys,
    check_names,
    is_empty,
    load_yaml,
    look_up,
    parse_when,
    read_mappings,
    rule_failure,
    strip_lines,
    value_sources,
)

__all__ = ["Context", "Layout", "Library", "MappingResult", "RuleError", "rule_failure", "run"]

Leaf = tuple[str, int, int, int, int, int]  # segment, occurrence, field, repetition, component, subcomponent
Function = Callable[["Context", Any], Any]

NULL: Final = '""'  # HL7's explicit null: "delete the value held"
WRITE_POLICY: Final = "urn:passerelle:write-policy"
CLEAR: Final = "urn:passerelle:clear"
IF_ABSENT: Final = "urn:passerelle:if-absent"
# Reference data several parts of a message may name with small differences (a doctor's name
# spelt twice): the first is kept, with a warning. Any other resource named twice with different
# content refuses the message.
SHARED_TYPES: Final = frozenset({"Practitioner", "Organization", "Location"})
UNSUPPORTED_FILE: Final = "unsupported.yaml"
# Header fields the gateway itself reads (routing, sender, dedupe, ACK): not content.
HEADER_FIELDS: Final = frozenset({3, 4, 5, 6, 7, 9, 10, 11, 12, 15, 16, 17, 18, 21})
_RESERVED_FILES: Final = frozenset({OWNERSHIP_FILE, UNSUPPORTED_FILE})
# An element path; a leading "_" names a primitive's extensions (_birthDate).
_ELEMENT = re.compile(
    r"^_?[a-zA-Z][a-zA-Z0-9]*(?:\[(?:\d+)?\])?(?:\.[a-zA-Z][a-zA-Z0-9]*(?:\[(?:\d+)?\])?)*$"
)


@dataclass(frozen=True, slots=True)
class Degradation:
    """A value the mapping could not carry as sent: reported, and refused by a strict channel."""

    text: str
    location: str | None
    code: str  # HL7 table 0357

    def __str__(self) -> str:
        return self.text


@dataclass(slots=True)
class Context:
    """What a rule sees: the message, the current repetition (inside ``each``), and the output so far."""

    message: Message
    warnings: list[str]
    consumed: set[Leaf]  # leaves some rule put into the output
    refs: dict[str, str | list[str]]  # resource key → fullUrl (a list for one-per-segment resources)
    scope: str | None = None  # raw text of the current repetition
    at: tuple[str, int, int, int] | None = None  # where that repetition is: segment, occurrence, field, rep
    segment: tuple[str, int] | None = None  # the segment iterated by a segment-level "each"
    timezone: str = "Europe/Paris"  # for HL7 times sent without a zone
    fr_core_version: str = "2.1.0"  # the FR Core release the output is shaped to
    layout: Layout | None = None  # segment groups (ORU: ORC/OBR), when the mapping declares them
    group: int | None = None  # the group of the segment being iterated
    section: int | None = None  # and its section
    ref_segments: dict[str, str] = field(default_factory=dict)  # key → segment of a per-segment resource
    skipped: set[str] = field(default_factory=set)  # fullUrls of resources already found not produced
    forward: set[str] = field(default_factory=set)  # fullUrls referenced before being decided
    decided: set[str] = field(default_factory=set)  # fullUrls whose resource was built or skipped
    found: dict[tuple[str, int], Segment | None] = field(default_factory=dict)  # segment lookups so far
    namespaces: Namespaces = field(default_factory=Namespaces)
    kind: str | None = None  # the identifier kind the rule being applied names (``kind:``)
    source: str | None = None  # the ``from:`` of the rule whose function runs
    degraded: list[Degradation] = field(default_factory=list)  # what strict channels refuse
    # Top-level elements the message nulled (""), with the leaves that said so: they count as mapped
    # only when the entry carries the removal (an update, not a create).
    nulls: dict[str, list[Leaf]] = field(default_factory=dict)
    defaulted: list[str] = field(default_factory=list)  # elements set to the mapping's "unknown" value
    concept_maps: Mapping[str, ConceptMap] = field(default_factory=dict)  # for functions that translate
    memo: dict[tuple[Any, ...], Any] = field(default_factory=dict)  # what functions work out once a message
    _order: list[tuple[str, int]] | None = None  # (segment, occurrence) in message order, when asked
    _split: tuple[str, list[list[str]]] | None = None  # the current scope, split
    _sender: tuple[str, str, str] | None = None

    def enter(self, segment: tuple[str, int] | None) -> None:
        """Iterate ``segment`` (name, occurrence): reads and references follow its group."""
        self.segment = segment
        layout = self.layout
        if layout is not None and segment is not None:
            self.group, self.section = layout.group_of.get(segment), layout.section_of.get(segment)
        else:
            self.group = self.section = None

    def find(self, seg: str, occurrence: int) -> Segment | None:
        """``message.segment``, looked up once per message: the message does not change while mapped."""
        key = (seg, occurrence)
        found = self.found
        if key in found:
            return found[key]
        segment = found[key] = self.message.segment(seg, occurrence)
        return segment

    def members(self, seg: str) -> list[int]:
        """The occurrences of ``seg`` that belong here: the current group's (or section's), else all."""
        if self.layout is not None:
            mine = self.layout.occurrences(seg, self.group, self.section)
            if mine is not None:
                return mine
            if self.group is not None:
                return self.layout.in_group.get((seg, self.group), [])
        return list(range(1, len(self.message.segments_named(seg)) + 1))

    def occurrence(self, seg: str) -> int | None:
        """Which occurrence of ``seg`` an unqualified path means here; None when its group has none."""
        if self.segment is not None and self.segment[0] == seg:
            return self.segment[1]
        if self.layout is not None:
            mine = self.layout.occurrences(seg, self.group, self.section)
            if mine is not None:
                return mine[0] if mine else None
        return 1

    # -- reading ----------------------------------------------------------------------------

    def locate(self, path: str) -> tuple[str, Leaf | None]:
        """The raw (escaped) text of the leaf ``path`` names, and the leaf's key."""
        seg, occ, fld, rep, comp, sub = _read_plan(path)
        if seg == "":
            if self.scope is None:
                raise RuleError(f"relative path {path} outside an 'each'")
            raw, c, s = self.relative(comp, sub)
            at = self.at
            return raw, (at[0], at[1], at[2], at[3], c, s) if at is not None else None
        found = occ if occ is not None else self.occurrence(seg)
        if found is None:
            return "", None
        segment = self.find(seg, found)
        if segment is None:
            return "", None
        text = segment.field(fld)
        if seg == "MSH" and fld <= 2:
            return text, None
        if not text:
            return "", None
        seps = self.message.separators
        if rep == 1:
            rep_text = text.partition(seps.repetition)[0]
        else:
            reps = text.split(seps.repetition)
            rep_text = reps[rep - 1] if rep <= len(reps) else ""
        raw, c, s = _pick(rep_text, comp, sub, self.message)
        return raw, (seg, found, fld, rep, c, s)

    def relative(self, comp: int | None, sub: int | None) -> tuple[str, int, int]:
        """The raw leaf of the current repetition at component/subcomponent (split once per scope:
        functions read several parts of one repetition)."""
        scope = self.scope or ""
        split = self._split
        if split is None or split[0] is not scope:
            seps = self.message.separators
            parts = [
                piece.split(seps.subcomponent) if seps.subcomponent in piece else [piece]
                for piece in (scope.split(seps.component) if seps.component in scope else [scope])
            ]
            split = self._split = (scope, parts)
        c, s = comp or 1, sub or 1
        pieces = split[1]
        if c > len(pieces):
            return "", c, s
        subs = pieces[c - 1]
        return (subs[s - 1] if s <= len(subs) else ""), c, s

    def read(self, path: str) -> str:
        """An ER7 path, absolute (PID-5.1) or relative to the current repetition (.1): its text,
        unescaped ("" for HL7's explicit null). Reading does not make it mapped: see ``take``."""
        raw, _ = self.locate(path)
        return _text(raw, self.message)

    def value(self, path: str) -> tuple[str, Leaf | None]:
        """``read``, with the leaf: ``consume(leaf)`` then makes it mapped without reading twice."""
        raw, leaf = self.locate(path)
        text = _text(raw, self.message)
        if not text.strip():  # blanks only: no value (FHIR strings hold a non-blank character)
            return "", None
        return text, leaf

    def take(self, path: str) -> str:
        """``read``, and the leaf counts as mapped: call it for what goes into the output."""
        raw, leaf = self.locate(path)
        value = _text(raw, self.message)
        if not value.strip():  # blanks only: no value (FHIR strings hold a non-blank character)
            return ""
        if leaf is not None:
            self.consumed.add(leaf)
        return value

    def consume(self, leaf: Leaf | None) -> None:
        if leaf is not None:
            self.consumed.add(leaf)

    def take_field(self, seg: str, occurrence: int, fld: int) -> str:
        """Every leaf of a field counts as mapped (its raw text is kept whole); the raw text."""
        segment = self.find(seg, occurrence)
        if segment is None:
            return ""
        text = segment.field(fld)
        for leaf in _field_leaves(seg, occurrence, fld, text, self.message):
            self.consumed.add(leaf)
        return text

    def take_scope(self) -> None:
        """Every leaf of the current repetition counts as mapped (kept whole by the caller)."""
        if self.scope is None or self.at is None:
            return
        seg, occ, fld, rep = self.at
        for leaf in _rep_leaves(seg, occ, fld, rep, self.scope, self.message):
            self.consumed.add(leaf)

    def repetitions(self, path: str) -> list[tuple[int, str]]:
        """The non-empty repetitions of a field with their numbers; ``PV1-7[1]`` takes only the
        first (the others are reported, as a warning and in the unmapped report)."""
        try:
            loc = er7_path.parse(path, every=True)
        except ValueError as exc:
            raise RuleError(f"'each' takes a field path such as PID-3, not {path!r}") from exc
        if loc.component is not None:
            raise RuleError(f"'each' takes a field path such as PID-3, not {path!r}")
        seg = loc.segment
        found = loc.occurrence if loc.occurrence is not None else self.occurrence(seg)
        if found is None:
            return []
        segment = self.find(seg, found)
        if segment is None:
            return []
        return _each_repetition(self, seg, found, loc.field, segment.field(loc.field), loc.repetition)

    def scoped(self, seg: str, occurrence: int, fld: int, rep: int, text: str) -> tuple[Any, ...]:
        """Make ``text`` (that repetition) the current scope; returns what ``restore`` needs."""
        saved = (self.scope, self.at)
        self.scope, self.at = text, (seg, occurrence, fld, rep)
        return saved

    def restore(self, saved: tuple[Any, ...]) -> None:
        self.scope, self.at = saved

    def here(self, path: str = "") -> str:
        """Where a relative path points, as warnings and ERR segments name it (``PID-3[2].4``)."""
        if self.at is None:
            return path
        seg, occ, fld, rep = self.at
        base = er7_path.field_path(seg, occ, fld) + f"[{rep}]"
        return base + path

    def field_here(self, seg: str, fld: int) -> str:
        """Field ``fld`` of the ``seg`` meant here, as ERR-2 names it (``OBR[2]-3`` in the second
        order group)."""
        return er7_path.field_path(seg, self.occurrence(seg) or 1, fld)

    def place(self) -> str:
        """Where the value a function was given comes from (``SCH-9``, ``PID-13[2].18``)."""
        source = self.source or ""
        return source if source and not source.startswith(".") else self.here(source)

    def sender(self) -> tuple[str, str, str]:
        """(MSH-3.1, MSH-4.1, MSH-4.2): who sent the message, for namespaces."""
        if self._sender is None:
            m = self.message
            self._sender = (m.get("MSH-3.1"), m.get("MSH-4.1"), m.get("MSH-4.2"))
        return self._sender

    def system(self, kind: str, authority: Authority, where: str | Callable[[], str]) -> str:
        """The namespace of an identifier of ``kind`` (raises UnknownNamespace when none);
        ``where`` (or what it gives) names the field in a warning or a refusal."""
        return self.resolve(kind, authority, where).system

    def resolve(self, kind: str, authority: Authority, where: str | Callable[[], str]) -> Resolved:
        """``system``, saying also which parts of the authority the system carries."""
        resolved = self.namespaces.resolve(kind, authority, self.sender, where)
        if resolved.note is not None:
            self.warnings.append(resolved.note)
        return resolved

    def degrade(self, note: str, *, code: str = "102", location: str | None = None) -> None:
        """A warning a strict channel turns into a refusal (a code not known, a value defaulted).

        ``code``: HL7 table 0357 for the refusal (102 data type error, 103 table value not found,
        101 required field missing); the location defaults to the note's own prefix (``PV1-2: …``).
        """
        self.warnings.append(note)
        if location is None:
            prefix = note.partition(": ")[0]
            location = prefix if er7_path.location(prefix) is not None else None
        self.degraded.append(Degradation(note, location, code))

    def following(self, name: str) -> list[int]:
        """Occurrences of ``name`` right after the current segment (NTE after its OBX)."""
        if self.segment is None:
            return []
        order = self._order
        if order is None:
            counts: dict[str, int] = {}
            order = []
            for s in self.message.segments:
                counts[s.name] = counts.get(s.name, 0) + 1
                order.append((s.name, counts[s.name]))
            self._order = order
        try:
            start = order.index(self.segment)
        except ValueError:
            return []
        out = []
        for seg, occ in order[start + 1 :]:
            if seg != name:
                break
            out.append(occ)
        return out

    # -- references -------------------------------------------------------------------------

    def ref(self, key: str) -> dict[str, str] | list[dict[str, str]]:
        """A reference to a resource of this mapping. A per-segment resource is narrowed to what
        belongs here: the same occurrence of the same segment, else the current group's ones."""
        if key not in self.refs:
            raise RuleError(f"no resource {key!r} in this mapping")
        target = self.refs[key]
        if not isinstance(target, list):
            return {"reference": target} if self._wanted(target) else []
        seg = self.ref_segments.get(key, "")
        if self.segment is not None and self.segment[0] == seg:
            n = self.segment[1]
            urls = [target[n - 1]] if n <= len(target) else []
        else:
            mine = self.layout.occurrences(seg, self.group, self.section) if self.layout is not None else None
            urls = target if mine is None else [target[n - 1] for n in mine if n <= len(target)]
        return [{"reference": url} for url in urls if self._wanted(url)]

    def _wanted(self, url: str) -> bool:
        """A resource already skipped is not referenced; one not built yet is checked at the end."""
        if url in self.skipped:
            return False
        if url not in self.decided:
            self.forward.add(url)
        return True


def _each_repetition(
    ctx: Context, seg: str, occ: int, fld: int, raw: str, wanted: int | None
) -> list[tuple[int, str]]:
    items = raw.split(ctx.message.separators.repetition) if raw else []
    if wanted is None or wanted == er7_path.ALL:
        return [(i, r) for i, r in enumerate(items, 1) if r.strip()]
    others = sum(1 for i, r in enumerate(items, 1) if r.strip() and i != wanted)
    if others:
        ctx.warnings.append(
            f"{er7_path.field_path(seg, occ, fld)}: only repetition {wanted} is mapped; {others} more "
            "in the unmapped report"
        )
    return [(wanted, items[wanted - 1])] if wanted <= len(items) and items[wanted - 1].strip() else []


def _text(raw: str, msg: Message) -> str:
    if raw == NULL:
        return ""
    return unescape(raw, msg.separators, msg.codec) if msg.separators.escape in raw else raw


def _pick(text: str, comp: int | None, sub: int | None, msg: Message) -> tuple[str, int, int]:
    """The raw leaf of ``text`` (a repetition) at component/subcomponent; a path without component
    means the first component's first subcomponent."""
    seps = msg.separators
    c = comp or 1
    s = sub or 1
    if c == 1:
        piece = text.partition(seps.component)[0] if seps.component in text else text
    else:
        pieces = text.split(seps.component)
        piece = pieces[c - 1] if c <= len(pieces) else ""
    if s == 1:
        if seps.subcomponent in piece:
            piece = piece.partition(seps.subcomponent)[0]
    else:
        subs = piece.split(seps.subcomponent)
        piece = subs[s - 1] if s <= len(subs) else ""
    return piece, c, s


def _rep_leaves(seg: str, occ: int, fld: int, rep: int, text: str, msg: Message) -> Iterable[Leaf]:
    seps = msg.separators
    for c, comp in enumerate(text.split(seps.component), 1):
        for s, sub in enumerate(comp.split(seps.subcomponent), 1):
            if sub.strip() and sub != NULL:  # HL7's null is an instruction, never text to keep
                yield (seg, occ, fld, rep, c, s)


def _field_leaves(seg: str, occ: int, fld: int, text: str, msg: Message) -> Iterable[Leaf]:
    if not text:
        return
    for r, rep in enumerate(text.split(msg.separators.repetition), 1):
        yield from _rep_leaves(seg, occ, fld, r, rep, msg)


@dataclass(frozen=True, slots=True)
class Layout:
    """Where each segment sits. A section opens at each section anchor (PID: one patient's part of
    an ORU that carries several patients); inside it, groups open at the group anchors (ORC, OBR),
    so that a result reads its own order's OBR, refers to its own patient, and a report lists only
    its own observations."""

    group_of: dict[tuple[str, int], int]  # (segment, occurrence) → group; a section's head is one too
    grouped: frozenset[str]  # segments met inside an anchored group
    section_of: dict[tuple[str, int], int]  # (segment, occurrence) → section (0 before the first)
    sectioned: frozenset[str]  # segments met inside a section
    in_group: dict[tuple[str, int], list[int]]  # (segment, group) → its occurrences there
    in_section: dict[tuple[str, int], list[int]]  # (segment, section) → its occurrences there

    @classmethod
    def of(cls, message: Message, anchors: Sequence[str], sections: Sequence[str] = ()) -> Layout:
        """``anchors`` in their order in a group (ORC, OBR): a segment that comes again, or one
        that comes before an anchor already seen in the group, opens the next group. A section
        anchor opens a section, whose segments up to the first group anchor are its head group."""
        rank = {name: i for i, name in enumerate(anchors)}
        opens = frozenset(sections)
        counts: dict[str, int] = {}
        group = section = 0
        last, anchored = -1, False
        group_of: dict[tuple[str, int], int] = {}
        section_of: dict[tuple[str, int], int] = {}
        in_group: dict[tuple[str, int], list[int]] = {}
        in_section: dict[tuple[str, int], list[int]] = {}
        grouped: set[str] = set()
        sectioned: set[str] = set()
        for seg in message.segments:
            name = seg.name
            counts[name] = occ = counts.get(name, 0) + 1
            if name in opens:
                section += 1
                group += 1
                last, anchored = -1, False
            elif name in rank:
                if not anchored or rank[name] <= last:
                    group += 1
                last, anchored = rank[name], True
            group_of[(name, occ)] = group
            section_of[(name, occ)] = section
            in_group.setdefault((name, group), []).append(occ)
            in_section.setdefault((name, section), []).append(occ)
            if anchored:
                grouped.add(name)
            if section:
                sectioned.add(name)
        return cls(group_of, frozenset(grouped), section_of, frozenset(sectioned), in_group, in_section)

    def occurrences(self, seg: str, group: int | None, section: int | None) -> list[int] | None:
        """The occurrences of ``seg`` that belong with a segment of ``group`` in ``section``: the
        group's, for a segment of groups; else the section's; None when neither narrows it."""
        if group is not None and seg in self.grouped:
            return self.in_group.get((seg, group), [])
        if section is not None and seg in self.sectioned:
            return self.in_section.get((seg, section), [])
        return None


@functools.lru_cache(maxsize=4096)
def _read_plan(path: str) -> tuple[str, int | None, int, int, int | None, int | None]:
    """(segment, occurrence, field, repetition, component, subcomponent); segment "" for a relative path."""
    try:
        loc = er7_path.parse(path, relative=True)
    except ValueError as exc:
        raise RuleError(str(exc)) from exc
    if loc.relative:
        return ("", None, 0, 1, loc.component, loc.subcomponent)
    return (loc.segment, loc.occurrence, loc.field, loc.repetition or 1, loc.component, loc.subcomponent)


# -- rules ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class Rule:
    target: str  # FHIR element path: "gender", "name[]", "identifier[0].system", "" for the resource itself
    source: str | None = None
    const: Any = None
    concept_map: str | None = None
    function: str | None = None
    when: When | None = None
    each: str | None = None  # a field (repetitions) or a segment name (occurrences)
    rules: list[Rule] = field(default_factory=list)
    ref: str | None = None
    where: str = ""  # file:line, for error messages
    kind: str | None = None  # the identifier kind a namespacing function resolves
    follows: bool = False  # segment "each": only the occurrences right after the current segment


@dataclass(slots=True)
class ResourceMapping:
    key: str
    type: str
    rules: list[Rule]
    identity: str | None = None  # element whose namespaced system|value makes the conditional write
    when: When | None = None
    where: str = ""
    each: str | None = None  # one resource per occurrence of this segment (an Observation per OBX)
    use: str | None = None  # "mapping-name:key": take the rules of a resource defined in another file
    match: Rule | None = None  # builds the identifiers to find the resource by, when not its own (A47)
    scope: str | None = None  # a field repetition (PV1-7[1]) the rules' relative paths read
    key_types: tuple[str, ...] = ()  # identifier types (v2-0203) preferred as the key, in order
    required: Mapping[str, Any] = field(default_factory=dict)  # element → value when the message has none
    write: str | None = None  # the write policy, when not the ownership table's


@dataclass(slots=True)
class Mapping_:
    name: str
    events: frozenset[str]
    resources: list[ResourceMapping]
    file: str
    groups: tuple[str, ...] = ()  # anchor segments of repeated groups, in group order (ORU: ORC, OBR)
    sections: tuple[str, ...] = ()  # segments that open one patient's part of the message (ORU: PID)
    includes: tuple[str, ...] = ()  # mappings whose resources this one takes, less its own keys
    excludes: frozenset[str] = frozenset()  # keys of those resources it does not take

    def serves(self, event: str) -> bool:
        family = event.split("^")[0] + "^*"
        return event in self.events or family in self.events


@dataclass(slots=True)
class MappingResult:
    bundle: dict[str, Any]
    warnings: list[str]
    unmapped: list[str]  # leaves no rule put anywhere: "PID-13[1].4", "ZXY-2[1]" …
    mapping: str
    degraded: list[Degradation] = field(default_factory=list)  # the warnings a strict channel refuses


# -- loading -----------------------------------------------------------------------------------

_RULE_KEYS = {
    "set",
    "from",
    "const",
    "map",
    "fn",
    "when",
    "each",
    "rules",
    "ref",
    "kind",
    "follows",
    "__line__",
}
_RESOURCE_KEYS = {
    "key",
    "type",
    "identity",
    "rules",
    "when",
    "each",
    "use",
    "match",
    "scope",
    "key_types",
    "required",
    "write",
    "__line__",
}
_FILE_KEYS = {"name", "events", "resources", "groups", "sections", "include", "exclude", "__line__"}


class Library:
    """All mapping files, concept maps, functions and write policies, checked at load time."""

    def __init__(
        self,
        mappings: Sequence[Mapping_],
        concept_maps: Mapping[str, ConceptMap],
        functions: Mapping[str, Function],
        ownership: Ownership | None = None,
        unsupported: Mapping[str, str] | None = None,
    ) -> None:
        self.mappings = list(mappings)
        self.concept_maps = dict(concept_maps)
        self.functions = dict(functions)
        self.ownership = ownership or Ownership()
        self.unsupported = dict(unsupported or {})  # event (or TYPE^*) → why it is not mapped
        # Rules compiled once, here: by identity, for a mapping is a mutable dataclass.
        self._plans: dict[int, tuple[Mapping_, list[_Plan]]] = {
            id(m): (m, _compiled(m, self)) for m in self.mappings
        }

    def plan(self, mapping: Mapping_) -> list[_Plan]:
        """The compiled rules of ``mapping`` (compiled now if it is not one of the library's own)."""
        known = self._plans.get(id(mapping))
        if known is not None and known[0] is mapping:
            return known[1]
        plans = _compiled(mapping, self)
        self._plans[id(mapping)] = (mapping, plans)
        return plans

    @classmethod
    def load(cls, directory: Path, functions: Mapping[str, Function]) -> Library:
        mappings, maps = read_mappings(directory, "mapping", _parse_file, functions, skip=_RESERVED_FILES)
        _resolve_includes(mappings)
        _resolve_uses(mappings)
        return cls(mappings, maps, functions, Ownership.load(directory), _unsupported(directory))

    def for_event(self, event: str) -> Mapping_ | None:
        exact = [m for m in self.mappings if event in m.events]
        if exact:
            return exact[0]
        family = [m for m in self.mappings if m.serves(event)]
        return family[0] if family else None

    def why_unsupported(self, event: str) -> str | None:
        """None when a mapping serves ``event``; else the reason, from ``unsupported.yaml`` if it says."""
        if self.for_event(event) is not None:
            return None
        reason = self.unsupported.get(event) or self.unsupported.get(event.split("^")[0] + "^*")
        return f"{event} is not mapped: {reason}" if reason else f"no mapping for {event}"

    def map(
        self,
        message: Message,
        *,
        timezone: str = "Europe/Paris",
        fr_core_version: str = "2.1.0",
        namespaces: Namespaces | None = None,
    ) -> MappingResult:
        event = f"{message.message_type}^{message.trigger}"
        mapping = self.for_event(event)
        if mapping is None:
            raise UnsupportedMessage(self.why_unsupported(event) or event, location="MSH-9")
        return run(
            mapping,
            message,
            self,
            timezone=timezone,
            fr_core_version=fr_core_version,
            namespaces=namespaces,
        )

    def key_sites(self, event: str) -> list[tuple[str, str, str]]:
        """(field path, identifier function, kind) of every namespaced identifier ``event`` is mapped
        with: what a channel checks before acknowledging (see gateway.mapping.screen)."""
        mapping = self.for_event(event)
        if mapping is None:
            return []
        sites: list[tuple[str, str, str]] = []

        def walk(rules: Iterable[Rule], each: str | None) -> None:
            for rule in rules:
                here = rule.each if rule.each is not None and not er7_path.is_segment(rule.each) else each
                if rule.kind is not None and rule.function is not None and here is not None:
                    site = (here, rule.function, rule.kind)
                    if site not in sites:
                        sites.append(site)
                walk(rule.rules, here)

        for res in mapping.resources:
            walk(res.rules, res.scope)
            if res.match is not None:
                walk([res.match], res.scope)
        return sites


def _unsupported(directory: Path) -> dict[str, str]:
    path = directory / UNSUPPORTED_FILE
    if not path.is_file():
        return {}
    data = strip_lines(load_yaml(path))
    out: dict[str, str] = {}
    for event, reason in data.items():
        if (
            not re.fullmatch(r"[A-Z0-9]{2,3}\^(\*|[A-Z0-9]{2,3})", str(event))
            or not str(reason or "").strip()
        ):
            raise ConfigError(
                "an event (ADT^A08, or BAR^*) and the reason it is not mapped", file=str(path), key=str(event)
            )
        out[str(event)] = str(reason).strip()
    return out


def _parse_file(path: Path, concept_maps: Mapping[str, Any], functions: Mapping[str, Function]) -> Mapping_:
    file = str(path)
    data = load_yaml(path)
    check_keys(data, _FILE_KEYS, file, "a mapping file")
    for required in ("name", "events", "resources"):
        if required not in data:
            raise ConfigError("is required", file=file, key=required, line=1)
    events = data["events"]
    if not isinstance(events, list) or not all(isinstance(e, str) and "^" in e for e in events):
        raise ConfigError(
            "a list of events such as ADT^A01 (or ADT^* for a family)",
            file=file,
            key="events",
            line=data["__line__"],
        )
    resources = []
    keys: set[str] = set()
    for item in data["resources"]:
        check_keys(item, _RESOURCE_KEYS, file, "a resource")
        line = item["__line__"]
        for required in ("key", "type"):
            if required not in item:
                raise ConfigError("is required", file=file, key=required, line=line)
        if item["key"] in keys:
            raise ConfigError(f"duplicate resource key {item['key']!r}", file=file, key="key", line=line)
        keys.add(item["key"])
        rules = [_parse_rule(r, file, concept_maps, functions) for r in item.get("rules", [])]
        when = _parse_when(item["when"], file) if "when" in item else None
        each = item.get("each")
        if each is not None and not er7_path.is_segment(str(each)):
            raise ConfigError(
                "a resource's 'each' names a segment, such as OBX", file=file, key="each", line=line
            )
        match = _parse_rule(item["match"], file, concept_maps, functions) if "match" in item else None
        scope = item.get("scope")
        if scope is not None:
            try:
                loc = er7_path.parse(str(scope))
            except ValueError:
                loc = None
            if loc is None or loc.component is not None:
                raise ConfigError(
                    "a resource's 'scope' names a field repetition, such as PV1-7[1]",
                    file=file,
                    key="scope",
                    line=line,
                )
        key_types = item.get("key_types", [])
        if not isinstance(key_types, list) or not all(isinstance(t, str) for t in key_types):
            raise ConfigError(
                "a list of identifier type codes, such as [PI]", file=file, key="key_types", line=line
            )
        required = strip_lines(item.get("required", {}))
        if not isinstance(required, dict) or not all(_ELEMENT.match(str(k)) for k in required):
            raise ConfigError(
                "element path → the value used when the message leaves it empty",
                file=file,
                key="required",
                line=line,
            )
        write = item.get("write")
        if write is not None and write not in POLICIES:
            raise ConfigError(f"one of {', '.join(POLICIES)}", file=file, key="write", line=line)
        resources.append(
            ResourceMapping(
                item["key"],
                item["type"],
                rules,
                item.get("identity"),
                when,
                f"{file}:{line}",
                each,
                item.get("use"),
                match,
                scope,
                tuple(key_types),
                required,
                write,
            )
        )
    if not data.get("include"):  # else checked once the included resources are in
        _check_refs(resources, file)
    anchors = {}
    for key, example in (("groups", "[ORC, OBR]"), ("sections", "[PID]")):
        names = data.get(key, [])
        if not isinstance(names, list) or not all(
            isinstance(n, str) and er7_path.is_segment(n) for n in names
        ):
            raise ConfigError(
                f"a list of the segments that open a {key[:-1]}, such as {example}",
                file=file,
                key=key,
                line=data["__line__"],
            )
        anchors[key] = tuple(names)
    if set(anchors["groups"]) & set(anchors["sections"]):
        raise ConfigError(
            "a segment opens a group or a section, not both", file=file, key="sections", line=data["__line__"]
        )
    lists = {}
    for key in ("include", "exclude"):
        names = data.get(key, [])
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise ConfigError(
                "a list of mapping names" if key == "include" else "a list of resource keys",
                file=file,
                key=key,
                line=data["__line__"],
            )
        lists[key] = names
    return Mapping_(
        data["name"],
        frozenset(events),
        resources,
        file,
        anchors["groups"],
        anchors["sections"],
        tuple(lists["include"]),
        frozenset(lists["exclude"]),
    )


def _is_segment_name(name: object) -> bool:
    return isinstance(name, str) and er7_path.is_segment(name)


def _check_refs(resources: Sequence[ResourceMapping], file: str) -> None:
    """References must name a resource of this file (or of a file it includes)."""
    keys = {r.key for r in resources}
    for res in resources:
        if not res.where.startswith(f"{file}:"):
            continue  # an included resource's rules were checked in their own file
        for rule in _walk(res.rules):
            if rule.ref is not None and rule.ref not in keys:
                raise ConfigError(
                    f"no resource with key {rule.ref!r} in this file",
                    file=file,
                    key="ref",
                    line=int(rule.where.rsplit(":", 1)[1]),
                )


def _resolve_includes(mappings: Sequence[Mapping_]) -> None:
    """``include: [clinical-segments]`` appends that mapping's resources, except the keys this file
    defines itself or names in ``exclude`` (an ORU's OBX are its results, not the ADT's OBX)."""
    by_name = {m.name: m for m in mappings}
    for mapping in mappings:
        if not mapping.includes:
            continue
        own = {r.key for r in mapping.resources}
        for name in mapping.includes:
            included = by_name.get(name)
            if included is None or included.includes or included is mapping:
                raise ConfigError(
                    f"no mapping {name!r} to include (a mapping name; an included file includes none)",
                    file=mapping.file,
                    key="include",
                )
            unknown = mapping.excludes - {r.key for r in included.resources}
            if unknown:
                raise ConfigError(
                    f"{name!r} has no resource {sorted(unknown)[0]!r} to exclude",
                    file=mapping.file,
                    key="exclude",
                )
            for res in included.resources:
                if res.key not in own and res.key not in mapping.excludes:
                    mapping.resources.append(dataclasses.replace(res, rules=list(res.rules)))
                    own.add(res.key)
        _check_refs(mapping.resources, mapping.file)


def _resolve_uses(mappings: Sequence[Mapping_]) -> None:
    """``use: pam-fr-adt:patient`` puts that resource's rules (and identity) before the local ones."""
    index = {(m.name, r.key): r for m in mappings for r in m.resources}
    for mapping in mappings:
        for res in mapping.resources:
            if res.use is None:
                continue
            name, _, key = res.use.partition(":")
            base = index.get((name, key))
            file, line = res.where.rsplit(":", 1)
            if base is None or base.use is not None:
                raise ConfigError(
                    f"no resource {res.use!r} (a mapping name, ':', a resource key)",
                    file=file,
                    key="use",
                    line=int(line),
                )
            if base.type != res.type:
                raise ConfigError(
                    f"{res.use!r} builds a {base.type}, not a {res.type}",
                    file=file,
                    key="use",
                    line=int(line),
                )
            res.rules = [*base.rules, *res.rules]
            res.identity = res.identity or base.identity
            res.scope = res.scope or base.scope
            res.when = res.when or base.when
            res.key_types = res.key_types or base.key_types
            res.required = {**base.required, **res.required}
            res.write = res.write or base.write


def _walk(rules: Iterable[Rule]) -> Iterable[Rule]:
    for rule in rules:
        yield rule
        yield from _walk(rule.rules)


def _parse_when(data: Any, file: str) -> When:
    return parse_when(data, file, lambda path, line: _check_path(path, file, line))


def _check_path(path: Any, file: str, line: int) -> None:
    try:
        if not isinstance(path, str):
            raise ValueError(path)
        er7_path.parse(path, relative=True)
    except ValueError:
        raise ConfigError(
            f"{path!r} is not an ER7 path such as PID-3.1 or .2 (inside 'each')",
            file=file,
            key="from",
            line=line,
        ) from None


def _parse_rule(
    data: Any, file: str, concept_maps: Mapping[str, Any], functions: Mapping[str, Function]
) -> Rule:
    if not isinstance(data, dict):
        raise ConfigError("a rule is a mapping with 'set'", file=file)
    check_keys(data, _RULE_KEYS, file, "a rule")
    line = data["__line__"]
    where = f"{file}:{line}"
    target = data.get("set", "")
    if target and not _ELEMENT.match(target):
        raise ConfigError(
            f"{target!r} is not a FHIR element path such as name[].family", file=file, key="set", line=line
        )
    if "from" in data:
        _check_path(data["from"], file, line)
    check_names(data, concept_maps, functions, file, line)
    sources = [k for k in ("from", "const", "each", "ref") if k in data]
    if not sources and "fn" not in data:
        raise ConfigError("a rule needs one of from, const, each, ref or fn", file=file, key="set", line=line)
    each = data.get("each")
    if each is not None:
        if "rules" not in data:
            raise ConfigError("'each' needs inner 'rules'", file=file, key="each", line=line)
        if not er7_path.is_segment(str(each)):
            try:
                loc = er7_path.parse(str(each), every=True)
            except ValueError:
                loc = None
            if loc is None or loc.component is not None:
                raise ConfigError(
                    f"'each' takes a segment (OBX) or a field (PID-3), not {each!r}",
                    file=file,
                    key="each",
                    line=line,
                )
    kind = data.get("kind")
    if kind is not None and (not isinstance(kind, str) or not is_kind(kind) or "fn" not in data):
        raise ConfigError(
            "'kind' names what a namespacing function identifies (patient, visit, filler-order…)",
            file=file,
            key="kind",
            line=line,
        )
    follows = data.get("follows", False)
    if follows and (each is None or not er7_path.is_segment(str(each))):
        raise ConfigError("'follows' goes with a segment 'each' (NTE)", file=file, key="follows", line=line)
    return Rule(
        target=target,
        **value_sources(data),
        when=_parse_when(data["when"], file) if "when" in data else None,
        each=each,
        rules=[_parse_rule(r, file, concept_maps, functions) for r in data.get("rules", [])],
        ref=data.get("ref"),
        where=where,
        kind=kind,
        follows=bool(follows),
    )


# -- running -----------------------------------------------------------------------------------


def run(
    mapping: Mapping_,
    message: Message,
    library: Library,
    *,
    timezone: str = "Europe/Paris",
    fr_core_version: str = "2.1.0",
    namespaces: Namespaces | None = None,
    interpret: bool = False,
) -> MappingResult:
    """Map one message. The library's compiled rules run, unless ``interpret`` asks for the rule
    interpreter (the reference the compiled rules are tested against)."""
    plans = _interpreted(mapping, library) if interpret else library.plan(mapping)
    refs: dict[str, str | list[str]] = {}
    ref_segments: dict[str, str] = {}
    counts = [1 if r.each is None else len(message.segments_named(r.each)) for r in mapping.resources]
    urns = iter(_random_urns(sum(counts)))
    for r, count in zip(mapping.resources, counts, strict=True):
        if r.each is None:
            refs[r.key] = next(urns)
        else:
            refs[r.key] = [next(urns) for _ in range(count)]
            ref_segments[r.key] = r.each
    ctx = Context(
        message,
        [],
        set(),
        refs,
        timezone=timezone,
        fr_core_version=fr_core_version,
        layout=Layout.of(message, mapping.groups, mapping.sections)
        if mapping.groups or mapping.sections
        else None,
        ref_segments=ref_segments,
        namespaces=namespaces or Namespaces(),
        concept_maps=library.concept_maps,
    )
    built: list[_Built] = []
    mapped: set[Leaf] = set()
    for plan in plans:
        res = plan.res
        urls = refs[res.key]
        scopes: list[tuple[str, tuple[str, int] | None]] = (
            [(urls, None)]
            if isinstance(urls, str)
            else [(url, (res.each or "", n)) for n, url in enumerate(urls, 1)]
        )
        for url, segment in scopes:
            ctx.enter(segment)
            ctx.scope, ctx.at = None, None
            ctx.decided.add(url)
            ctx.skipped.add(url)  # until it is built
            if plan.scope is not None:
                reps = plan.scope(ctx)
                if not reps:
                    continue
                seg, occ, fld = _scope_field(res.scope or "", ctx)
                ctx.scope, ctx.at = reps[0][1], (seg, occ, fld, reps[0][0])
            if plan.when is not None and not plan.when(ctx):
                continue
            resource: dict[str, Any] = {"resourceType": res.type}
            # What this resource takes counts only if it is produced.
            ctx.consumed, ctx.nulls, ctx.defaulted = set(), {}, []
            try:
                for apply in plan.rules:
                    apply(resource, ctx)
                # A resource nothing was mapped into is not produced, nor one without what it
                # cannot be without (``required: {content: ~}``); what it took stays unmapped.
                if len(_prune_fast(resource)) > 1 and all(
                    not is_empty(_element_at(resource, k)) for k, v in res.required.items() if v is None
                ):
                    _fill_required(resource, res, ctx)
                    probe = _probe(plan, ctx) if plan.match is not None else None
                    built.append(_Built(plan, url, resource, dict(ctx.nulls), probe, list(ctx.defaulted)))
                    ctx.skipped.discard(url)
                    mapped |= ctx.consumed
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                raise ValidationError(f"mapping {mapping.name}: {res.key}: {rule_failure(exc)}") from exc
        ctx.enter(None)
        ctx.scope, ctx.at = None, None
    entries = _entries(built, ctx, library, message, mapped)
    return MappingResult(
        {"resourceType": "Bundle", "type": "transaction", "entry": entries},
        list(dict.fromkeys(ctx.warnings)),
        unmapped_leaves(message, mapped),
        mapping.name,
        list(dict.fromkeys(ctx.degraded)),
    )


@dataclass(slots=True)
class _Built:
    plan: _Plan
    url: str
    resource: dict[str, Any]
    nulls: dict[str, list[Leaf]]
    probe: dict[str, Any] | None  # the identifiers to find it by, when not its own (A47)
    defaulted: list[str]


def _scope_field(scope: str, ctx: Context) -> tuple[str, int, int]:
    loc = er7_path.parse(scope, every=True)
    occ = loc.occurrence if loc.occurrence is not None else ctx.occurrence(loc.segment)
    return loc.segment, occ or 1, loc.field


def _probe(plan: _Plan, ctx: Context) -> dict[str, Any]:
    """The identifiers the resource is found by (A47: the old ones); they reach the output as the
    request's criteria, so what they take counts as mapped."""
    probe: dict[str, Any] = {}
    assert plan.match is not None
    before = set(ctx.consumed)
    plan.match(probe, ctx)
    probe = _prune(probe)
    # Only system|value reach the criteria: what else the match read (a type, an authority's
    # name) is not carried, so it stays unmapped.
    criteria = [
        str(ident.get(part) or "")
        for idents in probe.values()
        if isinstance(idents, list)
        for ident in idents
        if isinstance(ident, dict)
        for part in ("system", "value")
    ]
    for seg, occ, fld, rep, c, sub in ctx.consumed - before:
        text = ctx.read(f"{seg}[{occ}]-{fld}[{rep}].{c}.{sub}")
        if not any(text in criterion for criterion in criteria):
            ctx.consumed.discard((seg, occ, fld, rep, c, sub))
    return probe


def _element_at(resource: Mapping[str, Any], path: str) -> Any:
    """The value at an element path (``content[0].attachment.data``; a list without an index: its
    first item), None when any step is missing."""
    node: Any = resource
    for step in path.split("."):
        name, _, index = step.partition("[")
        node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, list):
            at = int(index[:-1]) if index[:-1] else 0
            node = node[at] if at < len(node) else None
        if node is None:
            return None
    return node


def _fill_required(resource: dict[str, Any], res: ResourceMapping, ctx: Context) -> None:
    """A required FHIR element the message left empty takes the value the mapping gives for
    "unknown" (FHIR's own where it has one), and the message a warning."""
    for element, value in res.required.items():
        if value is None:
            continue  # checked by the caller: without it the resource is not produced
        node: Any = resource
        steps = element.split(".")
        for step in steps[:-1]:
            node = node.get(step) if isinstance(node, dict) else None
        if isinstance(node, dict) and not is_empty(node.get(steps[-1])):
            continue
        _set(resource, element, value)
        ctx.defaulted.append(element.split(".")[0])
        shown = value.get("code", value) if isinstance(value, dict) else value
        ctx.degrade(f"{res.type}.{element}: required and not in the message; set to {shown!r}", code="101")


def _entries(
    built: list[_Built], ctx: Context, library: Library, message: Message, mapped: set[Leaf]
) -> list[dict[str, Any]]:
    """Each built resource as a transaction entry, written by its policy under its namespaced key:
    an update by the preferred key; a create by any of its keys (found by one, it is that one)."""
    entries: list[dict[str, Any]] = []
    seen: dict[str, dict[str, Any]] = {}  # request URL (or key) → the entry that carries it
    merged: dict[str, str] = {}  # fullUrl of a dropped duplicate → the kept one
    feed = message.message_type

    def policy_of(res: ResourceMapping) -> str:
        return res.write or library.ownership.policy(res.type, feed)

    for item in built:
        res, resource, url = item.plan.res, item.resource, item.url
        request: dict[str, Any] = {"method": "POST", "url": res.type}
        criteria: str | None = None
        if res.identity == "id":
            # No business identifier (Binary): the mapping computes a stable id, so a replay
            # updates the same resource.
            if isinstance(resource.get("id"), str):
                request = {"method": "PUT", "url": f"{res.type}/{resource['id']}"}
        elif res.identity:
            keys = [_key(resource, res.identity, res.key_types)]
            if item.probe is not None:
                keys = [_key(item.probe, res.identity, ()), *keys]
                keys += [k for k in _all_keys(item.probe, res.identity) if k not in keys]
            elif policy_of(res) == "create":
                keys += _all_keys(resource, res.identity)
            found = [k for k in keys if k]
            if found:
                criteria = "identifier=" + ",".join(dict.fromkeys(found))
            elif res.type == "Patient":
                # A patient no identifier names could never be found again: every clinical
                # resource of the message would hang on an empty, orphan record.
                raise ValidationError(
                    "the patient has no identifier (PID-3 is required): no Patient is created",
                    location="PID-3",
                )
            else:
                ctx.warnings.append(
                    f"{res.type} ({res.key}): no namespaced identifier; created anew, never found again"
                )
        if criteria is not None:
            policy = policy_of(res)
            if policy == "create":
                request = {"method": "POST", "url": res.type, "ifNoneExist": criteria}
            else:
                request = {"method": "PUT", "url": f"{res.type}?{criteria}"}
                extensions = [{"url": WRITE_POLICY, "valueCode": "merge"}] if policy == "merge" else []
                for name, leaves in sorted(item.nulls.items()):
                    extensions.append({"url": CLEAR, "valueString": name})
                    mapped.update(leaves)
                if policy == "merge":  # a value the mapping supplied never replaces a stored one
                    extensions += [
                        {"url": IF_ABSENT, "valueString": name} for name in dict.fromkeys(item.defaulted)
                    ]
                if extensions:
                    request["extension"] = extensions
        same: str | None = None
        if criteria is not None:
            same = f"{res.type}?{criteria}"
        elif request["method"] == "PUT":
            same = request["url"]
        if same is not None:
            # One resource named twice (the same doctor attending and admitting): one entry, or the
            # two writes would race to create it twice; what the second adds is kept.
            kept = seen.get(same)
            if kept is not None:
                merged[url] = kept["fullUrl"]
                _absorb(kept["resource"], resource, ctx, shared=res.type in SHARED_TYPES)
                continue
        entry = {"fullUrl": url, "resource": resource, "request": request}
        if same is not None:
            seen[same] = entry
        entries.append(entry)
    present = {e["fullUrl"] for e in entries}
    for entry in entries if merged else ():
        _redirect(entry["resource"], merged)
    # References to resources decided earlier were left out at once; only a reference made before
    # its target was decided (a forward one) may point at nothing now.
    if ctx.forward - present - merged.keys():
        for entry in entries:
            _drop_dangling(entry["resource"], present)
            _prune(entry["resource"])  # what held only that reference goes too
    return entries


def _absorb(kept: dict[str, Any], duplicate: Mapping[str, Any], ctx: Context, *, shared: bool) -> None:
    """A resource named twice in one message (the same doctor attending and admitting). For shared
    reference data, the duplicate's elements the kept one lacks are added, and of two different
    values the first is kept, with a warning. For anything else (a patient, a result, an order) two
    parts of one message that say different things about one resource are not reconciled by
    guessing: an ADT^A40 whose MRG-1 names the survivor itself would otherwise deactivate it. The
    message is refused, naming the element."""
    for name, value in duplicate.items():
        if name == "identifier" or kept.get(name) == value:
            continue
        what = f"{kept.get('resourceType')}.{name}"
        if not shared:
            raise ValidationError(
                f"two parts of the message name one {kept.get('resourceType')} (same key) and "
                f"{'disagree on' if name in kept else 'only one gives'} {name}: neither is dropped, "
                "the message is refused"
            )
        if name not in kept:
            kept[name] = value
        else:
            ctx.warnings.append(f"{what}: one resource named twice with different values; the first kept")
    idents = kept.get("identifier")
    if isinstance(idents, list):
        for ident in duplicate.get("identifier") or []:
            if ident not in idents:
                idents.append(ident)


_PLAIN_TOKEN = re.compile(r"[A-Za-z0-9:/._~@-]*")


def search_token(text: str) -> str:
    """A token of a FHIR search value: its ``\\ , | $`` escaped, then percent-encoded for the URL."""
    if _PLAIN_TOKEN.fullmatch(text):  # the usual OID, URL or number: nothing to escape
        return text
    escaped = text.replace("\\", "\\\\").replace(",", "\\,").replace("|", "\\|").replace("$", "\\$")
    return quote(escaped, safe=":/.-_~\\,|@")


def _key(resource: Mapping[str, Any], element: str, prefer: Sequence[str]) -> str | None:
    """``system|value`` of the identifier the resource is found by: the first namespaced one of the
    preferred types (the IPP, so that PROV → VALI updates one Patient), else the first namespaced."""
    values = resource.get(element)
    if not isinstance(values, list):
        return None
    namespaced = [i for i in values if isinstance(i, dict) and i.get("system") and i.get("value")]
    for code in prefer:
        for ident in namespaced:
            codings = (ident.get("type") or {}).get("coding") or []
            if any(isinstance(c, dict) and c.get("code") == code for c in codings):
                return search_token(str(ident["system"])) + "|" + search_token(str(ident["value"]))
    if namespaced:
        return search_token(str(namespaced[0]["system"])) + "|" + search_token(str(namespaced[0]["value"]))
    return None


def _all_keys(resource: Mapping[str, Any], element: str) -> list[str]:
    values = resource.get(element)
    if not isinstance(values, list):
        return []
    return [
        search_token(str(i["system"])) + "|" + search_token(str(i["value"]))
        for i in values
        if isinstance(i, dict) and i.get("system") and i.get("value")
    ]


# The version (4) and variant (RFC 4122) bits of a random UUID, as uuid.uuid4() sets them.
_UUID_KEEP = ~((0xF000 << 64) | (0xC000 << 48)) & ((1 << 128) - 1)
_UUID_SET = (4 << 76) | (0x8000 << 48)


def _random_urns(count: int) -> list[str]:
    """``urn:uuid:`` + ``uuid.uuid4()``, ``count`` times, from one ``os.urandom`` call."""
    raw = os.urandom(16 * count)
    urns = []
    for start in range(0, 16 * count, 16):
        h = f"{int.from_bytes(raw[start : start + 16]) & _UUID_KEEP | _UUID_SET:032x}"
        urns.append(f"urn:uuid:{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    return urns


def unmapped_leaves(message: Message, consumed: set[Leaf]) -> list[str]:
    """Every non-empty leaf no rule put into the output, by its full path (gateway.hl7.path).

    Written for speed (it reads every leaf of every message): a field nothing was taken from is
    reported without looking its leaves up, and counters replace enumerate.
    """
    out: list[str] = []
    append = out.append
    seps = message.separators
    rep_sep, comp_sep, sub_sep = seps.repetition, seps.component, seps.subcomponent
    fields_taken = {leaf[:3] for leaf in consumed}
    counts: dict[str, int] = {}
    for seg in message.segments:
        name = seg.name
        counts[name] = occ = counts.get(name, 0) + 1
        header = name == "MSH"
        label = f"{name}[{occ}]-" if occ > 1 else f"{name}-"
        n = 0
        for raw in seg.fields():
            n += 1
            if not raw or (header and (n <= 2 or n in HEADER_FIELDS)):
                continue
            touched = (name, occ, n) in fields_taken
            if not touched and comp_sep not in raw and sub_sep not in raw and rep_sep not in raw:
                if raw.strip():
                    append(f"{label}{n}[1]")
                continue
            r = 0
            for rep in raw.split(rep_sep) if rep_sep in raw else (raw,):
                r += 1
                if comp_sep not in rep and sub_sep not in rep:
                    if rep.strip() and (not touched or (name, occ, n, r, 1, 1) not in consumed):
                        append(f"{label}{n}[{r}]")
                    continue
                comps = rep.split(comp_sep)
                several = len(comps) > 1
                c = 0
                for comp in comps:
                    c += 1
                    if sub_sep not in comp:
                        if comp.strip() and (not touched or (name, occ, n, r, c, 1) not in consumed):
                            append(f"{label}{n}[{r}].{c}" if several else f"{label}{n}[{r}]")
                        continue
                    for s, text in enumerate(comp.split(sub_sep), 1):
                        if text.strip() and (not touched or (name, occ, n, r, c, s) not in consumed):
                            append(f"{label}{n}[{r}].{c}.{s}")
    return out


def _redirect(node: Any, merged: Mapping[str, str]) -> None:
    """References to a merged duplicate point to the entry that was kept."""
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str) and ref in merged:
            node["reference"] = merged[ref]
        for value in node.values():
            if isinstance(value, (dict, list)):
                _redirect(value, merged)
    elif isinstance(node, list):
        for value in node:
            _redirect(value, merged)


# -- the rule pipeline: when → source → map → fn → put -------------------------------------------
# The interpreter (_apply) and the compiled closures (_compile_rule) read, warn, set and account
# for leaves exactly alike (tests/mapping/test_compiled.py); both end in _finish.


def _finish(
    rule: Rule,
    value: Any,
    leaf: Leaf | None,
    target: dict[str, Any],
    ctx: Context,
    table: ConceptMap | None,
    function: Function | None,
    put: Callable[[dict[str, Any], Any], None],
) -> None:
    """A value read (or given) → concept map → function → set; the source leaf counts as mapped
    when something was set from it."""
    if table is not None:
        code = str(value)
        if code in table.table:  # the usual case, without building the warning's location
            value = table.table[code]
        else:
            where = (
                rule.source
                if rule.source and not rule.source.startswith(".")
                else ctx.here(rule.source or "")
            )
            value = look_up(table, code, where, lambda note: ctx.degrade(note, code="103"))
            if value is None:
                return
    if function is not None:
        previous = ctx.kind, ctx.source
        ctx.kind, ctx.source = rule.kind, rule.source
        try:
            value = function(ctx, value)
        finally:
            ctx.kind, ctx.source = previous
    if is_empty(value):
        return
    put(target, value)
    if leaf is not None and rule.source is not None:
        ctx.consumed.add(leaf)


_ELEMENT_NAME = re.compile(r"[a-zA-Z][a-zA-Z0-9]*")


def _null(rule: Rule, ctx: Context, leaf: Leaf | None) -> None:
    """HL7's ``""`` in a top-level rule's source: the element is to be removed from what is stored
    (a request extension says so); deeper targets are left to the unmapped report."""
    name = rule.target.removesuffix("[]")
    # Identifiers are never removed by a message: a "" there is left to the unmapped report.
    if leaf is not None and _ELEMENT_NAME.fullmatch(name) and name != "identifier":
        ctx.nulls.setdefault(name, []).append(leaf)


def _source(rule: Rule, raw: str, leaf: Leaf | None, ctx: Context, top: bool) -> str | None:
    """The text a rule read, or None when there is nothing to set: blank (FHIR strings need a
    non-blank character) or HL7's "" (then, for a top-level rule, the element is to be removed)."""
    if raw == NULL:
        if top:
            _null(rule, ctx, leaf)
        return None
    value = _text(raw, ctx.message)
    return value if value.strip() else None


def _apply(rule: Rule, target: dict[str, Any], ctx: Context, library: Library, top: bool = False) -> None:
    if rule.each is not None:
        _apply_each(rule, target, ctx, library, top)  # its condition is tested on each repetition
        return
    if rule.when is not None and not rule.when.holds(ctx):
        return
    leaf: Leaf | None = None
    if rule.ref is not None:
        value: Any = ctx.ref(rule.ref)
        if isinstance(value, list) and not rule.target.endswith("[]"):
            # a single Reference element takes the one resource that belongs here
            if len(value) > 1:
                ctx.warnings.append(f"{rule.target}: {len(value)} candidates for one reference; first kept")
            value = value[0] if value else None
    elif rule.source is not None:
        raw, leaf = ctx.locate(rule.source)
        value = _source(rule, raw, leaf, ctx, top)
        if value is None:
            return
    else:
        value = rule.const
    table = library.concept_maps[rule.concept_map] if rule.concept_map is not None else None
    function = library.functions[rule.function] if rule.function is not None else None
    _finish(rule, value, leaf, target, ctx, table, function, lambda t, v: _set(t, rule.target, v))


def _segment_occurrences(rule: Rule, ctx: Context) -> list[int]:
    assert rule.each is not None
    if rule.follows:
        return ctx.following(rule.each)
    return ctx.members(rule.each)


def _apply_each(rule: Rule, target: dict[str, Any], ctx: Context, library: Library, top: bool) -> None:
    assert rule.each is not None
    saved = (ctx.scope, ctx.at, ctx.segment)
    scopes: list[tuple[str | None, tuple[str, int, int, int] | None, tuple[str, int] | None]]
    if er7_path.is_segment(rule.each):  # every occurrence of a segment (of the current group, if any)
        scopes = [(None, None, (rule.each, i)) for i in _segment_occurrences(rule, ctx)]
    else:
        loc = er7_path.parse(rule.each, every=True)
        occ = loc.occurrence if loc.occurrence is not None else ctx.occurrence(loc.segment)
        if top and _field_is_null(ctx, loc.segment, occ, loc.field):
            _null(rule, ctx, (loc.segment, occ or 1, loc.field, 1, 1, 1))
            return
        scopes = [
            (text, (loc.segment, occ or 1, loc.field, rep), ctx.segment)
            for rep, text in ctx.repetitions(rule.each)
        ]
    try:
        for scope, at, segment in scopes:
            ctx.scope, ctx.at = scope, at
            ctx.enter(segment)
            if rule.when is not None and not rule.when.holds(ctx):
                continue
            item: dict[str, Any] = {}
            for inner in rule.rules:
                _apply(inner, item, ctx, library)
            # Rules never set empty values, so an item is empty only when nothing applied;
            # the resource is pruned once, at the end.
            if item:
                if rule.target:
                    _set(target, rule.target, item.get("") if "" in item else item)
                else:
                    target.update(item)
    finally:
        ctx.scope, ctx.at = saved[0], saved[1]
        ctx.enter(saved[2])


def _field_is_null(ctx: Context, seg: str, occ: int | None, fld: int) -> bool:
    if occ is None:
        return False
    segment = ctx.find(seg, occ)
    return segment is not None and segment.field(fld) == NULL


_STEP = re.compile(r"^(_?[a-zA-Z][a-zA-Z0-9]*)(?:\[(\d*)\])?$")


def _set(target: dict[str, Any], path: str, value: Any) -> None:
    """Set ``value`` at a dotted element path; ``x[]`` appends, ``x[0]`` addresses an index."""
    if path == "":
        if isinstance(value, dict):
            target.update(value)
            return
        target[""] = value
        return
    _set_steps(target, _set_plan(path), value)


def _set_steps(target: dict[str, Any], steps: tuple[tuple[str, str | None, int], ...], value: Any) -> None:
    node: Any = target
    end = len(steps) - 1
    for i, (name, index, pos) in enumerate(steps):
        last = i == end
        if index is None:
            if last:
                node[name] = value
                return
            node = node.setdefault(name, {})
            continue
        items = node.setdefault(name, [])
        if index == "":
            if last:
                items.extend(value) if isinstance(value, list) else items.append(value)
                return
            items.append({})
            node = items[-1]
            continue
        while len(items) <= pos:
            items.append({})
        if last:
            items[pos] = value
            return
        node = items[pos]


@functools.lru_cache(maxsize=4096)
def _set_plan(path: str) -> tuple[tuple[str, str | None, int], ...]:
    """Each step of an element path as (name, index text, index), read once per path."""
    plan = []
    for step in path.split("."):
        m = _STEP.match(step)
        if m is None:
            raise RuleError(f"bad element path {path!r}")
        name, index = m.groups()
        plan.append((name, index, int(index) if index else -1))
    return tuple(plan)


# -- compiled rules ------------------------------------------------------------------------------
# Each rule becomes, once per library, a closure that does only what that rule needs: its paths
# parsed, its concept map and function looked up, its element path planned. Anything unusual (a
# name the library does not know, a path only the run may reject) is left to the interpreter, so
# that it fails at the same moment with the same error.

Apply = Callable[[dict[str, Any], Context], None]
_Locate = Callable[[Context], tuple[str, Leaf | None]]
_Test = Callable[[Context], bool]
_Reps = Callable[[Context], list[tuple[int, str]]]
_Put = Callable[[dict[str, Any], Any], None]


@dataclass(frozen=True, slots=True)
class _Plan:
    """One resource of a mapping, ready to run: compiled, or wrapping the interpreter."""

    res: ResourceMapping
    scope: _Reps | None
    when: _Test | None
    rules: tuple[Apply, ...]
    match: Apply | None


def _interpreted(mapping: Mapping_, library: Library) -> list[_Plan]:
    def apply(rule: Rule) -> Apply:
        return lambda target, ctx: _apply(rule, target, ctx, library, True)

    def reps(path: str) -> _Reps:
        return lambda ctx: ctx.repetitions(path)

    return [
        _Plan(
            res,
            reps(res.scope) if res.scope is not None else None,
            res.when.holds if res.when is not None else None,
            tuple(apply(rule) for rule in res.rules),
            apply(res.match) if res.match is not None else None,
        )
        for res in mapping.resources
    ]


def _compiled(mapping: Mapping_, library: Library) -> list[_Plan]:
    return [
        _Plan(
            res,
            _compile_reps(res.scope) if res.scope is not None else None,
            _compile_when(res.when),
            tuple(_compile_rule(rule, library, True) for rule in res.rules),
            _compile_rule(res.match, library, True) if res.match is not None else None,
        )
        for res in mapping.resources
    ]


def _compile_locate(path: str) -> _Locate:
    """``Context.locate`` for one path."""
    try:
        seg, occ, fld, rep, comp, sub = _read_plan(path)
    except ValueError:
        return lambda ctx: ctx.locate(path)  # the run raises, as it always did
    if seg == "":

        def locate_relative(ctx: Context) -> tuple[str, Leaf | None]:
            if ctx.scope is None:
                raise RuleError(f"relative path {path} outside an 'each'")
            raw, c, s = ctx.relative(comp, sub)
            at = ctx.at
            return raw, (at[0], at[1], at[2], at[3], c, s) if at is not None else None

        return locate_relative
    if seg == "MSH" and fld <= 2:
        return lambda ctx: ctx.locate(path)

    def locate(ctx: Context) -> tuple[str, Leaf | None]:
        found = occ if occ is not None else ctx.occurrence(seg)
        if found is None:
            return "", None
        segment = ctx.find(seg, found)
        if segment is None:
            return "", None
        text = segment.field(fld)
        if not text:
            return "", None
        msg = ctx.message
        rs = msg.separators.repetition
        if rep == 1:  # the usual case: the first repetition, without splitting the others
            rep_text = text.partition(rs)[0] if rs in text else text
        else:
            reps = text.split(rs)
            rep_text = reps[rep - 1] if rep <= len(reps) else ""
        raw, c, s = _pick(rep_text, comp, sub, msg)
        return raw, (seg, found, fld, rep, c, s)

    return locate


def _compile_reps(path: str) -> _Reps:
    """``Context.repetitions`` for one path."""
    try:
        loc = er7_path.parse(path, every=True)
    except ValueError:
        return lambda ctx: ctx.repetitions(path)  # the run raises, as it always did
    if loc.component is not None:
        return lambda ctx: ctx.repetitions(path)
    seg, occurrence, number, wanted = loc.segment, loc.occurrence, loc.field, loc.repetition

    def reps(ctx: Context) -> list[tuple[int, str]]:
        found = occurrence if occurrence is not None else ctx.occurrence(seg)
        if found is None:
            return []
        segment = ctx.find(seg, found)
        if segment is None:
            return []
        return _each_repetition(ctx, seg, found, number, segment.field(number), wanted)

    return reps


def _compile_when(when: When | None) -> _Test | None:
    if when is None:
        return None
    if isinstance(when, AllOf):
        tests = tuple(_compile_condition(c) for c in when.conditions)
        return lambda ctx: all(test(ctx) for test in tests)
    return _compile_condition(when)


def _compile_condition(cond: Condition) -> _Test:
    locate = _compile_locate(cond.source)
    present, equals, in_, not_in = cond.present, cond.equals, cond.in_, cond.not_in

    def test(ctx: Context) -> bool:
        value = _text(locate(ctx)[0], ctx.message)
        if present is not None and bool(value) != present:
            return False
        if equals is not None and value != equals:
            return False
        if in_ is not None and value not in in_:
            return False
        return not (not_in is not None and value in not_in)

    return test


def _compile_put(path: str) -> _Put:
    """``_set`` for one element path."""
    if path == "":
        return lambda target, value: _set(target, "", value)
    try:
        steps = _set_plan(path)
    except ValueError:
        return lambda target, value: _set(target, path, value)  # the run raises, as it always did
    if len(steps) == 1:
        name, index, _ = steps[0]
        if index is None:

            def put_field(target: dict[str, Any], value: Any) -> None:
                target[name] = value

            return put_field
        if index == "":

            def put_append(target: dict[str, Any], value: Any) -> None:
                items = target.setdefault(name, [])
                if isinstance(value, list):
                    items.extend(value)
                else:
                    items.append(value)

            return put_append
    return lambda target, value: _set_steps(target, steps, value)


def _compile_rule(rule: Rule, library: Library, top: bool = False) -> Apply:
    """``_apply`` for one rule."""
    if (rule.concept_map is not None and rule.concept_map not in library.concept_maps) or (
        rule.function is not None and rule.function not in library.functions
    ):
        return lambda target, ctx: _apply(rule, target, ctx, library, top)  # fails when run, as it always did
    if rule.each is not None:
        return _compile_each(rule, library, top)
    test = _compile_when(rule.when)
    put = _compile_put(rule.target)
    if rule.ref is None and rule.concept_map is None and rule.function is None:
        if rule.source is not None:
            locate = _compile_locate(rule.source)

            def apply_read(target: dict[str, Any], ctx: Context) -> None:
                if test is not None and not test(ctx):
                    return
                raw, leaf = locate(ctx)
                value = _source(rule, raw, leaf, ctx, top)
                if value is not None:
                    put(target, value)
                    if leaf is not None:
                        ctx.consumed.add(leaf)

            return apply_read
        const = rule.const
        if not is_empty(const):

            def apply_const(target: dict[str, Any], ctx: Context) -> None:
                if test is None or test(ctx):
                    put(target, const)

            return apply_const

    ref, source, appends = rule.ref, rule.source, rule.target.endswith("[]")
    locate_source = _compile_locate(source) if source is not None else None
    table = library.concept_maps[rule.concept_map] if rule.concept_map is not None else None
    element = rule.target
    function = library.functions[rule.function] if rule.function is not None else None

    def apply(target: dict[str, Any], ctx: Context) -> None:
        if test is not None and not test(ctx):
            return
        value: Any
        leaf: Leaf | None = None
        if ref is not None:
            value = ctx.ref(ref)
            if isinstance(value, list) and not appends:
                if len(value) > 1:
                    ctx.warnings.append(f"{element}: {len(value)} candidates for one reference; first kept")
                value = value[0] if value else None
        elif locate_source is not None:
            raw, leaf = locate_source(ctx)
            value = _source(rule, raw, leaf, ctx, top)
            if value is None:
                return
        else:
            value = rule.const
        _finish(rule, value, leaf, target, ctx, table, function, put)

    return apply


def _compile_each(rule: Rule, library: Library, top: bool) -> Apply:
    """``_apply_each`` for one rule."""
    assert rule.each is not None
    test = _compile_when(rule.when)
    inner = tuple(_compile_rule(r, library) for r in rule.rules)
    put = _compile_put(rule.target) if rule.target else None
    each = rule.each

    def one(target: dict[str, Any], ctx: Context) -> None:
        """One repetition (or occurrence): its item, when some inner rule applied."""
        if test is not None and not test(ctx):
            return
        item: dict[str, Any] = {}
        for apply in inner:
            apply(item, ctx)
        if item:
            if put is not None:
                put(target, item.get("") if "" in item else item)
            else:
                target.update(item)

    if er7_path.is_segment(each):

        def apply_segments(target: dict[str, Any], ctx: Context) -> None:
            saved_scope, saved_at, saved_segment = ctx.scope, ctx.at, ctx.segment
            occurrences = _segment_occurrences(rule, ctx)
            try:
                for i in occurrences:
                    ctx.scope, ctx.at = None, None
                    ctx.enter((each, i))
                    one(target, ctx)
            finally:
                ctx.scope, ctx.at = saved_scope, saved_at
                ctx.enter(saved_segment)

        return apply_segments
    try:
        loc = er7_path.parse(each, every=True)
    except ValueError:
        return lambda target, ctx: _apply(rule, target, ctx, library, top)  # the run raises, as it always did
    seg, fixed, number, wanted = loc.segment, loc.occurrence, loc.field, loc.repetition

    def apply_repetitions(target: dict[str, Any], ctx: Context) -> None:
        # the segment (and so the group) stays the same: only the scope moves
        occ = fixed if fixed is not None else ctx.occurrence(seg)
        if occ is None:
            return
        segment = ctx.find(seg, occ)
        if segment is None:
            return
        raw = segment.field(number)
        if not raw:
            return
        if raw == NULL:
            if top:
                _null(rule, ctx, (seg, occ, number, 1, 1, 1))
            return
        saved_scope, saved_at = ctx.scope, ctx.at
        try:
            for rep, text in _each_repetition(ctx, seg, occ, number, raw, wanted):
                ctx.scope, ctx.at = text, (seg, occ, number, rep)
                one(target, ctx)
        finally:
            ctx.scope, ctx.at = saved_scope, saved_at

    return apply_repetitions


def _prune(node: Any) -> Any:
    """Drop empty objects and lists left by rules that found nothing (empty text and None too)."""
    if isinstance(node, dict):
        dead: list[str] = []
        for key, value in node.items():
            if isinstance(value, (dict, list)):
                if value and _prune(value):
                    continue
            elif not (value is None or value == ""):
                continue
            dead.append(key)
        for key in dead:
            del node[key]
    elif isinstance(node, list):
        whole = True  # most lists keep every item: rebuilt only when one goes
        for value in node:
            if isinstance(value, (dict, list)):
                if value and _prune(value):
                    continue
            elif not (value is None or value == ""):
                continue
            whole = False
        if not whole:
            node[:] = [v for v in node if (v if isinstance(v, (dict, list)) else not (v is None or v == ""))]
    return node


def _prune_fast(node: dict[str, Any]) -> dict[str, Any]:
    """``_prune``, skipped when the tree holds nothing it could drop: serialised (in C), every such
    value shows as ``""``, ``null``, ``{}`` or ``[]``. Text that merely contains one prunes anyway."""
    try:
        text = orjson.dumps(node)
    except TypeError:  # not JSON-shaped (orjson's errors are TypeErrors): the plain way
        return _prune(node)  # type: ignore[no-any-return]
    if b'""' in text or b"null" in text or b"{}" in text or b"[]" in text:
        return _prune(node)  # type: ignore[no-any-return]
    return node


def _drop_dangling(node: Any, present: set[str]) -> None:
    """A reference to a resource this message did not produce (its ``when`` failed) is removed."""
    if isinstance(node, dict):
        for key in list(node):
            value = node[key]
            if (
                isinstance(value, dict)
                and str(value.get("reference", "")).startswith("urn:uuid:")
                and value["reference"] not in present
            ):
                del node[key]
            else:
                _drop_dangling(value, present)
                if value == []:
                    del node[key]
    elif isinstance(node, list):
        node[:] = [
            v
            for v in node
            if not (
                isinstance(v, dict)
                and str(v.get("reference", "")).startswith("urn:uuid:")
                and v["reference"] not in present
            )
        ]
        for v in node:
            _drop_dangling(v, present)
