"""Who is calling: the caller identity that every protected route reads.

A request's credentials become a ``Caller`` once, in ``auth_middleware``; handlers ask
``caller_of(request)`` and decide with it (document masking, author-only delete, admin
routes). How a bearer credential becomes a ``Caller`` is an ``Authenticator``: a static
token table from config, signed JWTs (HS256/RS256), or both. ``auth_middleware`` applies
the per-route rules (``DEFAULT_RULES``) before any handler runs.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import jwt
from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.config import AuthSettings
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


CALLER_KEY: web.RequestKey[Caller] = web.RequestKey("passerelle.caller", Caller)


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


class JwtAuthenticator:
    """Signed bearer tokens (JWT, HS256 or RS256) from keys in config.

    Claims: ``sub`` (an opaque id), ``role``, and for a professional ``practitioner``, for a
    patient ``patients`` (a list of "system|value"); ``scope`` is a space-separated list.
    ``exp`` is required: a token that never expires is refused.
    """

    def __init__(self, settings: Mapping[str, Any], *, base_dir: Path | None = None) -> None:
        self._keys: list[tuple[str, Any]] = []
        for spec in settings.get("keys", ()):
            algorithm = str(spec["algorithm"])
            if algorithm == "HS256":
                secret = spec.get("secret") or _read(spec["secret_file"], base_dir)
                self._keys.append((algorithm, secret.encode() if isinstance(secret, str) else secret))
            else:
                pem = spec.get("public_key") or _read(spec["public_key_file"], base_dir)
                self._keys.append((algorithm, pem))
        self.issuer: str | None = settings.get("issuer")
        self.audience: str | None = settings.get("audience")
        self.leeway = float(settings.get("leeway_s", 30))

    def authenticate(self, token: str) -> Caller | None:
        if token.count(".") != 2:
            return None
        for algorithm, key in self._keys:
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=[algorithm],  # pinned per key: no "alg: none", no HS/RS confusion
                    issuer=self.issuer,
                    audience=self.audience,
                    leeway=self.leeway,
                    options={"require": ["exp", "sub"], "verify_aud": self.audience is not None},
                )
            except jwt.PyJWTError:
                continue
            return _caller_from_claims(claims)
        return None


def _read(path: str, base_dir: Path | None) -> str:
    p = Path(path)
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return p.read_text("utf-8")


def _qualified(identifier: str) -> bool:
    system, sep, value = identifier.partition("|")
    return bool(sep and system and value)


def _caller_from_claims(claims: Mapping[str, Any]) -> Caller | None:
    try:
        role = Role(str(claims.get("role", "")))
    except ValueError:
        return None
    patients = claims.get("patients") or []
    if not isinstance(patients, list) or not all(isinstance(p, str) and _qualified(p) for p in patients):
        return None  # a bare value would match the same number in any other identifier system
    scope = claims.get("scope", "")
    return Caller(
        subject=str(claims["sub"]),
        role=role,
        practitioner=str(claims["practitioner"]) if claims.get("practitioner") else None,
        patients=tuple(patients),
        scopes=frozenset(str(scope).split()) if isinstance(scope, str) else frozenset(),
    )


class Authenticators:
    """Several authenticators tried in turn (static table, then signed tokens)."""

    def __init__(self, *members: Authenticator) -> None:
        self.members = list(members)

    def authenticate(self, token: str) -> Caller | None:
        for member in self.members:
            caller = member.authenticate(token)
            if caller is not None:
                return caller
        return None


def ensure_admin_token(path: Path) -> str:
    """The first-start admin token: read from ``path``, or made at random and written there (0600)."""
    try:
        token = path.read_text("ascii").strip()
    except FileNotFoundError:
        token = ""
    if len(token) >= 32:
        return token
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, token.encode("ascii") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return token


def build_authenticator(
    auth: AuthSettings, *, base_dir: Path | None = None
) -> tuple[Authenticator, Path | None]:
    """The authenticator config describes, plus the admin-token file when one had to be made."""
    members: list[Authenticator] = [TokenTable(auth.tokens)]
    if auth.jwt is not None:
        members.append(JwtAuthenticator(auth.jwt, base_dir=base_dir))
    written: Path | None = None
    if not auth.has_admin_credential:
        written = auth.admin_token_file
        token = ensure_admin_token(written)
        members.append(TokenTable([{"token": token, "subject": "local-admin", "role": Role.ADMIN.value}]))
    return Authenticators(*members), written


@dataclass(frozen=True, slots=True)
class Rule:
    """Who may call paths under ``prefix``: nobody needs a token when ``roles`` is None,
    any authenticated caller when it is empty, else one of ``roles`` (admin always may)."""

    prefix: str
    roles: tuple[Role, ...] | None


# First match wins; an unlisted path needs an authenticated caller.
DEFAULT_RULES: tuple[Rule, ...] = (
    Rule("/health", None),
    Rule("/ready", None),
    Rule("/console", None),  # static files only: every datum they show comes from /api
    Rule("/fhir/metadata", None),  # the CapabilityStatement is public, as FHIR servers make it
    Rule("/fhir/AuditEvent", (Role.OPERATOR,)),
    Rule("/fhir", ()),
    Rule("/api", (Role.OPERATOR,)),
    Rule("/metrics", (Role.OPERATOR,)),
)


def rule_for(path: str, rules: Sequence[Rule] = DEFAULT_RULES) -> Rule:
    for rule in rules:
        if path == rule.prefix or path.startswith(rule.prefix + "/"):
            return rule
    return Rule(path, ())


def auth_middleware(authenticator: Authenticator | None, rules: Sequence[Rule] = DEFAULT_RULES) -> Middleware:
    """Access control, on for every route: the caller is set from the bearer token, then the
    route's rule applies (401 without a recognised token, 403 without a fitting role).

    With no authenticator every protected route answers 401: a gateway is never open by default.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        rule = rule_for(request.path, rules)
        token = bearer_token(request)
        if token is not None:
            caller = authenticator.authenticate(token) if authenticator is not None else None
            if caller is None:
                if rule.roles is None:
                    return await handler(request)  # an open route ignores a stale token
                raise Unauthorized("the bearer token is not recognised")
            request[CALLER_KEY] = caller
        if rule.roles is not None:
            require(request, *(rule.roles or tuple(Role)))  # () = any authenticated caller
        return await handler(request)

    return middleware
