"""What both mapping directions share: the YAML loader, rule keys, conditions, concept maps, "empty".

A rule runs the same pipeline inbound (HL7v2 → FHIR) and outbound (FHIR → HL7v2)::

    when → source (from | const | ref) → map (concept map) → fn (named function) → put

Only the reader (an ER7 path, a FHIR path) and the writer (a FHIR element, an ER7 field) differ; they
live in :mod:`gateway.mapping.engine` and :mod:`gateway.mapping.reverse`.

Concept maps (``mappings/conceptmaps/*.yaml``, ``mappings/reverse/conceptmaps/*.yaml``) are either
a plain table ``{source code: target}`` or, to say where an unknown code comes from::

    pam-patient-class:
      system: http://terminology.hl7.org/CodeSystem/v2-0004   # an unknown code is kept in this system
      map:
        I: {system: http://terminology.hl7.org/CodeSystem/v3-ActCode, code: IMP}

A code missing from the table is never guessed: with a ``system`` and Coding targets, the code is
kept as it came, in that system, and the message gets a warning; otherwise the element is left out,
the warning says so and the field stays in the unmapped report.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import yaml

from gateway.core.errors import ConfigError


class RuleError(ValueError):
    """A mapping rule that cannot apply (a bad path, an unknown resource): its text names the
    rule, never message content, so it may be shown; other errors are shown by type only."""


def rule_failure(exc: Exception) -> str:
    """What a failed rule says on the message: a library's own text may quote patient data."""
    return str(exc) if isinstance(exc, RuleError) else type(exc).__name__


def is_empty(value: Any) -> bool:
    """What a rule never sets and a reader treats as absent."""
    return value is None or value == "" or value == [] or value == {}


# -- YAML ----------------------------------------------------------------------------------------


class _LineLoader(yaml.SafeLoader):
    """Keeps each mapping's line so that errors point at it."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict[str, Any]:
    data = {str(k): v for k, v in loader.construct_mapping(node, deep=True).items()}
    data["__line__"] = node.start_mark.line + 1
    return data


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: Path) -> dict[str, Any]:
    """A mapping file, each mapping carrying its ``__line__``."""
    try:
        data = yaml.load(path.read_text("utf-8"), Loader=_LineLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        raise ConfigError(f"not valid YAML: {exc.problem}", file=str(path), line=line) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot be read: {type(exc).__name__}", file=str(path)) from exc
    if not isinstance(data, dict):
        raise ConfigError("a mapping file is a YAML mapping", file=str(path), line=1)
    return data


def strip_lines(value: Any) -> Any:
    """The loader's line markers belong to the rules, not to the values they carry."""
    if isinstance(value, dict):
        return {k: strip_lines(v) for k, v in value.items() if k != "__line__"}
    if isinstance(value, list):
        return [strip_lines(v) for v in value]
    return value


def value_sources(data: Mapping[str, Any]) -> dict[str, Any]:
    """Where a rule takes its value, as both directions' rules name it: a path, a constant, a
    concept map, a function."""
    return {
        "source": data.get("from"),
        "const": strip_lines(data.get("const")),
        "concept_map": data.get("map"),
        "function": data.get("fn"),
    }


def check_keys(data: Mapping[str, Any], allowed: set[str], file: str, what: str) -> None:
    extra = sorted(set(data) - allowed)
    if extra:
        raise ConfigError(
            f"unknown key in {what}; allowed: {', '.join(sorted(allowed - {'__line__'}))}",
            file=file,
            key=extra[0],
            line=data.get("__line__"),
        )


def shipped_mappings(part: str = "") -> Path:
    """The mappings the project ships (``part``: "" or "reverse"), wherever the command runs: the
    source tree's ``mappings/`` (a checkout, an editable install), else the copy a wheel installs
    under ``<prefix>/share/passerelle/mappings``."""
    here = Path(__file__).resolve().parents[2] / "mappings"
    base = here if here.is_dir() else Path(sys.prefix) / "share" / "passerelle" / "mappings"
    return base / part if part else base


def mapping_files(directory: Path, what: str) -> list[Path]:
    """The ``*.yaml`` files of a mapping directory; a missing or empty one is a configuration error."""
    if not directory.is_dir():
        raise ConfigError(f"no such {what} directory", file=str(directory), key="directory")
    files = sorted(p for p in directory.glob("*.yaml") if p.is_file())
    if not files:
        raise ConfigError(f"no {what} file (*.yaml) here", file=str(directory), key="directory")
    return files


# -- conditions ----------------------------------------------------------------------------------

_WHEN_KEYS = {"from", "equals", "in", "not_in", "present", "__line__"}


class Reads(Protocol):
    """What a condition reads through: a message (ER7 paths) or a request (FHIR paths)."""

    def read(self, path: str) -> str: ...


@dataclass(frozen=True, slots=True)
class Condition:
    source: str
    equals: str | None = None
    in_: frozenset[str] | None = None
    not_in: frozenset[str] | None = None
    present: bool | None = None

    def holds(self, ctx: Reads) -> bool:
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

    def holds(self, ctx: Reads) -> bool:
        return all(c.holds(ctx) for c in self.conditions)


When = Condition | AllOf
CheckPath = Callable[[Any, int], None]


def parse_when(data: Any, file: str, check_source: CheckPath) -> When:
    """``when:`` (one condition, or a list that must all hold), in either direction."""
    if isinstance(data, list) and data:
        return AllOf(tuple(parse_condition(d, file, check_source) for d in data))
    return parse_condition(data, file, check_source)


def parse_condition(data: Any, file: str, check_source: CheckPath) -> Condition:
    """A ``when:`` condition; ``check_source`` checks its ``from`` path (ER7 inbound, FHIR outbound)."""
    if not isinstance(data, dict) or "from" not in data:
        raise ConfigError(
            "a condition needs 'from' and one test (equals, in, not_in, present)",
            file=file,
            key="when",
            line=data.get("__line__") if isinstance(data, dict) else None,
        )
    check_keys(data, _WHEN_KEYS, file, "a condition")
    check_source(data["from"], data["__line__"])
    return Condition(
        data["from"],
        equals=str(data["equals"]) if "equals" in data else None,
        in_=frozenset(map(str, data["in"])) if "in" in data else None,
        not_in=frozenset(map(str, data["not_in"])) if "not_in" in data else None,
        present=bool(data["present"]) if "present" in data else None,
    )


# -- concept maps --------------------------------------------------------------------------------


class ConceptMap(Mapping[str, Any]):
    """One code table (a read-only mapping of source code → target); ``system`` names where its
    source codes come from (an HL7 table)."""

    __slots__ = ("name", "system", "table")

    def __init__(self, name: str, table: Mapping[str, Any], system: str | None = None) -> None:
        self.name = name
        self.table = dict(table)
        self.system = system

    def __getitem__(self, code: str) -> Any:
        return self.table[code]

    def __iter__(self) -> Iterator[str]:
        return iter(self.table)

    def __len__(self) -> int:
        return len(self.table)

    def fallback(self, code: str) -> dict[str, str] | None:
        """An unknown code kept as it came, when the table maps to Codings and says its system."""
        if self.system is None or not self.table:
            return None
        if not all(isinstance(t, dict) and "code" in t for t in self.table.values()):
            return None  # a plain code element (a status) cannot hold a foreign system
        return {"system": self.system, "code": code}


def look_up(table: ConceptMap, code: str, where: str, report: Callable[[str], None]) -> Any:
    """``code`` through ``table``, in either direction: its target; an unknown code kept as it came
    when the table allows it (see ConceptMap.fallback), else None; ``report`` hears of every code
    the table does not know."""
    if code in table.table:
        return table.table[code]
    kept = table.fallback(code)
    if kept is None:
        report(f"{where}: code {code!r} not in concept map {table.name}; left out")
        return None
    report(f"{where}: code {code!r} not in concept map {table.name}; kept as sent ({table.system})")
    return kept


def load_concept_maps(directory: Path, *, text_targets: bool = False) -> dict[str, ConceptMap]:
    """Every table of ``directory/*.yaml``; ``text_targets`` makes every target text (outbound)."""
    maps: dict[str, ConceptMap] = {}
    for path in sorted(directory.glob("*.yaml")):
        data = load_yaml(path)
        for name, spec in data.items():
            if name == "__line__":
                continue
            if not isinstance(spec, dict):
                raise ConfigError(
                    "a concept map is a mapping of source code → target", file=str(path), key=name
                )
            system: str | None = None
            table = spec
            if "map" in spec and isinstance(spec["map"], dict):
                check_keys(spec, {"map", "system", "__line__"}, str(path), "a concept map")
                system = str(spec["system"]) if spec.get("system") else None
                table = spec["map"]
            if name in maps:
                raise ConfigError("two concept maps have this name", file=str(path), key=name)
            rows = {str(k): strip_lines(v) for k, v in table.items() if k != "__line__"}
            if text_targets:
                rows = {k: str(v) for k, v in rows.items()}
            maps[name] = ConceptMap(name, rows, system)
    return maps


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


class _Named(Protocol):
    @property
    def name(self) -> str: ...


Parsed = TypeVar("Parsed", bound=_Named)


def read_mappings(
    directory: Path,
    what: str,
    parse: Callable[[Path, dict[str, ConceptMap], Mapping[str, Any]], Parsed],
    functions: Mapping[str, Any],
    *,
    skip: frozenset[str] = frozenset(),
    text_targets: bool = False,
) -> tuple[list[Parsed], dict[str, ConceptMap]]:
    """A mapping directory's files (but ``skip``), each parsed with the directory's concept maps
    and the functions; two files of one name are a configuration error."""
    files = [p for p in mapping_files(directory, what) if p.name not in skip]
    concept_maps = load_concept_maps(directory / "conceptmaps", text_targets=text_targets)
    mappings = [parse(p, concept_maps, functions) for p in files]
    unique_names([m.name for m in mappings], directory, what)
    return mappings, concept_maps


def unique_names(names: Sequence[str], directory: Path, what: str) -> None:
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"two {what} files are named {name!r}", file=str(directory))
