"""A pytest plugin: the log output of the whole test suite must not contain patient data.

Every test's captured output (the gateway's structlog lines, stdlib log records) is kept
and, at the end of the session, searched for the names, identifiers and birth dates the
tests put in their messages and resources. So are the log files that ``passerelle run``
child processes wrote under the session's temporary directory. A hit fails the run.

The standard library's logging is read at its source too: for the whole session a handler on the
root logger sees every record that reaches the root's handlers (aiohttp's server-side loggers
opened to DEBUG, so that their records are made at all), formatted with its traceback, whatever
pytest captures or not (records outside a test, records of threads).

Only log lines are scanned (JSON lines with an "event", structlog console lines, log
records, and Python tracebacks with the line that announces them: what the logging module
prints when no handler is configured, in a child process say): what a CLI prints on purpose (a
converted Bundle, say) is not a log.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

# Patient data used by tests/messages.py, tests/fhir, tests/mapping and others: fictional, but
# exactly what must never reach a log. Short or common tokens are left out to avoid false hits.
PHI_TERMS: set[str] = {
    "LEFÈVRE",
    "Lefèvre",
    "Françoise",
    "Amélie",
    "GÉRARD",
    "MARTIN-GÉRARD",
    "Martin-Lefèvre",
    "DUPRÉ",
    "Zoé",
    "Léonie",
    "D'ARCY",
    "19750412",
    "19750425",
    "1975-04-12",
    "1975-04-25",
    "1984-07-07",
    "2840775123456",
    "275042512345678",
    "1920375999001",
    "552233",
    "IPP-777",
    "rue des Écoles",
    "Besançon",
    "Tanneurs",
}

_LOG_LINE = re.compile(
    r'^\s*(\{.*"event"\s*:|\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d\S* \[\s*\w+\s*\]|\{.*"level"\s*:)'
)
_LOG_FILES = ("*.log", "*.jsonl")


def _escaped(term: str) -> str:
    return term.encode("ascii", "backslashreplace").decode().replace("\\x", "\\u00")


# A log line's own time is no patient data, yet its microseconds can spell a six-digit identifier.
_TIMESTAMP = re.compile(r'"timestamp"\s*:\s*"[^"]*"|^\s*\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d\S*')


def _numeric(term: str) -> re.Pattern[str]:
    # Digits only: a whole number, not a run inside a longer one or a decimal fraction.
    return re.compile(rf"(?<![\d.]){re.escape(term)}(?!\d)")


_TRACEBACK = "Traceback (most recent call last):"
# Inside a traceback: its frames (indented) and the lines that chain one to another.
_TRACEBACK_BODY = (" ", "\t", _TRACEBACK, "During handling of", "The above exception", "^", "~")


def _log_lines(lines: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """(line, whether it is part of a Python traceback or announces one)."""
    pending: str | None = None  # the line before, which may announce a traceback
    inside = False
    for line in lines:
        if line.startswith(_TRACEBACK):
            if pending is not None:
                yield pending, True
                pending = None
            inside = True
            yield line, True
            continue
        if inside:
            yield line, True
            # the exception's own line (not indented) ends a traceback, unless another follows
            inside = not line or line.startswith(_TRACEBACK_BODY)
            continue
        if pending is not None:
            yield pending, False
        pending = line
    if pending is not None:
        yield pending, False


def find_phi(
    lines: Iterable[str], terms: Iterable[str] = PHI_TERMS, *, every_line: bool = False
) -> list[tuple[str, str]]:
    """(term, line) for each log line that carries a term (also JSON-escaped: \\u00c8)."""
    variants: dict[str, str] = {}
    numbers: dict[re.Pattern[str], str] = {}
    for term in terms:
        if term.isdigit():
            numbers[_numeric(term)] = term
            continue
        for variant in (term, _escaped(term), term.upper(), _escaped(term.upper())):
            variants.setdefault(variant, term)
    hits = []
    for line, traceback in _log_lines(lines):
        if not every_line and not traceback and not _LOG_LINE.match(line):
            continue
        text = _TIMESTAMP.sub("", line)
        found = next((term for variant, term in variants.items() if variant in text), None)
        if found is None:
            found = next((term for pattern, term in numbers.items() if pattern.search(text)), None)
        if found is not None:
            hits.append((found, line[:300]))
    return hits


class LogRecords(logging.Handler):
    """On the root logger for the whole session: every record that reaches the root's handlers,
    formatted with its traceback and stack, searched as it comes; hits kept with the test then
    running ("<session>" outside any test)."""

    def __init__(self, scan: PhiScan) -> None:
        super().__init__(logging.NOTSET)
        self.scan = scan
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.records = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - a record that cannot be formatted: its parts, raw
            text = f"{record.name} {record.msg!r} {record.args!r}"
        self.records += 1
        for term, line in find_phi(text.splitlines(), every_line=True):
            self.scan.hit(self.scan.current, term, line)


# Loggers opened to DEBUG for the session, so that their records are made and read: aiohttp's
# server side. ``aiohttp.access`` and ``aiohttp.client`` keep their level: the gateway keeps no
# access log (gateway.http.server), and the far-end servers and clients some tests run are not
# the gateway (tests/ops/test_parser_errors.py opens every aiohttp logger around the gateway).
OPENED_LOGGERS = ("aiohttp.server", "aiohttp.web", "aiohttp.internal", "aiohttp.websocket")


class PhiScan:
    def __init__(self) -> None:
        self.hits: list[tuple[str, str, str]] = []  # (where, term, line)
        self.current = "<session>"
        self.handler = LogRecords(self)
        self._levels: dict[str, int] = {}

    def hit(self, where: str, term: str, line: str) -> None:
        if (where, term, line) not in self.hits:
            self.hits.append((where, term, line))

    def install(self) -> None:
        """Read the standard library's logging from now on (root handler, aiohttp at DEBUG)."""
        root = logging.getLogger()
        if self.handler not in root.handlers:
            root.addHandler(self.handler)
        for name in OPENED_LOGGERS:
            logger = logging.getLogger(name)
            self._levels.setdefault(name, logger.level)
            logger.setLevel(logging.DEBUG)

    def uninstall(self) -> None:
        logging.getLogger().removeHandler(self.handler)
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        self._levels.clear()

    @pytest.hookimpl
    def pytest_runtest_logstart(self, nodeid: str, location: tuple[str, int | None, str]) -> None:
        self.current = nodeid

    @pytest.hookimpl
    def pytest_runtest_logfinish(self, nodeid: str, location: tuple[str, int | None, str]) -> None:
        self.current = "<session>"

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for name, text in report.sections:
            if "stdout" in name or "stderr" in name or "log" in name:
                # Captured log records are log lines as a whole; on stdout/stderr only log-shaped lines.
                for term, line in find_phi(text.splitlines(), every_line="log" in name):
                    self.hit(report.nodeid, term, line)  # later reports repeat sections: kept once

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        self.uninstall()
        factory = getattr(session.config, "_tmp_path_factory", None)
        if factory is not None:
            try:
                base = Path(factory.getbasetemp())
            except (OSError, ValueError):
                base = None
            if base is not None and base.is_dir():
                for pattern in _LOG_FILES:
                    for path in base.rglob(pattern):
                        try:
                            text = path.read_text("utf-8", errors="replace")
                        except OSError:
                            continue
                        self.hits += [(str(path), t, line) for t, line in find_phi(text.splitlines())]
        if self.hits:
            reporter = session.config.pluginmanager.get_plugin("terminalreporter")
            if reporter is not None:
                reporter.write_sep("=", "patient data found in the logs", red=True)
                for where, term, line in self.hits[:50]:
                    reporter.write_line(f"{where}: {term!r} in: {line}")
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
