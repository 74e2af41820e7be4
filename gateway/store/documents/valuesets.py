"""The DMP value sets a document's metadata is checked against, and the elements each one binds."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from gateway.core.errors import ConfigError

DEFAULT_VALUESETS = Path(__file__).resolve().parents[3] / "profiles" / "valuesets"

# The element each value set checks: (path in the resource, ValueSet id).
J07, J06, J10 = "JDV-J07-XdsTypeCode-CISIS", "JDV-J06-XdsClassCode-CISIS", "JDV-J10-XdsFormatCode-CISIS"
J02 = "JDV-J02-XdsHealthcareFacilityTypeCode-CISIS"
J04, J08 = "JDV-J04-XdsPracticeSettingCode-CISIS", "JDV-J08-XdsConfidentialityCode-CISIS"


class ValueSets:
    """The codes of the ValueSet JSON files the gateway ships (``compose.include`` with concepts)."""

    def __init__(self, sets: Mapping[str, frozenset[tuple[str, str]]]) -> None:
        self.sets = dict(sets)

    @classmethod
    def load(cls, directory: Path) -> ValueSets:
        sets: dict[str, frozenset[tuple[str, str]]] = {}
        for path in sorted(directory.glob("ValueSet-*.json")):
            try:
                data = orjson.loads(path.read_bytes())
                codes = frozenset(
                    (str(inc["system"]), str(concept["code"]))
                    for inc in data["compose"]["include"]
                    for concept in inc.get("concept", ())
                )
                sets[str(data["id"])] = codes
            except (OSError, orjson.JSONDecodeError, KeyError, TypeError) as exc:
                raise ConfigError(f"not a readable ValueSet: {exc}", file=str(path)) from exc
        missing = [v for v in (J07, J06, J10, J02, J04, J08) if v not in sets]
        if missing:
            raise ConfigError(f"value sets missing: {', '.join(missing)}", file=str(directory))
        return cls(sets)

    def contains(self, valueset: str, system: str, code: str) -> bool:
        return (system, code) in self.sets.get(valueset, frozenset())


def codings(concept: Any) -> list[dict[str, Any]]:
    """The codings of a CodeableConcept (none when it is not one)."""
    if not isinstance(concept, dict):
        return []
    return [c for c in concept.get("coding") or () if isinstance(c, dict)]


def coded_elements(doc: Mapping[str, Any]) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """(path, value set, codings) of every element PDSm binds to a DMP value set."""
    out = [("type", J07, codings(doc.get("type")))]
    for i, cat in enumerate(doc.get("category") or ()):
        out.append((f"category[{i}]", J06, codings(cat)))
    for i, label in enumerate(doc.get("securityLabel") or ()):
        out.append((f"securityLabel[{i}]", J08, codings(label)))
    for i, content in enumerate(doc.get("content") or ()):
        fmt = content.get("format") if isinstance(content, dict) else None
        if isinstance(fmt, dict):
            out.append((f"content[{i}].format", J10, [fmt]))
    context = doc.get("context") or {}
    if isinstance(context, dict):
        if context.get("facilityType") is not None:
            out.append(("context.facilityType", J02, codings(context["facilityType"])))
        if context.get("practiceSetting") is not None:
            out.append(("context.practiceSetting", J04, codings(context["practiceSetting"])))
    return out
