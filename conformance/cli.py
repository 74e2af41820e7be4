"""``passerelle validate`` and ``passerelle conformance list|run`` (gateway.cli parses the arguments)."""

from __future__ import annotations

import asyncio
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from conformance.fhir.registry import ProfileError, Registry
from conformance.findings import Finding
from conformance.report import CaseResult
from conformance.runner import validate_file
from conformance.suite import SuiteError, available, find

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _print(label: str, findings: list[Finding], out: TextIO) -> None:
    errors = sum(f.is_error for f in findings)
    print(
        f"{label}: {'FAILED' if errors else 'PASSED'} ({errors} error(s), {len(findings) - errors} other)",
        file=out,
    )
    for f in findings:
        print(f"  [{f.severity.value}] {f.rule} at {f.location}: {f.message}", file=out)


def validate(
    files: Sequence[str],
    profile: str | None = None,
    profiles_dir: str | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    try:
        registry = Registry(Path(profiles_dir)) if profiles_dir else Registry()
        if profile and registry.profile(profile) is None:
            known = ", ".join(name for name, _, _ in registry.names)
            print(f"passerelle validate: no profile {profile!r} (known: {known})", file=err)
            return EXIT_USAGE
    except ProfileError as exc:
        print(f"passerelle validate: {exc}", file=err)
        return EXIT_USAGE
    worst = EXIT_OK
    for name in files:
        path = Path(name)
        if not path.is_file():
            print(f"passerelle validate: no such file: {name}", file=err)
            return EXIT_USAGE
        for label, findings in validate_file(path, registry, profile):
            _print(label, findings, out)
            if any(f.is_error for f in findings):
                worst = EXIT_FAIL
    return worst


def list_suites(out: TextIO = sys.stdout) -> int:
    for suite in available():
        print(f"{suite.name:24} {suite.kind:16} {len(suite.cases):3} case(s)  {suite.title}", file=out)
    return EXIT_OK


def run(
    name: str,
    target: str | None,
    *,
    listen: str | None = None,
    report_dir: str | None = None,
    token: str | None = None,
    profile: str | None = None,
    count: int | None = None,
    fhir: str | None = None,
    api: str | None = None,
    settle: float | None = None,
    timeout: float | None = None,
    reveal: bool = False,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Runs a suite. On a terminal, a progress bar (as `passerelle tail` draws); elsewhere (a CI
    log), one plain line per case as it ends: ``[3/12] SUITE CASE PASSED 0.4 s``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from conformance.report import write_reports
    from conformance.runner import AWAITS_ANSWERS, run_suite

    try:
        suite = find(name)
    except SuiteError as exc:
        print(f"passerelle conformance: {exc}", file=err)
        return EXIT_USAGE
    where = listen if suite.kind == "mllp-sender" else target
    if not where:
        flag = "--listen mllp://HOST:PORT" if suite.kind == "mllp-sender" else "--target URL"
        print(f"passerelle conformance: suite {suite.name} ({suite.kind}) needs {flag}", file=err)
        return EXIT_USAGE
    if timeout is not None and not (timeout > 0 and math.isfinite(timeout)):
        print(f"passerelle conformance: --timeout {timeout:g}: seconds, more than 0", file=err)
        return EXIT_USAGE
    if timeout is not None and suite.kind not in AWAITS_ANSWERS:
        print(f"passerelle conformance: --timeout: a {suite.kind} suite awaits no answer; ignored", file=err)
    if reveal:
        print(
            "passerelle conformance: --reveal: the reports show the messages unmasked; they may hold"
            " patient data",
            file=err,
        )
    interactive = out.isatty()
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        transient=True,
        disable=not (interactive and err.isatty()),
    )
    task = bar.add_task(suite.name, total=len(suite.cases) or None)

    def progress(done: int, total: int, label: str) -> None:
        bar.update(task, completed=done, total=total, description=f"{suite.name}: {label}")

    def case_done(number: int, total: int, case: CaseResult) -> None:
        print(progress_line(suite.name, number, total, case), file=out, flush=True)

    try:
        with bar:
            result = asyncio.run(
                run_suite(
                    suite,
                    where,
                    token=token,
                    profile=profile,
                    count=count,
                    progress=progress,
                    fhir=fhir,
                    api=api,
                    settle=settle,
                    timeout=timeout,
                    reveal=reveal,
                    on_case=None if interactive else case_done,
                )
            )
    except (SuiteError, ProfileError) as exc:
        print(f"passerelle conformance: {exc}", file=err)
        return EXIT_USAGE
    counts = result.counts()
    for case in result.cases:
        print(f"{'PASSED' if case.passed else 'FAILED'}  {case.id}  {case.title}", file=out)
        for a in case.assertions:
            if not a.passed:
                label = "skipped" if a.skipped else a.severity.value
                print(f"    [{label}] {a.check} at {a.location}: {a.message}", file=out)
    verdict = "PASSED" if result.passed else "FAILED"
    print(
        f"{suite.name}: {verdict} — {counts['passed']}/{counts['cases']} cases, {counts['checks']} checks, "
        f"{counts['errors']} errors, {counts['warnings']} warnings, {counts['skipped']} skipped",
        file=out,
    )
    if result.timeout is not None:
        print(f"time-out for each answer: {result.timeout_text}", file=out)
    if report_dir:
        for path in write_reports(result, Path(report_dir)):
            print(f"report: {path}", file=out)
    return EXIT_OK if result.passed else EXIT_FAIL


def progress_line(suite: str, number: int, total: int, case: CaseResult) -> str:
    """A case that ended, for a log: its number, suite, id, verdict and time; no patient data (the
    case id is the suite's, or a file name or ``message-N``), no terminal codes."""
    verdict = "PASSED" if case.passed else "FAILED"
    text = f"[{number}/{total}] {suite} {case.id} {verdict} {case.seconds:.1f} s"
    return "".join(c if c.isprintable() else "?" for c in text)
