"""Per-client request rate: a token bucket per authenticated caller (else per address) → 429."""

from __future__ import annotations

import time
from collections import OrderedDict

from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.config import RateLimit
from gateway.core.errors import TooManyRequests
from gateway.http.auth import Authenticator, bearer_token
from gateway.http.outcome import Handler, error_response

_EXEMPT = frozenset({"/health", "/ready"})


class TokenBuckets:
    """``rate`` requests per second with bursts of ``burst``; at most ``max_clients`` tracked
    (least recently seen forgotten first), so a flood of new clients cannot grow memory."""

    def __init__(self, rate: float, burst: int, max_clients: int = 10_000) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, now: float | None = None) -> float:
        """0 when the request may go ahead, else the seconds to wait for a token."""
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait


def client_key(request: web.Request, authenticator: Authenticator | None = None) -> str:
    """A recognised caller has its own bucket; anything else (no token, an unknown or forged
    one) shares its address's bucket, so rotating made-up tokens buys no extra requests."""
    token = bearer_token(request)
    if token is not None and authenticator is not None:
        caller = authenticator.authenticate(token)
        if caller is not None:
            return "s:" + caller.subject
    return "a:" + (request.remote or "?")


def rate_limit_middleware(settings: RateLimit, authenticator: Authenticator | None = None) -> Middleware:
    buckets = TokenBuckets(settings.requests_per_s, settings.burst)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in _EXEMPT:
            wait = buckets.take(client_key(request, authenticator))
            if wait > 0:
                exc = TooManyRequests("too many requests; slow down", retry_after=wait)
                resp = error_response(exc.http_status, exc.fhir_issue_code, exc.message)
                resp.headers["Retry-After"] = str(max(1, int(exc.retry_after + 0.999)))
                return resp
        return await handler(request)

    return middleware
