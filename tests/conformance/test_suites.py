"""Suites as data, the files and live-sender runners, the reports and the CLI."""

from __future__ import annotations

import asyncio
import io
import socket
from pathlib import Path
from xml.etree import ElementTree as ET

import orjson
import pytest

from conformance import cli
from conformance.report import to_html, to_json, to_junit
from conformance.runner import run_suite
from conformance.suite import DATA_DIR, SuiteError, available, find, load
from connectors.mllp.client import MllpClient


def test_every_shipped_suite_loads_and_names_existing_data() -> None:
    suites = {s.name: s for s in available()}
    assert {"files", "pam-fr-receiver", "pam-fr-sender", "mhd-document-server"} <= set(suites)
    for step in (step for case in suites["pam-fr-receiver"].cases for step in case.steps):
        assert suites["pam-fr-receiver"].data(step["send"]).is_file()


def test_a_bad_suite_is_named_with_its_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nkind: telepathy\n")
    with pytest.raises(SuiteError, match=r"bad.yaml: key 'kind'"):
        load(bad)
    with pytest.raises(SuiteError, match="no suite"):
        find("no-such-suite")


async def test_files_suite_and_its_three_reports(tmp_path: Path) -> None:
    (tmp_path / "ok.hl7").write_bytes((DATA_DIR / "hl7" / "a01-admission.hl7").read_bytes())
    broken = (DATA_DIR / "hl7" / "a02-transfer.hl7").read_bytes().replace(b"|INSERT|", b"|MOVE|")
    (tmp_path / "broken.hl7").write_bytes(broken)
    result = await run_suite(find("files"), str(tmp_path))
    assert not result.passed
    report = orjson.loads(to_json(result))
    assert report["result"] == "FAILED"
    assert report["counts"] == {
        "cases": 2,
        "passed": 1,
        "failed": 1,
        "checks": 2,
        "errors": 1,
        "warnings": 0,
        "skipped": 0,
    }
    failed = next(c for c in report["cases"] if c["result"] == "FAILED")
    assert failed["assertions"][0] | {"message": ""} == {
        "check": "PAMFR-ZBE-004",
        "result": "FAILED",
        "severity": "error",
        "location": "ZBE-4",
        "message": "",
    }
    junit = ET.fromstring(to_junit(result))  # noqa: S314 - our own report, just written
    suite = junit.find("testsuite")
    assert suite is not None and suite.get("tests") == "2" and suite.get("failures") == "1"
    failure = junit.find(".//failure")
    assert failure is not None and "PAMFR-ZBE-004 at ZBE-4" in (failure.get("message") or "")
    page = to_html(result).decode()
    assert "FAILED" in page and "PAMFR-ZBE-004" in page and "<script" not in page


async def test_live_sender_suite_validates_what_it_receives_and_answers() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    task = asyncio.create_task(run_suite(find("pam-fr-sender"), f"mllp://127.0.0.1:{port}", count=2))
    client = MllpClient("127.0.0.1", port)
    for _ in range(100):  # the listener starts with the task
        try:
            await client.connect()
            break
        except OSError:
            await asyncio.sleep(0.05)
    good = (DATA_DIR / "hl7" / "a01-admission.hl7").read_bytes()
    bad = good.replace(b"|INSERT|", b"|MOVE|")
    acks = [await client.send(good), await client.send(bad)]
    await client.close()
    result = await asyncio.wait_for(task, 30)
    assert [c.passed for c in result.cases] == [True, False]
    assert b"MSA|AA|C1" in acks[0]
    assert b"MSA|AE|C1" in acks[1] and b"\rERR|" in acks[1]


def test_cli_validate_and_list(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    good = DATA_DIR / "fhir" / "patient-ins.json"
    assert cli.validate([str(good)], out=out, err=err) == 0
    assert "patient-ins.json: PASSED" in out.getvalue()
    resource = orjson.loads(good.read_bytes())
    del resource["birthDate"]
    bad = tmp_path / "bad.json"
    bad.write_bytes(orjson.dumps(resource))
    out = io.StringIO()
    assert cli.validate([str(bad)], profile="fr-core-patient-ins", out=out, err=err) == 1
    assert "FHIR-CARD-001 at Patient.birthDate" in out.getvalue()
    assert cli.validate([str(bad)], profile="no-such-profile", out=out, err=err) == 2
    assert "no profile 'no-such-profile'" in err.getvalue()
    out = io.StringIO()
    assert cli.list_suites(out=out) == 0
    assert "pam-fr-receiver" in out.getvalue()
