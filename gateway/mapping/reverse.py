"""Declarative FHIR → HL7v2 mappings: YAML rules that read FHIR elements and set ER7 fields.

The mirror of :mod:`gateway.mapping.engine`. A reverse mapping file (``mappings/reverse/*.yaml``)
names the resource it starts from (its *focus*), the resources it reaches from there, the
event it produces and the segments it builds::

    name: pam-fr-patient-out
    focus: Patient
    priority: 10                    # in a Bundle, the focus of the highest priority wins
    event: {fn: patient_event}      # or a constant such as ORU^R01
    structure: ADT_A05
    bind:
      patient: {path: "."}          # %patient is the focus itself
    segments:
      - segment: PID
        rules:
          - set: PID-5              # one repetition per item
            each: "%patient.name"
            rules:
              - {set: ".1", from: family}
              - {set: ".7", from: use, map: fhir-name-use}
          - {set: PID-7, from: "%patient.birthDate", fn: v2_date}

FHIR paths are dotted element names read from the current node (the item of an ``each``, else the
focus); ``%name`` starts at a bound resource, ``[n]`` picks an item, ``[key=value]`` keeps the items
whose element equals value, and ``a|b`` takes the first alternative that has a value.

Output is built segment by segment and encoded by the ER7 codec: every value set is escaped,
so text with separators or line breaks travels intact. Mappings never touch sockets or databases.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from gateway.core.errors import ConfigError, UnsupportedMessage, ValidationError
from gateway.hl7 import path as er7_path
from gateway.hl7.er7 import DEFAULT_SEPARATORS, Message, Separators, escape
from gateway.mapping.rules import (
    ConceptMap,
    RuleError,
    check_keys,
    check_names,
    is_empty,
    load_yaml,
    look_up,
    parse_condition,
    read_mappings,
    rule_failure,
    strip_lines,
    value_sources,
)
from gateway.mapping.rules import Condition as InboundCondition

# -- FHIR paths ----------------------------------------------------------------------------------

_STEP = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\[([^\]]*)\])?$")
_SELF = "."


def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets (URLs in selectors hold dots and bars)."""
    out, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == sep and depth == 0:
            out.append(text[start:i])
            start = i + 1
    out.append(text[start:])
    return out


@dataclass(frozen=True, slots=True)
class _Alt:
    start: str | None  # a binding name, or None for the current node
    steps: tuple[tuple[str, str | None], ...]
    start_selector: str | None = None  # %focus[0]


@functools.lru_cache(maxsize=4096)
def compile_path(text: str) -> tuple[_Alt, ...]:
    """A FHIR path, parsed once. Raises ValueError for a malformed one."""
    alts = []
    for alt in _split_top(text.strip(), "|"):
        alt = alt.strip()
        if not alt:
            raise RuleError(f"empty alternative in {text!r}")
        parts = _split_top(alt, ".") if alt != _SELF else [_SELF]
        start: str | None = None
        start_selector: str | None = None
        if parts[0].startswith("%"):
            m = re.fullmatch(r"%([a-z][a-z0-9_]*)(?:\[([^\]]*)\])?", parts.pop(0))
            if m is None:
                raise RuleError(f"bad binding name in {text!r}")
            start, start_selector = m.group(1), m.group(2)
        steps = []
        for part in parts:
            if part == _SELF:
                continue
            m = _STEP.match(part)
            if m is None:
                raise RuleError(f"bad FHIR path step {part!r} in {text!r}")
            steps.append((m.group(1), m.group(2)))
        alts.append(_Alt(start, tuple(steps), start_selector))
    return tuple(alts)


def _select(items: list[Any], selector: str) -> list[Any]:
    if selector.isdigit():
        index = int(selector)
        return items[index : index + 1]
    key, eq, wanted = selector.partition("=")
    if not eq:
        raise RuleError(f"bad selector [{selector}]: an index or key=value")
    kept = []
    for item in items:
        if isinstance(item, dict) and any(str(v) == wanted for v in _walk(item, key.strip().split("."))):
            kept.append(item)
    return kept


def _walk(node: Any, names: Sequence[str]) -> list[Any]:
    nodes = [node]
    for name in names:
        nodes = _step(nodes, name)
    return nodes


def _step(nodes: Sequence[Any], name: str) -> list[Any]:
    """The values of element ``name`` under each node, repetitions flattened."""
    out: list[Any] = []
    for n in nodes:
        if isinstance(n, dict) and name in n:
            value = n[name]
            if isinstance(value, list):
                out.extend(value)
            elif value is not None:
                out.append(value)
    return out


# -- what the rules read ---------------------------------------------------------------------------


class _Reads:
    """The (object id, key) pairs read while a message was built: what is left is reported unmapped."""

    __slots__ = ("keys", "on")

    def __init__(self) -> None:
        self.keys: set[tuple[int, str]] = set()
        self.on = False


class _Tracked(dict[str, Any]):
    """A JSON object of the request that notes which of its keys a rule or a function reads."""

    __slots__ = ("_reads",)

    def __init__(self, reads: _Reads) -> None:
        super().__init__()
        self._reads = reads

    def __getitem__(self, key: str) -> Any:
        reads = self._reads
        if reads.on:
            reads.keys.add((id(self), key))
        return dict.__getitem__(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        reads = self._reads
        if reads.on:
            reads.keys.add((id(self), key))
        return dict.get(self, key, default)


def _track(value: Any, reads: _Reads) -> Any:
    kind = type(value)
    if kind is dict or isinstance(value, dict):
        out = _Tracked(reads)
        for k, v in value.items():
            out[k] = _track(v, reads) if type(v) in _CONTAINERS else v
        return out
    if kind is list:
        return [_track(v, reads) if type(v) in _CONTAINERS else v for v in value]
    return value


_CONTAINERS = (dict, list)


# Not content: the resource's identity and bookkeeping, its narrative, our own marker.
_NOT_CONTENT = frozenset({"resourceType", "id", "meta", "text", "__fullUrl"})


def _unread(resources: Sequence[dict[str, Any]], positions: Mapping[int, int], reads: _Reads) -> list[str]:
    """FHIR paths of the request's content that no rule and no function read."""
    out: list[str] = []
    seen = reads.keys

    def walk(node: Any, where: str) -> None:
        if isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{where}[{i}]")
            return
        if not isinstance(node, dict):
            return
        here = id(node)
        for key, value in dict.items(node):
            if key in _NOT_CONTENT or not (value or value is False or value == 0):
                continue  # absent (None, "", [], {}) is not content
            if (here, key) not in seen:
                out.append(f"{where}.{key}")
            elif isinstance(value, (dict, list)):
                walk(value, f"{where}.{key}")

    for resource in resources:
        # In a Bundle, the entry's place (as in validation reports); a lone resource by its type.
        n = positions.get(id(resource))
        where = f"Bundle.entry[{n}].resource" if n is not None else str(dict.get(resource, "resourceType"))
        if not any((id(resource), key) in seen for key in resource if key not in _NOT_CONTENT):
            out.append(f"{where} ({dict.get(resource, 'resourceType')}): not read by any rule")
            continue
        walk(resource, where)
    return out


# -- output: segments as nested maps of unescaped leaves -------------------------------------------


class Raw(str):
    """ER7 text set as it is (already escaped): a segment field kept whole on the inbound side."""

    __slots__ = ()


_Field = dict[int, dict[int, dict[int, str]]]  # repetition → component → subcomponent → text


class SegmentBuilder:
    """One segment under construction: fields of repetitions of components of subcomponents."""

    __slots__ = ("fields", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.fields: dict[int, _Field] = {}

    def set(self, fld: int, rep: int, comp: int, sub: int, value: str) -> None:
        reps = self.fields.setdefault(fld, {})
        reps.setdefault(rep, {}).setdefault(comp, {})[sub] = value

    def next_rep(self, fld: int) -> int:
        reps = self.fields.get(fld)
        return max(reps) + 1 if reps else 1

    def __bool__(self) -> bool:
        return any(v for reps in self.fields.values() for comps in reps.values() for v in comps.values())

    def render(self, seps: Separators) -> list[str]:
        """[name, field1, …] as raw ER7 texts (MSH: the first item is MSH-2)."""
        fields = self.fields
        top = max(fields, default=0)
        items = [self.name]
        first = 1
        if self.name == "MSH":
            items.append(seps.encoding_characters)
            first = 3
        rep_sep = seps.repetition
        for n in range(first, top + 1):
            reps = fields.get(n)
            if not reps:
                items.append("")
            elif len(reps) == 1 and 1 in reps:
                items.append(_render_rep(reps[1], seps))
            else:
                items.append(
                    rep_sep.join(_render_rep(reps.get(r, {}), seps) for r in range(1, max(reps) + 1))
                )
        return items


def _render_rep(comps: dict[int, dict[int, str]], seps: Separators) -> str:
    if len(comps) == 1 and 1 in comps and len(comps[1]) == 1 and 1 in comps[1]:
        return _leaf(comps[1][1], seps)  # the usual case: one plain value
    out = []
    for c in range(1, max(comps, default=0) + 1):
        subs = comps.get(c)
        if not subs:
            out.append("")
        elif len(subs) == 1 and 1 in subs:
            out.append(_leaf(subs[1], seps))
        else:
            out.append(seps.subcomponent.join(_leaf(subs.get(i, ""), seps) for i in range(1, max(subs) + 1)))
    return seps.component.join(out).rstrip(seps.component)


def _leaf(value: str, seps: Separators) -> str:
    return value if isinstance(value, Raw) else escape(value, seps)


# -- ER7 targets ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _target(path: str) -> tuple[str, int, int | None, int, int]:
    """(segment, field, repetition, component, subcomponent); segment "" for a relative path."""
    try:
        loc = er7_path.parse(path, relative=True)
    except ValueError as exc:
        raise RuleError(f"bad ER7 target {path!r}") from exc
    if loc.occurrence is not None:
        raise RuleError(f"bad ER7 target {path!r}: a segment built here has no occurrence")
    return (loc.segment, loc.field, loc.repetition, loc.component or 1, loc.subcomponent or 1)


# -- rules ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Condition:
    """The inbound engine's condition, read from a FHIR path: present means any value there."""

    test: InboundCondition

    def holds(self, ctx: Context) -> bool:
        source = self.test.source
        return self.test.passes(ctx.text(source), bool(ctx.values(source)))


@dataclass(slots=True)
class Rule:
    target: str  # ER7 path: "PID-5", "PID-5.7", ".1" inside an each, "" for a function's own paths
    source: str | None = None
    const: Any = None
    concept_map: str | None = None
    function: str | None = None
    when: Condition | None = None
    each: str | None = None
    rules: list[Rule] = field(default_factory=list)
    where: str = ""


@dataclass(slots=True)
class SegmentMapping:
    name: str
    rules: list[Rule]
    each: str | None = None  # one segment per item of this FHIR path
    flatten: str | None = None  # and per item of this element of each item (Observation.component)
    when: Condition | None = None
    required: bool = False  # emitted even with no field set
    use: str | None = None
    where: str = ""


@dataclass(frozen=True, slots=True)
class Binding:
    name: str
    path: str  # a reference element of the focus ("subject", "result"), or "." for the focus itself
    type: str | None = None
    many: bool = False
    required: bool = False


@dataclass(slots=True)
class ReverseMapping:
    name: str
    focus: str
    segments: list[SegmentMapping]
    file: str
    event: str | None = None
    event_fn: str | None = None
    structure: str | Mapping[str, str] = ""
    priority: int = 0
    group: bool = False  # every focus candidate of a Bundle in one message (device observations)
    bind: list[Binding] = field(default_factory=list)
    when: Condition | None = None
    header: Mapping[str, str] = field(default_factory=dict)


Function = Callable[["Context", Any], Any]


@dataclass(slots=True)
class Context:
    """What a rule sees: the bound resources, the current node, and what was built so far."""

    bindings: dict[str, Any]
    node: Any
    warnings: list[str]
    timezone: str = "Europe/Paris"
    interaction: str = "create"  # how the focus arrived: create (POST) or update (PUT)
    event: str = ""
    control_id: str = ""
    now: str = ""  # the message time (MSH-7), HL7 form
    occurrence: int = 0  # of the segment being built (OBX set id)
    parent: Any = None  # the item a flattened item comes from (an Observation for its component)
    segment: SegmentBuilder | None = None
    scope: tuple[int, int] | None = None  # (field, repetition) inside a field-level each

    def values(self, path: str) -> list[Any]:
        for alt in compile_path(path):
            if alt.start is None:
                start = self.node
            elif alt.start == "parent":
                start = self.parent
            elif alt.start in self.bindings:
                start = self.bindings[alt.start]
            else:
                raise RuleError(f"no bound resource %{alt.start}")
            nodes = start if isinstance(start, list) else ([start] if start is not None else [])
            if alt.start_selector:
                nodes = _select(nodes, alt.start_selector)
            for name, selector in alt.steps:
                nxt = _step(nodes, name)
                nodes = _select(nxt, selector) if selector else nxt
            found = [n for n in nodes if n not in (None, "", [], {})]
            if found:
                return found
        return []

    def value(self, path: str) -> Any:
        found = self.values(path)
        return found[0] if found else None

    def text(self, path: str) -> str:
        return to_text(self.value(path))


def v2_datetime_at(moment: datetime, timezone: str) -> str:
    """An instant as HL7 TS in ``timezone``, without offset (as PAM FR feeds send times)."""
    return moment.astimezone(ZoneInfo(timezone)).strftime("%Y%m%d%H%M%S")


def to_text(value: Any) -> str:
    """A FHIR primitive as HL7 text: booleans Y/N, numbers without exponent, the rest as is."""
    if value is None or isinstance(value, dict | list):
        return ""
    if isinstance(value, bool):
        return "Y" if value else "N"
    if isinstance(value, float):
        text = repr(value)
        if "e" in text or "E" in text:
            text = format(value, "f").rstrip("0").rstrip(".")
        return text
    return str(value)


@dataclass(slots=True)
class ReverseResult:
    messages: list[Message]
    warnings: list[str]
    mappings: list[str]
    unmapped: list[str] = field(default_factory=list)  # request content no rule read


# -- loading ------------------------------------------------------------------------------------

_FILE_KEYS = {
    "name",
    "focus",
    "priority",
    "event",
    "structure",
    "group",
    "bind",
    "when",
    "header",
    "segments",
    "__line__",
}
_SEGMENT_KEYS = {"segment", "rules", "each", "flatten", "when", "required", "use", "__line__"}
_RULE_KEYS = {"set", "from", "const", "map", "fn", "when", "each", "rules", "__line__"}
_BIND_KEYS = {"path", "type", "many", "required", "__line__"}
_HEADER_KEYS = {"version", "profile", "country", "__line__"}


class ReverseLibrary:
    """Every reverse mapping file, concept map and function, checked at load time."""

    def __init__(
        self,
        mappings: Sequence[ReverseMapping],
        concept_maps: Mapping[str, ConceptMap],
        functions: Mapping[str, Function],
    ) -> None:
        self.mappings = sorted(mappings, key=lambda m: -m.priority)
        self.concept_maps = dict(concept_maps)
        self.functions = dict(functions)
        # What a message cannot go without (its Patient): looked up elsewhere when the request lacks it.
        self.required_types = frozenset(b.type for m in mappings for b in m.bind if b.required and b.type)

    @classmethod
    def load(cls, directory: Path, functions: Mapping[str, Function]) -> ReverseLibrary:
        mappings, concept_maps = read_mappings(
            directory, "reverse mapping", _parse_file, functions, text_targets=True
        )
        _resolve_uses(mappings)
        return cls(mappings, concept_maps, functions)

    def map(
        self,
        data: Mapping[str, Any],
        *,
        interaction: str = "create",
        header: Mapping[str, str] | None = None,
        control_id: str = "",
        now: datetime | None = None,
        timezone: str = "Europe/Paris",
        known: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> ReverseResult:
        """A resource or a transaction/batch Bundle → the HL7v2 messages the mappings make of it.

        ``known``: resources the request refers to by id ("Patient/123") without holding them,
        read beforehand from the repository (see :meth:`wanted`).
        """
        reads = _Reads()
        positions: dict[int, int] = {}
        resources, interactions = _entries(data, interaction, reads, positions)
        index = _Index(resources, known)
        for mapping in self.mappings:
            candidates = [r for r in resources if r.get("resourceType") == mapping.focus]
            # A resource that another of its kind points to is part of that one's message
            # (the visit of a movement), not a message of its own.
            inner = {
                id(index.resolve(ref))
                for r in candidates
                for ref in _references(r)
                if index.resolve(ref) is not None and index.resolve(ref) is not r
            }
            focuses = [r for r in candidates if id(r) not in inner]
            if not focuses:
                continue
            groups = [focuses] if mapping.group else [[r] for r in focuses]
            warnings: list[str] = []
            messages = []
            for n, group in enumerate(groups):
                cid = control_id if len(groups) == 1 else f"{control_id[: 20 - len(str(n + 1))]}{n + 1}"
                reads.on = True
                try:
                    msg = run(
                        mapping,
                        group,
                        index,
                        self,
                        warnings,
                        interaction=interactions.get(id(group[0]), interaction),
                        header=header or {},
                        control_id=cid,
                        now=now or datetime.now(UTC),
                        timezone=timezone,
                    )
                finally:
                    reads.on = False
                if msg is not None:
                    messages.append(msg)
            if messages:
                return ReverseResult(messages, warnings, [mapping.name], _unread(resources, positions, reads))
        kinds = sorted({str(r.get("resourceType")) for r in resources})
        raise UnsupportedMessage(
            f"no reverse mapping for {', '.join(kinds) or 'an empty request'}", location="resourceType"
        )

    def wanted(self, data: Mapping[str, Any]) -> list[tuple[str, str]]:
        """(type, id) of what a message cannot go without (its Patient) that the request names by a
        literal reference but does not hold: the caller may read them from the repository."""
        resources, _ = _entries(data, "create", None)
        index = _Index(resources)
        out: list[tuple[str, str]] = []
        for resource in resources:
            for ref in _references(resource):
                literal = _LITERAL.search(str(ref["reference"]))
                if literal is None or literal.group(1) not in self.required_types:
                    continue
                if index.resolve(ref) is None and (literal.group(1), literal.group(2)) not in out:
                    out.append((literal.group(1), literal.group(2)))
        return out


# "Patient/123", also at the end of an absolute URL or followed by a version.
_LITERAL = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")


def _entries(
    data: Mapping[str, Any], interaction: str, reads: _Reads | None, positions: dict[int, int] | None = None
) -> tuple[list[dict[str, Any]], dict[int, str]]:
    if data.get("resourceType") != "Bundle":
        return [_track(data, reads) if reads is not None else dict(data)], {}
    resources, interactions = [], {}
    for n, entry in enumerate(data.get("entry") or []):
        if not isinstance(entry, dict) or not isinstance(entry.get("resource"), dict):
            continue
        resource = entry["resource"]
        if entry.get("fullUrl"):
            resource = {**resource, "__fullUrl": entry["fullUrl"]}
        if reads is not None:
            resource = _track(resource, reads)
        if positions is not None:
            positions[id(resource)] = n
        method = str((entry.get("request") or {}).get("method", "")).upper()
        resources.append(resource)
        if method in ("PUT", "PATCH"):
            interactions[id(resource)] = "update"
        elif method == "POST":
            interactions[id(resource)] = "create"
    return resources, interactions


def _references(resource: Mapping[str, Any]) -> Iterable[Mapping[str, Any]]:
    """Every Reference the resource holds, at any depth."""
    stack: list[Any] = [v for k, v in resource.items() if k != "contained"]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "reference" in node and isinstance(node["reference"], str):
                yield node
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


class _Index:
    """Finds the resource a Reference points to within the request."""

    def __init__(
        self, resources: Sequence[dict[str, Any]], known: Mapping[str, Mapping[str, Any]] | None = None
    ) -> None:
        self.known = known  # read from the repository ("Type/id" → resource); None: not looked up
        self.by_url: dict[str, dict[str, Any]] = {}
        self.by_ident: dict[tuple[str, str, str], dict[str, Any]] = {}
        for r in resources:
            rtype = str(r.get("resourceType", ""))
            if r.get("__fullUrl"):
                self.by_url[str(r["__fullUrl"])] = r
            if r.get("id"):
                self.by_url[f"{rtype}/{r['id']}"] = r
            for ident in r.get("identifier") or []:
                if isinstance(ident, dict) and ident.get("value"):
                    self.by_ident[(rtype, str(ident.get("system", "")), str(ident["value"]))] = r

    def resolve(self, ref: Mapping[str, Any]) -> dict[str, Any] | None:
        target = str(ref.get("reference", ""))
        if target in self.by_url:
            return self.by_url[target]
        rtype, sep, query = target.partition("?identifier=")
        if sep:
            system, bar, value = query.partition("|")
            if not bar:
                system, value = "", system
            return self.by_ident.get((rtype, system, value))
        if "/" in target:  # an absolute URL ending in Type/id
            tail = "/".join(target.rstrip("/").split("/")[-2:])
            if tail in self.by_url:
                return self.by_url[tail]
        ident = ref.get("identifier")
        if isinstance(ident, dict) and ref.get("type"):
            found = self.by_ident.get(
                (str(ref["type"]), str(ident.get("system", "")), str(ident.get("value")))
            )
            if found is not None:
                return found
        if self.known and (literal := _LITERAL.search(target)) is not None:
            known = self.known.get(f"{literal.group(1)}/{literal.group(2)}")
            return dict(known) if known is not None else None
        return None


def _parse_file(
    path: Path, concept_maps: Mapping[str, Any], functions: Mapping[str, Function]
) -> ReverseMapping:
    file = str(path)
    data = load_yaml(path)
    check_keys(data, _FILE_KEYS, file, "a reverse mapping file")
    line = data["__line__"]
    for required in ("name", "focus", "segments"):
        if required not in data:
            raise ConfigError("is required", file=file, key=required, line=line)
    if "event" not in data:
        raise ConfigError("is required (ADT^A28, or {fn: name})", file=file, key="event", line=line)
    event, event_fn = data["event"], None
    if isinstance(event, dict):
        event_fn = strip_lines(event).get("fn")
        if event_fn not in functions:
            raise ConfigError(f"no function {event_fn!r}", file=file, key="event", line=event["__line__"])
        event = None
    elif not isinstance(event, str) or not re.fullmatch(r"[A-Z0-9]{3}\^[A-Z0-9]{3}", event):
        raise ConfigError("an event such as ORU^R01, or {fn: name}", file=file, key="event", line=line)
    header = strip_lines(data.get("header", {}))
    if isinstance(data.get("header"), dict):
        check_keys(data["header"], _HEADER_KEYS, file, "a header")
    binds = []
    for name, spec in (data.get("bind") or {}).items():
        if name == "__line__":
            continue
        if not isinstance(spec, dict) or "path" not in spec:
            raise ConfigError("a binding needs a 'path'", file=file, key=f"bind.{name}", line=line)
        check_keys(spec, _BIND_KEYS, file, "a binding")
        _check_fhir_path(spec["path"], file, spec["__line__"], "path")
        binds.append(
            Binding(name, spec["path"], spec.get("type"), bool(spec.get("many")), bool(spec.get("required")))
        )
    bound = {"focus", "parent", *(b.name for b in binds)}
    segments = []
    for item in data["segments"]:
        if not isinstance(item, dict) or "segment" not in item:
            raise ConfigError("a segment needs 'segment'", file=file, key="segments", line=line)
        check_keys(item, _SEGMENT_KEYS, file, "a segment")
        name = str(item["segment"])
        seg_line = item["__line__"]
        if not re.fullmatch(r"[A-Z][A-Z0-9]{2}", name) or name == "MSH":
            raise ConfigError(
                "a segment name such as PID (MSH is built from the header)",
                file=file,
                key="segment",
                line=seg_line,
            )
        rules = [_parse_rule(r, file, name, concept_maps, functions, bound) for r in item.get("rules", [])]
        if "each" in item:
            _check_fhir_path(item["each"], file, seg_line, "each", bound)
        segments.append(
            SegmentMapping(
                name,
                rules,
                item.get("each"),
                item.get("flatten"),
                _parse_when(item["when"], file, bound) if "when" in item else None,
                bool(item.get("required", False)),
                item.get("use"),
                f"{file}:{seg_line}",
            )
        )
    return ReverseMapping(
        name=str(data["name"]),
        focus=str(data["focus"]),
        segments=segments,
        file=file,
        event=event,
        event_fn=event_fn,
        structure=strip_lines(data.get("structure", "")),
        priority=int(data.get("priority", 0)),
        group=bool(data.get("group", False)),
        bind=binds,
        when=_parse_when(data["when"], file, bound) if "when" in data else None,
        header=header,
    )


def _resolve_uses(mappings: Sequence[ReverseMapping]) -> None:
    """``use: pam-fr-patient-out:PID`` takes that file's PID rules before the local ones."""
    index = {(m.name, s.name): s for m in mappings for s in m.segments if s.use is None}
    for mapping in mappings:
        for seg in mapping.segments:
            if seg.use is None:
                continue
            base = index.get(tuple(seg.use.partition(":")[::2]))  # type: ignore[arg-type]
            file, line = seg.where.rsplit(":", 1)
            if base is None or base.name != seg.name:
                raise ConfigError(
                    f"no segment {seg.use!r} (a mapping name, ':', a segment name of that file)",
                    file=file,
                    key="use",
                    line=int(line),
                )
            seg.rules = [*base.rules, *seg.rules]
            seg.required = seg.required or base.required


def _check_fhir_path(path: Any, file: str, line: int, key: str, bound: set[str] | None = None) -> None:
    try:
        if not isinstance(path, str):
            raise RuleError(f"{path!r} is not text")
        alts = compile_path(path)
    except ValueError as exc:
        raise ConfigError(f"not a FHIR path: {exc}", file=file, key=key, line=line) from exc
    if bound is not None:
        for alt in alts:
            if alt.start is not None and alt.start not in bound:
                raise ConfigError(
                    f"%{alt.start} is not bound; bound here: {', '.join(sorted(bound))}",
                    file=file,
                    key=key,
                    line=line,
                )


def _parse_when(data: Any, file: str, bound: set[str]) -> Condition:
    return Condition(
        parse_condition(data, file, lambda path, line: _check_fhir_path(path, file, line, "when", bound))
    )


def _parse_rule(
    data: Any,
    file: str,
    segment: str,
    concept_maps: Mapping[str, Any],
    functions: Mapping[str, Function],
    bound: set[str],
) -> Rule:
    if not isinstance(data, dict):
        raise ConfigError("a rule is a mapping with 'set'", file=file)
    check_keys(data, _RULE_KEYS, file, "a rule")
    line = data["__line__"]
    target = str(data.get("set", ""))
    if target:
        try:
            seg = _target(target)[0]
        except ValueError as exc:
            raise ConfigError(str(exc), file=file, key="set", line=line) from exc
        if seg and seg != segment:
            raise ConfigError(f"{target} is not a field of {segment}", file=file, key="set", line=line)
    elif "fn" not in data:
        raise ConfigError("only a function ('fn') may set several fields", file=file, key="set", line=line)
    if "from" in data:
        _check_fhir_path(data["from"], file, line, "from", bound)
    if "each" in data:
        _check_fhir_path(data["each"], file, line, "each", bound)
        if "rules" not in data:
            raise ConfigError("'each' needs inner 'rules'", file=file, key="each", line=line)
        if not target or _target(target)[0] == "" or target.count(".") or "[" in target:
            raise ConfigError(
                "'each' fills repetitions of a field: set: PID-5", file=file, key="set", line=line
            )
    check_names(data, concept_maps, functions, file, line)
    if not any(k in data for k in ("from", "const", "each", "fn")):
        raise ConfigError("a rule needs one of from, const, each or fn", file=file, key="set", line=line)
    return Rule(
        target=target,
        **value_sources(data),
        when=_parse_when(data["when"], file, bound) if "when" in data else None,
        each=data.get("each"),
        rules=[_parse_rule(r, file, segment, concept_maps, functions, bound) for r in data.get("rules", [])],
        where=f"{file}:{line}",
    )


# -- running ------------------------------------------------------------------------------------


def run(
    mapping: ReverseMapping,
    focus: list[dict[str, Any]],
    index: _Index,
    library: ReverseLibrary,
    warnings: list[str],
    *,
    interaction: str,
    header: Mapping[str, str],
    control_id: str,
    now: datetime,
    timezone: str,
) -> Message | None:
    """One message from one focus resource (or a group of them)."""
    bindings: dict[str, Any] = {"focus": focus if mapping.group else focus[0]}
    for bind in mapping.bind:
        bindings[bind.name] = _bind(bind, focus, index, mapping, warnings, bindings)
    ctx = Context(
        bindings,
        bindings["focus"],
        warnings,
        timezone=timezone,
        interaction=interaction,
        control_id=control_id,
    )
    ctx.now = v2_datetime_at(now, timezone)
    if mapping.when is not None and not mapping.when.holds(ctx):
        return None
    try:
        event = mapping.event or str(library.functions[mapping.event_fn or ""](ctx, None) or "")
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise ValidationError(f"reverse mapping {mapping.name}: event: {rule_failure(exc)}") from exc
    if not event:
        raise UnsupportedMessage(f"reverse mapping {mapping.name}: no event fits this {mapping.focus}")
    ctx.event = event
    structure = mapping.structure if isinstance(mapping.structure, str) else mapping.structure.get(event, "")
    seps = DEFAULT_SEPARATORS
    built: list[list[str]] = [_msh(header, mapping.header, event, structure, control_id, now, timezone, seps)]
    for seg in mapping.segments:
        try:
            built.extend(_segments(seg, ctx, library, seps))
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise ValidationError(f"reverse mapping {mapping.name}: {seg.name}: {rule_failure(exc)}") from exc
    return Message.from_segments(built, seps, charset=header.get("charset") or None)


def _bind(
    bind: Binding,
    focus: list[dict[str, Any]],
    index: _Index,
    mapping: ReverseMapping,
    warnings: list[str],
    bindings: dict[str, Any],
) -> Any:
    found: list[Any] = []
    missing: list[str] = []  # literal references found neither in the request nor in the repository
    for alt in _split_top(bind.path, "|"):
        alt = alt.strip()
        for resource in focus:
            if alt == _SELF:
                found.append(resource)
                continue
            for ref in Context(bindings, resource, warnings).values(alt):
                if isinstance(ref, str):  # a url (Attachment.url) names a resource as a reference does
                    ref = {"reference": ref}
                if not isinstance(ref, dict) or not (ref.get("reference") or ref.get("identifier")):
                    continue  # a display only: nothing to find
                target = index.resolve(ref)
                if target is None and isinstance(ref.get("identifier"), dict):
                    # A logical reference: the identifier is all the request says of it.
                    target = {"resourceType": bind.type or ref.get("type"), "identifier": [ref["identifier"]]}
                if target is None:
                    note = (
                        f"{bind.name}: reference found neither in the request nor in the repository"
                        if index.known is not None
                        else f"{bind.name}: reference not found in the request"
                    )
                    if note not in warnings:
                        warnings.append(note)
                    if isinstance(ref.get("reference"), str) and ref["reference"] not in missing:
                        missing.append(ref["reference"])
                    continue
                if bind.type and target.get("resourceType") != bind.type:
                    continue
                if all(target is not f for f in found):
                    found.append(target)
        if found:
            break
    if not found and bind.required:
        if missing:
            # Ids only: they name records, they are not patient data.
            reason = (
                f"{mapping.focus}: the {bind.type or bind.name} it refers to ({', '.join(missing)}) is "
                "neither in the request nor in the repository"
            )
        else:
            what = bind.type or bind.name
            reason = f"{mapping.focus}: the {what} it refers to ({bind.path}) is not in the request"
        raise ValidationError(reason, location=f"{mapping.focus}.{bind.path}")
    return found if bind.many else (found[0] if found else None)


def _msh(
    header: Mapping[str, str],
    defaults: Mapping[str, str],
    event: str,
    structure: str,
    control_id: str,
    now: datetime,
    timezone: str,
    seps: Separators,
) -> list[str]:
    msh = SegmentBuilder("MSH")
    values = {
        3: header.get("sending_application", "PASSERELLE"),
        4: header.get("sending_facility", ""),
        5: header.get("receiving_application", ""),
        6: header.get("receiving_facility", ""),
        7: v2_datetime_at(now, timezone),
        10: control_id,
        11: header.get("processing_id", "P"),
        17: defaults.get("country", "FRA"),
        18: header.get("charset", "UNICODE UTF-8"),
    }
    for fld, text in values.items():
        if text:
            msh.set(fld, 1, 1, 1, text)
    kind, trigger = event.split("^")
    msh.set(9, 1, 1, 1, kind)
    msh.set(9, 1, 2, 1, trigger)
    if structure:
        msh.set(9, 1, 3, 1, structure)
    for comp, text in enumerate(str(defaults.get("version", "2.5")).split("^"), 1):
        msh.set(12, 1, comp, 1, text)
    if defaults.get("profile"):
        for comp, text in enumerate(str(defaults["profile"]).split("^"), 1):
            msh.set(21, 1, comp, 1, text)
    return msh.render(seps)


def _segments(
    seg: SegmentMapping, ctx: Context, library: ReverseLibrary, seps: Separators
) -> list[list[str]]:
    saved = (ctx.node, ctx.parent, ctx.occurrence)
    items: list[tuple[Any, Any]]
    if seg.each is None:
        items = [(ctx.node, ctx.parent)]
    else:
        items = []
        for item in ctx.values(seg.each):
            parts = item.get(seg.flatten) if seg.flatten and isinstance(item, dict) else None
            if not parts or any(k.startswith("value") for k in item):
                items.append((item, None))
            for part in parts or []:
                items.append((part, item))
    out = []
    try:
        for n, (node, parent) in enumerate(items, 1):
            ctx.node, ctx.parent, ctx.occurrence = node, parent, n
            if seg.when is not None and not seg.when.holds(ctx):
                continue
            builder = SegmentBuilder(seg.name)
            ctx.segment, ctx.scope = builder, None
            for rule in seg.rules:
                _apply(rule, ctx, library)
            if builder or seg.required:
                out.append(builder.render(seps))
    finally:
        ctx.node, ctx.parent, ctx.occurrence = saved
        ctx.segment, ctx.scope = None, None
    return out


def _apply(rule: Rule, ctx: Context, library: ReverseLibrary) -> None:
    if rule.each is not None:
        _apply_each(rule, ctx, library)
        return
    if rule.when is not None and not rule.when.holds(ctx):
        return
    value: Any
    if rule.source is not None:
        value = ctx.value(rule.source)
        if value is None:
            return
    else:
        value = rule.const
    if rule.concept_map is not None:
        table = library.concept_maps[rule.concept_map]
        value = look_up(table, to_text(value), str(rule.source), ctx.warnings.append)
        if value is None:
            return
    if rule.function is not None:
        value = library.functions[rule.function](ctx, value)
    if is_empty(value):
        return
    if isinstance(value, dict):  # a function's own fields: {target: text}
        for target, text in value.items():
            _put(ctx, str(target), text)
        return
    _put(ctx, rule.target, value)


def _apply_each(rule: Rule, ctx: Context, library: ReverseLibrary) -> None:
    assert rule.each is not None and ctx.segment is not None
    _, fld, _, _, _ = _target(rule.target)
    saved = (ctx.node, ctx.scope)
    try:
        for item in ctx.values(rule.each):
            ctx.node = item
            if rule.when is not None and not rule.when.holds(ctx):
                continue
            ctx.scope = (fld, ctx.segment.next_rep(fld))
            for inner in rule.rules:
                _apply(inner, ctx, library)
    finally:
        ctx.node, ctx.scope = saved


def _put(ctx: Context, target: str, value: Any) -> None:
    assert ctx.segment is not None
    text = value if isinstance(value, Raw) else to_text(value)
    if not text:
        return
    seg, fld, rep, comp, sub = _target(target)
    if seg == "":
        if ctx.scope is None:
            raise RuleError(f"relative target {target} outside an 'each'")
        fld, rep = ctx.scope
    elif rep is None:
        rep = ctx.scope[1] if ctx.scope is not None and ctx.scope[0] == fld else 1
    ctx.segment.set(fld, rep, comp, sub, text)
