"""Namespaces: the FHIR ``system`` of every business identifier the mappings key resources on.

Hospitals reuse numbers (two labs both have a filler number 456), so a resource is only ever found
again by a namespaced identifier, never by a bare value. The system of an identifier comes from:

1. its assigning authority (CX-4, EI-2..4, XCN-9, an HD): an OID (``ISO``, or an OID-shaped universal
   id with no type) becomes ``urn:oid:…``; a URI (``URI``/``URL``) is taken as it is; a UUID becomes
   ``urn:uuid:…``;
2. else the authority's namespace id or universal id looked up in ``namespaces.authorities`` of
   config.yaml (the sender's own ``authorities`` first): a system, or one system per kind;
3. else a FINESS-typed authority (HD-3 ``M`` legal entity, ``N`` site): national and unambiguous, so
   a system is derived from it (``urn:passerelle:finess:…``), with a warning asking for its OID;
4. else the sender's namespace from ``namespaces.senders`` (keyed by MSH-3.1^MSH-4.1, MSH-4.1 or
   MSH-4.2): its ``systems`` per kind, or ``<system>/<kind>``;
5. else, when the channel says ``missing_namespace: sender``, a system derived from the sending
   facility and application (``urn:passerelle:sender:…``), with a warning;
6. else the message is refused (AE, ERR-3 103) with the field named.

Derived systems carry the identifier's kind (patient, visit, movement, filler-order…): one
authority may number several kinds of things, which must not collide inside one resource type.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote

from gateway.core.errors import ConfigError, UnknownNamespace

POLICIES: Final = ("reject", "sender")
_OID: Final = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
_UUID: Final = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}")
_URI: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:\S+")
_KIND: Final = re.compile(r"[a-z][a-z0-9-]*")
_FINESS_TYPES: Final = {"M": "ej", "N": "eg"}


def is_oid(text: str) -> bool:
    return _OID.fullmatch(text) is not None


def is_kind(text: str) -> bool:
    return _KIND.fullmatch(text) is not None


def _part(text: str) -> str:
    """A piece of a derived URN: letters, digits and ``-._~`` kept, the rest percent-encoded."""
    return quote(text, safe="-._~")


@dataclass(frozen=True, slots=True)
class Authority:
    """An assigning authority as the message wrote it (an HD: namespace id, universal id, its type)."""

    namespace: str = ""
    universal: str = ""
    type: str = ""

    def __bool__(self) -> bool:
        return bool(self.namespace or self.universal)

    def key(self) -> str:
        """The authority as a piece of a derived system: its three parts, each kept readable."""
        return ":".join(_part(p) for p in (self.namespace, self.universal, self.type)).rstrip(":")

    def verbatim(self) -> frozenset[str]:
        """The parts ``key`` carries as they are written (not percent-encoded): those reach the
        output through a derived system; the others stay in the unmapped report."""
        parts = (("namespace", self.namespace), ("universal", self.universal), ("type", self.type))
        return frozenset(name for name, text in parts if text and _part(text) == text)

    def describe(self) -> str:
        """For warnings and errors: the authority's own codes, never patient data."""
        parts = [p for p in (self.namespace, self.universal, self.type) if p]
        return "&".join(parts) if parts else "(none)"


@dataclass(frozen=True, slots=True)
class Resolved:
    system: str
    note: str | None = None  # a warning for the message when the system had to be derived
    # The parts of the authority the system carries (namespace, universal, type): what of the
    # message reaches the output through it.
    used: frozenset[str] = frozenset()


_UNIVERSAL = frozenset({"universal", "type"})


@dataclass(frozen=True, slots=True)
class _Sender:
    system: str | None = None
    systems: Mapping[str, str] = field(default_factory=dict)
    authorities: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Namespaces:
    """The deployment's namespace table and a channel's policy for what it cannot resolve."""

    authorities: Mapping[str, Any] = field(default_factory=dict)
    senders: Mapping[str, _Sender] = field(default_factory=dict)
    policy: str = "reject"

    @classmethod
    def from_config(cls, data: Mapping[str, Any] | None, policy: str = "reject") -> Namespaces:
        """``namespaces:`` of config.yaml (already checked by its JSON schema) and a channel's policy."""
        if policy not in POLICIES:
            raise ConfigError(
                f"missing_namespace must be one of {', '.join(POLICIES)}", key="missing_namespace"
            )
        data = data or {}
        senders = {
            str(key): _Sender(
                entry.get("system"), dict(entry.get("systems") or {}), dict(entry.get("authorities") or {})
            )
            for key, entry in (data.get("senders") or {}).items()
        }
        return cls(dict(data.get("authorities") or {}), senders, policy)

    def resolve(
        self,
        kind: str,
        authority: Authority,
        sender: Callable[[], tuple[str, str, str]],
        where: str | Callable[[], str],
    ) -> Resolved:
        """The system of an identifier of ``kind`` whose assigning authority is ``authority``.

        ``sender``: gives (MSH-3.1, MSH-4.1, MSH-4.2), asked only when needed. ``where``: the field,
        for the refusal.
        Raises UnknownNamespace when nothing resolves and the policy is ``reject``.
        """
        native = _native(authority)
        if native is not None:
            return Resolved(native, used=_UNIVERSAL)
        if not isinstance(where, str):
            where = where()
        who = sender()
        entry = self._sender(who)
        for table in (entry.authorities if entry else {}, self.authorities):
            for key, part in ((authority.namespace, "namespace"), (authority.universal, "universal")):
                if key and key in table:
                    found = _for_kind(table[key], kind)
                    if found is not None:
                        return Resolved(found, used=frozenset({part}))
        finess = _FINESS_TYPES.get(authority.type.upper())
        if finess is not None and authority.universal:
            system = f"urn:passerelle:finess:{finess}:{_part(authority.universal)}:{kind}"
            return Resolved(
                system,
                f"{where}: assigning authority {authority.describe()} has no OID; system derived from its "
                "FINESS (declare it in namespaces.authorities of config.yaml)",
                _UNIVERSAL,
            )
        # Derived from the sender: the whole authority (its name, universal id and type, whatever
        # they are) goes into the system, so that two authorities never share one.
        suffix = f"/{authority.key()}" if authority else ""
        used = authority.verbatim()
        if entry is not None:
            # The sender's own numbers (no authority at all) are in its system for that kind.
            if not authority and kind in entry.systems:
                return Resolved(entry.systems[kind])
            if entry.system:
                return Resolved(f"{entry.system.rstrip('/')}/{kind}{suffix}", used=used)
        application, facility, facility_id = who
        owner = facility_id or facility
        if self.policy == "sender" and (owner or application):
            system = f"urn:passerelle:sender:{_part(owner)}:{_part(application)}:{kind}"
            if authority:
                system += f":{authority.key()}"
            return Resolved(
                system,
                f"{where}: assigning authority {authority.describe()} not known; system derived from the "
                "sender (declare it in namespaces.authorities or namespaces.senders of config.yaml)",
                used,
            )
        raise UnknownNamespace(
            f"{where}: no namespace for this {kind} identifier (assigning authority {authority.describe()}); "
            "declare it in namespaces.authorities or namespaces.senders of config.yaml",
            location=where,
        )

    def _sender(self, sender: tuple[str, str, str]) -> _Sender | None:
        application, facility, facility_id = sender
        for key in (f"{application}^{facility}", facility, facility_id):
            if key and key != "^" and key in self.senders:
                return self.senders[key]
        return None


def _native(authority: Authority) -> str | None:
    """A system the authority names by itself (OID, URI, UUID), or None."""
    return _native_system(authority.universal, authority.type)


@functools.lru_cache(maxsize=4096)
def _native_system(universal: str, kind_code: str) -> str | None:
    uid, kind = universal.strip(), kind_code.strip().upper()
    if not uid:
        return None
    if kind in ("ISO", "") and _OID.fullmatch(uid):
        return f"urn:oid:{uid}"
    if kind in ("URI", "URL") and _URI.fullmatch(uid):
        return uid
    if kind in ("UUID", "GUID") and _UUID.fullmatch(uid):
        h = uid.replace("-", "").lower()
        return f"urn:uuid:{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    return None


def _for_kind(value: Any, kind: str) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        found = value.get(kind, value.get("*"))
        return str(found) if found is not None else None
    return None
