"""Routes: /health, /ready and the admin API under /api."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import urlencode

from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.config import RateLimit
from gateway.core.envelope import HL7_V2
from gateway.core.errors import BadRequest, Conflict, NotFound
from gateway.core.protocols import MessageStore
from gateway.core.status import Status
from gateway.http.audit import add_audit_routes, audit_middleware, record_reveal
from gateway.http.auth import Authenticator, Role, auth_middleware, require
from gateway.http.bulk import add_bulk_routes
from gateway.http.console import add_console_routes
from gateway.http.console_api import add_console_api_routes
from gateway.http.documents import add_document_routes
from gateway.http.fhir import add_fhir_routes
from gateway.http.limits import rate_limit_middleware
from gateway.http.masking import mask_hl7, payload_text
from gateway.http.metrics import MetricsSource, add_metrics_route
from gateway.http.outcome import format_middleware, json_response, outcome_middleware
from gateway.http.server import server_handler_args
from gateway.store.audit import AuditLog
from gateway.store.fhir_common import FhirRepository


class Runtime(Protocol):
    """What the HTTP layer needs from the running gateway."""

    @property
    def store(self) -> MessageStore: ...

    @property
    def fhir(self) -> FhirRepository: ...

    async def replay(self, message_id: str) -> bool: ...

    async def readiness(self) -> Mapping[str, Any]: ...

    def snapshot(self) -> Mapping[str, Any]: ...


RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime", Runtime)


def build_app(
    runtime: Runtime,
    *,
    max_body_bytes: int = 32 * 1024 * 1024,
    authenticator: Authenticator | None = None,
    audit: AuditLog | None = None,
    metrics: MetricsSource | None = None,
    rate_limit: RateLimit | None = None,
    documents: Mapping[str, Any] | None = None,
    console: Mapping[str, Any] | None = None,
    bulk: Mapping[str, Any] | None = None,
) -> web.Application:
    """Access control is always on: without an authenticator only /health, /ready and the
    console's static files answer; everything else is 401.

    Serve it with ``gateway.http.server.GatewayRunner`` (in place of ``web.AppRunner``): errors
    aiohttp answers itself (a request line or header over the limit...) are OperationOutcomes.
    """
    middlewares: list[Middleware] = [outcome_middleware]
    if rate_limit is not None:
        middlewares.append(rate_limit_middleware(rate_limit, authenticator))
    middlewares += [auth_middleware(authenticator), audit_middleware(), format_middleware]
    # aiohttp's protocol logs through a PHI-free logger of its own, and keeps no access log (its
    # lines begin with the request line: a query with names and INS). See gateway.http.server.
    app = web.Application(
        middlewares=middlewares, client_max_size=max_body_bytes, handler_args=server_handler_args()
    )
    app[RUNTIME] = runtime
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/api/messages", list_messages)
    app.router.add_get("/api/messages/{id}", get_message)
    app.router.add_post("/api/messages/{id}/replay", replay)
    app.router.add_get("/api/stats", stats)
    app.router.add_get("/api/dlq", dead_letters)
    app.router.add_post("/api/dlq/{id}/replay", replay)
    app.router.add_post("/api/dlq/{id}/discard", discard)
    add_metrics_route(app, metrics)
    add_console_routes(app)
    add_console_api_routes(app, runtime, console)  # after the metrics route: its plots sample it
    add_bulk_routes(app, runtime.fhir, bulk)  # $export (settings or None): before every other /fhir route
    add_audit_routes(app, audit)  # before /fhir/{type}, which would take /fhir/AuditEvent
    add_document_routes(app, runtime.fhir, documents)  # the MHD routes, before the generic /fhir ones
    add_fhir_routes(app, runtime.fhir)
    return app


async def health(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    checks = await request.app[RUNTIME].readiness()
    ok = all(c.get("ok") for c in checks.values())
    return json_response({"status": "ready" if ok else "not-ready", "checks": checks}, 200 if ok else 503)


def _int(
    request: web.Request, name: str, default: int | None, *, low: int = 1, high: int = 1000
) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise BadRequest(f"{name} must be an integer", location=name) from exc
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}", location=name)
    return value


async def list_messages(request: web.Request) -> web.Response:
    status = request.query.get("status") or None
    if status is not None and status not in Status.__members__:
        raise BadRequest(
            f"unknown status {status!r}; one of {', '.join(Status.__members__)}", location="status"
        )
    limit = _int(request, "limit", 50) or 50
    before = _int(request, "before", None, low=1, high=2**62)
    since, until = _instant(request, "since"), _instant(request, "until")
    if since is not None and until is not None and since > until:
        raise BadRequest("since is after until", location="since")
    rows = await request.app[RUNTIME].store.list_messages(
        status=status,
        control_id=request.query.get("control_id") or None,
        channel=request.query.get("channel") or None,
        limit=limit,
        before_seq=before,
        since=since,
        until=until,
    )
    body: dict[str, Any] = {"messages": rows}
    if len(rows) == limit:
        # The next page keeps every filter; only the position moves.
        kept = [(k, v) for k, v in request.query.items() if k not in ("before", "limit")]
        body["next"] = "/api/messages?" + urlencode([*kept, ("before", rows[-1]["seq"]), ("limit", limit)])
    return json_response(body)


def _instant(request: web.Request, name: str) -> float | None:
    """An ISO 8601 instant (date, time and offset, e.g. 2024-05-14T10:00:00Z) as epoch seconds."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    # An unencoded "+02:00" arrives as " 02:00" (form encoding); the T separator is required anyway.
    text = raw.replace(" ", "+")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise BadRequest(
            f"{name} must be an ISO 8601 instant, e.g. 2024-05-14T10:00:00Z", location=name
        ) from exc
    if moment.tzinfo is None or "T" not in text.upper():
        raise BadRequest(f"{name} needs a time and a UTC offset (Z or ±hh:mm)", location=name)
    return moment.timestamp()


async def get_message(request: web.Request) -> web.Response:
    reveal = request.query.get("reveal", "").lower() in ("1", "true", "yes")
    if reveal:
        require(request, Role.OPERATOR)
    msg = await request.app[RUNTIME].store.get_message(request.match_info["id"], with_payloads=True)
    if reveal:
        # Recorded before anything is shown: an unaudited reveal does not happen (StoreError → 503).
        await record_reveal(request, request.match_info["id"], 200 if msg is not None else 404)
    if msg is None:
        raise NotFound(f"no message {request.match_info['id']}")
    charset = msg.get("charset") or "ASCII"

    def show(data: bytes | None, content_type: str | None) -> str | None:
        if data is None:
            return None
        if reveal:
            return payload_text(data, charset)
        if content_type in (None, HL7_V2):
            return mask_hl7(data, charset)
        return f"<{len(data)} bytes masked>"

    msg["raw"] = show(msg.get("raw"), msg.get("content_type"))
    for stage in msg["stages"]:
        stage["payload"] = show(stage.get("payload"), stage.get("content_type"))
    msg["masked"] = not reveal
    return json_response(msg)


async def replay(request: web.Request) -> web.Response:
    mid = request.match_info["id"]
    store = request.app[RUNTIME].store
    found = await store.get_message(mid, with_payloads=False)
    if found is None:
        raise NotFound(f"no message {mid}")
    if str(found.get("channel") or "").startswith("source:"):
        raise Conflict(
            f"message {mid} was refused at intake (no channel took it; its bytes are kept as evidence): "
            "the sender sends it again, corrected"
        )
    if not await request.app[RUNTIME].replay(mid):
        raise Conflict(
            f"message {mid} cannot be replayed (payload pruned by retention, or not a channel message)"
        )
    return json_response({"id": mid, "status": Status.RECEIVED.value}, 202)


async def stats(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    data = await runtime.store.stats()
    data["runtime"] = runtime.snapshot()
    return json_response(data)


async def dead_letters(request: web.Request) -> web.Response:
    limit = _int(request, "limit", 100) or 100
    rows = await request.app[RUNTIME].store.dead_letters(request.query.get("channel") or None, limit)
    return json_response({"messages": rows})


async def discard(request: web.Request) -> web.Response:
    mid = request.match_info["id"]
    if not await request.app[RUNTIME].store.discard(mid):
        raise NotFound(f"no dead message {mid} to discard")
    return json_response({"id": mid, "discarded": True})
