"""Every HTTP error leaves as a FHIR OperationOutcome with the right status."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from gateway.core.envelope import FHIR_JSON
from gateway.core.errors import HttpError, PasserelleError
from gateway.core.logging import get_logger
from gateway.fhir.outcome import issue, outcome

log = get_logger("passerelle.http")


def operation_outcome(code: str, text: str, *, severity: str = "error", location: str | None = None) -> bytes:
    return orjson.dumps(outcome(issue(code, text, severity=severity, location=location)))


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
    406: "not-supported",
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


class NotAcceptable(HttpError):
    """The caller asks for a format this server does not write (only FHIR JSON)."""

    http_status = 406
    fhir_issue_code = "not-supported"


# What ``_format`` may say for JSON (FHIR R4: json, the MIME types, the old DSTU2 one).
JSON_FORMATS = frozenset({"json", "application/json", "application/fhir+json", "application/json+fhir"})


def _media_type(text: str) -> str:
    return text.split(";", 1)[0].strip().lower()


def accepts_json(accept: str) -> bool:
    """Whether an Accept header admits JSON (no header, ``*/*`` and ``application/*`` do)."""
    ranges = [_media_type(part) for part in accept.split(",") if part.strip()]
    return not ranges or any(
        r in JSON_FORMATS or r in ("*/*", "application/*") or r.endswith("+json") for r in ranges
    )


@web.middleware
async def format_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """/fhir speaks FHIR JSON only: another ``_format`` or an Accept without JSON is 406 (an
    ITI-68 ``Binary/{id}`` read answers the document's own type, whatever Accept says). A body
    in another format is the handlers' 415."""
    path = request.path
    if path == "/fhir" or path.startswith("/fhir/"):
        fmt = request.query.get("_format")
        # An unencoded "+" (application/fhir+json) arrives as a space.
        if fmt and _media_type(fmt.replace(" ", "+")) not in JSON_FORMATS:
            raise NotAcceptable(f"_format={fmt}: this server answers FHIR JSON only", location="_format")
        accept = request.headers.get("Accept", "")
        # ITI-68 answers the document's own type; an export's files are NDJSON.
        own_format = path.startswith(("/fhir/Binary/", "/fhir/$export-file/"))
        if fmt is None and not own_format and not accepts_json(accept):
            raise NotAcceptable("Accept: this server answers FHIR JSON only (application/fhir+json)")
    return await handler(request)
