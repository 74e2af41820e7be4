"""FHIR REST destination: POSTs the channel's Bundle (or resource) to a remote FHIR server.

One aiohttp session per destination. 2xx → SENT; 408, 429, 5xx and connection
failures → retried (``Retry-After`` honoured); any other 4xx → ERROR without
retry, the server's OperationOutcome kept as the delivery's response.

The remote server does not know our merge write policy (gateway.store.merge), so a transaction
Bundle with merge entries is resolved here first: each merge entry's criteria are searched; no
match → a plain conditional PUT; one → ``PUT Type/id`` of the merged resource, guarded by
``ifMatch`` (a 409/412 answer is retried, and the retry reads again); more → a permanent error,
an ambiguous identity is never guessed. Our request extensions are not sent.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import orjson

from gateway.core.envelope import FHIR_JSON, Envelope
from gateway.core.errors import BadRequest, ConfigError, PermanentDeliveryError, RetryLater
from gateway.core.protocols import DeliveryResult
from gateway.core.status import Status
from gateway.core.tls import client_context
from gateway.fhir.resource import ID_RE, TYPE_RE
from gateway.store.merge import MERGE, Policy, is_policy_extension, merge_resource, strip_policy, write_policy

_RETRYABLE = frozenset({408, 429})
_CHANGED = frozenset({409, 412})  # after a merge: the resource changed since it was read
# Conditions of the original request that make no sense on the rewritten PUT Type/id.
_CONDITIONS = ("ifNoneExist", "ifMatch", "ifNoneMatch", "ifModifiedSince")
_MAX_RESPONSE = 1 << 20  # what is kept of an answer in the trace; an OperationOutcome is far smaller


class FhirRestDestination:
    """Implements ``gateway.core.protocols.Destination``."""

    CONFIG_SCHEMA: Mapping[str, Any] = {
        "type": "object",
        "required": ["base_url"],
        "properties": {
            "base_url": {"type": "string", "pattern": "^https?://"},
            "bearer_token_env": {"type": "string", "minLength": 1},
            "timeout_s": {"type": "number", "exclusiveMinimum": 0},
            "max_response_bytes": {"type": "integer", "minimum": 1024},
            # For https: the authorities to trust (system store otherwise), a client certificate.
            "tls": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "ca": {"type": "string"},
                    "cert": {"type": "string"},
                    "key": {"type": "string"},
                    "check_hostname": {"type": "boolean"},
                },
                "dependentRequired": {"cert": ["key"], "key": ["cert"]},
            },
        },
    }

    def __init__(self, name: str, settings: Mapping[str, Any]) -> None:
        self.name = name
        self.base_url = str(settings["base_url"]).rstrip("/")
        # The token is named by an environment variable: secrets stay out of config.yaml.
        self._token_env: str | None = settings.get("bearer_token_env")
        self.timeout = aiohttp.ClientTimeout(total=float(settings.get("timeout_s", 30)))
        self.max_response = int(settings.get("max_response_bytes", _MAX_RESPONSE))
        self._ssl: ssl.SSLContext | None = None
        if "tls" in settings:
            if not self.base_url.startswith("https://"):
                raise ConfigError("tls needs an https:// base_url", key=f"destinations.{name}.tls")
            self._ssl = client_context(settings["tls"], where=f"destinations.{name}.tls")
        self._session: aiohttp.ClientSession | None = None

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
        if self._token_env:
            token = os.environ.get(self._token_env)
            if not token:
                raise PermanentDeliveryError(f"the environment variable {self._token_env} is not set")
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl) if self._ssl is not None else None
            self._session = aiohttp.ClientSession(timeout=self.timeout, connector=connector)
        return self._session

    async def send(self, envelope: Envelope, payload: bytes) -> DeliveryResult:
        if "json" not in envelope.content_type and not payload.lstrip().startswith(b"{"):
            raise PermanentDeliveryError("this destination takes FHIR JSON; add a fhir_mapping step")
        try:
            data = orjson.loads(payload)
            kind = data.get("resourceType", "")
        except (orjson.JSONDecodeError, AttributeError) as exc:
            raise PermanentDeliveryError("the payload is not JSON") from exc
        if not isinstance(kind, str) or not TYPE_RE.fullmatch(kind):
            # the type becomes a URL segment: "../admin" or "Patient?x=" must never reach the server
            raise PermanentDeliveryError("the payload has no valid resourceType")
        url = self.base_url if kind == "Bundle" else f"{self.base_url}/{kind}"
        session = self._client()
        merging = kind == "Bundle" and _has_merge(data)
        if merging:
            payload = orjson.dumps(await self._resolve_merges(data))
        elif kind == "Bundle" and _carries_ours(data):
            # A remote server does not know our request extensions: they never leave the gateway.
            payload = orjson.dumps({**data, "entry": [_plain(e) for e in data["entry"]]})
        try:
            async with session.post(url, data=payload, headers=self._headers()) as resp:
                body = await _read_capped(resp, self.max_response)
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RetryLater(f"cannot reach the FHIR server: {type(exc).__name__}") from exc
        note = "" if body is not None else f" (answer over {self.max_response} bytes, not kept)"
        if 200 <= status < 300:
            return DeliveryResult(Status.SENT, f"{status}{note}", body, FHIR_JSON)
        if status in _RETRYABLE or status >= 500:
            raise RetryLater(f"FHIR server answered {status}", defer=_defer(retry_after))
        if merging and status in _CHANGED:
            raise RetryLater(f"FHIR server answered {status}: a merged resource changed meanwhile")
        return DeliveryResult(
            Status.ERROR, f"FHIR server answered {status}{note}", body, FHIR_JSON, retry=False
        )

    async def _resolve_merges(self, bundle: dict[str, Any]) -> dict[str, Any]:
        """``bundle`` with its merge entries made into what a standard server does as meant."""
        if bundle.get("type") != "transaction":
            # A batch answers a failed ifMatch inside a 200: the loss would go unseen.
            raise PermanentDeliveryError("merge entries are only sent in a transaction Bundle")
        entries: list[Any] = []
        for entry in bundle["entry"]:
            policy = _policy(entry)
            if policy is None:
                entries.append(entry)
                continue
            plain = strip_policy(entry["request"])
            if policy.kind == MERGE and plain.get("method") == "PUT":
                entries.append(await self._merged(entry, plain, policy))
            else:
                entries.append({**entry, "request": plain})
        return {**bundle, "entry": entries}

    async def _merged(self, entry: dict[str, Any], request: dict[str, Any], policy: Policy) -> dict[str, Any]:
        """One merge entry → a plain conditional PUT (nothing matches) or a guarded PUT Type/id."""
        url = request.get("url")
        resource = entry.get("resource")
        if not isinstance(url, str) or not isinstance(resource, dict):
            raise PermanentDeliveryError("a merge entry needs a request.url and a resource")
        path, _, query = url.lstrip("/").partition("?")
        type_, _, id_ = path.partition("/")
        if not TYPE_RE.fullmatch(type_) or (id_ and not ID_RE.fullmatch(id_)):
            raise PermanentDeliveryError(f"a merge entry's request.url is not Type/id or Type?query: {url!r}")
        params = [("_id", id_)] if id_ else parse_qsl(query, keep_blank_values=True)
        if not params:
            raise PermanentDeliveryError(f"a merge entry for {type_} has no criteria")
        count, found = await self._search(type_, params)
        if count > 1:
            raise PermanentDeliveryError(
                f"the merge criteria of a {type_} match several resources on the FHIR server:"
                " ambiguous identity, not guessed"
            )
        if found is None:
            return {**entry, "request": request}
        found_id = found.get("id")
        if not isinstance(found_id, str) or not ID_RE.fullmatch(found_id):
            raise PermanentDeliveryError(f"the FHIR server returned a {type_} without a valid id")
        put = {k: v for k, v in request.items() if k not in _CONDITIONS}
        put["url"] = f"{type_}/{found_id}"
        meta = found.get("meta")
        version = meta.get("versionId") if isinstance(meta, dict) else None
        if isinstance(version, str) and version:
            put["ifMatch"] = f'W/"{version}"'
        # Without a versionId (a server that does not version) the PUT cannot be guarded.
        return {
            **entry,
            "resource": merge_resource(found, resource, policy.clear, policy.keep),
            "request": put,
        }

    async def _search(self, type_: str, params: list[tuple[str, str]]) -> tuple[int, dict[str, Any] | None]:
        """(how many resources of ``type_`` the criteria match on the server, the first of them).

        Two are enough to know that the identity is ambiguous.
        """
        if not any(name == "_count" for name, _ in params):
            params = [*params, ("_count", "2")]
        headers = {k: v for k, v in self._headers().items() if k != "Content-Type"}
        try:
            async with self._client().get(f"{self.base_url}/{type_}", params=params, headers=headers) as resp:
                body = await _read_capped(resp, self.max_response)
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RetryLater(f"cannot reach the FHIR server: {type(exc).__name__}") from exc
        if status in _RETRYABLE or status >= 500:
            raise RetryLater(f"FHIR server answered {status} to a search", defer=_defer(retry_after))
        if status != 200 or body is None:
            raise PermanentDeliveryError(f"searching {type_} before a merge: FHIR server answered {status}")
        try:
            found = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise PermanentDeliveryError(f"searching {type_}: the answer is not JSON") from exc
        if not isinstance(found, dict) or found.get("resourceType") != "Bundle":
            raise PermanentDeliveryError(f"searching {type_}: the answer is not a Bundle")
        matches = [
            e["resource"]
            for e in found.get("entry") or []
            if isinstance(e, dict)
            and isinstance(e.get("resource"), dict)
            and e["resource"].get("resourceType") == type_
            and _mode(e) == "match"
        ]
        total = found.get("total")
        count = max(len(matches), total if isinstance(total, int) else 0)
        if count == 1 and not matches:
            raise PermanentDeliveryError(f"searching {type_}: the server counts a match it did not return")
        return count, matches[0] if matches else None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _has_merge(bundle: Mapping[str, Any]) -> bool:
    entries = bundle.get("entry")
    if not isinstance(entries, list):
        return False
    policies = [_policy(e) for e in entries]  # every one checked: a malformed one is final
    return any(p is not None and p.kind == MERGE for p in policies)


def _carries_ours(bundle: Mapping[str, Any]) -> bool:
    entries = bundle.get("entry")
    return isinstance(entries, list) and any(_policy(e) is not None for e in entries)


def _plain(entry: Any) -> Any:
    if isinstance(entry, dict) and isinstance(entry.get("request"), dict):
        return {**entry, "request": strip_policy(entry["request"])}
    return entry


def _policy(entry: Any) -> Policy | None:
    """An entry's write Policy; None when it carries nothing of ours, and a permanent error when
    what it carries is malformed."""
    request = entry.get("request") if isinstance(entry, dict) else None
    if not isinstance(request, dict):
        return None
    extensions = request.get("extension")
    if not isinstance(extensions, list) or not any(is_policy_extension(e) for e in extensions):
        return None
    try:
        return write_policy(request)
    except BadRequest as exc:
        raise PermanentDeliveryError(exc.message) from exc


def _mode(entry: dict[str, Any]) -> Any:
    search = entry.get("search")
    return search.get("mode", "match") if isinstance(search, dict) else "match"


def _defer(retry_after: str | None) -> float | None:
    return float(retry_after) if retry_after and retry_after.isdigit() else None


async def _read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The answer's body when it is at most ``limit`` bytes, else None: a huge (or endless)
    answer is neither held in memory nor stored in the trace."""
    if resp.content_length is not None and resp.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
