"""Off a terminal (a CI log), `conformance run` prints one plain line per case as it ends."""

from __future__ import annotations

import io
import re
import subprocess
from pathlib import Path

import orjson

from conformance import cli
from conformance.suite import DATA_DIR
from tests.conformance import test_gateway_suites as gateway_suites
from tests.test_process import Proc

gateway = gateway_suites.gateway  # the fixture: a real `passerelle run`

LINE = re.compile(r"\[(\d+)/(\d+)\] (\S+) (\S+) (PASSED|FAILED) (\d+\.\d) s")


def _progress(stdout: str) -> list[tuple[int, int, str, str, str]]:
    found = []
    for line in stdout.splitlines():
        if line.startswith("["):
            match = LINE.fullmatch(line)
            assert match, line
            number, total, suite, case, verdict, _ = match.groups()
            found.append((int(number), int(total), suite, case, verdict))
    return found


def _files(tmp_path: Path) -> Path:
    good = (DATA_DIR / "hl7" / "a01-admission.hl7").read_bytes()
    (tmp_path / "a.hl7").write_bytes(good + good.replace(b"|INSERT|", b"|MOVE|"))  # two messages
    (tmp_path / "b.hl7").write_bytes(good)
    return tmp_path


def test_one_line_per_case_when_stdout_is_a_pipe(tmp_path: Path) -> None:
    done = subprocess.run(
        [*gateway_suites.PASSERELLE, "conformance", "run", "files", "--target", str(_files(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert _progress(done.stdout) == [
        (1, 3, "files", "a.hl7#1", "PASSED"),
        (2, 3, "files", "a.hl7#2", "FAILED"),
        (3, 3, "files", "b.hl7#1", "PASSED"),
    ]
    assert "\x1b" not in done.stdout and "\x1b" not in done.stderr
    assert "MARTIN" not in done.stdout and "19820317" not in done.stdout


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_no_lines_on_a_terminal(tmp_path: Path) -> None:
    out, err = Terminal(), io.StringIO()
    assert cli.run("files", str(_files(tmp_path)), out=out, err=err) == cli.EXIT_FAIL
    assert _progress(out.getvalue()) == []
    assert "files: FAILED" in out.getvalue()  # the summary, as before
    piped = io.StringIO()
    assert cli.run("files", str(tmp_path), out=piped, err=err) == cli.EXIT_FAIL
    assert len(_progress(piped.getvalue())) == 3


def test_the_document_servers_setup_case_has_its_line(gateway: Proc, tmp_path: Path) -> None:
    http_port = int(gateway.wait_event("gateway_started")["http_port"])  # type: ignore[call-overload]
    done = subprocess.run(
        [
            *gateway_suites.PASSERELLE,
            "conformance",
            "run",
            "mhd-document-server",
            "--target",
            f"http://127.0.0.1:{http_port}/fhir",
            "--token",
            gateway_suites.TOKEN,
            "--report-dir",
            str(tmp_path / "reports"),
        ],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = _progress(done.stdout)
    assert [(n, total) for n, total, *_ in lines] == [(n, 7) for n in range(1, 8)]
    assert lines[0][2:] == ("mhd-document-server", "setup-patient", "PASSED")
    assert "time-out for each answer: 30 s (the default)" in done.stdout
    # each step of the document server's cases shows its request and answer, masked
    (report,) = (tmp_path / "reports").glob("*.json")
    data = orjson.loads(report.read_bytes())
    steps = [step for case in data["cases"] for step in case["steps"]]
    assert steps and all(step["kind"] == "fhir" and step["sent"] and step["received"] for step in steps)
    assert any(step["sent"].startswith("POST ") for step in steps)
    assert not any("TEST-CONFORMITE" in str(step) for step in steps)
