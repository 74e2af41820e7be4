"""ValueSets and CodeSystems shipped as JSON beside the profiles, expanded once into code sets.

A ValueSet is expanded from its ``expansion.contains`` when it has one, else from
``compose.include``: listed concepts, or every concept of an included CodeSystem that is
shipped too. ``compose.exclude`` is honoured the same way. Filters are not supported: a
ValueSet that uses them is reported as not expandable, and its bindings are not checked.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Expansion:
    url: str
    codes: frozenset[tuple[str, str]]  # (system, code)
    bare: frozenset[str]  # codes alone, for `code` elements that carry no system

    def has(self, system: str | None, code: str) -> bool:
        if system is None:
            return code in self.bare
        return (system, code) in self.codes


class Terminology:
    def __init__(self) -> None:
        self.valuesets: dict[str, dict[str, Any]] = {}
        self.codesystems: dict[str, dict[str, Any]] = {}
        self._expansions: dict[str, Expansion | None] = {}

    def add(self, resource: Mapping[str, Any]) -> None:
        url = resource.get("url")
        if not isinstance(url, str):
            return
        if resource.get("resourceType") == "ValueSet":
            self.valuesets[url] = dict(resource)
        elif resource.get("resourceType") == "CodeSystem":
            self.codesystems[url] = dict(resource)
        self._expansions.clear()

    def expansion(self, url: str) -> Expansion | None:
        """The codes of ValueSet ``url`` (a ``|version`` suffix is ignored), None when unknown."""
        url = url.split("|", 1)[0]
        if url in self._expansions:
            return self._expansions[url]
        vs = self.valuesets.get(url)
        result = None if vs is None else self._expand(vs, set())
        self._expansions[url] = result
        return result

    def _expand(self, vs: Mapping[str, Any], seen: set[str]) -> Expansion | None:
        url = str(vs.get("url"))
        seen.add(url)
        codes: set[tuple[str, str]] = set()
        contains = vs.get("expansion", {}).get("contains")
        if contains:
            codes.update(_contains(contains))
        else:
            compose = vs.get("compose", {})
            for include in compose.get("include", []):
                got = self._include(include, seen)
                if got is None:
                    return None
                codes |= got
            for exclude in compose.get("exclude", []):
                got = self._include(exclude, seen)
                if got is None:
                    return None
                codes -= got
        return Expansion(url, frozenset(codes), frozenset(code for _, code in codes))

    def _include(self, include: Mapping[str, Any], seen: set[str]) -> set[tuple[str, str]] | None:
        if include.get("filter"):
            return None
        system = include.get("system")
        codes: set[tuple[str, str]] = set()
        if system:
            concepts = include.get("concept")
            if concepts:
                codes.update((system, c["code"]) for c in concepts)
            else:
                cs = self.codesystems.get(system)
                if cs is None:
                    return None
                codes.update((system, code) for code in _all_codes(cs.get("concept", [])))
        for other in include.get("valueSet", []):
            other = other.split("|", 1)[0]
            if other in seen:
                continue
            vs = self.valuesets.get(other)
            sub = None if vs is None else self._expand(vs, seen)
            if sub is None:
                return None
            codes = set(sub.codes) if not system else codes & set(sub.codes)
        return codes


def _contains(items: Iterable[Mapping[str, Any]]) -> Iterable[tuple[str, str]]:
    for item in items:
        if "code" in item:
            yield str(item.get("system", "")), str(item["code"])
        yield from _contains(item.get("contains", []))


def _all_codes(concepts: Iterable[Mapping[str, Any]]) -> Iterable[str]:
    for concept in concepts:
        yield str(concept["code"])
        yield from _all_codes(concept.get("concept", []))
