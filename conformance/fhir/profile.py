"""A StructureDefinition compiled into a tree of element rules, and the checker that walks it.

The elements come from the snapshot when there is one, else from the differential; what
neither constrains is left to the base validation (the R4B models) and to the parent profile,
which the registry checks too. Element ids give the nesting, slices included
(``Patient.identifier:INS-NIR.system``, ``Extension.value[x]:valueCoding``).

Supported: cardinality, types (primitive formats, complex shapes, resource types), fixed[x],
pattern[x], slicing with ``value``, ``pattern``, ``exists``, ``type`` and ``profile``
discriminators, open/closed rules, required and extensible bindings on code, Coding and
CodeableConcept, FHIRPath invariants (fhirpathpy, compiled once), and type profiles
(an extension or a contained resource is checked against its own profile when it is known).

Slices and their fixed/pattern values. A value belongs to a slice when it matches every
discriminator of the slicing that the slice fixes (by a fixed or pattern value on the
discriminator's path, or on an element above it: a ``patternIdentifier`` fixes ``system``).
A derived profile that states discriminators of its own for the slices it adds
(fr-core-patient-ins slices the identifiers by ``system``, under fr-core-patient's ``type``)
makes those slices' own discriminators decisive: a value matching none of the slices on the
whole combination, but matching such a slice on its own discriminators, belongs to it. Either
way, once in a slice, every fixed[x] and pattern[x] of the slice and of its elements applies:
a test NIR (system ...4.10) typed INS-NIR is an FHIR-PATTERN-001 error on
``Patient.identifier:INS-NIR-TEST.type``, not an identifier the open slicing lets through.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from conformance.fhir.terminology import Terminology
from conformance.findings import Finding, Severity


class Registry(Protocol):
    """What a Checker asks of the registry that holds the profiles (conformance/fhir/registry.py)."""

    @property
    def terminology(self) -> Terminology: ...

    def profile(self, name_or_url: str) -> Profile | None: ...

    def check_against(
        self, url: str, value: Mapping[str, Any], where: str, out: list[Finding], resource: Mapping[str, Any]
    ) -> None: ...


CARDINALITY: Final = "FHIR-CARD-001"
TYPE: Final = "FHIR-TYPE-001"
FIXED: Final = "FHIR-FIXED-001"
PATTERN: Final = "FHIR-PATTERN-001"
SLICE_CLOSED: Final = "FHIR-SLICE-001"
BINDING_REQUIRED: Final = "FHIR-BIND-001"
BINDING_EXTENSIBLE: Final = "FHIR-BIND-002"
INVARIANT_ERROR: Final = "FHIR-INV-001"

_DATE: Final = r"\d{4}(?:-(?:0[1-9]|1[0-2])(?:-(?:0[1-9]|[12]\d|3[01]))?)?"
_TIME: Final = r"(?:[01]\d|2[0-3]):[0-5]\d:(?:[0-5]\d|60)(?:\.\d+)?"
_ZONE: Final = r"(?:Z|[+-](?:0\d|1[0-3]):[0-5]\d|14:00)"
_STRINGS: Final[dict[str, re.Pattern[str] | None]] = {
    "string": None,
    "markdown": None,
    "uri": re.compile(r"\S+"),
    "url": re.compile(r"\S+"),
    "canonical": re.compile(r"\S+"),
    "uuid": re.compile(r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"),
    "oid": re.compile(r"urn:oid:[0-2](?:\.(?:0|[1-9]\d*))+"),
    "id": re.compile(r"[A-Za-z0-9\-.]{1,64}"),
    "code": re.compile(r"[^\s]+(?: [^\s]+)*"),
    "base64Binary": re.compile(r"(?:\s*[0-9a-zA-Z+/=]){4,}\s*|"),
    "date": re.compile(_DATE),
    "dateTime": re.compile(_DATE + r"(?:T" + _TIME + _ZONE + r")?"),
    "instant": re.compile(r"\d{4}-\d{2}-\d{2}T" + _TIME + _ZONE),
    "time": re.compile(_TIME),
}
_PRIMITIVES: Final = frozenset(_STRINGS) | {"boolean", "integer", "decimal", "positiveInt", "unsignedInt"}
_CHOICE_KEY: Final = re.compile(r"[A-Z][A-Za-z0-9]*")

Evaluator = Callable[[Any, Any], list[Any]]


@dataclass(slots=True)
class Constraint:
    key: str
    severity: Severity
    human: str
    expression: str
    run: Evaluator


@dataclass(slots=True)
class Element:
    """Rules for one element (or one slice of it)."""

    key: str  # JSON property, or the prefix of a choice ("value" for value[x])
    label: str  # element id, for messages
    choice: bool = False
    min: int | None = None
    max: int | None = None  # None: not constrained here; -1: unbounded
    types: dict[str, list[str]] = field(default_factory=dict)  # type code → profiles
    fixed: Any = None
    pattern: Any = None
    binding: tuple[str, str] | None = None  # (strength, value set url)
    constraints: list[Constraint] = field(default_factory=list)
    discriminators: list[tuple[str, str]] = field(default_factory=list)
    # A slice: the discriminators stated by the profile that introduced it, when that profile stated
    # its own (None: the slicing's, ``discriminators`` of the sliced element).
    slice_by: list[tuple[str, str]] | None = None
    rules: str = "open"
    slices: dict[str, Element] = field(default_factory=dict)
    children: dict[str, Element] = field(default_factory=dict)


@dataclass(slots=True)
class Profile:
    url: str
    name: str
    type: str
    base: str | None
    root: Element
    kind: str = "resource"

    @property
    def is_extension(self) -> bool:
        return self.type == "Extension"


# -- compilation ------------------------------------------------------------------------------


def _value_key(element: Mapping[str, Any], prefix: str) -> tuple[str, Any] | None:
    for key, value in element.items():
        if key.startswith(prefix) and len(key) > len(prefix) and key[len(prefix)].isupper():
            return key, value
    return None


def compile_profile(
    sd: Mapping[str, Any], compile_fhirpath: Callable[[str], Evaluator], base: Profile | None = None
) -> Profile:
    """Compile a StructureDefinition (snapshot if present, else differential over ``base``'s rules)."""
    source = sd.get("snapshot") or sd.get("differential") or {}
    elements = source.get("element", [])
    rtype = str(sd.get("type"))
    # A differential only states what changes: start from a copy of the parent's compiled tree.
    root = copy.deepcopy(base.root) if base is not None and not sd.get("snapshot") else Element(rtype, rtype)
    # The discriminators this StructureDefinition states, by sliced element: the slices it adds are
    # made under them (elements come in order: a slicing before its slices).
    stated: dict[int, list[tuple[str, str]]] = {}
    for element in elements:
        eid = str(element.get("id") or element.get("path"))
        node = _node_for(root, eid, rtype, stated)
        _apply(node, element, compile_fhirpath)
        slicing = element.get("slicing")
        if slicing:
            stated[id(node)] = _discriminator_pairs(slicing)
    return Profile(
        url=str(sd.get("url")),
        name=str(sd.get("name") or sd.get("id")),
        type=rtype,
        base=sd.get("baseDefinition"),
        root=root,
        kind=str(sd.get("kind", "resource")),
    )


def _discriminator_pairs(slicing: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(str(d["type"]), str(d["path"])) for d in slicing.get("discriminator", [])]


def _node_for(
    root: Element, eid: str, rtype: str, stated: Mapping[int, list[tuple[str, str]]] | None = None
) -> Element:
    parts = _split_id(eid)
    if parts[0] != rtype:
        raise ValueError(f"element {eid!r} is not under {rtype}")
    node = root
    for part in parts[1:]:
        name, _, slice_name = part.partition(":")
        choice = name.endswith("[x]")
        key = name[:-3] if choice else name
        child = node.children.get(key)
        if child is None:
            child = node.children[key] = Element(key, f"{node.label}.{name}", choice=choice)
        if slice_name:
            if choice and _value_key({slice_name: 1}, key):
                # value[x]:valueCoding is the element valueCoding itself
                concrete = node.children.get(slice_name)
                if concrete is None:
                    concrete = node.children[slice_name] = Element(slice_name, f"{node.label}.{slice_name}")
                child = concrete
            else:
                sub = child.slices.get(slice_name)
                if sub is None:
                    own = stated.get(id(child)) if stated is not None else None
                    sub = child.slices[slice_name] = Element(
                        key, f"{child.label}:{slice_name}", choice=choice, slice_by=own
                    )
                child = sub
        node = child
    return node


def _split_id(eid: str) -> list[str]:
    # Dots inside slice names ("identifier:a.b") are rare but legal: split only where a dot
    # starts a new element name.
    return re.split(r"\.(?=[a-zA-Z_][\w\[\]]*(?::|\.|$))", eid)


def _apply(node: Element, element: Mapping[str, Any], compile_fhirpath: Callable[[str], Evaluator]) -> None:
    if "min" in element:
        node.min = int(element["min"])
    if "max" in element:
        node.max = -1 if element["max"] == "*" else int(element["max"])
    for t in element.get("type", []):
        node.types[str(t["code"])] = list(t.get("profile", []))
    fixed = _value_key(element, "fixed")
    if fixed is not None:
        node.fixed = fixed[1]
    pattern = _value_key(element, "pattern")
    if pattern is not None:
        node.pattern = pattern[1]
    binding = element.get("binding")
    if binding and binding.get("valueSet") and binding.get("strength") in ("required", "extensible"):
        node.binding = (str(binding["strength"]), str(binding["valueSet"]))
    for c in element.get("constraint", []):
        expression = c.get("expression")
        if not expression or any(k.key == c.get("key") for k in node.constraints):
            continue
        node.constraints.append(
            Constraint(
                key=str(c["key"]),
                severity=Severity(c.get("severity", "error")),
                human=str(c.get("human", c["key"])),
                expression=str(expression),
                run=compile_fhirpath(str(expression)),
            )
        )
    slicing = element.get("slicing")
    if slicing:
        # A derived profile keeps its parent's discriminators and may add some.
        for pair in _discriminator_pairs(slicing):
            if pair not in node.discriminators:
                node.discriminators.append(pair)
        node.rules = str(slicing.get("rules", node.rules))


# -- checking ---------------------------------------------------------------------------------


def _is_type(value: Any, code: str) -> bool:
    if code in _STRINGS:
        pattern = _STRINGS[code]
        return isinstance(value, str) and (pattern is None or pattern.fullmatch(value) is not None)
    if code == "boolean":
        return isinstance(value, bool)
    if code in ("integer", "positiveInt", "unsignedInt"):
        if isinstance(value, bool) or not isinstance(value, int):
            return False
        return value > 0 if code == "positiveInt" else value >= 0 if code == "unsignedInt" else True
    if code == "decimal":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if code[:1].isupper():
        # A complex type, or a resource (then it names itself)
        if not isinstance(value, dict):
            return False
        rtype = value.get("resourceType")
        return rtype is None or rtype == code or code in ("Resource", "DomainResource")
    return True


def matches_pattern(value: Any, pattern: Any) -> bool:
    """FHIR pattern[x]: every property of the pattern is present with a matching value."""
    if isinstance(pattern, dict):
        if not isinstance(value, dict):
            return False
        return all(k in value and matches_pattern(value[k], v) for k, v in pattern.items())
    if isinstance(pattern, list):
        items = value if isinstance(value, list) else [value]
        return all(any(matches_pattern(item, p) for item in items) for p in pattern)
    return bool(value == pattern)


def _get_path(value: Any, path: str) -> list[Any]:
    items = [value]
    if path in ("$this", ""):
        return items
    for part in path.split("."):
        out: list[Any] = []
        for item in items:
            if isinstance(item, dict) and part in item:
                got = item[part]
                out.extend(got if isinstance(got, list) else [got])
        items = out
    return items


class Checker:
    """Walks a resource against one compiled profile; findings go to ``out``."""

    __slots__ = ("out", "registry", "resource")

    def __init__(self, registry: Registry, resource: Mapping[str, Any], out: list[Finding]) -> None:
        self.registry = registry
        self.resource = resource
        self.out = out

    def run(self, profile: Profile, value: Mapping[str, Any], location: str) -> None:
        self._value(profile.root, value, location)

    # element with its values ----------------------------------------------------------------

    def _items(self, node: Element, parent: Mapping[str, Any], location: str) -> list[tuple[Any, str, str]]:
        """(value, location, concrete key) of each value of ``node`` under ``parent``."""
        if node.choice:
            keys = [k for k in parent if k.startswith(node.key) and _CHOICE_KEY.fullmatch(k[len(node.key) :])]
        else:
            keys = [node.key] if node.key in parent else []
        items: list[tuple[Any, str, str]] = []
        for key in keys:
            raw = parent[key]
            if isinstance(raw, list):
                items.extend((v, f"{location}.{key}[{i}]", key) for i, v in enumerate(raw))
            else:
                items.append((raw, f"{location}.{key}", key))
        return items

    def _children(self, node: Element, value: Mapping[str, Any], location: str) -> None:
        for child in node.children.values():
            items = self._items(child, value, location)
            self._count(child, len(items), f"{location}.{child.key}", child.label)
            for item, where, key in items:
                if child.choice and child.types:
                    suffix = key[len(child.key) :]
                    if not any(t[:1].upper() + t[1:] == suffix for t in child.types):
                        self._add(
                            TYPE,
                            Severity.ERROR,
                            where,
                            f"{child.label}: type {suffix} is not allowed",
                            "structure",
                        )
                        continue
                self._value(child, item, where, key)
            if child.slices or child.discriminators:
                self._slices(child, items, location)

    def _count(self, node: Element, count: int, where: str, label: str) -> None:
        if node.min is not None and count < node.min:
            self._add(
                CARDINALITY,
                Severity.ERROR,
                where,
                f"{label}: minimum cardinality {node.min} not met (found {count})",
                "required",
            )
        if node.max is not None and node.max >= 0 and count > node.max:
            self._add(
                CARDINALITY,
                Severity.ERROR,
                where,
                f"{label}: maximum cardinality {node.max} exceeded (found {count})",
                "structure",
            )

    def _value(self, node: Element, value: Any, where: str, key: str | None = None) -> None:
        if node.types and not node.choice:
            if not any(_is_type(value, t) for t in node.types):
                self._add(
                    TYPE,
                    Severity.ERROR,
                    where,
                    f"{node.label}: expected {' | '.join(node.types)}",
                    "structure",
                )
                return
        elif node.choice and key is not None:
            suffix = key[len(node.key) :]
            code = next((t for t in node.types if t[:1].upper() + t[1:] == suffix), suffix)
            if code[:1].lower() + code[1:] in _PRIMITIVES:
                code = code[:1].lower() + code[1:]
            if not _is_type(value, code):
                self._add(TYPE, Severity.ERROR, where, f"{node.label}: not a valid {code}", "structure")
                return
        if node.fixed is not None and value != node.fixed:
            self._add(
                FIXED,
                Severity.ERROR,
                where,
                f"{node.label}: value must be exactly {_show(node.fixed)}",
                "value",
            )
        if node.pattern is not None and not matches_pattern(value, node.pattern):
            self._add(
                PATTERN,
                Severity.ERROR,
                where,
                f"{node.label}: value must match {_show(node.pattern)}",
                "value",
            )
        if node.binding is not None:
            self._binding(node, value, where)
        for c in node.constraints:
            self._constraint(c, value, where)
        if isinstance(value, dict):
            if node.children:
                self._children(node, value, where)
            for code, profiles in node.types.items():
                for url in profiles:
                    if code == "Extension" and value.get("url") != url.split("|", 1)[0]:
                        continue
                    if code not in ("Extension",) and value.get("resourceType") not in (None, code):
                        continue
                    self.registry.check_against(url, value, where, self.out, self.resource)

    def _binding(self, node: Element, value: Any, where: str) -> None:
        strength, url = node.binding or ("", "")
        expansion = self.registry.terminology.expansion(url)
        if expansion is None:
            return  # unknown or not expandable: reported once by `conformance profiles`
        if isinstance(value, str):
            ok = expansion.has(None, value)
        elif isinstance(value, dict) and "coding" in value:
            ok = any(expansion.has(c.get("system", ""), c.get("code", "")) for c in value["coding"])
        elif isinstance(value, dict) and "code" in value:
            ok = expansion.has(value.get("system", ""), str(value.get("code")))
        else:
            return
        if ok:
            return
        if strength == "required":
            self._add(
                BINDING_REQUIRED,
                Severity.ERROR,
                where,
                f"{node.label}: code not in the required value set {url}",
                "code-invalid",
            )
        else:
            self._add(
                BINDING_EXTENSIBLE,
                Severity.WARNING,
                where,
                f"{node.label}: code not in the extensible value set {url}",
                "code-invalid",
            )

    def _constraint(self, c: Constraint, value: Any, where: str) -> None:
        try:
            result = c.run(value, {"resource": self.resource, "rootResource": self.resource})
        except Exception as exc:  # noqa: BLE001 - a broken expression is reported, not raised
            self._add(
                INVARIANT_ERROR,
                Severity.ERROR,
                where,
                f"invariant {c.key} could not run: {type(exc).__name__}",
                "processing",
            )
            return
        if result and all(r is True for r in result):
            return
        if not result:
            return  # FHIRPath: an empty result is not a failure
        self._add(c.key, c.severity, where, f"{c.key}: {c.human}", "invariant")

    # slicing --------------------------------------------------------------------------------

    def _slices(self, node: Element, items: list[tuple[Any, str, str]], location: str) -> None:
        members: dict[str, list[tuple[Any, str, str]]] = {name: [] for name in node.slices}
        for item in items:
            name = self._slice_of(node, item[0])
            if name is None:
                if node.rules == "closed" and node.discriminators:
                    self._add(
                        SLICE_CLOSED,
                        Severity.ERROR,
                        item[1],
                        f"{node.label}: matches none of the slices (closed slicing)",
                        "structure",
                    )
                continue
            members[name].append(item)
        for name, sub in node.slices.items():
            got = members[name]
            self._count(sub, len(got), f"{location}.{node.key}", sub.label)
            for value, where, key in got:
                self._value(sub, value, where, key)

    def _slice_of(self, node: Element, value: Any) -> str | None:
        # A slice matches when every discriminator it constrains matches, and it constrains one at
        # least (a derived profile may add discriminators its parent's slices do not fix).
        for name, sub in node.slices.items():
            if self._fits(sub, node.discriminators, value):
                return name
        # Else a slice a derived profile added under discriminators of its own takes the value its
        # own discriminators match; its other fixed and pattern values are then checked.
        for name, sub in node.slices.items():
            own = sub.slice_by
            if own and set(own) != set(node.discriminators) and self._fits(sub, own, value):
                return name
        return None

    def _fits(self, sub: Element, discriminators: list[tuple[str, str]], value: Any) -> bool:
        verdicts = [self._discriminates(sub, kind, path, value) for kind, path in discriminators]
        return False not in verdicts and True in verdicts

    def _discriminates(self, sub: Element, kind: str, path: str, value: Any) -> bool | None:
        """Whether ``value`` fits ``sub`` on this discriminator; None when the slice does not fix it."""
        if kind in ("type", "profile"):
            wanted = self._slice_types(sub, path)
            if not wanted:
                return None
            found = [v for v in _get_path(value, path) if isinstance(v, dict)]
            if not any(v.get("resourceType") in wanted for v in found):
                return False
            return kind == "type" or any(self._fits_profile_values(sub, path, v) for v in found)
        target = _descend(sub, path)
        actual = _get_path(value, path)
        if kind == "exists":
            if target is None or (target.min is None and target.max is None):
                return None
            return bool(actual) == ((target.min or 0) > 0)
        expected, is_pattern = _expected_at(sub, path)
        if expected is None and path == "url":
            # an extension slice names its extension by the type profile
            profiles = sub.types.get("Extension") or []
            expected = profiles[0].split("|", 1)[0] if profiles else None
        if expected is None:
            return None
        if is_pattern or kind == "pattern":
            return any(matches_pattern(a, expected) for a in actual)
        return any(a == expected for a in actual)

    def _fits_profile_values(self, sub: Element, path: str, value: Mapping[str, Any]) -> bool:
        """Profile discriminator: the value meets the fixed and pattern values at the top of the profile."""
        target = _descend(sub, path) if path not in ("$this", "") else sub
        for profiles in target.types.values() if target is not None else ():
            for url in profiles:
                prof = self.registry.profile(url)
                if prof is None:
                    continue
                for child in prof.root.children.values():
                    got = value.get(child.key)
                    if child.fixed is not None and got != child.fixed:
                        return False
                    if child.pattern is not None and not matches_pattern(got, child.pattern):
                        return False
        return True

    def _slice_types(self, sub: Element, path: str) -> set[str]:
        target = _descend(sub, path) if path not in ("$this", "") else sub
        if target is None:
            return set()
        out = set(target.types)
        for profiles in target.types.values():
            for url in profiles:
                prof = self.registry.profile(url)
                if prof is not None:
                    out.add(prof.type)
        return out

    def _add(self, rule: str, severity: Severity, where: str, message: str, code: str) -> None:
        self.out.append(Finding(rule, severity, where, message, code))


def _expected_at(sub: Element, path: str) -> tuple[Any, bool]:
    """(value, is a pattern) a slice fixes at a discriminator path; (None, False) when it fixes none.

    The element at the path says it with its fixed[x] or pattern[x]; else an element above it
    does, with a complex fixed or pattern value holding the path (``patternIdentifier.system``).
    """
    parts = [p for p in path.split(".") if p not in ("$this", "")]
    node: Element | None = sub
    for depth in range(len(parts) + 1):
        if node is None:
            break
        rest = parts[depth:]
        for held, is_pattern in ((node.fixed, False), (node.pattern, True)):
            if held is None:
                continue
            found = _inside(held, rest)
            if found is not None:
                return found, is_pattern
        if depth < len(parts):
            node = node.children.get(parts[depth])
    return None, False


def _inside(value: Any, keys: list[str]) -> Any:
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _descend(node: Element, path: str) -> Element | None:
    for part in path.split("."):
        if part in ("$this", ""):
            continue
        child = node.children.get(part)
        if child is None:
            return None
        node = child
    return node


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= 120 else text[:117] + "..."
