"""Who is calling: the caller identity that every protected route reads.

A request's credentials become a ``Caller`` once, in ``auth_middleware``; handlers ask
``caller_of(request)`` and decide with it (document masking, author-only delete, admin
routes). How a bearer credential becomes a ``Caller`` is an ``Authenticator``: a static
token table from config today; signed tokens plug in behind the same Protocol.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.core.errors import Forbidden, Unauthorized
from gateway.http.outcome import Handler


class Role(StrEnum):
    ADMIN = "admin"  # everything, configuration included
    OPERATOR = "operator"  # the admin API and console; may reveal masked data (audited)
    PROFESSIONAL = "professional"  # a health professional acting for a practitioner id
    PATIENT = "patient"  # a patient (or legal representative) reading their own record


@dataclass(frozen=True, slots=True)
class Caller:
    subject: str  # an opaque id for logs and audit, never a name
    role: Role
    practitioner: str | None = None  # e.g. "8|<RPPS>" for a professional
    patients: tuple[str, ...] = ()  # "system|value" identifiers a patient may read
    scopes: frozenset[str] = field(default_factory=frozenset)

    def has(self, *roles: Role) -> bool:
        return self.role in roles or self.role is Role.ADMIN


class Authenticator(Protocol):
    def authenticate(self, token: str) -> Caller | None:
        """The caller a bearer credential stands for, or None when it is not recognised."""
        ...


class TokenTable:
    """Static bearer tokens from config: ``auth.tokens: [{token, subject, role, ...}]``.

    Tokens are compared by SHA-256 digest in constant time so that the table held in memory
    is not a list of usable secrets; config may give ``token_sha256`` instead of ``token``.
    """

    def __init__(self, entries: Iterable[Mapping[str, Any]]) -> None:
        self._by_digest: dict[bytes, Caller] = {}
        for entry in entries:
            if "token_sha256" in entry:
                digest = bytes.fromhex(str(entry["token_sha256"]))
            else:
                digest = hashlib.sha256(str(entry["token"]).encode()).digest()
            self._by_digest[digest] = Caller(
                subject=str(entry["subject"]),
                role=Role(entry["role"]),
                practitioner=entry.get("practitioner"),
                patients=tuple(entry.get("patients", ())),
                scopes=frozenset(entry.get("scopes", ())),
            )

    def authenticate(self, token: str) -> Caller | None:
        digest = hashlib.sha256(token.encode()).digest()
        for known, caller in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                return caller
        return None


CALLER_KEY = "passerelle.caller"


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def caller_of(request: web.Request) -> Caller | None:
    """The authenticated caller, or None on an open route / when access control is off."""
    caller = request.get(CALLER_KEY)
    return caller if isinstance(caller, Caller) else None


def require(request: web.Request, *roles: Role) -> Caller:
    """The caller, who must hold one of ``roles`` (admin always does): 401 / 403 otherwise."""
    caller = caller_of(request)
    if caller is None:
        raise Unauthorized("a bearer token is required")
    if not caller.has(*roles):
        raise Forbidden(f"the {caller.role} role may not do this")
    return caller


def auth_middleware(
    authenticator: Authenticator | None, open_paths: Sequence[str] = ("/health", "/ready")
) -> Middleware:
    """Sets the caller on every request that carries a recognised credential.

    With no authenticator configured, requests carry no caller and routes that ``require``
    one answer 401. An unrecognised credential is a 401 on every route but the open ones.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in open_paths:
            return await handler(request)
        token = bearer_token(request)
        if token is not None:
            caller = authenticator.authenticate(token) if authenticator is not None else None
            if caller is None:
                raise Unauthorized("the bearer token is not recognised")
            request[CALLER_KEY] = caller
        return await handler(request)

    return middleware
