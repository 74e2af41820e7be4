"""Auditing of the HTTP API, and ``GET /fhir/AuditEvent`` for operators.

Every /fhir interaction (read, search, create, update, delete, transaction) and every reveal
of masked data is recorded as an AuditEvent by ``audit_middleware`` / ``record_reveal``.
A read whose audit entry cannot be written is not answered (503): no unrecorded access.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.core.envelope import FHIR_JSON
from gateway.core.errors import BadRequest, NotFound, PasserelleError, StoreError
from gateway.core.logging import get_logger
from gateway.http.auth import caller_of
from gateway.http.fhir import add_capability
from gateway.http.outcome import Handler, error_response
from gateway.store.audit import (
    AUDIT_LOG_USED,
    INTERACTION,
    MINOR_FAILURE,
    REST,
    SERIOUS_FAILURE,
    SUCCESS,
    AuditLog,
    event,
    query_entity,
)

log = get_logger("passerelle.audit")

AUDIT: web.AppKey[AuditLog] = web.AppKey("audit", AuditLog)

# name → (FHIR type, what it matches); the CapabilityStatement is made from it.
SEARCH_PARAMS: dict[str, tuple[str, str]] = {
    "agent": ("token", "the agent's who.identifier value (the caller's subject)"),
    "action": ("token", "C R U D or E"),
    "date": ("date", "recorded; prefixes ge gt le lt"),
}
_SEARCH_PARAMS = frozenset({*SEARCH_PARAMS, "_count", "_cursor", "_format", "_pretty"})


def _outcome(status: int) -> str:
    if status < 400:
        return SUCCESS
    return MINOR_FAILURE if status < 500 else SERIOUS_FAILURE


def _interaction(method: str, parts: list[str]) -> tuple[str, str]:
    """(restful-interaction code, AuditEvent.action) for a path below /fhir."""
    if method == "POST" and not parts:
        return "transaction", "E"
    if method == "GET":
        if len(parts) <= 1:
            return "search-type" if parts else "search-system", "E"
        if parts[-1] == "_history":
            return "history-instance", "R"
        return ("vread" if "_history" in parts else "read"), "R"
    if method == "POST":
        return "create", "C"
    if method in ("PUT", "PATCH"):
        return ("patch" if method == "PATCH" else "update"), "U"
    if method == "DELETE":
        return "delete", "D"
    return "operation", "E"


def _who(request: web.Request) -> tuple[str, str | None]:
    caller = caller_of(request)
    if caller is None:
        return "anonymous", None
    return caller.subject, caller.role.value


async def _is_read(request: web.Request, parts: list[str]) -> bool:
    """Whether the request only reads: a GET, a POST search, or a Bundle whose entries are all GETs."""
    if request.method == "GET":
        return True
    if request.method != "POST":
        return False
    if parts and parts[-1] == "_search":
        return True
    if parts:
        return False
    try:
        data = orjson.loads(await request.read())  # already read (and cached) by the handler
    except Exception:  # noqa: BLE001 - an unreadable body is not a read; the handler answered it
        return False
    entries = data.get("entry") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        return False
    return all(
        isinstance(e, dict)
        and isinstance(e.get("request"), dict)
        and str(e["request"].get("method", "")).upper() == "GET"
        for e in entries
    )


def audit_middleware() -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        audit = request.app.get(AUDIT)
        path = request.path
        if (
            audit is None
            or not (path == "/fhir" or path.startswith("/fhir/"))
            or path == "/fhir/metadata"
            or path.startswith("/fhir/AuditEvent")
            or "/$export" in path  # gateway.http.bulk records its own kick-off, download and cancel
            or request.method in ("HEAD", "OPTIONS")
        ):
            return await handler(request)
        failure: BaseException | None = None
        try:
            response: web.StreamResponse | None = await handler(request)
            status = response.status if response is not None else 500
        except PasserelleError as exc:  # refused requests are audited too, then answered as before
            failure, response, status = exc, None, exc.http_status
        except web.HTTPException as exc:
            failure, response, status = exc, None, exc.status
        except Exception as exc:  # noqa: BLE001 - a crash is an access attempt too: audited, then re-raised
            failure, response, status = exc, None, 500
        parts = [p for p in path[len("/fhir") :].split("/") if p]
        code, action = _interaction(request.method, parts)
        entities: list[dict[str, Any]] = []
        if len(parts) >= 2:
            entities.append({"what": {"reference": f"{parts[0]}/{parts[1]}"}})
        elif code == "create" and response is not None and "Location" in response.headers:
            ref = response.headers["Location"].split("/fhir/", 1)[-1].split("/_history", 1)[0]
            entities.append({"what": {"reference": ref}})
        if request.query_string:
            entities.append(query_entity(request.query_string))
        who, role = _who(request)
        resource = event(
            type_=REST,
            subtype={"system": INTERACTION, "code": code},
            action=action,
            outcome=_outcome(status),
            who=who,
            role=role,
            address=request.remote,
            entities=entities,
        )
        try:
            await audit.write(resource)
        except StoreError as exc:
            log.error("audit_write_failed", path_kind=parts[0] if parts else "", error=exc.message)
            if action in ("R", "E") and await _is_read(request, parts):
                return error_response(503, "transient", "the access could not be audited; try again")
        if failure is not None:
            raise failure
        assert response is not None
        return response

    return middleware


async def record_reveal(request: web.Request, message_id: str, outcome_status: int) -> None:
    """A masked payload shown in clear: who, which message, when. Raises StoreError when unrecorded."""
    audit = request.app.get(AUDIT)
    if audit is None:
        raise StoreError("no audit log: revealing is disabled")
    who, role = _who(request)
    await audit.write(
        event(
            type_=REST,
            subtype={"system": INTERACTION, "code": "read"},
            action="R",
            outcome=_outcome(outcome_status),
            who=who,
            role=role,
            address=request.remote,
            description="reveal of masked message data",
            entities=[{"what": {"identifier": {"system": "urn:passerelle:message", "value": message_id}}}],
        )
    )


def _date_bound(value: str) -> tuple[str, float]:
    prefix = value[:2] if value[:2] in ("ge", "gt", "le", "lt") else "ge"
    text = value[2:] if value[:2] in ("ge", "gt", "le", "lt") else value
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise BadRequest(f"date must be an ISO date or date-time, got {text!r}", location="date") from exc
    if moment.tzinfo is None:
        moment = moment.astimezone()
    return prefix, moment.timestamp()


async def search_audit(request: web.Request) -> web.Response:
    audit = request.app.get(AUDIT)
    if audit is None:
        raise NotFound("no audit log is configured")
    unknown = sorted(set(request.query) - _SEARCH_PARAMS)
    if unknown:
        raise BadRequest(f"unknown search parameter {unknown[0]!r}", location=unknown[0])
    raw_count = request.query.get("_count", "50")
    if not raw_count.isdigit() or not 1 <= int(raw_count) <= 1000:
        raise BadRequest("_count must be an integer from 1 to 1000", location="_count")
    action = request.query.get("action")
    if action is not None and action not in ("C", "R", "U", "D", "E"):
        raise BadRequest("action is one of C, R, U, D, E", location="action")
    since = until = None
    for value in request.query.getall("date", []):
        prefix, ts = _date_bound(value)
        if prefix in ("ge", "gt"):
            since = ts
        else:
            until = ts
    cursor = request.query.get("_cursor")
    if cursor is not None and (not cursor.isascii() or not cursor.isdigit() or len(cursor) > 18):
        raise BadRequest("_cursor is the value a next link gives", location="_cursor")
    count = int(raw_count)
    # One more than a page: whether there is a next page, without counting the whole trail.
    rows = await audit.search(
        count=count + 1,
        agent=request.query.get("agent"),
        action=action,
        since=since,
        until=until,
        before_seq=int(cursor) if cursor is not None else None,
    )
    more = len(rows) > count
    rows = rows[:count]
    who, role = _who(request)
    await audit.write(
        event(
            type_=AUDIT_LOG_USED,
            action="E",
            outcome=SUCCESS,
            who=who,
            role=role,
            address=request.remote,
            entities=[query_entity(urlencode(list(request.query.items())))] if request.query else [],
        )
    )
    base = f"{request.url.origin()}/fhir/AuditEvent"
    links = [{"relation": "self", "url": str(request.url)}]
    if more:
        kept = [(k, v) for k, v in request.query.items() if k not in ("_count", "_cursor")]
        query = urlencode([*kept, ("_count", count), ("_cursor", rows[-1][0])])
        links.append({"relation": "next", "url": f"{base}?{query}"})
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if cursor is None and not more:
        bundle["total"] = len(rows)  # the whole result is this page; otherwise not counted
    bundle["link"] = links
    bundle["entry"] = [{"fullUrl": f"{base}/{r['id']}", "resource": r} for _, r in rows]
    return web.Response(body=orjson.dumps(bundle), content_type=FHIR_JSON)


async def read_audit(request: web.Request) -> web.Response:
    audit = request.app.get(AUDIT)
    if audit is None:
        raise NotFound("no audit log is configured")
    resource = await audit.get(request.match_info["id"])
    if resource is None:
        raise NotFound(f"no AuditEvent {request.match_info['id']}")
    return web.Response(body=orjson.dumps(resource), content_type=FHIR_JSON)


def add_audit_routes(app: web.Application, audit: AuditLog | None) -> None:
    """Registered before the generic /fhir/{type} routes, which would otherwise take these paths."""
    if audit is not None:
        app[AUDIT] = audit
    app.router.add_get("/fhir/AuditEvent", search_audit)
    app.router.add_get("/fhir/AuditEvent/{id}", read_audit)
    add_capability(
        app,
        {
            "type": "AuditEvent",
            "documentation": "The gateway's own hash-chained audit trail: operators and admins, read only;"
            " _count up to 1000",
            "interaction": [{"code": "read"}, {"code": "search-type"}],
            "versioning": "no-version",
            "readHistory": False,
            "updateCreate": False,
            "conditionalCreate": False,
            "conditionalUpdate": False,
            "conditionalDelete": "not-supported",
            "searchParam": [
                {"name": name, "type": kind, "documentation": doc}
                for name, (kind, doc) in SEARCH_PARAMS.items()
            ],
        },
    )
