"""Suites as data: YAML files in conformance/suites/ (or any path), each a kind, cases and steps."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

SUITES_DIR: Final = Path(__file__).resolve().parent / "suites"
DATA_DIR: Final = SUITES_DIR / "data"
KINDS: Final = ("files", "mllp-receiver", "mllp-sender", "fhir-documents")


class SuiteError(ValueError):
    """A suite file that cannot be used: the text names the file, the key and the reason."""


@dataclass(frozen=True, slots=True)
class Case:
    id: str
    title: str
    steps: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Suite:
    name: str
    title: str
    kind: str
    path: Path
    cases: list[Case] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def data(self, relative: str) -> Path:
        """A data file a step names, relative to suites/data/ (or to the suite's own folder)."""
        for base in (self.path.parent / "data", self.path.parent, DATA_DIR):
            candidate = base / relative
            if candidate.is_file():
                return candidate
        raise SuiteError(f"{self.path}: data file {relative!r} not found")


def available() -> list[Suite]:
    return [load(p) for p in sorted(SUITES_DIR.glob("*.yaml"))]


def find(name: str) -> Suite:
    """A suite by name (``pam-fr-receiver``) or by path to a YAML file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return load(path)
    candidate = SUITES_DIR / f"{name}.yaml"
    if candidate.is_file():
        return load(candidate)
    known = ", ".join(s.name for s in available())
    raise SuiteError(f"no suite {name!r} (known: {known})")


def load(path: Path) -> Suite:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise SuiteError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(doc, dict):
        raise SuiteError(f"{path}: a suite is a mapping")
    for key in ("name", "kind"):
        if not isinstance(doc.get(key), str):
            raise SuiteError(f"{path}: key {key!r}: required string")
    if doc["kind"] not in KINDS:
        raise SuiteError(f"{path}: key 'kind': {doc['kind']!r} is not one of {', '.join(KINDS)}")
    cases: list[Case] = []
    for index, raw in enumerate(doc.get("cases") or []):
        if not isinstance(raw, dict) or not isinstance(raw.get("id"), str):
            raise SuiteError(f"{path}: key 'cases[{index}].id': required string")
        steps = raw.get("steps") or []
        if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
            raise SuiteError(f"{path}: key 'cases[{index}].steps': a list of mappings")
        cases.append(Case(raw["id"], str(raw.get("title", raw["id"])), steps))
    settings = {k: v for k, v in doc.items() if k not in ("name", "title", "kind", "cases")}
    return Suite(doc["name"], str(doc.get("title", doc["name"])), doc["kind"], path, cases, settings)
