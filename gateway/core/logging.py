"""Logging is configured once: JSON lines, context variables first, PHI-free by contract.

Callers bind ids and codes only (message id, channel, control id, peer); payloads,
names, identifiers and birth dates never reach a log call.
"""

from __future__ import annotations

import io
import logging
import os
import select
import sys
import threading
import traceback
from collections.abc import MutableMapping
from typing import Any, TextIO

import orjson
import structlog
from structlog.typing import FilteringBoundLogger


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


class LineLogger:
    """Writes each rendered event as one whole line: one ``os.write`` of the line and its newline.

    The main process and its worker processes share stdout. ``print`` writes the text and the
    newline apart (two writes when stdout is unbuffered), and a buffered stream cuts long lines
    where its buffer ends: either way a line of one process can land inside a line of another,
    which breaks every JSON-lines shipper. A single write of a whole line is never interleaved
    with another process's on a pipe (up to PIPE_BUF bytes) nor on a file (O_APPEND, or a shared
    offset); a longer line on a pipe is at least written in one go from this process.

    ``stream`` None: ``sys.stdout`` as it is at each call (tests swap it). A stream without a
    file descriptor (an in-memory one) gets the whole line in one ``write``.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def msg(self, message: str) -> None:
        line = message + "\n"
        stream = self._stream if self._stream is not None else sys.stdout
        with self._lock:
            try:
                fd = stream.fileno()
            except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
                stream.write(line)
                stream.flush()
                return
            stream.flush()  # whatever the stream holds goes first, in order
            write_whole(fd, line.encode("utf-8", "backslashreplace"))

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def write_whole(fd: int, data: bytes) -> None:
    """One ``os.write`` of ``data``; only what the kernel did not take (a full non-blocking pipe,
    a signal) is written after it, once the descriptor can take more."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [], 1.0)
            continue
        view = view[written:]


class LineLoggerFactory:
    def __init__(self, stream: TextIO | None = None) -> None:
        self._logger = LineLogger(stream)

    def __call__(self, *args: Any) -> LineLogger:
        return self._logger


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    structlog.configure(
        processors=processors(),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=LineLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> FilteringBoundLogger:
    """The logger ``configure`` sets up (a filtering bound logger): typed, so mypy checks each call."""
    logger: FilteringBoundLogger = structlog.get_logger(name)
    return logger
