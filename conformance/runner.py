"""Runs a suite against its target: files, a live MLLP receiver or sender, a live FHIR document server."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from conformance.fhir.registry import Registry, default_registry
from conformance.findings import Finding
from conformance.hl7v2.validator import validate_hl7
from conformance.per_run import PerRun
from conformance.report import CaseResult, SuiteResult
from conformance.results import ResultApis, Verifier
from conformance.suite import Suite, SuiteError
from gateway.core.errors import MessageError
from gateway.hl7.er7 import split_messages

Progress = Callable[[int, int, str], None]  # (done, total, case id)

HL7_SUFFIXES = (".hl7", ".er7", ".txt")


def _noop(done: int, total: int, label: str) -> None:
    return None


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
    timeout: float = 30.0,
    fhir: str | None = None,
    api: str | None = None,
    settle: float | None = None,
) -> SuiteResult:
    """``fhir``, ``api`` and ``settle`` serve the result checks of mllp-receiver suites: the
    system's FHIR API, a Passerelle gateway's admin API, and the seconds given to processing
    (default: the suite's ``settle_s``)."""
    result = SuiteResult(suite.name, suite.title, target)
    start = time.monotonic()
    registry = registry or default_registry()
    if suite.kind == "files":
        _run_files(suite, Path(target.removeprefix("file://")), result, registry, profile, progress)
    elif suite.kind == "mllp-receiver":
        wait = float(suite.settings.get("settle_s", 20)) if settle is None else settle
        apis = ResultApis(fhir=fhir, api=api, token=token, settle=wait)
        await _run_mllp_receiver(suite, target, result, progress, timeout, apis)
    elif suite.kind == "mllp-sender":
        await _run_mllp_sender(suite, target, result, progress, count)
    else:
        from conformance.mhd import run_document_server

        await run_document_server(suite, target, result, registry, progress, token=token, timeout=timeout)
    result.seconds = time.monotonic() - start
    return result


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
    suite: Suite, target: str, result: SuiteResult, progress: Progress, timeout: float, apis: ResultApis
) -> None:
    from connectors.mllp.client import MllpClient

    host, port = parse_mllp(target)
    run = PerRun(suite.per_run)
    client = MllpClient(host, port)
    try:
        async with Verifier(apis, run, timeout) as verifier:
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
                    try:
                        answer = await client.send(raw, timeout=timeout)
                    except (TimeoutError, OSError, ConnectionError, MessageError) as exc:
                        outcome.fail("ACK-RECEIVED", where, f"no acknowledgement: {type(exc).__name__}")
                        await client.close()
                        continue
                    code = _check_ack(outcome, where, answer, control_id, step.get("expect") or {})
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
    suite: Suite, listen: str, result: SuiteResult, progress: Progress, count: int | None
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
