"""Which feed may create, update or only reference each resource type (``mappings/ownership.yaml``).

A write policy says how a produced resource meets the one already stored under the same key:

- ``merge``: the owner feed updates it; what the message carries replaces what is stored, what it
  lacks is kept, identifiers are merged per system (never removed by a message that lacks them);
- ``replace``: the message's resource is the whole truth (a result, an appointment);
- ``create``: created when absent, never changed by this feed (a result feed referencing a Patient).

The table is data an integrator overrides: resource type → {message type (MSH-9.1) or ``*`` → policy}.
A type the table does not name is ``replace``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from gateway.core.errors import ConfigError
from gateway.mapping.rules import load_yaml, strip_lines

POLICIES: Final = ("merge", "replace", "create")
FILE: Final = "ownership.yaml"


@dataclass(frozen=True, slots=True)
class Ownership:
    table: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def policy(self, resource_type: str, message_type: str) -> str:
        row = self.table.get(resource_type)
        if row is None:
            return "replace"
        return row.get(message_type) or row.get("*") or "replace"

    @classmethod
    def load(cls, directory: Path) -> Ownership:
        path = directory / FILE
        if not path.is_file():
            return cls()
        data = load_yaml(path)
        table: dict[str, dict[str, str]] = {}
        for rtype, row in strip_lines(data).items():
            if not isinstance(row, dict):
                raise ConfigError("a row is {message type or *: policy}", file=str(path), key=rtype)
            for feed, policy in row.items():
                if policy not in POLICIES:
                    raise ConfigError(
                        f"a write policy is one of {', '.join(POLICIES)}",
                        file=str(path),
                        key=f"{rtype}.{feed}",
                    )
            table[str(rtype)] = {str(k): str(v) for k, v in row.items()}
        return cls(table)
