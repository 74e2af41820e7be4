"""Logging is configured once: JSON lines, context variables first, PHI-free by contract.

Callers bind ids and codes only (message id, channel, control id, peer); payloads,
names, identifiers and birth dates never reach a log call.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import MutableMapping
from typing import Any, TextIO

import orjson
import structlog


def _dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default).decode()


def _exc_info_of(value: Any) -> BaseException | None:
    if isinstance(value, BaseException):
        return value
    if isinstance(value, tuple) and len(value) == 3 and isinstance(value[1], BaseException):
        return value[1]
    if value is True:
        return sys.exc_info()[1]
    return None


def describe_exception(exc: BaseException) -> dict[str, Any]:
    """An exception as its type, SQLSTATE when it has one, and (file, line, function) frames:
    never its message, which may quote the data that failed (asyncpg DataError, ValueError)."""
    out: dict[str, Any] = {"type": type(exc).__name__}
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str):
        out["sqlstate"] = sqlstate
    out["frames"] = [
        f"{frame.filename}:{frame.lineno}:{frame.name}" for frame in traceback.extract_tb(exc.__traceback__)
    ]
    cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    if cause is not None and cause is not exc:
        out["cause"] = type(cause).__name__
    return out


def exception_without_message(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Replaces ``exc_info`` with ``describe_exception``; the message text is dropped."""
    value = event.pop("exc_info", None)
    exc = _exc_info_of(value)
    if exc is not None:
        event["exception"] = describe_exception(exc)
    return event


def processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        exception_without_message,
        structlog.processors.JSONRenderer(serializer=_dumps),
    ]


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    structlog.configure(
        processors=processors(),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
