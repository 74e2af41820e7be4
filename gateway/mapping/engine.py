"""Declarative HL7v2 → FHIR mappings: YAML rules, concept maps, named functions.

A mapping file (``mappings/*.yaml``) says which events it serves and which
resources it builds. Each resource has rules; a rule reads an ER7 path and sets
a FHIR element::

    name: pam-fr-adt
    events: ["ADT^A01", "ADT^A04"]
    resources:
      - key: patient                  # other rules refer to it as {ref: patient}
        type: Patient
        identity: identifier          # conditional update on this element's first system|value
        rules:
          - set: gender
            from: PID-8
            map: hl7-0001-gender      # a concept map (mappings/conceptmaps/*.yaml)
          - set: name[]               # [] appends one element per repetition
            each: PID-5               # repetitions; inner "from" paths are relative (".1", ".2.1")
            rules:
              - {set: family, from: ".1"}
              - {set: "given[]", from: ".2"}
          - set: birthDate
            from: PID-7
            fn: hl7_date              # a named Python function (gateway.mapping.functions)
          - set: active
            const: true
          - set: extension[]
            fn: identity_reliability  # functions may read the whole message
            when: {from: PID-32, not_in: ["", "VIDE"]}

Mapping code never touches sockets or databases. Every field a rule reads is
recorded, so what a message carries and no rule consumed can be reported.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml

from gateway.core.errors import ConfigError, UnsupportedMessage, ValidationError
from gateway.hl7.er7 import Message, Segment, unescape

_ER7_ABS = re.compile(r"^([A-Z][A-Z0-9]{2})(?:\[(\d+)\])?-(\d+)(?:\[(\d+|\*)\])?((?:\.\d+){0,2})$")
_ER7_REL = re.compile(r"^((?:\.\d+){1,2})$")


class RuleError(ValueError):
    """A mapping rule that cannot apply (a bad path, an unknown resource): its text names the
    rule, never message content, so it may be shown; other errors are shown by type only."""


def rule_failure(exc: Exception) -> str:
    """What a failed rule says on the message: a library's own text may quote patient data."""
    return str(exc) if isinstance(exc, RuleError) else type(exc).__name__


_ELEMENT = re.compile(r"^[a-zA-Z][a-zA-Z0-9]*(?:\[(?:\d+)?\])?(?:\.[a-zA-Z][a-zA-Z0-9]*(?:\[(?:\d+)?\])?)*$")

Function = Callable[["Context", Any], Any]


@dataclass(slots=True)
class Context:
    """What a rule sees: the message, the current repetition (inside ``each``), and the output so far."""

    message: Message
    warnings: list[str]
    consumed: set[tuple[str, int, int]]  # (segment, occurrence, field)
    refs: dict[str, str | list[str]]  # resource key → fullUrl (a list for one-per-segment resources)
    scope: str | None = None  # raw text of the current repetition
    scope_field: tuple[str, int, int] | None = None
    segment: tuple[str, int] | None = None  # the segment iterated by a segment-level "each"
    timezone: str = "Europe/Paris"  # for HL7 times sent without a zone
    fr_core_version: str = "2.1.0"  # the FR Core release the output is shaped to
    layout: Layout | None = None  # segment groups (ORU: ORC/OBR), when the mapping declares them
    group: int | None = None  # the group of the segment being iterated
    ref_segments: dict[str, str] = field(default_factory=dict)  # key → segment of a per-segment resource
    skipped: set[str] = field(default_factory=set)  # fullUrls of resources already found not produced
    forward: set[str] = field(default_factory=set)  # fullUrls referenced before being decided
    decided: set[str] = field(default_factory=set)  # fullUrls whose resource was built or skipped
    found: dict[tuple[str, int], Segment | None] = field(default_factory=dict)  # segment lookups so far

    def enter(self, segment: tuple[str, int] | None) -> None:
        """Iterate ``segment`` (name, occurrence): reads and references follow its group."""
        self.segment = segment
        self.group = self.layout.group_of.get(segment) if self.layout and segment else None

    def find(self, seg: str, occurrence: int) -> Segment | None:
        """``message.segment``, looked up once per message: the message does not change while mapped."""
        key = (seg, occurrence)
        found = self.found
        if key in found:
            return found[key]
        segment = found[key] = self.message.segment(seg, occurrence)
        return segment

    def occurrence(self, seg: str) -> int | None:
        """Which occurrence of ``seg`` an unqualified path means here; None when its group has none."""
        if self.segment is not None and self.segment[0] == seg:
            return self.segment[1]
        if self.layout is not None and self.group is not None and seg in self.layout.grouped:
            return self.layout.first_in_group.get((seg, self.group))
        return 1

    def read(self, path: str) -> str:
        """An ER7 path, absolute (PID-5.1) or relative to the current repetition (.1)."""
        seg, occ, fld, rep_index, comps = _read_plan(path)
        if seg == "":
            if self.scope is None:
                raise RuleError(f"relative path {path} outside an 'each'")
            return _component(self.scope, comps or "", self.message)
        found = occ if occ is not None else self.occurrence(seg)
        if found is None:
            return ""
        occurrence = found
        self.consumed.add((seg, occurrence, fld))
        segment = self.find(seg, occurrence)
        if segment is None:
            return ""
        reps = _repetitions(segment.field(fld), self.message, seg == "MSH" and fld <= 2)
        if rep_index > len(reps):
            return ""
        return (
            _component(reps[rep_index - 1], comps, self.message)
            if comps
            else _leaf(reps[rep_index - 1], self.message)
        )

    def repetitions(self, path: str) -> list[str]:
        """The non-empty repetitions of a field; ``PV1-7[1]`` takes only the first (the others are
        reported as a warning, never dropped silently)."""
        try:
            seg, occ, fld, rep, comps = _parse_er7(path)
        except ValueError:
            seg, comps = "", None
        if seg == "" or comps:
            raise RuleError(f"'each' takes a field path such as PID-3, not {path!r}")
        found = int(occ) if occ else self.occurrence(seg)
        if found is None:
            return []
        self.consumed.add((seg, found, int(fld)))
        segment = self.find(seg, found)
        if segment is None:
            return []
        reps = _repetitions(segment.field(int(fld)), self.message, False)
        if rep is None or rep == "*":
            return [r for r in reps if r]
        index = int(rep)
        others = sum(1 for i, r in enumerate(reps, 1) if r and i != index)
        if others:
            self.warnings.append(f"{seg}-{fld}: only repetition {index} is mapped; {others} more left out")
        return [reps[index - 1]] if index <= len(reps) and reps[index - 1] else []

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
        elif self.layout is not None and self.group is not None and seg in self.layout.grouped:
            group_of, group = self.layout.group_of, self.group
            urls = [url for n, url in enumerate(target, 1) if group_of.get((seg, n)) == group]
        else:
            urls = target
        return [{"reference": url} for url in urls if self._wanted(url)]

    def _wanted(self, url: str) -> bool:
        """A resource already skipped is not referenced; one not built yet is checked at the end."""
        if url in self.skipped:
            return False
        if url not in self.decided:
            self.forward.add(url)
        return True


@dataclass(frozen=True, slots=True)
class Layout:
    """Where each segment sits: groups start at an anchor segment (ORC or OBR in an ORU), so that a
    result reads its own order's OBR and a report lists only its own observations."""

    group_of: dict[tuple[str, int], int]  # (segment, occurrence) → group (0 before the first anchor)
    first_in_group: dict[tuple[str, int], int]  # (segment, group) → its first occurrence there
    grouped: frozenset[str]  # segments met inside a group

    @classmethod
    def of(cls, message: Message, anchors: frozenset[str]) -> Layout:
        counts: dict[str, int] = {}
        group, opened_by = 0, set[str]()
        group_of: dict[tuple[str, int], int] = {}
        first: dict[tuple[str, int], int] = {}
        grouped: set[str] = set()
        for seg in message.segments:
            name = seg.name
            counts[name] = occ = counts.get(name, 0) + 1
            if name in anchors:
                # ORC then OBR open one group together; a second OBR (or a new ORC) opens the next
                if group == 0 or name in opened_by:
                    group, opened_by = group + 1, set()
                opened_by.add(name)
            group_of[(name, occ)] = group
            first.setdefault((name, group), occ)
            if group:
                grouped.add(name)
        return cls(group_of, first, frozenset(grouped))


@functools.lru_cache(maxsize=4096)
def _parse_er7(path: str) -> tuple[str, str | None, str, str | None, str | None]:
    """(segment, occurrence, field, repetition, components); segment "" for a relative path. Parsed once."""
    rel = _ER7_REL.match(path)
    if rel:
        return ("", None, "", None, rel.group(1))
    m = _ER7_ABS.match(path)
    if m is None:
        raise RuleError(f"bad ER7 path {path!r}")
    seg, occ, fld, rep, comps = m.groups()
    return (seg, occ, fld, rep, comps)


@functools.lru_cache(maxsize=4096)
def _read_plan(path: str) -> tuple[str, int | None, int, int, str | None]:
    """(segment, occurrence, field, repetition index, components) with the numbers already read."""
    seg, occ, fld, rep, comps = _parse_er7(path)
    if seg == "":
        return ("", None, 0, 1, comps)
    return (seg, int(occ) if occ else None, int(fld), int(rep) if rep and rep != "*" else 1, comps)


@functools.lru_cache(maxsize=1024)
def _component_plan(comps: str) -> tuple[int, int]:
    """'.2' or '.2.1' → (component, subcomponent)."""
    parts = [int(p) for p in comps.strip(".").split(".")]
    return parts[0], parts[1] if len(parts) > 1 else 1


def _repetitions(raw: str, msg: Message, atomic: bool) -> list[str]:
    if atomic:
        return [raw]
    return raw.split(msg.separators.repetition) if raw else []


def _leaf(text: str, msg: Message) -> str:
    seps = msg.separators
    if seps.component in text or seps.subcomponent in text:
        return _component(text, ".1", msg)
    return unescape(text, seps, msg.codec)


def _component(rep: str, comps: str, msg: Message) -> str:
    seps = msg.separators
    first, sub = _component_plan(comps)
    pieces = rep.split(seps.component)
    value = pieces[first - 1] if first <= len(pieces) else ""
    subs = value.split(seps.subcomponent)
    value = subs[sub - 1] if sub <= len(subs) else ""
    return unescape(value, seps, msg.codec)


# -- rules ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Condition:
    source: str
    equals: str | None = None
    in_: frozenset[str] | None = None
    not_in: frozenset[str] | None = None
    present: bool | None = None

    def holds(self, ctx: Context) -> bool:
        value = ctx.read(self.source)
        return self.passes(value, bool(value))

    def passes(self, value: str, present: bool) -> bool:
        """The tests on a value already read (each direction reads its own kind of path)."""
        if self.present is not None and present != self.present:
            return False
        if self.equals is not None and value != self.equals:
            return False
        if self.in_ is not None and value not in self.in_:
            return False
        return not (self.not_in is not None and value in self.not_in)


@dataclass(frozen=True, slots=True)
class AllOf:
    """``when: [..., ...]``: every condition must hold."""

    conditions: tuple[Condition, ...]

    def holds(self, ctx: Context) -> bool:
        return all(c.holds(ctx) for c in self.conditions)


@dataclass(slots=True)
class Rule:
    target: str  # FHIR element path: "gender", "name[]", "identifier[0].system", "" for the resource itself
    source: str | None = None
    const: Any = None
    concept_map: str | None = None
    function: str | None = None
    when: Condition | AllOf | None = None
    each: str | None = None  # a field (repetitions) or a segment name (occurrences)
    rules: list[Rule] = field(default_factory=list)
    ref: str | None = None
    where: str = ""  # file:line, for error messages


@dataclass(slots=True)
class ResourceMapping:
    key: str
    type: str
    rules: list[Rule]
    identity: str | None = None  # element whose first system|value makes the conditional update
    when: Condition | AllOf | None = None
    where: str = ""
    each: str | None = None  # one resource per occurrence of this segment (an Observation per OBX)
    use: str | None = None  # "mapping-name:key": take the rules of a resource defined in another file
    match: Rule | None = None  # builds the identifiers to find the resource by, when not its own (A47)
    scope: str | None = None  # a field repetition (PV1-7[1]) the rules' relative paths read


@dataclass(slots=True)
class Mapping_:
    name: str
    events: frozenset[str]
    resources: list[ResourceMapping]
    file: str
    ignore_segments: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()  # anchor segments of repeated groups (ORU: ORC, OBR)

    def serves(self, event: str) -> bool:
        family = event.split("^")[0] + "^*"
        return event in self.events or family in self.events


@dataclass(slots=True)
class MappingResult:
    bundle: dict[str, Any]
    warnings: list[str]
    unmapped: list[str]  # "ZXY-2", "PID-13" … non-empty fields no rule read
    mapping: str


# -- loading -----------------------------------------------------------------------------------


class _LineLoader(yaml.SafeLoader):
    """Keeps each mapping's line so that errors point at it."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict[str, Any]:
    data = {str(k): v for k, v in loader.construct_mapping(node, deep=True).items()}
    data["__line__"] = node.start_mark.line + 1
    return data


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

_RULE_KEYS = {"set", "from", "const", "map", "fn", "when", "each", "rules", "ref", "__line__"}
_RESOURCE_KEYS = {"key", "type", "identity", "rules", "when", "each", "use", "match", "scope", "__line__"}
_FILE_KEYS = {"name", "events", "resources", "ignore_segments", "groups", "__line__"}
_WHEN_KEYS = {"from", "equals", "in", "not_in", "present", "__line__"}


class Library:
    """All mapping files, concept maps and functions, checked at load time."""

    def __init__(
        self,
        mappings: Sequence[Mapping_],
        concept_maps: Mapping[str, Mapping[str, str]],
        functions: Mapping[str, Function],
    ) -> None:
        self.mappings = list(mappings)
        self.concept_maps = dict(concept_maps)
        self.functions = dict(functions)
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
        concept_maps: dict[str, dict[str, str]] = {}
        for path in sorted((directory / "conceptmaps").glob("*.yaml")):
            data = _load_yaml(path)
            for name, table in data.items():
                if name == "__line__":
                    continue
                if not isinstance(table, dict):
                    raise ConfigError(
                        "a concept map is a mapping of source code → target", file=str(path), key=name
                    )
                concept_maps[name] = {str(k): _strip_lines(v) for k, v in table.items() if k != "__line__"}
        mappings = [_parse_file(p, concept_maps, functions) for p in sorted(directory.glob("*.yaml"))]
        names = [m.name for m in mappings]
        for name in names:
            if names.count(name) > 1:
                raise ConfigError(f"two mapping files are named {name!r}", file=str(directory))
        _resolve_uses(mappings)
        return cls(mappings, concept_maps, functions)

    def for_event(self, event: str) -> Mapping_ | None:
        exact = [m for m in self.mappings if event in m.events]
        if exact:
            return exact[0]
        family = [m for m in self.mappings if m.serves(event)]
        return family[0] if family else None

    def map(
        self, message: Message, *, timezone: str = "Europe/Paris", fr_core_version: str = "2.1.0"
    ) -> MappingResult:
        event = f"{message.message_type}^{message.trigger}"
        mapping = self.for_event(event)
        if mapping is None:
            raise UnsupportedMessage(f"no mapping for {event}", location="MSH-9")
        return run(mapping, message, self, timezone=timezone, fr_core_version=fr_core_version)


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text("utf-8"), Loader=_LineLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise ConfigError(f"not valid YAML: {exc.problem}", file=str(path), line=line) from exc
    if not isinstance(data, dict):
        raise ConfigError("a mapping file is a YAML mapping", file=str(path), line=1)
    return data


def _strip_lines(value: Any) -> Any:
    """The loader's line markers belong to the rules, not to the values they carry."""
    if isinstance(value, dict):
        return {k: _strip_lines(v) for k, v in value.items() if k != "__line__"}
    if isinstance(value, list):
        return [_strip_lines(v) for v in value]
    return value


def _check_keys(data: Mapping[str, Any], allowed: set[str], file: str, what: str) -> None:
    extra = sorted(set(data) - allowed)
    if extra:
        raise ConfigError(
            f"unknown key in {what}; allowed: {', '.join(sorted(allowed - {'__line__'}))}",
            file=file,
            key=extra[0],
            line=data.get("__line__"),
        )


def _parse_file(path: Path, concept_maps: Mapping[str, Any], functions: Mapping[str, Function]) -> Mapping_:
    file = str(path)
    data = _load_yaml(path)
    _check_keys(data, _FILE_KEYS, file, "a mapping file")
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
        _check_keys(item, _RESOURCE_KEYS, file, "a resource")
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
        if each is not None and not re.fullmatch(r"[A-Z][A-Z0-9]{2}", str(each)):
            raise ConfigError(
                "a resource's 'each' names a segment, such as OBX", file=file, key="each", line=line
            )
        match = _parse_rule(item["match"], file, concept_maps, functions) if "match" in item else None
        scope = item.get("scope")
        if scope is not None:
            m = _ER7_ABS.match(str(scope))
            if m is None or m.group(5):
                raise ConfigError(
                    "a resource's 'scope' names a field repetition, such as PV1-7[1]",
                    file=file,
                    key="scope",
                    line=line,
                )
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
            )
        )
    for res in resources:  # references must name a resource of this file
        for rule in _walk(res.rules):
            if rule.ref is not None and rule.ref not in keys:
                raise ConfigError(
                    f"no resource with key {rule.ref!r} in this file",
                    file=file,
                    key="ref",
                    line=int(rule.where.rsplit(":", 1)[1]),
                )
    groups = data.get("groups", [])
    if not isinstance(groups, list) or not all(
        isinstance(g, str) and re.fullmatch(r"[A-Z][A-Z0-9]{2}", g) for g in groups
    ):
        raise ConfigError(
            "a list of the segments that open a group, such as [ORC, OBR]",
            file=file,
            key="groups",
            line=data["__line__"],
        )
    return Mapping_(
        data["name"],
        frozenset(events),
        resources,
        file,
        frozenset(data.get("ignore_segments", [])),
        frozenset(groups),
    )


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


def _walk(rules: Iterable[Rule]) -> Iterable[Rule]:
    for rule in rules:
        yield rule
        yield from _walk(rule.rules)


def _parse_when(data: Any, file: str) -> Condition | AllOf:
    if isinstance(data, list) and data:
        return AllOf(tuple(_parse_condition(d, file) for d in data))
    return _parse_condition(data, file)


def _parse_condition(data: Any, file: str) -> Condition:
    return parse_condition(data, file, lambda path, line: _check_path(path, file, line))


def parse_condition(data: Any, file: str, check_source: Callable[[Any, int], None]) -> Condition:
    """A ``when:`` condition, the same YAML in both directions; ``check_source`` checks its
    ``from`` path (ER7 inbound, FHIR outbound)."""
    if not isinstance(data, dict) or "from" not in data:
        raise ConfigError(
            "a condition needs 'from' and one test (equals, in, not_in, present)",
            file=file,
            key="when",
            line=data.get("__line__") if isinstance(data, dict) else None,
        )
    _check_keys(data, _WHEN_KEYS, file, "a condition")
    check_source(data["from"], data["__line__"])
    return Condition(
        data["from"],
        equals=str(data["equals"]) if "equals" in data else None,
        in_=frozenset(map(str, data["in"])) if "in" in data else None,
        not_in=frozenset(map(str, data["not_in"])) if "not_in" in data else None,
        present=bool(data["present"]) if "present" in data else None,
    )


def _check_path(path: Any, file: str, line: int) -> None:
    if not isinstance(path, str) or not (_ER7_ABS.match(path) or _ER7_REL.match(path)):
        raise ConfigError(
            f"{path!r} is not an ER7 path such as PID-3.1 or .2 (inside 'each')",
            file=file,
            key="from",
            line=line,
        )


def check_names(
    data: Mapping[str, Any],
    concept_maps: Mapping[str, Any],
    functions: Mapping[str, Any],
    file: str,
    line: int,
) -> None:
    """A rule's ``map`` and ``fn`` must name a known concept map and function (both directions)."""
    for key, known, what in (("map", concept_maps, "concept map"), ("fn", functions, "function")):
        if key in data and data[key] not in known:
            raise ConfigError(
                f"no {what} {data[key]!r}; known: {', '.join(sorted(known))}", file=file, key=key, line=line
            )


def _parse_rule(
    data: Any, file: str, concept_maps: Mapping[str, Any], functions: Mapping[str, Function]
) -> Rule:
    if not isinstance(data, dict):
        raise ConfigError("a rule is a mapping with 'set'", file=file)
    _check_keys(data, _RULE_KEYS, file, "a rule")
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
    if "each" in data and "rules" not in data:
        raise ConfigError("'each' needs inner 'rules'", file=file, key="each", line=line)
    return Rule(
        target=target,
        source=data.get("from"),
        const=_strip_lines(data.get("const")),
        concept_map=data.get("map"),
        function=data.get("fn"),
        when=_parse_when(data["when"], file) if "when" in data else None,
        each=data.get("each"),
        rules=[_parse_rule(r, file, concept_maps, functions) for r in data.get("rules", [])],
        ref=data.get("ref"),
        where=where,
    )


# -- running -----------------------------------------------------------------------------------


def run(
    mapping: Mapping_,
    message: Message,
    library: Library,
    *,
    timezone: str = "Europe/Paris",
    fr_core_version: str = "2.1.0",
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
        layout=Layout.of(message, mapping.groups) if mapping.groups else None,
        ref_segments=ref_segments,
    )
    ctx.consumed.update(_HEADER_FIELDS)
    entries: list[tuple[_Plan, str, dict[str, Any]]] = []
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
            ctx.scope = None
            ctx.decided.add(url)
            ctx.skipped.add(url)  # until it is built
            if plan.scope is not None:
                reps = plan.scope(ctx)
                if not reps:
                    continue
                ctx.scope = reps[0]
            if plan.when is not None and not plan.when(ctx):
                continue
            resource: dict[str, Any] = {"resourceType": res.type}
            try:
                for apply in plan.rules:
                    apply(resource, ctx)
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                raise ValidationError(f"mapping {mapping.name}: {res.key}: {rule_failure(exc)}") from exc
            if len(_prune_fast(resource)) > 1:  # a resource nothing was mapped into is not produced
                entries.append((plan, url, resource))
                ctx.skipped.discard(url)
        ctx.enter(None)
        ctx.scope = None
    bundle_entries: list[dict[str, Any]] = []
    seen: dict[str, str] = {}  # conditional URL → fullUrl of the entry that carries it
    merged: dict[str, str] = {}  # fullUrl of a dropped duplicate → the kept one
    for plan, url, resource in entries:
        res = plan.res
        request: dict[str, str] = {"method": "POST", "url": res.type}
        if res.identity == "id":
            # No business identifier (Binary): the mapping computes a stable id, so a replay
            # updates the same resource.
            if isinstance(resource.get("id"), str):
                request = {"method": "PUT", "url": f"{res.type}/{resource['id']}"}
        else:
            ident = _identity(resource, res.identity) if res.identity else None
            if plan.match is not None and res.match is not None:
                # Found by other identifiers than those it will carry (A47: the old ones, in MRG-1).
                probe: dict[str, Any] = {}
                plan.match(probe, ctx)
                ident = _identity(_prune(probe), res.match.target.split("[")[0]) or ident
            if ident:
                request = {"method": "PUT", "url": f"{res.type}?{ident}"}
        if request["method"] == "PUT":
            # One resource named twice (the same doctor attending and admitting): one entry,
            # or the two writes would race to create it twice.
            if request["url"] in seen:
                merged[url] = seen[request["url"]]
                continue
            seen[request["url"]] = url
        bundle_entries.append({"fullUrl": url, "resource": resource, "request": request})
    present = {e["fullUrl"] for e in bundle_entries}
    for entry in bundle_entries if merged else ():
        _redirect(entry["resource"], merged)
    # References to resources decided earlier were left out at once; only a reference made before
    # its target was decided (a forward one) may point at nothing now.
    if ctx.forward - present - merged.keys():
        for entry in bundle_entries:
            _drop_dangling(entry["resource"], present)
            _prune(entry["resource"])  # what held only that reference goes too
    unmapped = _unmapped(message, ctx.consumed, mapping.ignore_segments)
    return MappingResult(
        {"resourceType": "Bundle", "type": "transaction", "entry": bundle_entries},
        list(dict.fromkeys(ctx.warnings)),
        unmapped,
        mapping.name,
    )


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


# Header fields the gateway itself reads (routing, sender, dedupe, ACK) are not content.
_HEADER_FIELDS = tuple(("MSH", 1, n) for n in (1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 15, 16, 17, 18, 21))


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


def _identity(resource: Mapping[str, Any], element: str) -> str | None:
    values = resource.get(element)
    if not isinstance(values, list):
        return None
    with_system = [i for i in values if isinstance(i, dict) and i.get("system") and i.get("value")]
    if with_system:
        return f"identifier={with_system[0]['system']}|{with_system[0]['value']}"
    # "|value" searches identifiers that have no system: still idempotent on replay.
    bare = [i for i in values if isinstance(i, dict) and i.get("value")]
    return f"identifier=|{bare[0]['value']}" if bare else None


def _apply(rule: Rule, target: dict[str, Any], ctx: Context, library: Library) -> None:
    if rule.each is not None:
        _apply_each(rule, target, ctx, library)  # its condition is tested on each repetition
        return
    if rule.when is not None and not rule.when.holds(ctx):
        return
    if rule.ref is not None:
        value: Any = ctx.ref(rule.ref)
        if isinstance(value, list) and not rule.target.endswith("[]"):
            # a single Reference element takes the one resource that belongs here
            if len(value) > 1:
                ctx.warnings.append(f"{rule.target}: {len(value)} candidates for one reference; first kept")
            value = value[0] if value else None
    elif rule.source is not None:
        value = ctx.read(rule.source)
        if not value.strip():  # FHIR strings need a non-blank character: blank is absent
            return
    else:
        value = rule.const
    if rule.concept_map is not None:
        table = library.concept_maps[rule.concept_map]
        if str(value) not in table:
            ctx.warnings.append(f"{rule.source}: code not in concept map {rule.concept_map}")
            return
        value = table[str(value)]
    if rule.function is not None:
        value = library.functions[rule.function](ctx, value)
    if value is None or value == "" or value == [] or value == {}:
        return
    _set(target, rule.target, value)


def _apply_each(rule: Rule, target: dict[str, Any], ctx: Context, library: Library) -> None:
    assert rule.each is not None
    saved = (ctx.scope, ctx.segment)
    if _SEGMENT.fullmatch(rule.each):  # every occurrence of a segment (of the current group, if any)
        count = len(ctx.message.segments_named(rule.each))
        layout, group = ctx.layout, ctx.group
        scopes: list[tuple[str | None, tuple[str, int] | None]] = [
            (None, (rule.each, i))
            for i in range(1, count + 1)
            if layout is None or group is None or layout.group_of.get((rule.each, i)) == group
        ]
    else:
        scopes = [(rep, ctx.segment) for rep in ctx.repetitions(rule.each)]
    try:
        for scope, segment in scopes:
            ctx.scope = scope
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
        ctx.scope = saved[0]
        ctx.enter(saved[1])


_SEGMENT = re.compile(r"[A-Z][A-Z0-9]{2}")
_STEP = re.compile(r"^([a-zA-Z][a-zA-Z0-9]*)(?:\[(\d*)\])?$")


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
# parsed, its concept map and function looked up, its element path planned. The closures read,
# warn and set exactly as _apply does, in the same order (tests/mapping/test_compiled*.py).
# Anything unusual (a name the library does not know, a path only the run may reject) is left to
# the interpreter, so that it fails at the same moment with the same error.

Apply = Callable[[dict[str, Any], Context], None]
_Read = Callable[[Context], str]
_Test = Callable[[Context], bool]
_Reps = Callable[[Context], list[str]]
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
        return lambda target, ctx: _apply(rule, target, ctx, library)

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
            tuple(_compile_rule(rule, library) for rule in res.rules),
            _compile_rule(res.match, library) if res.match is not None else None,
        )
        for res in mapping.resources
    ]


def _pick(text: str, first: int, sub: int, msg: Message) -> str:
    """``_component`` with the component numbers already read."""
    seps = msg.separators
    pieces = text.split(seps.component)
    value = pieces[first - 1] if first <= len(pieces) else ""
    if sub == 1:
        if seps.subcomponent in value:
            value = value.split(seps.subcomponent, 1)[0]
    else:
        subs = value.split(seps.subcomponent)
        value = subs[sub - 1] if sub <= len(subs) else ""
    return unescape(value, seps, msg.codec)


def _compile_read(path: str) -> _Read:
    """``Context.read`` for one path."""
    try:
        seg, occ, fld, rep_index, comps = _read_plan(path)
    except ValueError:
        return lambda ctx: ctx.read(path)  # the run raises, as it always did
    first, sub = _component_plan(comps) if comps else (0, 0)
    if seg == "":

        def read_relative(ctx: Context) -> str:
            scope = ctx.scope
            if scope is None:
                raise RuleError(f"relative path {path} outside an 'each'")
            return _pick(scope, first, sub, ctx.message)

        return read_relative
    atomic = seg == "MSH" and fld <= 2

    def read(ctx: Context) -> str:
        found = occ if occ is not None else ctx.occurrence(seg)
        if found is None:
            return ""
        ctx.consumed.add((seg, found, fld))
        segment = ctx.find(seg, found)
        if segment is None:
            return ""
        raw = segment.field(fld)
        msg = ctx.message
        if atomic:
            reps = [raw]
        elif rep_index == 1:  # the usual case: the first repetition, without splitting the others
            if not raw:
                return ""
            reps = [raw.partition(msg.separators.repetition)[0]]
        else:
            reps = raw.split(msg.separators.repetition) if raw else []
        if rep_index > len(reps):
            return ""
        return _pick(reps[rep_index - 1], first, sub, msg) if comps else _leaf(reps[rep_index - 1], msg)

    return read


def _compile_reps(path: str) -> _Reps:
    """``Context.repetitions`` for one path."""
    try:
        seg, occ, fld, rep, comps = _parse_er7(path)
    except ValueError:
        seg, comps = "", None
    if seg == "" or comps:
        return lambda ctx: ctx.repetitions(path)  # the run raises, as it always did
    occurrence = int(occ) if occ else None
    number = int(fld)
    index = None if rep is None or rep == "*" else int(rep)

    def reps(ctx: Context) -> list[str]:
        found = occurrence if occurrence is not None else ctx.occurrence(seg)
        if found is None:
            return []
        ctx.consumed.add((seg, found, number))
        segment = ctx.find(seg, found)
        if segment is None:
            return []
        raw = segment.field(number)
        items = raw.split(ctx.message.separators.repetition) if raw else []
        if index is None:
            return [r for r in items if r]
        others = sum(1 for i, r in enumerate(items, 1) if r and i != index)
        if others:
            ctx.warnings.append(f"{seg}-{fld}: only repetition {index} is mapped; {others} more left out")
        return [items[index - 1]] if index <= len(items) and items[index - 1] else []

    return reps


def _compile_when(when: Condition | AllOf | None) -> _Test | None:
    if when is None:
        return None
    if isinstance(when, AllOf):
        tests = tuple(_compile_condition(c) for c in when.conditions)
        return lambda ctx: all(test(ctx) for test in tests)
    return _compile_condition(when)


def _compile_condition(cond: Condition) -> _Test:
    read = _compile_read(cond.source)
    present, equals, in_, not_in = cond.present, cond.equals, cond.in_, cond.not_in
    if equals is None and in_ is None and not_in is None and present is not None:
        return lambda ctx: bool(read(ctx)) == present

    def test(ctx: Context) -> bool:
        value = read(ctx)
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


def _compile_rule(rule: Rule, library: Library) -> Apply:
    """``_apply`` for one rule."""
    if (rule.concept_map is not None and rule.concept_map not in library.concept_maps) or (
        rule.function is not None and rule.function not in library.functions
    ):
        return lambda target, ctx: _apply(rule, target, ctx, library)  # fails when run, as it always did
    if rule.each is not None:
        return _compile_each(rule, library)
    test = _compile_when(rule.when)
    put = _compile_put(rule.target)
    if rule.ref is None and rule.concept_map is None and rule.function is None:
        if rule.source is not None:
            read = _compile_read(rule.source)

            def apply_read(target: dict[str, Any], ctx: Context) -> None:
                if test is not None and not test(ctx):
                    return
                value = read(ctx)
                if value.strip():  # FHIR strings need a non-blank character: blank is absent
                    put(target, value)

            return apply_read
        const = rule.const
        if not (const is None or const == "" or const == [] or const == {}):

            def apply_const(target: dict[str, Any], ctx: Context) -> None:
                if test is None or test(ctx):
                    put(target, const)

            return apply_const

    ref, source, appends = rule.ref, rule.source, rule.target.endswith("[]")
    read_source = _compile_read(source) if source is not None else None
    table = library.concept_maps[rule.concept_map] if rule.concept_map is not None else None
    unknown = f"{rule.source}: code not in concept map {rule.concept_map}"
    element = rule.target
    function = library.functions[rule.function] if rule.function is not None else None

    def apply(target: dict[str, Any], ctx: Context) -> None:
        if test is not None and not test(ctx):
            return
        value: Any
        if ref is not None:
            value = ctx.ref(ref)
            if isinstance(value, list) and not appends:
                if len(value) > 1:
                    ctx.warnings.append(f"{element}: {len(value)} candidates for one reference; first kept")
                value = value[0] if value else None
        elif read_source is not None:
            value = read_source(ctx)
            if not value.strip():
                return
        else:
            value = rule.const
        if table is not None:
            if str(value) not in table:
                ctx.warnings.append(unknown)
                return
            value = table[str(value)]
        if function is not None:
            value = function(ctx, value)
        if value is None or value == "" or value == [] or value == {}:
            return
        put(target, value)

    return apply


def _compile_each(rule: Rule, library: Library) -> Apply:
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

    if _SEGMENT.fullmatch(each):

        def apply_segments(target: dict[str, Any], ctx: Context) -> None:
            saved_scope, saved_segment = ctx.scope, ctx.segment
            count = len(ctx.message.segments_named(each))
            layout, group = ctx.layout, ctx.group
            occurrences = [
                i
                for i in range(1, count + 1)
                if layout is None or group is None or layout.group_of.get((each, i)) == group
            ]
            try:
                for i in occurrences:
                    ctx.scope = None
                    ctx.enter((each, i))
                    one(target, ctx)
            finally:
                ctx.scope = saved_scope
                ctx.enter(saved_segment)

        return apply_segments
    reps = _compile_reps(each)

    def apply_repetitions(target: dict[str, Any], ctx: Context) -> None:
        # the segment (and so the group) stays the same: only the scope moves
        saved_scope = ctx.scope
        try:
            for rep in reps(ctx):
                ctx.scope = rep
                one(target, ctx)
        finally:
            ctx.scope = saved_scope

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


def _unmapped(message: Message, consumed: set[tuple[str, int, int]], ignored: frozenset[str]) -> list[str]:
    out = []
    counts: dict[str, int] = {}
    for seg in message.segments:
        counts[seg.name] = counts.get(seg.name, 0) + 1
        occ = counts[seg.name]
        if seg.name in ignored:
            continue
        for n, value in enumerate(seg.fields(), 1):
            if seg.name == "MSH" and n <= 2:
                continue
            if value and (seg.name, occ, n) not in consumed:
                out.append(f"{seg.name}{f'[{occ}]' if occ > 1 else ''}-{n}")
    return out
