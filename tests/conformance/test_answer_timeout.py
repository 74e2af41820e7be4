"""The time-out each answer is waited for: --timeout, else the suite's timeout_s, else 30 s; applied,
and said in both reports and on stdout."""

from __future__ import annotations

import io
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from conformance import cli
from conformance.runner import DEFAULT_TIMEOUT, answer_timeout, run_suite
from conformance.suite import SuiteError, load
from gateway.cli import build_parser
from tests.conformance.test_gateway_suites import PASSERELLE


@pytest.fixture
def silent_target() -> Iterator[str]:
    """A port that takes connections (the kernel's backlog) and never answers a byte."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"mllp://127.0.0.1:{s.getsockname()[1]}"


def one_step_suite(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "slow.yaml"
    path.write_text(
        f"name: slow\nkind: mllp-receiver\n{extra}"
        "cases:\n  - id: admission\n    steps:\n      - send: hl7/a01-admission.hl7\n"
    )
    return path


def test_timeout_option_fails_a_silent_target_after_that_time_and_says_so(
    silent_target: str, tmp_path: Path
) -> None:
    reports = tmp_path / "reports"
    started = time.monotonic()
    done = subprocess.run(
        [
            *PASSERELLE,
            "conformance",
            "run",
            str(one_step_suite(tmp_path, "timeout_s: 60\n")),  # the option wins over the suite's
            "--target",
            silent_target,
            "--timeout",
            "1",
            "--report-dir",
            str(reports),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert time.monotonic() - started < 20  # not the suite's 60 s, nor the default 30 s
    assert done.returncode == 1, done.stdout + done.stderr
    report = orjson.loads((reports / "slow.json").read_bytes())
    assert report["timeout"] == {"seconds": 1.0, "source": "option"}
    (case,) = report["cases"]
    (step,) = case["steps"]
    assert step["result"] == "FAILED" and step["received"] is None and step["timeout_s"] == 1.0
    assert 0.9 <= step["seconds"] < 5
    assert step["note"] == "no acknowledgement: TimeoutError, none within the time-out of 1 s"
    (failed,) = [case["assertions"][i] for i in step["assertion_indexes"]]
    assert failed["check"] == "ACK-RECEIVED" and failed["message"] == step["note"]
    page = (reports / "slow.html").read_text()
    assert "Time-out for each answer: 1 s (given by --timeout)." in page
    assert "none within the time-out of 1 s" in page
    assert "time-out for each answer: 1 s (given by --timeout)" in done.stdout
    assert any(line.startswith("[1/1] slow admission FAILED ") for line in done.stdout.splitlines())


async def test_the_suites_timeout_applies_unless_one_is_given(silent_target: str, tmp_path: Path) -> None:
    suite = load(one_step_suite(tmp_path, "timeout_s: 0.3\n"))
    started = time.monotonic()
    result = await run_suite(suite, silent_target)
    assert time.monotonic() - started < 5
    assert (result.timeout, result.timeout_source) == (0.3, "suite")
    (step,) = result.cases[0].steps
    assert step.timeout == 0.3 and 0.25 <= step.seconds < 3 and not result.passed
    assert "none within the time-out of 0.3 s" in step.note
    result = await run_suite(suite, silent_target, timeout=0.2)
    assert (result.timeout, result.timeout_source) == (0.2, "option")
    assert (
        answer_timeout(load(one_step_suite(tmp_path)), None)
        == (DEFAULT_TIMEOUT, "default")
        == (30, "default")
    )


@pytest.mark.parametrize("value", ["0", "-1", "soon", "true", ".inf"])
def test_a_timeout_s_that_is_not_seconds_is_refused(tmp_path: Path, value: str) -> None:
    with pytest.raises(SuiteError, match="key 'timeout_s': seconds, more than 0"):
        load(one_step_suite(tmp_path, f"timeout_s: {value}\n"))


def test_the_options_are_parsed_and_checked() -> None:
    args = build_parser().parse_args(["conformance", "run", "files", "--timeout", "2.5", "--reveal"])
    assert (args.timeout, args.reveal) == (2.5, True)
    args = build_parser().parse_args(["conformance", "run", "files"])
    assert (args.timeout, args.reveal) == (None, False)
    out, err = io.StringIO(), io.StringIO()
    assert cli.run("pam-fr-receiver", "mllp://127.0.0.1:9", timeout=0, out=out, err=err) == cli.EXIT_USAGE
    assert "--timeout 0: seconds, more than 0" in err.getvalue()
