"""The HTTP server around the application: protocol-level errors as OperationOutcomes, and aiohttp's
own logging kept free of request lines and headers.

aiohttp answers what never reaches the application itself: a request line or header over the
limit, a malformed request, a handler that times out. Its default answer is ``text/plain`` that
echoes the start of the offending line, and its default logging writes a traceback whose message
quotes that line: a Patient search with a name, a birth date and an INS in its query, or an
``Authorization: Bearer …`` header. Here:

- ``GatewayRunner`` (an ``AppRunner``) serves the application with ``OutcomeRequestHandler``,
  whose ``handle_error`` answers an OperationOutcome (``application/fhir+json``) with the status
  aiohttp chose, says nothing of the request, and logs the error's type and status only;
- ``server_handler_args()`` (``build_app`` passes it as the application's ``handler_args``,
  so that it holds under any runner, aiohttp's test server included) gives the protocol a logger of
  its own, outside the logging hierarchy, that writes one PHI-free JSON line per record (what
  happened and the exception's type and frames, never a message or an argument), and turns
  aiohttp's access log off: its lines start with the request line.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from gateway.core.logging import describe_exception, get_logger
from gateway.http.outcome import error_response

log = get_logger("passerelle.http")


class _ToStructlog(logging.Handler):
    """A record of aiohttp's as a PHI-free event: its template and its exception's type only."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {"source": record.name, "level_no": record.levelno}
            # The template is aiohttp's constant text; the arguments (a peer, a line) are left out.
            fields["what"] = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
            if record.exc_info and record.exc_info[1] is not None:
                fields["error"] = describe_exception(record.exc_info[1])
            if record.levelno >= logging.ERROR:
                log.error("aiohttp_error", **fields)
            else:
                log.warning("aiohttp_warning", **fields)
        except Exception:  # noqa: BLE001, S110 - logging must never break the server that logs, and
            pass  # handleError() would print the record's arguments: the very text kept out of logs


def _protocol_logger() -> logging.Logger:
    """A logger of the HTTP protocol's own: not in the hierarchy, so that no handler of the root or
    of ``aiohttp.*`` ever sees its records (nor their arguments and tracebacks)."""
    logger = logging.Logger("aiohttp.server", logging.WARNING)
    logger.propagate = False
    logger.addHandler(_ToStructlog())
    return logger


PROTOCOL_LOG = _protocol_logger()


def server_handler_args() -> dict[str, Any]:
    """``handler_args`` for the application: the protocol logger above, and no access log."""
    return {"logger": PROTOCOL_LOG, "access_log": None}


def protocol_error(status: int, exc: BaseException | None) -> web.Response:
    """The answer to an error aiohttp meets before or around the application: an OperationOutcome
    that names no part of the request."""
    if isinstance(exc, LineTooLong):
        code, text = "too-long", "the request line or a header field is longer than this server accepts"
    elif isinstance(exc, BadHttpMessage) or status == 400:
        code, text = "structure", "the HTTP request is malformed"
    elif status == 504 or isinstance(exc, asyncio.TimeoutError):
        code, text = "timeout", "the request took too long"
    else:
        code, text = "exception", "internal error"
    response = error_response(status, code, text)
    response.force_close()
    return response


class OutcomeRequestHandler(RequestHandler):
    """aiohttp's protocol with its error answers as OperationOutcomes (see the module's text)."""

    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # ``message`` (aiohttp's text) quotes the request: neither logged nor sent.
        log.warning("http_protocol_error", status=status, error=type(exc).__name__ if exc else None)
        if request.writer.output_size > 0:
            raise ConnectionError("the response had started: no error answer can follow")
        return protocol_error(status, exc)


class OutcomeServer(web.Server):
    """A ``web.Server`` whose connections are ``OutcomeRequestHandler``s."""

    def __call__(self) -> RequestHandler:
        return OutcomeRequestHandler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` serving the application through ``OutcomeServer``: use it in place of
    ``web.AppRunner`` (same arguments)."""

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()  # the application started and frozen, as AppRunner does
        return OutcomeServer(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=made._loop,
            **made._kwargs,
        )
