"""Logged exceptions carry their type and frames, never their message (which may quote data)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable

import pytest
import structlog
from structlog.testing import capture_logs

from gateway.core.logging import describe_exception, processors
from gateway.store.messages.postgres import _log_failure as pg_log_failure
from gateway.store.messages.sqlite import _log_failure as sqlite_log_failure

FAKE_NAME = "DUPONTEL Marie-Jeanne"


def _logger(stream: io.StringIO) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.wrap_logger(
        structlog.PrintLogger(stream),
        processors=processors(),
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    )
    return logger


def _parse_birth_date(text: str) -> None:
    raise ValueError(f"bad birth date for {text}")


def test_a_logged_exception_shows_type_and_frames_but_not_its_message() -> None:
    stream = io.StringIO()
    log = _logger(stream)
    try:
        try:
            _parse_birth_date(FAKE_NAME)
        except ValueError as exc:
            raise RuntimeError(f"mapping failed: {exc}") from exc
    except RuntimeError:
        log.exception("mapping_failed", message_id="m-1")
    try:
        _parse_birth_date(FAKE_NAME)
    except ValueError as exc:
        log.error("explicit", exc_info=exc)
    text = stream.getvalue()
    assert FAKE_NAME not in text and "DUPONTEL" not in text
    first, second = (json.loads(line) for line in text.splitlines())
    assert first["message_id"] == "m-1"
    assert first["exception"]["type"] == "RuntimeError"
    assert first["exception"]["cause"] == "ValueError"
    assert any(
        frame.endswith(":test_a_logged_exception_shows_type_and_frames_but_not_its_message")
        for frame in first["exception"]["frames"]
    )
    assert second["exception"]["type"] == "ValueError"
    assert second["exception"]["frames"][-1].endswith(":_parse_birth_date")


def test_describe_exception_keeps_a_sqlstate() -> None:
    class DataError(Exception):
        sqlstate = "22007"

    info = describe_exception(DataError(f"invalid input value {FAKE_NAME!r}"))
    assert info == {"type": "DataError", "sqlstate": "22007", "frames": []}


@pytest.mark.parametrize("log_failure", [pg_log_failure, sqlite_log_failure])
async def test_a_failed_journal_write_logs_the_error_type_only(log_failure: Callable[..., None]) -> None:
    import asyncio

    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    fut.set_exception(ValueError(f"row for {FAKE_NAME}"))
    with capture_logs() as logs:
        log_failure(fut)
    assert logs and FAKE_NAME not in repr(logs)
    assert logs[0]["error"] == "ValueError"
