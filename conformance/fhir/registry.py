"""The profiles directory: StructureDefinitions, ValueSets and CodeSystems, compiled on first use.

Dropping a ``StructureDefinition-*.json`` into the directory adds a profile; it is selected by a
resource's ``meta.profile`` or by name (``--profile fr-core-patient-ins``: the SD's id, name or
url). Every JSON file below the directory is read, ``valuesets/`` included.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final

import orjson

from conformance.fhir.fhirpath import Unsupported, compile_fast
from conformance.fhir.profile import Checker, Evaluator, Profile, compile_profile
from conformance.fhir.terminology import Terminology
from conformance.findings import Finding, Severity
from gateway.core.errors import HttpError
from gateway.fhir.validation import Bindings, InvalidResource, validate_resource

BASE: Final = "FHIR-BASE-001"
UNKNOWN_PROFILE: Final = "FHIR-PROFILE-001"
NOT_JSON: Final = "FHIR-JSON-001"

# The repository's profiles/ (resolved from this file, so an editable install and a checkout agree).
DEFAULT_DIR: Final = Path(__file__).resolve().parents[2] / "profiles"


class ProfileError(ValueError):
    """A profile file that cannot be used; the text names the file and the reason."""


@functools.cache
def reference_fhirpath(expression: str) -> Evaluator:
    """fhirpathpy's evaluator: the reference, and the fallback for what the fast subset lacks."""
    import fhirpathpy
    from fhirpathpy.models import models

    run: Evaluator = fhirpathpy.compile(expression, models["r4"])
    return run


@functools.cache
def _fhirpath(expression: str) -> Evaluator:
    try:
        fast = compile_fast(expression)
    except Unsupported:
        return reference_fhirpath(expression)

    def run(value: Any, env: Any) -> list[Any]:
        try:
            return fast(value, env)
        except Unsupported:
            return reference_fhirpath(expression)(value, env)

    return run


class Registry:
    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or DEFAULT_DIR
        self.terminology = Terminology()
        self._sds: dict[str, dict[str, Any]] = {}  # url → SD
        self._names: dict[str, str] = {}  # id / name / url → url
        self._compiled: dict[str, Profile] = {}
        if self.directory.is_dir():
            self._load(sorted(self.directory.rglob("*.json")))

    def _load(self, files: Iterable[Path]) -> None:
        for path in files:
            try:
                resource = orjson.loads(path.read_bytes())
            except orjson.JSONDecodeError as exc:
                raise ProfileError(f"{path}: not JSON ({exc})") from exc
            if not isinstance(resource, dict):
                continue
            kind = resource.get("resourceType")
            if kind == "StructureDefinition":
                self.add_structure_definition(resource, str(path))
            elif kind in ("ValueSet", "CodeSystem"):
                self.terminology.add(resource)
            elif kind == "Bundle":
                for entry in resource.get("entry", []):
                    inner = entry.get("resource") or {}
                    if inner.get("resourceType") in ("ValueSet", "CodeSystem"):
                        self.terminology.add(inner)

    def add_structure_definition(self, sd: Mapping[str, Any], origin: str = "<memory>") -> None:
        url = sd.get("url")
        if not isinstance(url, str) or not sd.get("type"):
            raise ProfileError(f"{origin}: a StructureDefinition needs url and type")
        self._sds[url] = dict(sd)
        for key in (sd.get("id"), sd.get("name"), url):
            if isinstance(key, str):
                self._names[key] = url
        self._compiled.pop(url, None)

    @property
    def names(self) -> list[tuple[str, str, str]]:
        """(id, type, url) of every profile, sorted by id."""
        return sorted(
            (str(sd.get("id") or sd.get("name")), str(sd["type"]), url) for url, sd in self._sds.items()
        )

    def profile(self, name_or_url: str) -> Profile | None:
        url = self._names.get(name_or_url.split("|", 1)[0])
        if url is None:
            return None
        compiled = self._compiled.get(url)
        if compiled is None:
            compiled = self._compile(url, set())
        return compiled

    def _compile(self, url: str, busy: set[str]) -> Profile:
        if url in busy:
            raise ProfileError(f"profile {url}: its baseDefinition chain loops")
        busy.add(url)
        sd = self._sds[url]
        base_url = str(sd.get("baseDefinition", "")).split("|", 1)[0]
        base = None
        if base_url in self._sds:
            base = self._compiled.get(base_url) or self._compile(base_url, busy)
        try:
            compiled = compile_profile(sd, _fhirpath, base)
        except (KeyError, ValueError, TypeError) as exc:
            raise ProfileError(f"profile {url}: {exc}") from exc
        self._compiled[url] = compiled
        return compiled

    def chain(self, name_or_url: str) -> list[Profile]:
        """The profile to check, its parents' rules included (empty when unknown)."""
        prof = self.profile(name_or_url)
        return [] if prof is None else [prof]

    def check_against(
        self, url: str, value: Mapping[str, Any], where: str, out: list[Finding], resource: Mapping[str, Any]
    ) -> None:
        """Check ``value`` (an extension, a contained resource) against profile ``url`` if known."""
        for prof in self.chain(url):
            Checker(self, resource if not value.get("resourceType") else value, out).run(prof, value, where)

    def validate(self, resource: Any, profiles: Iterable[str] = (), *, base: bool = True) -> list[Finding]:
        """Every finding for one resource: the R4B base model, then each profile it claims or is given."""
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            return [
                Finding(
                    NOT_JSON, Severity.FATAL, "$this", "not a FHIR resource (no resourceType)", "structure"
                )
            ]
        out: list[Finding] = []
        rtype = resource["resourceType"]
        if base:
            out.extend(base_findings(resource))
        wanted = list(profiles) or [
            p for p in resource.get("meta", {}).get("profile", []) if isinstance(p, str)
        ]
        for name in wanted:
            chain = self.chain(name)
            if not chain:
                out.append(
                    Finding(
                        UNKNOWN_PROFILE,
                        Severity.WARNING,
                        f"{rtype}.meta.profile",
                        f"profile {name} is not known here: not checked",
                        "not-supported",
                    )
                )
                continue
            if chain[-1].type != rtype:
                out.append(
                    Finding(
                        UNKNOWN_PROFILE,
                        Severity.ERROR,
                        rtype,
                        f"profile {name} constrains {chain[-1].type}, not {rtype}",
                        "structure",
                    )
                )
                continue
            for prof in chain:
                Checker(self, resource, out).run(prof, resource, rtype)
        return _dedupe(out)


def base_findings(resource: Mapping[str, Any]) -> list[Finding]:
    """The R4B model's verdict (fhir.resources), as findings."""
    try:
        # Required bindings: the base verdict is the one the gateway gives a write.
        validate_resource(resource, bindings=Bindings.REQUIRED)
    except InvalidResource as exc:
        return [Finding(BASE, Severity.ERROR, loc, msg, code) for code, msg, loc in exc.issues]
    except HttpError as exc:
        return [
            Finding(
                BASE,
                Severity.ERROR,
                exc.location or str(resource.get("resourceType")),
                exc.message,
                exc.fhir_issue_code,
            )
        ]
    return []


def _dedupe(findings: list[Finding]) -> list[Finding]:
    # A parent and a child profile may state the same rule: report it once.
    seen: set[tuple[str, str, str]] = set()
    out: list[Finding] = []
    for f in findings:
        key = (f.rule, f.location, f.message)
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


@functools.cache
def default_registry() -> Registry:
    return Registry()
