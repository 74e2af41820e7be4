"""Suite results and their reports: JSON (the verdict and every assertion), JUnit XML (CI), HTML.

Each case also lists its steps: what was sent and what came back (an HL7v2 message and its ACK, a
FHIR search and its matches, an admin API lookup and its rows), as the reports show them: masked
unless the run was made with ``reveal`` (``--reveal``), which both reports then say at their top.
Masking follows the gateway's own rule for its console (gateway/http/masking.py): segment names and
field positions kept, MSH, MSA, ERR and EVN shown, every other value replaced; the free text of the
segments shown (MSA-3, ERR-6/7/8/12, EVN-5) is masked too.
"""

from __future__ import annotations

import html
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from xml.etree import ElementTree as ET

import orjson

from conformance.findings import Finding, Severity
from gateway.core.errors import MessageError
from gateway.hl7.er7 import Message
from gateway.http.masking import MASK, mask_hl7, payload_text

# 1: no such field (steps, masking and time-out not reported); 2: they are.
FORMAT_VERSION: Final = 2
REVEAL_WARNING: Final = (
    "WARNING: written with --reveal: the messages, requests and answers of this report are NOT masked"
    " and may hold patient data. Do not publish or share it as it is."
)
TIMEOUT_SOURCES: Final = {
    "option": "given by --timeout",
    "suite": "the suite's timeout_s",
    "default": "the default",
}
HL7_CHARSET: Final = "UNICODE UTF-8"  # what an HL7v2 text is read as when its MSH-18 is empty
MAX_SHOWN: Final = 100_000  # characters of one sent or received text kept in the reports
# Free text in the segments the gateway's masking shows: a system may write patient data there.
_FREE_TEXT: Final = {"MSA": frozenset({3}), "ERR": frozenset({6, 7, 8, 12}), "EVN": frozenset({5})}
# FHIR JSON keys whose string values are structure, codes or server ids, never patient data.
_FHIR_CLEAR: Final = frozenset(
    {
        "resourceType",
        "id",
        "versionId",
        "lastUpdated",
        "profile",
        "system",
        "code",
        "url",
        "fullUrl",
        "reference",
        "status",
        "use",
        "type",
        "mode",
        "relation",
        "total",
        "contentType",
    }
)
_FHIR_PLACES: Final = frozenset({"address", "valueAddress"})
_PLACE_CLEAR: Final = frozenset({"url", "use", "type"})


# -- what the reports show of a message or request ---------------------------------------------------


def show_hl7(raw: bytes, *, reveal: bool = False) -> str:
    """An HL7v2 message as the reports show it, one segment a line: masked, or as it is (``reveal``)."""
    if reveal:
        try:
            charset = Message.decode(raw, default_charset=HL7_CHARSET).charset
        except MessageError:
            charset = HL7_CHARSET
        return _printable(payload_text(raw, charset))
    return _printable(_mask_free_text(mask_hl7(raw, HL7_CHARSET)))


def _mask_free_text(masked: str) -> str:
    """``mask_hl7``'s text with the free-text fields of the segments it shows masked as well."""
    if not masked.startswith("MSH") or len(masked) < 4:
        return masked  # unreadable: nothing but its size is shown
    fs = masked[3]
    lines = []
    for line in masked.split("\r"):
        fields = _FREE_TEXT.get(line[:3])
        if fields and line[3:4] == fs:
            parts = line.split(fs)
            line = fs.join(MASK if n in fields and part else part for n, part in enumerate(parts))
        lines.append(line)
    return "\r".join(lines)


def mask_fhir(value: Any, key: str = "", *, place: bool = False) -> Any:
    """FHIR JSON with its structure (keys, resource types, ids, systems, codes, booleans) kept and
    every other value (names, identifiers' values, dates, addresses, texts, numbers) masked; in an
    address, its codes too (a birthplace's INSEE code), all but extension urls."""
    if isinstance(value, dict):
        return {k: mask_fhir(v, str(k), place=place or str(k) in _FHIR_PLACES) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_fhir(v, key, place=place) for v in value]
    if value is None or isinstance(value, bool) or key in (_PLACE_CLEAR if place else _FHIR_CLEAR):
        return value
    return MASK


def show_json(value: Any, *, reveal: bool = False) -> str:
    """FHIR JSON (a resource, a list of them) as the reports show it: masked, or as it is."""
    shown = value if reveal else mask_fhir(value)
    return _printable(orjson.dumps(shown, option=orjson.OPT_INDENT_2).decode())


def show_query(params: Sequence[tuple[str, str]], *, reveal: bool = False) -> str:
    """Search parameters as text; masked, each value is hidden but a token's system (``SYSTEM|***``)
    and the values of result parameters (``_count``, ``_sort``...)."""
    shown = []
    for name, value in params:
        if not reveal and not name.startswith("_") and value:
            system, bar, rest = value.partition("|")
            value = f"{system}|{MASK if rest else ''}" if bar else MASK
        shown.append(f"{name}={value}")
    return _printable("&".join(shown))


def _printable(text: str) -> str:
    """Segments one a line; control characters written as \\xNN; at most MAX_SHOWN characters."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n")
    if any(c != "\n" and c != "\t" and unicodedata.category(c) == "Cc" for c in text):
        text = "".join(
            f"\\x{ord(c):02x}" if c not in "\n\t" and unicodedata.category(c) == "Cc" else c for c in text
        )
    if len(text) > MAX_SHOWN:
        text = text[:MAX_SHOWN] + f"\n… ({len(text) - MAX_SHOWN} more characters not shown)"
    return text


# -- results -------------------------------------------------------------------------------------------


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
class Step:
    """One exchange of a case: a message sent and its acknowledgement, a search and its matches, a
    lookup and its rows. ``sent`` and ``received`` are already as the reports show them (masked
    unless revealed); ``received`` is None when nothing came back, and ``note`` then says why."""

    name: str  # "step 1", "then[0]", "step 1 status"
    action: str  # "send hl7/a01-admission.hl7", "search Patient"
    kind: str  # "hl7v2", "fhir", "http"
    sent: str | None = None
    received: str | None = None
    note: str = ""
    timeout: float | None = None  # seconds the answer was waited for
    seconds: float = 0.0
    assertions: list[int] = field(default_factory=list)  # indexes of the case's assertions it made


@dataclass(slots=True)
class CaseResult:
    id: str
    title: str
    assertions: list[Assertion] = field(default_factory=list)
    seconds: float = 0.0
    steps: list[Step] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not any(a.is_error for a in self.assertions)

    def add_step(self, step: Step, since: int) -> Step:
        """Records a step; the assertions made from index ``since`` on are the step's."""
        step.assertions = list(range(since, len(self.assertions)))
        self.steps.append(step)
        return step

    def step_result(self, step: Step) -> str:
        made = [self.assertions[i] for i in step.assertions if 0 <= i < len(self.assertions)]
        if any(a.is_error for a in made):
            return "FAILED"
        if made and all(a.skipped for a in made):
            return "SKIPPED"
        return "PASSED"

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
    revealed: bool = False  # the steps' texts are not masked (--reveal)
    timeout: float | None = None  # seconds each answer is waited for; None: the suite awaits none
    timeout_source: str = "default"  # one of TIMEOUT_SOURCES

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(c.passed for c in self.cases)

    @property
    def timeout_text(self) -> str:
        if self.timeout is None:
            return "no answer awaited"
        return f"{self.timeout:g} s ({TIMEOUT_SOURCES.get(self.timeout_source, self.timeout_source)})"

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
        head: dict[str, Any] = {"warning": REVEAL_WARNING} if self.revealed else {}
        return head | {
            "format_version": FORMAT_VERSION,
            "suite": self.suite,
            "title": self.title,
            "target": self.target,
            "result": "PASSED" if self.passed else "FAILED",
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "seconds": round(self.seconds, 3),
            "counts": self.counts(),
            "masked": not self.revealed,
            "timeout": (
                None if self.timeout is None else {"seconds": self.timeout, "source": self.timeout_source}
            ),
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
                    "steps": [_step_dict(c, step) for step in c.steps],
                }
                for c in self.cases
            ],
        }


def _step_dict(case: CaseResult, step: Step) -> dict[str, Any]:
    return {
        "step": step.name,
        "action": step.action,
        "kind": step.kind,
        "result": case.step_result(step),
        "seconds": round(step.seconds, 3),
        "timeout_s": step.timeout,
        "sent": step.sent,
        "received": step.received,
        "note": step.note,
        "assertion_indexes": step.assertions,
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


def summary_chart(counts: dict[str, int]) -> str:
    """The verdicts as SVG (the console's plotting library): cases passed or failed, and the
    checks by outcome."""
    from gateway.core.charts import FAIL, MUTED, PASS, WARN, bar_chart, side_by_side

    passed_checks = counts["checks"] - counts["errors"] - counts["warnings"] - counts["skipped"]
    cases = bar_chart(
        "Cases",
        ["cases"],
        {"passed": [counts["passed"]], "failed": [counts["failed"]]},
        horizontal=True,
        stacked=True,
        width=420,
        height=200,
        colors=(PASS, FAIL),
    )
    checks = bar_chart(
        "Checks",
        ["checks"],
        {
            "passed": [passed_checks],
            "errors": [counts["errors"]],
            "warnings": [counts["warnings"]],
            "skipped": [counts["skipped"]],
        },
        horizontal=True,
        stacked=True,
        width=420,
        height=200,
        colors=(PASS, FAIL, WARN, MUTED),
    )
    return side_by_side([cases, checks])


def to_html(result: SuiteResult) -> bytes:
    """One self-contained page (no script, nothing fetched); every value written escaped."""
    e = html.escape
    counts = result.counts()
    verdict = "PASSED" if result.passed else "FAILED"
    rows: list[str] = []
    for case in result.cases:
        status = "PASSED" if case.passed else "FAILED"
        head = f"{e(case.id)} — {e(case.title)}"
        rows.append(f'<tr class="case {status.lower()}"><th colspan="4">{head}</th><td>{status}</td></tr>')
        starts: dict[int, list[Step]] = {}
        for step in case.steps:
            first = step.assertions[0] if step.assertions else len(case.assertions)
            starts.setdefault(first, []).append(step)
        for index, a in enumerate(case.assertions):
            rows += [_html_step(case, step, result.revealed) for step in starts.pop(index, [])]
            state = "passed" if a.passed else "skipped" if a.skipped else a.severity.value
            failed = not a.passed and not a.skipped
            rows.append(
                f'<tr class="{state}"><td>{e(a.check)}</td><td>{e(a.location)}</td><td>{e(a.message)}</td>'
                f"<td>{e(a.severity.value if failed else '')}</td>"
                f"<td>{a.result}</td></tr>"
            )
        for rest in starts.values():
            rows += [_html_step(case, step, result.revealed) for step in rest]
    warning = f'<p class="reveal">{e(REVEAL_WARNING)}</p>\n' if result.revealed else ""
    shown = (
        "shown unmasked (--reveal)"
        if result.revealed
        else "masked: names, identifiers, dates, addresses and texts are replaced by ***"
    )
    page = f"""<!doctype html>
<html lang="fr"><head><meta charset="utf-8"><title>{e(result.title)} — {verdict}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2em}} table{{border-collapse:collapse;width:100%}}
td,th{{border:1px solid #ccc;padding:.3em .5em;text-align:left;vertical-align:top}}
tr.case th{{background:#eee}} tr.case.failed th{{background:#fdd}} tr.error td,tr.fatal td{{color:#a00}}
tr.warning td{{color:#a60}} tr.passed td{{color:#060}} tr.skipped td{{color:#666}}
tr.step td{{background:#f7f7fb;color:#222}} tr.step.failed summary{{color:#a00}}
pre{{white-space:pre-wrap;word-break:break-all;background:#fff;border:1px solid #ddd;padding:.4em}}
.verdict{{font-size:1.5em;font-weight:bold}}
.reveal{{background:#fdd;border:2px solid #a00;padding:.5em;font-weight:bold}}
</style></head><body>
{warning}<h1>{e(result.title)}</h1>
<p class="verdict">{verdict}</p>
<p>Suite <code>{e(result.suite)}</code> against <code>{e(result.target)}</code> —
{counts["cases"]} cases ({counts["passed"]} passed, {counts["failed"]} failed), {counts["checks"]} checks,
{counts["errors"]} errors, {counts["warnings"]} warnings, {counts["skipped"]} skipped,
{result.seconds:.2f} s.</p>
<p class="timeout">Time-out for each answer: {e(result.timeout_text)}.</p>
<p>Messages, requests and answers of each step: {e(shown)}. Report format {FORMAT_VERSION}.</p>
<div class="charts">{summary_chart(counts)}</div>
<table><tr><th>Check</th><th>Location</th><th>Message</th><th>Severity</th><th>Result</th></tr>
{"".join(rows)}
</table></body></html>
"""
    return page.encode("utf-8")


def _html_step(case: CaseResult, step: Step, revealed: bool) -> str:
    e = html.escape
    state = case.step_result(step)
    waited = f" · time-out {step.timeout:g} s" if step.timeout is not None else ""
    summary = f"{e(step.name)} · {e(step.action)} · {state} · {step.seconds:.2f} s{waited}"
    how = "unmasked" if revealed else "masked"
    opened = " open" if state == "FAILED" else ""  # a failed step shows its exchange at once
    parts = [f"<details{opened}><summary>{summary}</summary>"]
    if step.note:
        parts.append(f'<p class="note">{e(step.note)}</p>')
    if step.sent is not None:
        parts.append(f"<p>Sent ({e(step.kind)}, {how}):</p><pre>{e(step.sent)}</pre>")
    if step.received is not None:
        parts.append(f"<p>Received ({e(step.kind)}, {how}):</p><pre>{e(step.received)}</pre>")
    else:
        parts.append("<p>Received: nothing.</p>")
    parts.append("</details>")
    return f'<tr class="step {state.lower()}"><td colspan="5">{"".join(parts)}</td></tr>'


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
