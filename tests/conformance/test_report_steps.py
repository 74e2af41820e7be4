"""Each step of a report shows what was sent and what came back: masked by default, as it is with
--reveal (and a warning then at the top of both reports), always escaped in the HTML."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from conformance.report import (
    FORMAT_VERSION,
    REVEAL_WARNING,
    CaseResult,
    Step,
    SuiteResult,
    mask_fhir,
    show_hl7,
    show_query,
    to_html,
    to_json,
)
from conformance.runner import run_suite
from conformance.suite import DATA_DIR, Suite, find
from connectors.mllp.framing import FrameDecoder, Oversize, frame
from gateway.hl7.er7 import Message
from tests.conformance import test_gateway_suites as gateway_suites
from tests.test_process import Proc

gateway = gateway_suites.gateway  # the fixture: a real `passerelle run` (mapping into its /fhir)

# The admission's patient, as the suite's data file writes it (hl7/a01-admission.hl7)
FAMILY, GIVEN, BIRTH, IPP = "MARTIN", "Lucie", "19820317", "200001"
STEP_KEYS = {
    "step",
    "action",
    "kind",
    "result",
    "seconds",
    "timeout_s",
    "sent",
    "received",
    "note",
    "assertion_indexes",
}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*gateway_suites.PASSERELLE, *args], capture_output=True, text=True, timeout=110, check=False
    )


def _receiver_run(gateway: Proc, reports: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    http_port = int(gateway.wait_event("gateway_started")["http_port"])  # type: ignore[call-overload]
    return _cli(
        "conformance",
        "run",
        "pam-fr-receiver",
        "--target",
        f"mllp://127.0.0.1:{gateway.mllp_port}",
        "--fhir",
        f"http://127.0.0.1:{http_port}/fhir",
        "--api",
        f"http://127.0.0.1:{http_port}/api",
        "--token",
        gateway_suites.ADMIN,
        "--report-dir",
        str(reports),
        *extra,
    )


def _msh(text: str, n: int) -> str:
    """MSH-n of a message as the reports show it (one segment a line)."""
    return text.split("\n", 1)[0].split("|")[n - 1]


def _sent_ipp(step: dict[str, Any]) -> str:
    """The IPP this run sent for the authored 200001: the run's six digits appended
    (conformance/per_run.py); the run's id is in every MSH-10 it sends: CF + 8 hex + serial."""
    run_id = _msh(step["sent"], 10)[2:10]
    return IPP + f"{int(run_id, 16) % 1_000_000:06d}"


def test_receiver_reports_show_each_message_and_ack_masked_and_with_reveal(
    gateway: Proc, tmp_path: Path
) -> None:
    done = _receiver_run(gateway, tmp_path / "masked")
    assert done.returncode == 0, done.stdout + done.stderr
    data = (tmp_path / "masked" / "pam-fr-receiver.json").read_text()
    page = (tmp_path / "masked" / "pam-fr-receiver.html").read_text()
    report = orjson.loads(data)
    assert report["format_version"] == FORMAT_VERSION == 2
    assert report["masked"] is True and "warning" not in report and REVEAL_WARNING not in page
    assert report["timeout"] == {"seconds": 30.0, "source": "default"}
    assert "Time-out for each answer: 30 s (the default)." in page
    admission = next(c for c in report["cases"] if c["id"] == "admission")
    step = admission["steps"][0]
    assert set(step) == STEP_KEYS
    assert (step["step"], step["action"], step["kind"]) == ("step 1", "send hl7/a01-admission.hl7", "hl7v2")
    assert step["result"] == "PASSED" and step["timeout_s"] == 30.0
    # the structure is kept: segments, field positions, MSH-9, MSA-1, MSA-2
    assert _msh(step["sent"], 9) == "ADT^A01^ADT_A01"
    assert [line.split("|", 1)[0] for line in step["sent"].split("\n")] == ["MSH", "EVN", "PID", "PV1", "ZBE"]
    pid = next(line for line in step["sent"].split("\n") if line.startswith("PID|"))
    assert pid.split("|")[3] == pid.split("|")[5] == pid.split("|")[7] == "***"  # PID-3, PID-5, PID-7
    assert re.search(r"^MSA\|AA\|" + re.escape(_msh(step["sent"], 10)) + r"$", step["received"], re.M)
    assert [admission["assertions"][i]["check"] for i in step["assertion_indexes"]] == ["ACK", "ACK-EXPECTED"]
    # the patient's data is in neither report
    sent_ipp = _sent_ipp(step)
    for text in (data, page):
        for secret in (FAMILY, GIVEN, BIRTH, sent_ipp):
            assert secret not in text
    assert "ADT^A01^ADT_A01" in page and "MSA|AA|" in page
    # result checks are steps too: the search sent, identifiers' values masked, and what it found
    prov = next(c for c in report["cases"] if c["id"] == "prov-then-vali")
    search = next(s for s in prov["steps"] if s["step"] == "then[0]")
    assert search["kind"] == "fhir" and search["result"] == "PASSED"
    assert search["sent"].endswith("/fhir/Patient?identifier=urn:oid:1.2.250.1.71.4.2.2.1234|***")
    (found,) = orjson.loads(search["received"])
    assert found["resourceType"] == "Patient" and found["birthDate"] == "***"
    assert {i["value"] for i in found["identifier"]} == {"***"}
    statuses = [s for s in prov["steps"] if s["kind"] == "http"]
    assert [s["step"] for s in statuses] == ["step 1 status", "step 2 status"]
    assert all(s["sent"].startswith("GET ") and "control_id=CF" in s["sent"] for s in statuses)
    # the progress lines of a CI log: one per case, in order, plain text
    lines = [line for line in done.stdout.splitlines() if line.startswith("[")]
    ids = [c.id for c in find("pam-fr-receiver").cases]
    assert lines == [
        f"[{n}/{len(ids)}] pam-fr-receiver {case} PASSED {_seconds(line)} s"
        for n, (case, line) in enumerate(zip(ids, lines, strict=True), 1)
    ]
    assert "\x1b" not in done.stdout + done.stderr

    done = _receiver_run(gateway, tmp_path / "revealed", "--reveal")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "--reveal" in done.stderr
    data = (tmp_path / "revealed" / "pam-fr-receiver.json").read_text()
    page = (tmp_path / "revealed" / "pam-fr-receiver.html").read_text()
    report = orjson.loads(data)
    assert next(iter(report)) == "warning" and report["warning"] == REVEAL_WARNING
    assert report["masked"] is False
    assert page.index(REVEAL_WARNING) < page.index("<h1>")
    step = next(c for c in report["cases"] if c["id"] == "admission")["steps"][0]
    assert f"|{_sent_ipp(step)}^^^HOPITAL-NORD" in step["sent"]
    assert f"|{FAMILY}^{GIVEN}^" in step["sent"] and f"|{BIRTH}|" in step["sent"]
    for text in (data, page):
        assert _sent_ipp(step) in text and FAMILY in text and BIRTH in text


def _seconds(line: str) -> str:
    return line.rsplit(" ", 2)[-2]


# -- a receiver of our own: answers what the test says ----------------------------------------------

Answer = Callable[[bytes], bytes | None]


@pytest.fixture
async def receiver() -> AsyncIterator[Callable[[Answer], Awaitable[str]]]:
    servers: list[asyncio.Server] = []

    async def start(answer: Answer) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            decoder = FrameDecoder()
            try:
                while data := await reader.read(65536):
                    for item in decoder.feed(data):
                        if isinstance(item, Oversize):
                            return
                        reply = answer(bytes(item))
                        if reply is not None:
                            writer.write(frame(reply))
                            await writer.drain()
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return f"mllp://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def one_case(case_id: str) -> Suite:
    suite = find("pam-fr-receiver")
    return dataclasses.replace(suite, cases=[c for c in suite.cases if c.id == case_id])


SCRIPT = "<script>alert(1)</script>"


def _hostile_ack(message: bytes) -> bytes:
    control = Message.decode(message, default_charset="UNICODE UTF-8").control_id
    return (
        f"MSH|^~\\&|{SCRIPT}|R|S|F|20260101000000||ACK^A01^ACK|X1|P|2.5\rMSA|AA|{control}|</pre>{SCRIPT}\r"
    ).encode()


@pytest.mark.parametrize("reveal", [False, True])
async def test_script_in_a_message_is_written_escaped_in_the_html(
    receiver: Callable[[Answer], Awaitable[str]], reveal: bool
) -> None:
    target = await receiver(_hostile_ack)
    result = await run_suite(one_case("admission"), target, reveal=reveal, timeout=5)
    (step,) = result.cases[0].steps
    assert step.received is not None and SCRIPT in step.received  # MSH-3 is shown, masked or not
    assert (f"</pre>{SCRIPT}" in step.received) is reveal  # MSA-3, free text, only when revealed
    page = to_html(result).decode()
    assert "<script" not in page.lower() and "</pre><script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert (f"&lt;/pre&gt;{SCRIPT}".replace("<", "&lt;").replace(">", "&gt;") in page) is reveal


def test_every_value_of_a_step_is_escaped() -> None:
    case = CaseResult("c<1>", 'a "title" <b>')
    case.fail("X<", "loc>", "msg &")
    case.add_step(Step("<s>", "<act>", "<kind>", f"sent {SCRIPT}", f"got {SCRIPT}", note=SCRIPT), 0)
    result = SuiteResult("s<", "<t>", "<target>", [case], revealed=True)
    page = to_html(result).decode()
    assert "<script" not in page and "<s>" not in page and "<act>" not in page and "<b>" not in page
    assert page.count("&lt;script&gt;") == 3


# -- masking ----------------------------------------------------------------------------------------


def test_masking_keeps_structure_and_codes_and_hides_data_and_free_text() -> None:
    ack = (
        b"MSH|^~\\&|R|F|S|SF|20260101000000||ACK^A01^ACK|A1|P|2.5\r"
        b"MSA|AE|C1|MARTIN Lucie refused\r"
        b"ERR||PID^1^5|207^Application internal error^HL70357|E||p1|diag DUPONT|user DUPONT||||0380000000\r"
    )
    shown = show_hl7(ack)
    assert shown.split("\n") == [
        "MSH|^~\\&|R|F|S|SF|20260101000000||ACK^A01^ACK|A1|P|2.5",
        "MSA|AE|C1|***",
        "ERR||PID^1^5|207^Application internal error^HL70357|E||***|***|***||||***",
    ]
    assert show_hl7(ack, reveal=True).split("\n")[1] == "MSA|AE|C1|MARTIN Lucie refused"
    message = (DATA_DIR / "hl7" / "a01-admission.hl7").read_bytes()
    masked = show_hl7(message)
    assert FAMILY not in masked and BIRTH not in masked and IPP not in masked and "Dijon" not in masked
    assert show_hl7(b"HELLO|\x0bnot HL7") == "<14 bytes, unreadable, masked>"
    assert show_hl7(b"HELLO|\x0bnot HL7", reveal=True) == "HELLO|\\x0bnot HL7"
    query = [("identifier", "urn:oid:1.2|200001"), ("name", "MARTIN"), ("_count", "10")]
    assert show_query(query) == "identifier=urn:oid:1.2|***&name=***&_count=10"
    assert show_query(query, reveal=True) == "identifier=urn:oid:1.2|200001&name=MARTIN&_count=10"
    patient = {
        "resourceType": "Patient",
        "id": "p1",
        "active": True,
        "identifier": [{"system": "urn:oid:1.2", "value": "200001"}],
        "name": [{"family": FAMILY, "given": [GIVEN]}],
        "birthDate": "1982-03-17",
        "address": [{"city": "Dijon", "postalCode": "21000"}],
        "telecom": [{"system": "phone", "value": "0380000000"}],
        "link": [{"type": "replaced-by", "other": {"reference": "Patient/p2"}}],
        "extension": [
            {"url": "birthPlace", "valueAddress": {"extension": [{"url": "insee", "code": "21054"}]}}
        ],
    }
    assert mask_fhir(patient) == {
        "resourceType": "Patient",
        "id": "p1",
        "active": True,
        "identifier": [{"system": "urn:oid:1.2", "value": "***"}],
        "name": [{"family": "***", "given": ["***"]}],
        "birthDate": "***",
        "address": [{"city": "***", "postalCode": "***"}],
        "telecom": [{"system": "phone", "value": "***"}],
        "link": [{"type": "replaced-by", "other": {"reference": "Patient/p2"}}],
        "extension": [
            {"url": "birthPlace", "valueAddress": {"extension": [{"url": "insee", "code": "***"}]}}
        ],
    }


def test_the_old_report_keys_are_all_still_there() -> None:
    case = CaseResult("c", "t")
    case.ok("ACK", "step 1", "fine")
    report = orjson.loads(to_json(SuiteResult("s", "t", "x", [case])))
    assert {"suite", "title", "target", "result", "started", "seconds", "counts", "cases"} <= set(report)
    assert set(report["cases"][0]) == {"id", "title", "result", "seconds", "assertions", "steps"}
    assert set(report["cases"][0]["assertions"][0]) == {"check", "result", "severity", "location", "message"}
    assert report["timeout"] is None and report["masked"] is True


async def test_the_sender_suite_shows_each_message_received_and_the_ack_answered() -> None:
    import socket

    from connectors.mllp.client import MllpClient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    task = asyncio.create_task(run_suite(find("pam-fr-sender"), f"mllp://127.0.0.1:{port}", count=1))
    client = MllpClient("127.0.0.1", port)
    for _ in range(100):
        try:
            await client.connect()
            break
        except OSError:
            await asyncio.sleep(0.05)
    await client.send((DATA_DIR / "hl7" / "a01-admission.hl7").read_bytes())
    await client.close()
    result = await asyncio.wait_for(task, 30)
    (step,) = result.cases[0].steps
    assert step.received is not None and step.sent is not None
    assert _msh(step.received, 9) == "ADT^A01^ADT_A01" and FAMILY not in step.received
    assert "\nMSA|AA|C1" in step.sent
    assert result.timeout is None  # a sender suite awaits no answer: no time-out to report
