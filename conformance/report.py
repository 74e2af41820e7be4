"""Suite results and their reports: JSON (the verdict and every assertion), JUnit XML (CI), HTML."""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import orjson

from conformance.findings import Finding, Severity


@dataclass(frozen=True, slots=True)
class Assertion:
    """One check made: passed, or failed with a severity (a failed warning does not fail the case),
    or skipped for want of what it needs (the message says what), which fails nothing."""

    check: str  # rule id or check name
    passed: bool
    severity: Severity
    location: str
    message: str
    skipped: bool = False

    @classmethod
    def from_finding(cls, f: Finding) -> Assertion:
        return cls(f.rule, False, f.severity, f.location, f.message)

    @property
    def is_error(self) -> bool:
        return not self.passed and self.severity in (Severity.ERROR, Severity.FATAL)

    @property
    def is_warning(self) -> bool:
        return not self.passed and self.severity == Severity.WARNING

    @property
    def result(self) -> str:
        return "SKIPPED" if self.skipped else "PASSED" if self.passed else "FAILED"


@dataclass(slots=True)
class CaseResult:
    id: str
    title: str
    assertions: list[Assertion] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not any(a.is_error for a in self.assertions)

    def ok(self, check: str, location: str, message: str) -> None:
        self.assertions.append(Assertion(check, True, Severity.INFORMATION, location, message))

    def fail(self, check: str, location: str, message: str, severity: Severity = Severity.ERROR) -> None:
        self.assertions.append(Assertion(check, False, severity, location, message))

    def skip(self, check: str, location: str, reason: str) -> None:
        self.assertions.append(Assertion(check, False, Severity.INFORMATION, location, reason, skipped=True))

    def expect(self, condition: bool, check: str, location: str, message: str) -> bool:
        if condition:
            self.ok(check, location, message)
        else:
            self.fail(check, location, message)
        return condition

    def findings(self, findings: list[Finding], check: str, location: str, what: str) -> None:
        """Validator findings as failed assertions, or one passed assertion when none is an error."""
        for f in findings:
            self.assertions.append(Assertion.from_finding(f))
        if not any(f.is_error for f in findings):
            self.ok(check, location, f"{what} conforms")


@dataclass(slots=True)
class SuiteResult:
    suite: str
    title: str
    target: str
    cases: list[CaseResult] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(c.passed for c in self.cases)

    def counts(self) -> dict[str, int]:
        assertions = [a for c in self.cases for a in c.assertions]
        return {
            "cases": len(self.cases),
            "passed": sum(c.passed for c in self.cases),
            "failed": sum(not c.passed for c in self.cases),
            "checks": len(assertions),
            "errors": sum(a.is_error for a in assertions),
            "warnings": sum(a.is_warning for a in assertions),
            "skipped": sum(a.skipped for a in assertions),
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "title": self.title,
            "target": self.target,
            "result": "PASSED" if self.passed else "FAILED",
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "seconds": round(self.seconds, 3),
            "counts": self.counts(),
            "cases": [
                {
                    "id": c.id,
                    "title": c.title,
                    "result": "PASSED" if c.passed else "FAILED",
                    "seconds": round(c.seconds, 3),
                    "assertions": [
                        {
                            "check": a.check,
                            "result": a.result,
                            "severity": a.severity.value,
                            "location": a.location,
                            "message": a.message,
                        }
                        for a in c.assertions
                    ],
                }
                for c in self.cases
            ],
        }


def to_json(result: SuiteResult) -> bytes:
    return orjson.dumps(result.as_dict(), option=orjson.OPT_INDENT_2)


def to_junit(result: SuiteResult) -> bytes:
    counts = result.counts()
    suites = ET.Element(
        "testsuites", name=result.suite, tests=str(counts["cases"]), failures=str(counts["failed"])
    )
    suite = ET.SubElement(
        suites,
        "testsuite",
        name=result.suite,
        tests=str(counts["cases"]),
        failures=str(counts["failed"]),
        errors="0",
        time=f"{result.seconds:.3f}",
    )
    for case in result.cases:
        node = ET.SubElement(
            suite, "testcase", classname=result.suite, name=case.id, time=f"{case.seconds:.3f}"
        )
        errors = [a for a in case.assertions if a.is_error]
        if errors:
            first = errors[0]
            failure = ET.SubElement(
                node, "failure", message=f"{first.check} at {first.location}: {first.message}"
            )
            failure.text = "\n".join(
                f"[{a.severity.value}] {a.check} at {a.location}: {a.message}" for a in errors
            )
        # JUnit skips whole test cases only: skipped checks are listed beside the warnings
        noted = [a for a in case.assertions if a.is_warning or a.skipped]
        if noted:
            out = ET.SubElement(node, "system-out")
            out.text = "\n".join(
                f"[{'skipped' if a.skipped else 'warning'}] {a.check} at {a.location}: {a.message}"
                for a in noted
            )
    data: bytes = ET.tostring(suites, encoding="utf-8", xml_declaration=True)
    return data


def to_html(result: SuiteResult) -> bytes:
    e = html.escape
    counts = result.counts()
    verdict = "PASSED" if result.passed else "FAILED"
    rows: list[str] = []
    for case in result.cases:
        status = "PASSED" if case.passed else "FAILED"
        head = f"{e(case.id)} — {e(case.title)}"
        rows.append(f'<tr class="case {status.lower()}"><th colspan="4">{head}</th><td>{status}</td></tr>')
        for a in case.assertions:
            state = "passed" if a.passed else "skipped" if a.skipped else a.severity.value
            failed = not a.passed and not a.skipped
            rows.append(
                f'<tr class="{state}"><td>{e(a.check)}</td><td>{e(a.location)}</td><td>{e(a.message)}</td>'
                f"<td>{e(a.severity.value if failed else '')}</td>"
                f"<td>{a.result}</td></tr>"
            )
    page = f"""<!doctype html>
<html lang="fr"><head><meta charset="utf-8"><title>{e(result.title)} — {verdict}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em}} table{{border-collapse:collapse;width:100%}}
td,th{{border:1px solid #ccc;padding:.3em .5em;text-align:left;vertical-align:top}}
tr.case th{{background:#eee}} tr.case.failed th{{background:#fdd}} tr.error td,tr.fatal td{{color:#a00}}
tr.warning td{{color:#a60}} tr.passed td{{color:#060}} tr.skipped td{{color:#666}}
.verdict{{font-size:1.5em;font-weight:bold}}
</style></head><body>
<h1>{e(result.title)}</h1>
<p class="verdict">{verdict}</p>
<p>Suite <code>{e(result.suite)}</code> against <code>{e(result.target)}</code> —
{counts["cases"]} cases ({counts["passed"]} passed, {counts["failed"]} failed), {counts["checks"]} checks,
{counts["errors"]} errors, {counts["warnings"]} warnings, {counts["skipped"]} skipped,
{result.seconds:.2f} s.</p>
<table><tr><th>Check</th><th>Location</th><th>Message</th><th>Severity</th><th>Result</th></tr>
{"".join(rows)}
</table></body></html>
"""
    return page.encode("utf-8")


def write_reports(result: SuiteResult, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name, data in (
        (f"{result.suite}.json", to_json(result)),
        (f"{result.suite}.junit.xml", to_junit(result)),
        (f"{result.suite}.html", to_html(result)),
    ):
        path = directory / name
        path.write_bytes(data)
        out.append(path)
    return out
