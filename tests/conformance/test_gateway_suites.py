"""The gateway passes its own suites: `passerelle run` as a process, the suites driven through the CLI.

The receiver suite checks results too: the gateway maps into its built-in repository, read back
through its own /fhir, and every message's status is read through its admin API.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from tests.test_process import Proc

PASSERELLE = [sys.executable, "-m", "gateway.cli"]
TOKEN = "conformance-suite-token-0123456789"  # noqa: S105 - a throwaway credential of the test config
ADMIN = "conformance-admin-token-9876543210"  # reads /fhir and /api for the result checks
MAPPINGS = Path(__file__).resolve().parents[2] / "mappings"


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Proc]:
    config = {
        "workers": 0,
        "log_level": "info",
        "http": {"host": "127.0.0.1", "port": 0},
        "auth": {
            "tokens": [
                {"token": TOKEN, "subject": "suite", "role": "professional", "practitioner": "810000000001"},
                {"token": ADMIN, "subject": "suite-admin", "role": "admin"},
            ]
        },
        "documents": {"mode": "pdsm"},
        "sources": [{"name": "hospital", "type": "mllp", "host": "127.0.0.1", "port": 0}],
        "channels": [
            {  # as config.yaml ships: HL7v2 → FHIR into the repository that /fhir serves
                "name": "hospital-fhir",
                "source": "hospital",
                "queue": True,
                "steps": [{"type": "fhir_mapping", "directory": str(MAPPINGS)}],
                "destinations": [
                    {
                        "name": "repository",
                        "type": "fhir_repository",
                        "path": "{data_dir}/fhir.db",
                        "retry": {"max_attempts": 3, "initial_backoff_s": 0.1},
                    }
                ],
            },
            {
                "name": "adt",
                "source": "hospital",
                "destinations": [{"name": "files", "type": "file", "directory": str(tmp_path / "out")}],
            },
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


RESULT_CHECKS = {
    "MSG-STATUS",
    "FHIR-COUNT",
    "FHIR-IDENTIFIER",
    "FHIR-NO-IDENTIFIER",
    "FHIR-EQUALS",
    "FHIR-HOLDS",
    "FHIR-LINK",
}


def _failures(report: dict[str, Any]) -> str:
    return "\n".join(
        f"{c['id']}: {a['check']} at {a['location']}: {a['message']}"
        for c in report["cases"]
        for a in c["assertions"]
        if a["result"] == "FAILED" and a["severity"] in ("error", "fatal")
    )


def test_the_gateway_passes_the_pam_fr_receiver_suite(gateway: Proc, tmp_path: Path) -> None:
    port = gateway.mllp_port
    http_port = int(gateway.wait_event("gateway_started")["http_port"])  # type: ignore[call-overload]
    # twice: the second run sends its own patients, so it meets nothing the first one left
    for run in ("first", "second"):
        reports = tmp_path / run
        done = _run(
            "conformance",
            "run",
            "pam-fr-receiver",
            "--target",
            f"mllp://127.0.0.1:{port}",
            "--fhir",
            f"http://127.0.0.1:{http_port}/fhir",
            "--api",
            f"http://127.0.0.1:{http_port}/api",
            "--token",
            ADMIN,
            "--report-dir",
            str(reports),
        )
        report = orjson.loads((reports / "pam-fr-receiver.json").read_bytes())
        assert done.returncode == 0, _failures(report) or done.stdout + done.stderr
        assert report["result"] == "PASSED"
        counts = report["counts"]
        assert (counts["cases"], counts["failed"], counts["errors"], counts["skipped"]) == (15, 0, 0, 0)
        # every ACK was checked (structure, MSA-2 echo, expected code), and the results behind them
        checks = {a["check"] for case in report["cases"] for a in case["assertions"]}
        assert {"ACK", "ACK-EXPECTED", "ACK-ERR-EXPECTED"} | RESULT_CHECKS <= checks
        merge = next(c for c in report["cases"] if c["id"] == "merge-then-ins-change-then-movement-update")
        statuses = [a for a in merge["assertions"] if a["check"] == "MSG-STATUS"]
        assert len(statuses) == 6 and all(a["result"] == "PASSED" for a in statuses)
        junit = (reports / "pam-fr-receiver.junit.xml").read_text()
        assert 'tests="15"' in junit and 'failures="0"' in junit
        page = (reports / "pam-fr-receiver.html").read_text()
        assert "PASSED" in page and "FHIR-LINK" in page


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
    assert report["result"] == "FAILED" and report["counts"]["failed"] == 15
    assert 'failures="15"' in (reports / "pam-fr-receiver.junit.xml").read_text()
