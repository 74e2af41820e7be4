"""The gateway as a real process: CLI errors, SIGTERM drain, and the kill -9 durability test."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import yaml

from connectors.mllp.client import MllpClient
from gateway.hl7.er7 import Message
from tests.messages import adt

PASSERELLE = [sys.executable, "-m", "gateway.cli"]


def write_config(tmp_path: Path, out_dir: Path, *, partitions: int = 16, workers: int = 1) -> Path:
    data = {
        "workers": workers,
        "log_level": "info",
        "drain_timeout_s": 10,
        "http": {"host": "127.0.0.1", "port": 0},
        "sources": [{"name": "hospital", "type": "mllp", "host": "127.0.0.1", "port": 0}],
        "channels": [
            {
                "name": "adt",
                "source": "hospital",
                "partitions": partitions,
                "destinations": [{"name": "files", "type": "file", "directory": str(out_dir)}],
            }
        ],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class Proc:
    """A `passerelle run` child whose JSON log lines are collected."""

    def __init__(self, config: Path, data_dir: Path) -> None:
        self.log_path = data_dir.parent / f"gateway-{time.monotonic_ns()}.log"
        self.log_file = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            [
                *PASSERELLE,
                "run",
                "--config",
                str(config),
                "--data-dir",
                str(data_dir),
                "--mllp-port",
                "0",
                "--http-port",
                "0",
            ],
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
        )

    def lines(self) -> list[dict[str, object]]:
        out = []
        for line in self.log_path.read_bytes().splitlines():
            try:
                out.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                out.append({"event": "<non-json>", "text": line.decode("utf-8", "replace")})
        return out

    def wait_event(self, event: str, timeout: float = 20) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines():
                if line.get("event") == event:
                    return line
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"gateway exited {self.popen.returncode}: {self.log_path.read_text()[-2000:]}"
                )
            time.sleep(0.05)
        raise AssertionError(f"no {event} in time")

    @property
    def mllp_port(self) -> int:
        return int(self.wait_event("mllp_listening")["port"])  # type: ignore[call-overload]

    def kill(self, sig: int) -> int:
        self.popen.send_signal(sig)
        code = self.popen.wait(30)
        self.log_file.close()
        return code

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        self.log_file.close()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.close()


def test_config_error_names_file_key_line_and_exits_non_zero(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "sources:\n  - name: h\n    type: mllp\n    port: quatre\n"
        "channels:\n  - name: c\n    source: h\n    destinations: []\n"
    )
    run = subprocess.run(
        [*PASSERELLE, "run", "--config", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2
    assert f"{bad}:4: sources[0].port:" in run.stderr
    assert "integer" in run.stderr


@pytest.mark.parametrize("missing", ["nowhere", "empty"])
def test_a_mapping_directory_missing_or_empty_stops_the_start(tmp_path: Path, missing: str) -> None:
    """Once the gateway started, said ready, ACKed AA and sent every message to ERROR."""
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "sources:\n  - {name: h, type: mllp, port: 0}\n"
        "channels:\n  - name: c\n    source: h\n"
        f'    steps:\n      - {{type: fhir_mapping, directory: "{{config_dir}}/{missing}"}}\n'
        "    destinations:\n      - {name: d, type: file, directory: out}\n"
    )
    run = subprocess.run(
        [*PASSERELLE, "run", "--config", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2
    assert f"{bad}:7: channels[0].steps[0].directory: {tmp_path / missing}:" in run.stderr


def test_unknown_connector_type_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "sources:\n  - name: h\n    type: mllp\n"
        "channels:\n  - name: c\n    source: h\n    destinations:\n      - {name: d, type: carrier-pigeon}\n"
    )
    run = subprocess.run(
        [*PASSERELLE, "run", "--config", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2
    assert "channels[0].destinations[0].type" in run.stderr
    assert "file" in run.stderr and "mllp" in run.stderr  # lists what is available


def _files_by_control_id(out_dir: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for f in out_dir.glob("*.hl7"):
        cid = Message.decode(f.read_bytes(), default_charset="UNICODE UTF-8").control_id
        counts[cid] = counts.get(cid, 0) + 1
    return counts


def _stored_control_ids(data_dir: Path) -> set[str]:
    db = sqlite3.connect(data_dir / "passerelle.db")
    try:
        return {r[0] for r in db.execute("SELECT control_id FROM messages WHERE channel='adt'")}
    finally:
        db.close()


@pytest.mark.slow
def test_sigterm_drains_and_exits_zero(tmp_path: Path, procs: list[Proc]) -> None:
    out_dir, data_dir = tmp_path / "out", tmp_path / "var"
    proc = Proc(write_config(tmp_path, out_dir), data_dir)
    procs.append(proc)
    port = proc.mllp_port
    acked: set[str] = set()

    async def sender(conn: int) -> None:
        client = MllpClient("127.0.0.1", port)
        try:
            for i in range(10_000):
                cid = f"T{conn}-{i}"
                try:
                    ack = await client.send(adt(cid, patient=str(i % 50)), timeout=15)
                except (ConnectionError, OSError):
                    return
                if Message.decode(ack, default_charset="UNICODE UTF-8").get("MSA-1") == "AA":
                    acked.add(cid)
        finally:
            await client.close()

    async def scenario() -> int:
        tasks = [asyncio.create_task(sender(c)) for c in range(4)]
        deadline = time.monotonic() + 60
        while len(acked) < 300:
            assert time.monotonic() < deadline, "the gateway did not acknowledge in time"
            await asyncio.sleep(0.01)
        proc.popen.send_signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        return await asyncio.to_thread(proc.popen.wait, 30)

    assert asyncio.run(scenario()) == 0
    events = [line.get("event") for line in proc.lines()]
    assert "gateway_draining" in events and "gateway_stopped" in events
    assert acked <= _stored_control_ids(data_dir)  # every ACKed message was committed first
    # what was ACKed but not yet delivered is delivered after a restart, once
    proc2 = Proc(write_config(tmp_path, out_dir), data_dir)
    procs.append(proc2)
    proc2.wait_event("gateway_started")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        delivered = _files_by_control_id(out_dir)
        if acked <= set(delivered):
            break
        time.sleep(0.1)
    assert acked <= set(delivered)
    assert all(n == 1 for n in delivered.values())
    assert proc2.kill(signal.SIGTERM) == 0


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_kill_9_loses_no_acked_message_and_delivers_each_exactly_once(
    tmp_path: Path, procs: list[Proc], workers: int
) -> None:
    """5,000 messages over 10 connections; SIGKILL mid-stream; restart; senders resend what was not ACKed."""
    out_dir, data_dir = tmp_path / "out", tmp_path / "var"
    config = write_config(tmp_path, out_dir, workers=workers)
    total_per_conn, conns = 500, 10
    acked: set[str] = set()
    state = {"port": 0}

    async def sender(conn: int, restarted: asyncio.Event) -> None:
        i = 0
        client = MllpClient("127.0.0.1", state["port"])
        while i < total_per_conn:
            cid = f"K{conn:02d}-{i:04d}"
            try:
                ack = await client.send(adt(cid, patient=f"{conn}{i % 7}"), timeout=15)
            except (ConnectionError, OSError, TimeoutError):
                # As a real MLLP sender does: wait for the receiver, reconnect, resend the same message.
                await client.close()
                await restarted.wait()
                client = MllpClient("127.0.0.1", state["port"])
                continue
            assert Message.decode(ack, default_charset="UNICODE UTF-8").get("MSA-1") == "AA"
            acked.add(cid)
            i += 1
        await client.close()

    async def scenario() -> None:
        proc = Proc(config, data_dir)
        procs.append(proc)
        state["port"] = proc.mllp_port
        restarted = asyncio.Event()
        tasks = [asyncio.create_task(sender(c, restarted)) for c in range(conns)]
        deadline = time.monotonic() + 60
        while len(acked) < 1500:
            assert time.monotonic() < deadline, "the gateway did not acknowledge in time"
            await asyncio.sleep(0.005)
        proc.popen.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.popen.wait, 30)
        acked_before_kill = set(acked)
        stored = _stored_control_ids(data_dir)
        assert acked_before_kill <= stored  # nothing ACKed was lost by the kill
        proc2 = Proc(config, data_dir)
        procs.append(proc2)
        state["port"] = await asyncio.to_thread(lambda: proc2.mllp_port)
        restarted.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 300)

    asyncio.run(scenario())
    expected = {f"K{c:02d}-{i:04d}" for c in range(conns) for i in range(total_per_conn)}
    assert acked == expected
    deadline = time.monotonic() + 120
    delivered: dict[str, int] = {}
    while time.monotonic() < deadline:
        delivered = _files_by_control_id(out_dir)
        if set(delivered) >= expected:
            break
        time.sleep(0.2)
    assert set(delivered) == expected
    duplicates = {cid: n for cid, n in delivered.items() if n != 1}
    assert duplicates == {}
    db = sqlite3.connect(data_dir / "passerelle.db")
    try:
        rows = db.execute(
            "SELECT control_id, COUNT(*) FROM messages WHERE channel='adt' GROUP BY control_id"
        ).fetchall()
    finally:
        db.close()
    assert len(rows) == len(expected)
    assert all(n == 1 for _, n in rows)
    assert procs[-1].kill(signal.SIGTERM) == 0
    assert os.path.isdir(data_dir)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PASSERELLE, *args], capture_output=True, text=True, timeout=60)


def test_send_prints_each_ack_and_exits_by_the_worst_answer(tmp_path: Path, procs: list[Proc]) -> None:
    proc = Proc(write_config(tmp_path, tmp_path / "out"), tmp_path / "var")
    procs.append(proc)
    to = f"mllp://127.0.0.1:{proc.mllp_port}"
    two = tmp_path / "two.hl7"
    # two messages in one file, with LF line ends as an editor would save them
    two.write_bytes((adt("CLI1") + adt("CLI2")).replace(b"\r", b"\n"))
    run = _cli("send", str(two), "--to", to)
    assert run.returncode == 0, run.stderr
    assert "MSA|AA|CLI1" in run.stdout
    assert "MSA|AA|CLI2" in run.stdout
    bad = tmp_path / "bad.hl7"
    bad.write_bytes(b"PID|||not a message\r")
    run = _cli("send", str(bad), "--to", to)
    assert run.returncode == 1
    assert "MSA|AR|" in run.stdout
    assert _cli("send", str(tmp_path / "missing.hl7"), "--to", to).returncode == 2
    assert _cli("send", str(two), "--to", "http://127.0.0.1:1").returncode == 2


def test_dlq_and_replay_commands_drive_the_running_gateway(tmp_path: Path, procs: list[Proc]) -> None:
    data = {
        "log_level": "info",
        "http": {"host": "127.0.0.1", "port": 0},
        "sources": [{"name": "hospital", "type": "mllp", "host": "127.0.0.1", "port": 0}],
        "channels": [
            {
                "name": "adt",
                "source": "hospital",
                # nothing listens on port 1: every attempt fails, and after one the message is DEAD
                "destinations": [
                    {
                        "name": "sih",
                        "type": "mllp",
                        "host": "127.0.0.1",
                        "port": 1,
                        "retry": {"max_attempts": 1},
                    }
                ],
            }
        ],
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    proc = Proc(config, tmp_path / "var")
    procs.append(proc)
    port = proc.mllp_port
    api = f"http://127.0.0.1:{proc.wait_event('gateway_started')['http_port']}"
    # the token is read from there; --json: the API's answers, as a script reads them
    cli_api = ("--api", api, "--data-dir", str(tmp_path / "var"), "--json")
    # No admin credential configured: the first start wrote one (0600), and the CLI reads it from there.
    assert (tmp_path / "var" / "admin-token").stat().st_mode & 0o777 == 0o600
    assert _cli("dlq", "list", "--api", api, "--data-dir", str(tmp_path / "elsewhere")).returncode == 1
    msg = tmp_path / "m.hl7"
    msg.write_bytes(adt("DLQ1"))
    assert _cli("send", str(msg), "--to", f"mllp://127.0.0.1:{port}").returncode == 0
    deadline = time.monotonic() + 20
    listed: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        run = _cli("dlq", "list", *cli_api)
        assert run.returncode == 0
        listed = orjson.loads(run.stdout)["messages"]
        if listed:
            break
        time.sleep(0.2)
    assert [m["control_id"] for m in listed] == ["DLQ1"]
    mid = str(listed[0]["id"])
    replay = _cli("replay", mid, *cli_api)
    assert replay.returncode == 0
    assert orjson.loads(replay.stdout) == {"id": mid, "status": "RECEIVED"}
    assert _cli("replay", "NO-SUCH-MESSAGE", *cli_api).returncode == 1
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not orjson.loads(_cli("dlq", "list", *cli_api).stdout)["messages"]:
        time.sleep(0.2)  # dead again after the replayed attempt
    assert _cli("dlq", "discard", mid, *cli_api).returncode == 0
    assert orjson.loads(_cli("dlq", "list", *cli_api).stdout)["messages"] == []
    assert _cli("dlq", "discard", *cli_api).returncode == 2
    assert proc.kill(signal.SIGTERM) == 0


def test_logs_carry_no_patient_data(tmp_path: Path, procs: list[Proc]) -> None:
    """Every path that logs (accept, duplicate, reject, mapping warnings, API reads) stays PHI-free."""
    from tests.mapping.test_adt import A01, MAPPINGS

    data = {
        "log_level": "debug",
        "workers": 1,
        "http": {"host": "127.0.0.1", "port": 0},
        "sources": [{"name": "hospital", "type": "mllp", "host": "127.0.0.1", "port": 0}],
        "channels": [
            {
                "name": "fhir",
                "source": "hospital",
                "steps": [{"type": "fhir_mapping", "directory": str(MAPPINGS)}],
                "destinations": [{"name": "repo", "type": "fhir_repository", "path": "{data_dir}/fhir.db"}],
            }
        ],
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    proc = Proc(config, tmp_path / "var")
    procs.append(proc)
    to = f"mllp://127.0.0.1:{proc.mllp_port}"
    api = f"http://127.0.0.1:{proc.wait_event('gateway_started')['http_port']}"
    cli_api = ("--api", api, "--data-dir", str(tmp_path / "var"))  # the token is read from there
    without_vali = A01.replace("|VALI\r", "|PROV\r").replace("A01-0001", "A01-0002")  # INS dropped: a warning
    files = {
        "ok.hl7": A01.encode(),
        "dup.hl7": A01.encode(),
        "warn.hl7": without_vali.encode(),
        # not valid UTF-8 as MSH-18 declares: answered AR and journaled as ERROR
        "bad.hl7": A01.replace("A01-0001", "A01-0003").encode("utf-8").replace("Zoé".encode(), b"Zo\xe9"),
        "junk.hl7": b"PID|||552233\r",
    }
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
        _cli("send", str(tmp_path / name), "--to", to)
    time.sleep(1.0)
    listed = _cli("dlq", "list", *cli_api)
    assert listed.returncode == 0
    assert proc.kill(signal.SIGTERM) == 0
    logs = proc.log_path.read_text("utf-8")
    assert "message_received" in logs and "message_rejected" in logs  # the paths did log
    for phi in (
        "GÉRARD",
        "G\\u00c9RARD",
        "Zoé",
        "Zo\\u00e9",
        "MARTIN-GÉRARD",
        "552233",
        "275042512345678",
        "19750425",
        "Tanneurs",
        "0381000000",
    ):
        assert phi not in logs, f"patient data in the logs: {phi!r}"


def test_what_start_up_built_is_kept_out_of_later_collections() -> None:
    import gc

    from gateway.core import heap

    before = gc.get_freeze_count()
    try:
        heap.settle()
        assert gc.get_freeze_count() > before  # frozen: later full passes no longer scan it
    finally:
        gc.unfreeze()  # the rest of the test session collects as usual
