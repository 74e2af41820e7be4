"""Every HTTP error leaves as a FHIR OperationOutcome with the right status."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from gateway.core.envelope import FHIR_JSON
from gateway.core.errors import PasserelleError
from gateway.core.logging import get_logger

log = get_logger("passerelle.http")


def operation_outcome(code: str, text: str, *, severity: str = "error", location: str | None = None) -> bytes:
    issue: dict[str, object] = {"severity": severity, "code": code, "diagnostics": text}
    if location:
        issue["expression"] = [location]
    return orjson.dumps({"resourceType": "OperationOutcome", "issue": [issue]})


def error_response(status: int, code: str, text: str, location: str | None = None) -> web.Response:
    return web.Response(
        status=status, body=operation_outcome(code, text, location=location), content_type=FHIR_JSON
    )


_HTTP_CODES = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    409: "conflict",
    413: "too-long",
    415: "not-supported",
    422: "processing",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def outcome_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except PasserelleError as exc:
        return error_response(exc.http_status, exc.fhir_issue_code, exc.message, exc.location)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, _HTTP_CODES.get(exc.status, "exception"), exc.reason)
    except Exception as exc:
        log.exception("http_unhandled", path=request.path, error=type(exc).__name__)
        return error_response(500, "exception", "internal error")


def json_response(data: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")
