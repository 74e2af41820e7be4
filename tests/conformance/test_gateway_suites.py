"""The gateway passes its own suites: `passerelle run` as a process, the suites driven through the CLI."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import yaml

from tests.test_process import Proc

PASSERELLE = [sys.executable, "-m", "gateway.cli"]
TOKEN = "conformance-suite-token-0123456789"  # noqa: S105 - a throwaway credential of the test config


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Proc]:
    config = {
        "workers": 0,
        "log_level": "info",
        "http": {"host": "127.0.0.1", "port": 0},
        "auth": {
            "tokens": [
                {"token": TOKEN, "subject": "suite", "role": "professional", "practitioner": "810000000001"}
            ]
        },
        "documents": {"mode": "pdsm"},
        "sources": [{"name": "hospital", "type": "mllp", "host": "127.0.0.1", "port": 0}],
        "channels": [
            {
                "name": "adt",
                "source": "hospital",
                "destinations": [{"name": "files", "type": "file", "directory": str(tmp_path / "out")}],
            }
        ],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = Proc(path, tmp_path / "data")
    try:
        yield proc
    finally:
        proc.close()


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PASSERELLE, *args], capture_output=True, text=True, timeout=110, check=False)


def test_the_gateway_passes_the_pam_fr_receiver_suite(gateway: Proc, tmp_path: Path) -> None:
    port = gateway.mllp_port
    reports = tmp_path / "reports"
    done = _run(
        "conformance",
        "run",
        "pam-fr-receiver",
        "--target",
        f"mllp://127.0.0.1:{port}",
        "--report-dir",
        str(reports),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = orjson.loads((reports / "pam-fr-receiver.json").read_bytes())
    assert report["result"] == "PASSED"
    assert (
        report["counts"]["cases"] == 11
        and report["counts"]["failed"] == 0
        and report["counts"]["errors"] == 0
    )
    # every ACK was checked: its structure, MSA-2 echo and the expected code
    checks = {a["check"] for case in report["cases"] for a in case["assertions"]}
    assert {"ACK", "ACK-EXPECTED", "ACK-ERR-EXPECTED"} <= checks
    junit = (reports / "pam-fr-receiver.junit.xml").read_text()
    assert 'tests="11"' in junit and 'failures="0"' in junit
    assert "PASSED" in (reports / "pam-fr-receiver.html").read_text()


def test_the_gateway_passes_the_mhd_document_server_suite(gateway: Proc, tmp_path: Path) -> None:
    http_port = int(gateway.wait_event("gateway_started")["http_port"])  # type: ignore[call-overload]
    reports = tmp_path / "reports"
    done = _run(
        "conformance",
        "run",
        "mhd-document-server",
        "--target",
        f"http://127.0.0.1:{http_port}/fhir",
        "--token",
        TOKEN,
        "--report-dir",
        str(reports),
    )
    report = orjson.loads((reports / "mhd-document-server.json").read_bytes())
    failed = [
        (c["id"], a["check"], a["location"], a["message"])
        for c in report["cases"]
        for a in c["assertions"]
        if a["result"] == "FAILED" and a["severity"] in ("error", "fatal")
    ]
    assert done.returncode == 0, "\n".join(map(str, failed))
    assert report["result"] == "PASSED" and report["counts"]["cases"] == 7


def test_a_failing_target_fails_the_run_with_reports(tmp_path: Path) -> None:
    # nothing listens there: every case fails, the exit code says so, the reports are still written
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reports = tmp_path / "reports"
    done = _run(
        "conformance",
        "run",
        "pam-fr-receiver",
        "--target",
        f"mllp://127.0.0.1:{port}",
        "--report-dir",
        str(reports),
    )
    assert done.returncode == 1
    report = orjson.loads((reports / "pam-fr-receiver.json").read_bytes())
    assert report["result"] == "FAILED" and report["counts"]["failed"] == 11
    assert 'failures="11"' in (reports / "pam-fr-receiver.junit.xml").read_text()
