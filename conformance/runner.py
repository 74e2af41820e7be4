"""Runs a suite against its target: files, a live MLLP receiver or sender, a live FHIR document server."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import orjson

from conformance.fhir.registry import Registry, default_registry
from conformance.findings import Finding
from conformance.hl7v2.validator import validate_hl7
from conformance.per_run import PerRun
from conformance.report import CaseResult, Step, SuiteResult, show_hl7
from conformance.results import ResultApis, Verifier
from conformance.suite import Suite, SuiteError
from gateway.core.errors import MessageError
from gateway.hl7.er7 import split_messages

Progress = Callable[[int, int, str], None]  # (done, total, case id)
CaseDone = Callable[[int, int, CaseResult], None]  # (its number, the cases expected, the case ended)

HL7_SUFFIXES = (".hl7", ".er7", ".txt")
DEFAULT_TIMEOUT: Final = 30.0  # seconds each answer is waited for, unless the suite or --timeout says
AWAITS_ANSWERS: Final = frozenset({"mllp-receiver", "fhir-documents"})


def _noop(done: int, total: int, label: str) -> None:
    return None


def answer_timeout(suite: Suite, timeout: float | None) -> tuple[float, str]:
    """The seconds each answer is waited for, and where they come from (report.TIMEOUT_SOURCES)."""
    if timeout is not None:
        return float(timeout), "option"
    if suite.settings.get("timeout_s") is not None:
        return float(suite.settings["timeout_s"]), "suite"
    return DEFAULT_TIMEOUT, "default"


def parse_mllp(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "mllp" or not parts.hostname or parts.port is None:
        raise SuiteError(f"expected mllp://HOST:PORT, got {url!r}")
    return parts.hostname, parts.port


async def run_suite(
    suite: Suite,
    target: str,
    *,
    token: str | None = None,
    profile: str | None = None,
    count: int | None = None,
    registry: Registry | None = None,
    progress: Progress = _noop,
    timeout: float | None = None,
    fhir: str | None = None,
    api: str | None = None,
    settle: float | None = None,
    reveal: bool = False,
    on_case: CaseDone | None = None,
) -> SuiteResult:
    """``fhir``, ``api`` and ``settle`` serve the result checks of mllp-receiver suites: the
    system's FHIR API, a Passerelle gateway's admin API, and the seconds given to processing
    (default: the suite's ``settle_s``). ``timeout``: seconds each answer is waited for (default:
    the suite's ``timeout_s``, else DEFAULT_TIMEOUT). ``reveal``: the steps' messages are kept
    unmasked in the result. ``on_case`` is called as each case ends, with its number among the
    cases and how many are expected (for the files suite, a guess until every file is read)."""
    result = SuiteResult(suite.name, suite.title, target, revealed=reveal)
    wait_for, result.timeout_source = answer_timeout(suite, timeout)
    if suite.kind in AWAITS_ANSWERS:
        result.timeout = wait_for
    start = time.monotonic()
    registry = registry or default_registry()
    progress = _reporting(result, progress, on_case)
    if suite.kind == "files":
        _run_files(suite, Path(target.removeprefix("file://")), result, registry, profile, progress)
    elif suite.kind == "mllp-receiver":
        wait = float(suite.settings.get("settle_s", 20)) if settle is None else settle
        apis = ResultApis(fhir=fhir, api=api, token=token, settle=wait)
        await _run_mllp_receiver(suite, target, result, progress, wait_for, apis, reveal)
    elif suite.kind == "mllp-sender":
        await _run_mllp_sender(suite, target, result, progress, count, reveal)
    else:
        from conformance.mhd import run_document_server

        await run_document_server(
            suite, target, result, registry, progress, token=token, timeout=wait_for, reveal=reveal
        )
    result.seconds = time.monotonic() - start
    return result


def _reporting(result: SuiteResult, progress: Progress, on_case: CaseDone | None) -> Progress:
    """``progress`` as the runners call it (after appending the cases done), and ``on_case`` for
    each case appended since the last call: a runner may append more cases than it counts (the
    document server's setup case, the files suite's messages after the first of a file)."""
    if on_case is None:
        return progress
    seen = 0

    def tick(done: int, total: int, label: str) -> None:
        nonlocal seen
        progress(done, total, label)
        ended = len(result.cases)
        expected = total + max(ended - done, 0)
        for number in range(seen + 1, ended + 1):
            on_case(number, max(expected, number), result.cases[number - 1])
        seen = ended

    return tick


# -- files ----------------------------------------------------------------------------------------


def validate_file(
    path: Path, registry: Registry, profile: str | None, hl7_profile: str = "pam-fr"
) -> list[tuple[str, list[Finding]]]:
    """(label, findings) for each message or resource in one file."""
    data = path.read_bytes()
    if path.suffix == ".json":
        try:
            resource = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            from conformance.fhir.registry import NOT_JSON
            from conformance.findings import Severity

            return [
                (path.name, [Finding(NOT_JSON, Severity.FATAL, "$this", f"not JSON: {exc}", "structure")])
            ]
        return [(path.name, registry.validate(resource, [profile] if profile else ()))]
    out = []
    for index, raw in enumerate(split_messages(data), 1):
        out.append((f"{path.name}#{index}", validate_hl7(raw, profile=hl7_profile)))
    return out


def _run_files(
    suite: Suite,
    target: Path,
    result: SuiteResult,
    registry: Registry,
    profile: str | None,
    progress: Progress,
) -> None:
    if target.is_dir():
        patterns = suite.settings.get("patterns") or ["*.hl7", "*.er7", "*.txt", "*.json"]
        files = sorted({p for pattern in patterns for p in target.rglob(pattern) if p.is_file()})
    elif target.is_file():
        files = [target]
    else:
        raise SuiteError(f"no such file or directory: {target}")
    hl7_profile = str(suite.settings.get("hl7_profile", "pam-fr"))
    for done, path in enumerate(files, 1):
        started = time.monotonic()
        for label, findings in validate_file(path, registry, profile, hl7_profile):
            case = CaseResult(label, str(path))
            case.findings(findings, "validate", label, label)
            case.seconds = time.monotonic() - started
            result.cases.append(case)
        progress(done, len(files), path.name)


# -- live MLLP receiver ----------------------------------------------------------------------------


async def _run_mllp_receiver(
    suite: Suite,
    target: str,
    result: SuiteResult,
    progress: Progress,
    timeout: float,
    apis: ResultApis,
    reveal: bool = False,
) -> None:
    from connectors.mllp.client import MllpClient

    host, port = parse_mllp(target)
    run = PerRun(suite.per_run)
    # the time-out holds for the connection too: a target that never accepts is one that never answers
    client = MllpClient(host, port, connect_timeout=timeout)
    try:
        async with Verifier(apis, run, timeout, reveal=reveal) as verifier:
            for done, case in enumerate(suite.cases, 1):
                started = time.monotonic()
                outcome = CaseResult(case.id, case.title)
                accepted: list[tuple[str, str]] = []  # (step, MSH-10) the system took charge of
                for number, step in enumerate(case.steps, 1):
                    where = f"step {number}"
                    raw = suite.data(str(step["send"])).read_bytes()
                    control_id = ""  # raw steps send bytes with no readable MSH-10
                    if not step.get("raw"):
                        raw, control_id = run.prepare(raw)
                    since = len(outcome.assertions)
                    shown = Step(
                        where, f"send {step['send']}", "hl7v2", show_hl7(raw, reveal=reveal), timeout=timeout
                    )
                    sent_at = time.monotonic()
                    try:
                        answer = await client.send(raw, timeout=timeout)
                    except (TimeoutError, OSError, ConnectionError, MessageError) as exc:
                        shown.seconds = time.monotonic() - sent_at
                        why = f"no acknowledgement: {type(exc).__name__}"
                        if isinstance(exc, TimeoutError):
                            why += f", none within the time-out of {timeout:g} s"
                        outcome.fail("ACK-RECEIVED", where, why)
                        shown.note = why
                        outcome.add_step(shown, since)
                        await client.close()
                        continue
                    shown.seconds = time.monotonic() - sent_at
                    shown.received = show_hl7(answer, reveal=reveal)
                    code = _check_ack(outcome, where, answer, control_id, step.get("expect") or {})
                    outcome.add_step(shown, since)
                    if control_id and code in ("AA", "CA"):
                        accepted.append((where, control_id))
                await verifier.after(outcome, case.then, accepted)
                outcome.seconds = time.monotonic() - started
                result.cases.append(outcome)
                progress(done, len(suite.cases), case.id)
    finally:
        await client.close()


def _check_ack(
    case: CaseResult, where: str, answer: bytes, control_id: str, expect: dict[str, Any]
) -> str | None:
    """Checks one acknowledgement; returns its MSA-1 (None when it cannot be read)."""
    from gateway.hl7.er7 import Message

    findings = validate_hl7(answer, profile="v2.5", answers=control_id, default_charset="UNICODE UTF-8")
    case.findings(findings, "ACK", where, "the acknowledgement")
    try:
        ack = Message.decode(answer, default_charset="UNICODE UTF-8")
    except MessageError:
        return None
    code = ack.get("MSA-1")
    wanted = [str(c) for c in expect.get("ack", ["AA", "CA"])]
    case.expect(
        code in wanted,
        "ACK-EXPECTED",
        f"{where} MSA-1",
        f"MSA-1 is {code or '(empty)'}; expected {'/'.join(wanted)}",
    )
    if expect.get("err"):
        case.expect(
            ack.segment("ERR") is not None,
            "ACK-ERR-EXPECTED",
            f"{where} ERR",
            "an ERR segment explains the refusal",
        )
    return code


# -- live MLLP sender ------------------------------------------------------------------------------


async def _run_mllp_sender(
    suite: Suite,
    listen: str,
    result: SuiteResult,
    progress: Progress,
    count: int | None,
    reveal: bool = False,
) -> None:
    from connectors.mllp.framing import FrameDecoder, Oversize, frame
    from gateway.core.errors import AckCode, ValidationError
    from gateway.hl7.ack import build_ack
    from gateway.hl7.er7 import Message

    host, port = parse_mllp(listen)
    wanted = count or int(suite.settings.get("messages", 10))
    idle = float(suite.settings.get("idle_timeout_s", 60))
    profile = str(suite.settings.get("profile", "pam-fr"))
    received = asyncio.Event()
    finished = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder()
        try:
            while not finished.is_set():
                data = await reader.read(65536)
                if not data:
                    return
                for item in decoder.feed(data):
                    if isinstance(item, Oversize):
                        return
                    started = time.monotonic()
                    findings = validate_hl7(item, profile=profile)
                    msg: Message | None
                    try:
                        msg = Message.decode(item, default_charset="8859/15")
                    except MessageError:
                        msg = None
                    label = f"message-{len(result.cases) + 1}"
                    title = (
                        f"{msg.message_type}^{msg.trigger} control id {msg.control_id}"
                        if msg
                        else "unreadable"
                    )
                    case = CaseResult(label, title)
                    case.findings(findings, "validate", label, "the message")
                    case.seconds = time.monotonic() - started
                    result.cases.append(case)
                    errors = [f for f in findings if f.is_error]
                    if errors:
                        first = errors[0]
                        ack = build_ack(
                            msg,
                            AckCode.AE,
                            ValidationError(f"{first.rule}: {first.message}", location=first.location),
                        )
                    else:
                        ack = build_ack(msg, AckCode.AA)
                    # what the system sent, and the acknowledgement the suite answered
                    exchange = Step(label, "receive", "hl7v2", show_hl7(ack, reveal=reveal))
                    exchange.received = show_hl7(item, reveal=reveal)
                    exchange.seconds = case.seconds
                    case.add_step(exchange, 0)
                    writer.write(frame(ack))
                    await writer.drain()
                    progress(len(result.cases), wanted, label)
                    received.set()
                    if len(result.cases) >= wanted:
                        finished.set()
        finally:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, host, port)
    try:
        while not finished.is_set():
            received.clear()
            try:
                await asyncio.wait_for(received.wait(), idle)
            except TimeoutError:
                break
    finally:
        server.close()
        await server.wait_closed()


# -- helpers shared with the FHIR runner -------------------------------------------------------------


def sha1_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha1(data, usedforsecurity=False).digest()).decode()
