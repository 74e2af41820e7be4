"""The suite-wide PHI scan reads the standard library's logging (aiohttp's and the root logger's
output) as well as the gateway's JSON lines."""

from __future__ import annotations

import logging
import sys

import pytest
from aiohttp.http_exceptions import LineTooLong

from tests.phi_scan import LogRecords, PhiScan, find_phi


def test_the_session_reads_every_record_that_reaches_the_root_logger(request: pytest.FixtureRequest) -> None:
    scan = request.config.pluginmanager.get_plugin("passerelle-phi-scan")
    assert isinstance(scan, PhiScan)
    assert scan.handler in logging.getLogger().handlers
    assert scan.handler.level == logging.NOTSET
    # aiohttp's loggers make their records, DEBUG ones included, so that the scan sees them
    for name in ("aiohttp.server", "aiohttp.web", "aiohttp.internal"):
        assert logging.getLogger(name).isEnabledFor(logging.DEBUG), name


def _record(exc: BaseException | None = None) -> logging.LogRecord:
    return logging.LogRecord(
        "aiohttp.server",
        logging.ERROR,
        __file__,
        1,
        "Error handling request from %s",
        ("127.0.0.1",),
        (type(exc), exc, exc.__traceback__) if exc is not None else None,
    )


def test_a_record_quoting_patient_data_is_a_hit() -> None:
    scan = PhiScan()  # not the session's: what it finds fails nothing
    handler = LogRecords(scan)
    for quoted in (b"GET /fhir/Patient?birthdate=1984-07-07", b"Authorization: x|2840775123456"):
        try:
            raise LineTooLong(quoted, 8190)
        except LineTooLong as exc:
            handler.handle(_record(exc))  # straight to the handler: no logger, no propagation
    handler.handle(_record())
    assert {term for _, term, _ in scan.hits} == {"1984-07-07", "2840775123456"}
    assert all(where == scan.current for where, _, _ in scan.hits)


def test_a_plain_traceback_in_captured_output_or_a_child_log_is_read() -> None:
    # what the logging module prints when no handler is configured (a child process's stderr)
    text = (
        "Error handling request from 127.0.0.1\n"
        "Traceback (most recent call last):\n"
        '  File "aiohttp/web_protocol.py", line 1, in data_received\n'
        "    messages, upgraded, tail = self._parser.feed_data(data)\n"
        "aiohttp.http_exceptions.LineTooLong: 400, message: Got more than 8190 bytes when reading:"
        " b'GET /fhir/Patient?family=LEF\\xc3\\x88VRE&identifier=x|2840775123456'.\n"
        "a Bundle printed by a CLI: Lefèvre\n"
    )
    hits = find_phi(text.splitlines())
    assert [term for term, _ in hits] == ["2840775123456"]  # the CLI's own print is not a log
    announced = find_phi(["Invalid HTTP header: Besançon", "Traceback (most recent call last):", "E: x"])
    assert [term for term, _ in announced] == ["Besançon"]


def test_the_scan_is_python_3_11_aware() -> None:
    assert sys.version_info >= (3, 11)  # tracebacks' caret lines ("^^^^") stay inside the block
    lines = ["Traceback (most recent call last):", "  File 'x', line 1", "    ^^^^", "E: 1984-07-07", "after"]
    assert [line for _, line in find_phi(lines)] == ["E: 1984-07-07"]
