"""The message structures of the French specifications, where they differ from HL7 v2.5.

The table is conformance/hl7v2/french_structures.json (each entry names its source). Today it
holds the CI-SIS document transmission ("Transmission de documents CDA en HL7v2", and its
"Transmission au LPS ... courriel MSSanté" companion): ORU^R01 in v2.5 and MDM^T02/T04/T10 in
v2.6, both with the PRT segment pre-adopted from v2.9 after the OBX that carries the document.

An entry is found by the message structure (MSH-9.3, else the one its type maps to) and the
profile MSH-21 declares (its namespace, EI-2: ``2.1^CISIS_CDA_HL7_V2``); a message without
MSH-21 is found by its type (MSH-9.1^MSH-9.2). A message whose MSH-21 names another profile
keeps the v2.5 structure.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from conformance.hl7v2.structure import Insert, Node, message_structure
from gateway.hl7.er7 import Message

TABLE_FILE: Final = Path(__file__).with_name("french_structures.json")


@dataclass(frozen=True, slots=True)
class FrenchStructure:
    structure: str  # ORU_R01
    title: str
    profiles: frozenset[str]  # MSH-21 namespaces (EI-2) that declare it
    types: frozenset[str]  # MSH-9.1^MSH-9.2 that use it
    version: str  # hl7apy version of the base structure and of the segments' field rules
    segments: Mapping[str, str]  # segment → the version its field rules come from, when another
    inserts: tuple[Insert, ...]
    source: str

    @property
    def nodes(self) -> tuple[Node, ...]:
        nodes = message_structure(self.structure, self.version, self.inserts)
        if nodes is None:  # the table names a structure hl7apy lacks: a broken table, not a message
            raise ValueError(f"{TABLE_FILE.name}: no {self.structure} in hl7apy {self.version}")
        return nodes

    def segment_version(self, segment: str) -> str:
        return self.segments.get(segment, self.version)

    @property
    def label(self) -> str:
        """How findings name it: ``MDM_T02 (v2.6, PRT pre-adopted)``."""
        added = ", ".join(sorted({i.segment for i in self.inserts}))
        return f"{self.structure} (French specification: v{self.version}" + (
            f", {added} pre-adopted)" if added else ")"
        )


@dataclass(frozen=True, slots=True)
class Table:
    by_structure: Mapping[str, FrenchStructure]
    by_type: Mapping[str, FrenchStructure]
    profiles: Mapping[str, str]  # namespace → what it is


def _entry(name: str, raw: Mapping[str, Any]) -> FrenchStructure:
    return FrenchStructure(
        structure=name,
        title=str(raw.get("title", name)),
        profiles=frozenset(str(p) for p in raw.get("profiles", ())),
        types=frozenset(str(t) for t in raw.get("types", ())),
        version=str(raw.get("version", "2.5")),
        segments={str(k): str(v) for k, v in raw.get("segments", {}).items()},
        inserts=tuple(
            Insert(
                group=str(i["group"]),
                after=str(i["after"]),
                segment=str(i["segment"]),
                min=int(i.get("min", 0)),
                max=int(i.get("max", -1)),
            )
            for i in raw.get("insert", ())
        ),
        source=str(raw.get("source", "")),
    )


@functools.cache
def table() -> Table:
    raw = json.loads(TABLE_FILE.read_text(encoding="utf-8"))
    entries = {name: _entry(name, body) for name, body in raw.get("structures", {}).items()}
    by_type: dict[str, FrenchStructure] = {}
    for entry in entries.values():
        for kind in entry.types:
            if kind in by_type:
                raise ValueError(f"{TABLE_FILE.name}: message type {kind} in two entries")
            by_type[kind] = entry
    return Table(entries, by_type, {str(k): str(v) for k, v in raw.get("profiles", {}).items()})


def declared_profiles(msg: Message) -> list[str]:
    """The namespaces (EI-2) of the MSH-21 repetitions, stripped; [] when MSH-21 is empty."""
    comp = msg.separators.component
    out = []
    for rep in msg.repetitions("MSH-21"):
        parts = rep.split(comp)
        if len(parts) > 1 and parts[1].strip():
            out.append(parts[1].strip())
    return out


def lookup(msg: Message, structure: str) -> FrenchStructure | None:
    """The French structure for this message (``structure`` is MSH-9.3 or its stand-in), if any."""
    tab = table()
    kind = f"{msg.message_type}^{msg.trigger}"
    entry = tab.by_structure.get(structure) if msg.structure else tab.by_type.get(kind)
    if entry is None:
        return None
    if msg.repetitions("MSH-21"):
        return entry if entry.profiles.intersection(declared_profiles(msg)) else None
    return entry if kind in entry.types else None
