"""Our FHIR next to Microsoft FHIR-Converter's, on the Microsoft samples of the shared corpus.

For each ``ms/NAME.hl7`` that has ``ms/expected/NAME-expected.json`` (the Bundle Microsoft's
converter makes of it), the message goes through our mapping step, with the settings
``passerelle convert`` uses (the shipped mappings, identifiers of unknown namespace named by their
sender). Then, per side: the resource types and their counts, and, for a list of key clinical
elements, whether the side fills it (a value other than an "unknown" placeholder: a
data-absent-reason or NullFlavor coding, or a data-absent-reason extension).

Prints Markdown: one row per message type (MSH-9.1^MSH-9.2 of the message), then one row per key
element over all files. ``--json`` prints the same figures, per file too, as JSON.

.venv/bin/python bench/compare_converters.py [--corpus ../shared/corpus] [--json]

Microsoft's Bundle is no specification (it makes one Location per PV1 component, adds
MessageHeader, Provenance and Device, and never refuses a type): read a row as "what a mature
converter extracts from the same message", not as a score.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.core.errors import MessageError  # noqa: E402
from gateway.engine.steps import FhirMapping  # noqa: E402
from gateway.hl7.er7 import Message, split_messages  # noqa: E402
from gateway.mapping.rules import shipped_mappings  # noqa: E402

CORPUS = ROOT.parent / "shared" / "corpus"
DEFAULT_CHARSET = "8859/15"  # passerelle convert's default, for an empty MSH-18

# Type.element; "[x]" is a choice (any valueQuantity, valueString … fills value[x]).
KEY_ELEMENTS: tuple[str, ...] = (
    "Patient.name",
    "Patient.identifier",
    "Patient.address",
    "Patient.telecom",
    "Practitioner.name",
    "RelatedPerson.relationship",
    "Coverage.payor",
    "Encounter.location",
    "Location.name",
    "AllergyIntolerance.code",
    "Condition.code",
    "Procedure.code",
    "Observation.value[x]",
    "DiagnosticReport.result",
    "Immunization.vaccineCode",
    "Immunization.lotNumber",
    "Immunization.doseQuantity",
    "MedicationRequest.medication[x]",
    "MedicationAdministration.medication[x]",
)
ABSENT_SYSTEMS = frozenset(
    {
        "http://terminology.hl7.org/CodeSystem/data-absent-reason",
        "http://terminology.hl7.org/CodeSystem/v3-NullFlavor",
    }
)
ABSENT_EXTENSION = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
SIDES = ("ours", "microsoft")


# -- what a Bundle fills ---------------------------------------------------------------------------


def has_data(value: Any) -> bool:
    """A value holds data: some primitive outside "unknown" placeholders."""
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, bool | int | float):
        return True
    if isinstance(value, list):
        return any(has_data(v) for v in value)
    if isinstance(value, dict):
        if value.get("system") in ABSENT_SYSTEMS or value.get("url") == ABSENT_EXTENSION:
            return False
        return any(has_data(v) for k, v in value.items() if k != "url")
    return False


def element_values(resource: Mapping[str, Any], element: str) -> list[Any]:
    """The values of one top-level element; a choice ``name[x]`` is every ``nameType`` key."""
    if element.endswith("[x]"):
        stem = element[:-3]
        return [
            v for k, v in resource.items() if k.startswith(stem) and k[len(stem) : len(stem) + 1].isupper()
        ]
    return [resource[element]] if element in resource else []


def resources(bundle: Mapping[str, Any]) -> list[dict[str, Any]]:
    entries = bundle.get("entry") or []
    return [e["resource"] for e in entries if isinstance(e, dict) and isinstance(e.get("resource"), dict)]


def fills(found: Iterable[Mapping[str, Any]], key: str) -> bool:
    kind, element = key.split(".", 1)
    return any(
        r.get("resourceType") == kind and any(has_data(v) for v in element_values(r, element)) for r in found
    )


@dataclass(slots=True)
class Side:
    """One converter's output for one file."""

    resources: Counter[str] = field(default_factory=Counter)
    elements: dict[str, bool] = field(default_factory=dict)
    refused: str | None = None  # our refusal: HL7 table 0357 code and error class

    @classmethod
    def of(cls, found: Sequence[Mapping[str, Any]], refused: str | None = None) -> Side:
        return cls(
            Counter(str(r.get("resourceType")) for r in found),
            {key: fills(found, key) for key in KEY_ELEMENTS},
            refused,
        )

    def as_json(self) -> dict[str, Any]:
        return {"refused": self.refused, "resources": dict(self.resources), "elements": self.elements}


@dataclass(slots=True)
class Pair:
    file: str
    type: str
    ours: Side
    microsoft: Side


# -- running ---------------------------------------------------------------------------------------


def pairs_in(corpus: Path) -> list[tuple[Path, Path]]:
    """(message file, Microsoft's expected Bundle) for every sample that has one."""
    ms = corpus / "ms"
    out = []
    for hl7 in sorted(ms.glob("*.hl7")):
        expected = ms / "expected" / f"{hl7.stem}-expected.json"
        if expected.is_file():
            out.append((hl7, expected))
    return out


def ours(step: FhirMapping, raw: bytes) -> tuple[str, Side]:
    """The message type and our side (a file's messages together; a refused one counts as empty)."""
    found: list[dict[str, Any]] = []
    kinds: list[str] = []
    refusals: list[str] = []
    for one in split_messages(raw):
        try:
            msg = Message.decode(one, default_charset=DEFAULT_CHARSET)
        except MessageError as exc:
            kinds.append("(unparsed)")
            refusals.append(f"{exc.hl7_error_code} {type(exc).__name__}")
            continue
        kinds.append(f"{msg.message_type}^{msg.trigger}")
        try:
            found += resources(step.convert(msg).bundle)
        except MessageError as exc:
            refusals.append(f"{exc.hl7_error_code} {type(exc).__name__}")
    side = Side.of(found, ", ".join(dict.fromkeys(refusals)) or None)
    return (kinds[0] if kinds else "(empty)"), side


def compare(corpus: Path, step: FhirMapping | None = None) -> list[Pair]:
    step = step or FhirMapping(
        "compare",
        {"directory": str(shipped_mappings()), "missing_namespace": "sender", "timezone": "Europe/Paris"},
    )
    out = []
    for hl7, expected in pairs_in(corpus):
        kind, mine = ours(step, hl7.read_bytes())
        theirs = Side.of(resources(orjson.loads(expected.read_bytes())))
        out.append(Pair(hl7.name, kind, mine, theirs))
    return out


# -- aggregation -----------------------------------------------------------------------------------


@dataclass(slots=True)
class TypeRow:
    type: str
    files: int = 0
    refused: int = 0  # files we refused
    resources: dict[str, Counter[str]] = field(default_factory=lambda: {s: Counter() for s in SIDES})
    filled: dict[str, set[str]] = field(default_factory=lambda: {s: set() for s in SIDES})

    def add(self, pair: Pair) -> None:
        self.files += 1
        self.refused += pair.ours.refused is not None
        for name in SIDES:
            side: Side = getattr(pair, name)
            self.resources[name].update(side.resources)
            self.filled[name] |= {k for k, v in side.elements.items() if v}

    def only(self, side: str) -> list[str]:
        other = SIDES[1 - SIDES.index(side)]
        return [k for k in KEY_ELEMENTS if k in self.filled[side] and k not in self.filled[other]]

    def as_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "files": self.files,
            "refused_by_us": self.refused,
            "resources": {s: dict(self.resources[s]) for s in SIDES},
            "filled": {s: [k for k in KEY_ELEMENTS if k in self.filled[s]] for s in SIDES},
            "only_ours": self.only("ours"),
            "only_microsoft": self.only("microsoft"),
        }


def by_type(pairs: Iterable[Pair]) -> list[TypeRow]:
    rows: dict[str, TypeRow] = {}
    for pair in pairs:
        rows.setdefault(pair.type, TypeRow(pair.type)).add(pair)
    return [rows[k] for k in sorted(rows)]


def by_element(pairs: Sequence[Pair]) -> list[dict[str, Any]]:
    out = []
    for key in KEY_ELEMENTS:
        mine = [p.ours.elements[key] for p in pairs]
        theirs = [p.microsoft.elements[key] for p in pairs]
        both = sum(a and b for a, b in zip(mine, theirs, strict=True))
        out.append(
            {
                "element": key,
                "ours": sum(mine),
                "microsoft": sum(theirs),
                "both": both,
                "only_ours": sum(mine) - both,
                "only_microsoft": sum(theirs) - both,
            }
        )
    return out


def summary(pairs: Sequence[Pair]) -> dict[str, Any]:
    return {
        "files": len(pairs),
        "types": len({p.type for p in pairs}),
        "refused_by_us": sum(p.ours.refused is not None for p in pairs),
        "resources": {s: sum(sum(getattr(p, s).resources.values()) for p in pairs) for s in SIDES},
    }


# -- output ----------------------------------------------------------------------------------------


def _counts(counter: Counter[str]) -> str:
    if not counter:
        return "—"
    return ", ".join(f"{k} {n}" for k, n in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))


def _names(keys: Sequence[str]) -> str:
    return ", ".join(f"`{k}`" for k in keys) or "—"


def _line(cells: Iterable[object]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def markdown(pairs: Sequence[Pair]) -> str:
    total = summary(pairs)
    n = len(KEY_ELEMENTS)
    lines = [
        f"{total['files']} Microsoft samples with an expected Bundle, {total['types']} message types; "
        f"we refuse {total['refused_by_us']} of them. Resources: ours {total['resources']['ours']}, "
        f"Microsoft {total['resources']['microsoft']}.",
        "",
        _line(
            [
                "Type",
                "Files",
                "Refused by us",
                "Our resources",
                "Microsoft resources",
                f"Key elements filled (of {n}): ours / Microsoft",
                "Only Microsoft fills",
                "Only we fill",
            ]
        ),
        _line(["---", "---:", "---:", "---", "---", "---:", "---", "---"]),
    ]
    for row in by_type(pairs):
        lines.append(
            _line(
                [
                    row.type,
                    row.files,
                    row.refused,
                    _counts(row.resources["ours"]),
                    _counts(row.resources["microsoft"]),
                    f"{len(row.filled['ours'])} / {len(row.filled['microsoft'])}",
                    _names(row.only("microsoft")),
                    _names(row.only("ours")),
                ]
            )
        )
    lines += [
        "",
        f"Key elements, over the {total['files']} files (files where a side fills it):",
        "",
        _line(["Element", "Ours", "Microsoft", "Both", "Only ours", "Only Microsoft"]),
        _line(["---", "---:", "---:", "---:", "---:", "---:"]),
    ]
    for item in by_element(pairs):
        lines.append(
            _line(
                [
                    f"`{item['element']}`",
                    item["ours"],
                    item["microsoft"],
                    item["both"],
                    item["only_ours"],
                    item["only_microsoft"],
                ]
            )
        )
    return "\n".join(lines) + "\n"


def as_json(pairs: Sequence[Pair]) -> dict[str, Any]:
    return {
        "summary": summary(pairs),
        "key_elements": list(KEY_ELEMENTS),
        "types": [row.as_json() for row in by_type(pairs)],
        "elements": by_element(pairs),
        "files": [
            {"file": p.file, "type": p.type, "ours": p.ours.as_json(), "microsoft": p.microsoft.as_json()}
            for p in pairs
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--corpus", type=Path, default=CORPUS, help=f"the shared corpus (default: {CORPUS})")
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    args = parser.parse_args(argv)
    if not (args.corpus / "ms" / "expected").is_dir():
        print(f"compare_converters: no ms/expected/ under {args.corpus}", file=sys.stderr)
        return 2
    pairs = compare(args.corpus)
    if args.json:
        print(orjson.dumps(as_json(pairs), option=orjson.OPT_INDENT_2).decode())
    else:
        sys.stdout.write(markdown(pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
