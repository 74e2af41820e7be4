"""Connector and step discovery by config ``type:``, through entry-point groups.

Built-in connectors are declared in pyproject.toml like any third party's, so the
engine never imports a connector module by name (imports go downward only).
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

GROUPS = ("passerelle.sources", "passerelle.destinations", "passerelle.steps")

_extra: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}


def register(group: str, name: str, factory: Any) -> None:
    """Add a factory at run time (tests plug fakes in this way)."""
    _extra[group][name] = factory


def unregister(group: str, name: str) -> None:
    _extra[group].pop(name, None)


def available(group: str) -> list[str]:
    names = {ep.name for ep in entry_points(group=group)} | set(_extra[group])
    return sorted(names)


def lookup(group: str, name: str) -> Any | None:
    if name in _extra[group]:
        return _extra[group][name]
    for ep in entry_points(group=group, name=name):
        return ep.load()
    return None
