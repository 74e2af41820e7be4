"""FHIR REST destination: POSTs the channel's Bundle (or resource) to a remote FHIR server.

One aiohttp session per destination. 2xx → SENT; 408, 429, 5xx and connection
failures → retried (``Retry-After`` honoured); any other 4xx → ERROR without
retry, the server's OperationOutcome kept as the delivery's response.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson

from gateway.core.envelope import FHIR_JSON, Envelope
from gateway.core.errors import ConfigError, PermanentDeliveryError, RetryLater
from gateway.core.protocols import DeliveryResult
from gateway.core.status import Status
from gateway.core.tls import client_context
from gateway.store.fhir_common import TYPE_RE

_RETRYABLE = frozenset({408, 429})
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

    async def send(self, envelope: Envelope, payload: bytes) -> DeliveryResult:
        if "json" not in envelope.content_type and not payload.lstrip().startswith(b"{"):
            raise PermanentDeliveryError("this destination takes FHIR JSON; add a fhir_mapping step")
        try:
            kind = orjson.loads(payload).get("resourceType", "")
        except (orjson.JSONDecodeError, AttributeError) as exc:
            raise PermanentDeliveryError("the payload is not JSON") from exc
        if not isinstance(kind, str) or not TYPE_RE.fullmatch(kind):
            # the type becomes a URL segment: "../admin" or "Patient?x=" must never reach the server
            raise PermanentDeliveryError("the payload has no valid resourceType")
        url = self.base_url if kind == "Bundle" else f"{self.base_url}/{kind}"
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl) if self._ssl is not None else None
            self._session = aiohttp.ClientSession(timeout=self.timeout, connector=connector)
        try:
            async with self._session.post(url, data=payload, headers=self._headers()) as resp:
                body = await _read_capped(resp, self.max_response)
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RetryLater(f"cannot reach the FHIR server: {type(exc).__name__}") from exc
        note = "" if body is not None else f" (answer over {self.max_response} bytes, not kept)"
        if 200 <= status < 300:
            return DeliveryResult(Status.SENT, f"{status}{note}", body, FHIR_JSON)
        if status in _RETRYABLE or status >= 500:
            defer = float(retry_after) if retry_after and retry_after.isdigit() else None
            raise RetryLater(f"FHIR server answered {status}", defer=defer)
        return DeliveryResult(
            Status.ERROR, f"FHIR server answered {status}{note}", body, FHIR_JSON, retry=False
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


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
