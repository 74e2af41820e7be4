"""A pytest plugin: the log output of the whole test suite must not contain patient data.

Every test's captured output (the gateway's structlog lines, stdlib log records) is kept
and, at the end of the session, searched for the names, identifiers and birth dates the
tests put in their messages and resources. So are the log files that ``passerelle run``
child processes wrote under the session's temporary directory. A hit fails the run.

Only log lines are scanned (JSON lines with an "event", structlog console lines, log
records): what a CLI prints on purpose (a converted Bundle, say) is not a log.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
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
    for line in lines:
        if not every_line and not _LOG_LINE.match(line):
            continue
        text = _TIMESTAMP.sub("", line)
        found = next((term for variant, term in variants.items() if variant in text), None)
        if found is None:
            found = next((term for pattern, term in numbers.items() if pattern.search(text)), None)
        if found is not None:
            hits.append((found, line[:300]))
    return hits


class PhiScan:
    def __init__(self) -> None:
        self.hits: list[tuple[str, str, str]] = []  # (where, term, line)

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for name, text in report.sections:
            if "stdout" in name or "stderr" in name or "log" in name:
                # Captured log records are log lines as a whole; on stdout/stderr only log-shaped lines.
                for term, line in find_phi(text.splitlines(), every_line="log" in name):
                    if (report.nodeid, term, line) not in self.hits:  # later reports repeat sections
                        self.hits.append((report.nodeid, term, line))

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
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
