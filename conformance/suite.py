"""Suites as data: YAML files in conformance/suites/ (or any path), each a kind, cases and steps."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from conformance.errors import SuiteError as SuiteError  # re-exported: suites' users import it from here
from conformance.per_run import RewriteRule, check_value, parse_rules, placeholders, targets
from conformance.results import ResultCheck, parse_checks

SUITES_DIR: Final = Path(__file__).resolve().parent / "suites"
DATA_DIR: Final = SUITES_DIR / "data"
KINDS: Final = ("files", "mllp-receiver", "mllp-sender", "fhir-documents")


@dataclass(frozen=True, slots=True)
class Case:
    id: str
    title: str
    steps: list[dict[str, Any]]
    then: list[ResultCheck] = field(default_factory=list)  # result checks, after the steps


@dataclass(frozen=True, slots=True)
class Suite:
    name: str
    title: str
    kind: str
    path: Path
    cases: list[Case] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    per_run: list[RewriteRule] = field(default_factory=list)  # fields given this run's values

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
    try:
        return _suite(path, doc)
    except SuiteError as exc:
        raise SuiteError(f"{path}: {exc}") from exc


def _suite(path: Path, doc: Any) -> Suite:
    if not isinstance(doc, dict):
        raise SuiteError("a suite is a mapping")
    for key in ("name", "kind"):
        if not isinstance(doc.get(key), str):
            raise SuiteError(f"key {key!r}: required string")
    if doc["kind"] not in KINDS:
        raise SuiteError(f"key 'kind': {doc['kind']!r} is not one of {', '.join(KINDS)}")
    receiver = doc["kind"] == "mllp-receiver"
    if not receiver and doc.get("per_run") is not None:
        raise SuiteError("key 'per_run': only mllp-receiver suites send messages to rewrite")
    settle = doc.get("settle_s", 20)
    if isinstance(settle, bool) or not isinstance(settle, int | float) or settle < 0:
        raise SuiteError("key 'settle_s': seconds, 0 or more")
    timeout = doc.get("timeout_s")  # seconds each answer is waited for; --timeout overrides
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < float("inf")
    ):
        raise SuiteError("key 'timeout_s': seconds, more than 0")
    rules = parse_rules(doc.get("per_run"))
    cases: list[Case] = []
    for index, raw in enumerate(doc.get("cases") or []):
        if not isinstance(raw, dict) or not isinstance(raw.get("id"), str):
            raise SuiteError(f"key 'cases[{index}].id': required string")
        steps = raw.get("steps") or []
        if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
            raise SuiteError(f"key 'cases[{index}].steps': a list of mappings")
        if raw.get("then") is not None and not receiver:
            raise SuiteError(f"key 'cases[{index}].then': result checks are for mllp-receiver suites")
        case = Case(
            raw["id"],
            str(raw.get("title", raw["id"])),
            steps,
            parse_checks(raw.get("then"), f"cases[{index}].then"),
        )
        cases.append(case)
    settings = {k: v for k, v in doc.items() if k not in ("name", "title", "kind", "cases", "per_run")}
    suite = Suite(doc["name"], str(doc.get("title", doc["name"])), doc["kind"], path, cases, settings, rules)
    if receiver:
        for index, case in enumerate(cases):
            _check_steps(suite, case, f"cases[{index}]")
    return suite


def _check_steps(suite: Suite, case: Case, key: str) -> None:
    """Each step sends a data file that exists; every value of a per_run field can be rewritten;
    each {run:VALUE} of the case's checks names one that the case's own messages carry."""
    from gateway.core.errors import MessageError
    from gateway.hl7.er7 import Message

    authored: set[str] = set()
    for number, step in enumerate(case.steps):
        where = f"{key}.steps[{number}].send"
        if not isinstance(step.get("send"), str):
            raise SuiteError(f"key {where!r}: required string (a data file, e.g. hl7/a01-admission.hl7)")
        try:
            path = suite.data(step["send"])
        except SuiteError as exc:
            raise SuiteError(f"key {where!r}: data file {step['send']!r} not found") from exc
        if step.get("raw"):
            continue
        try:
            msg = Message.decode(path.read_bytes(), default_charset="UNICODE UTF-8")
        except MessageError as exc:
            raise SuiteError(f"key {where!r}: not a readable message: {exc}") from exc
        for _, value, rule in targets(msg, suite.per_run):
            try:
                check_value(value, rule)
            except SuiteError as exc:
                raise SuiteError(f"key {where!r}: {exc}") from exc
            authored.add(value)
    for check in case.then:
        for text in check.texts():
            for value in placeholders(text):
                if value not in authored:
                    raise SuiteError(
                        f"key '{key}.{check.key}': {{run:{value}}} names no value that this case's messages"
                        " carry in a per_run field"
                    )
