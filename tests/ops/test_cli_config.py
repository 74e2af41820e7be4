"""The CLI's clients find the gateway from its config.yaml; `run` says which key holds a busy port."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from gateway import config as config_mod
from gateway.cli import build_parser, main
from tests.conftest import ADMIN_TOKEN, GatewayFactory, make_config
from tests.messages import adt
from tests.waiting import until

PASSERELLE = str(Path(sys.executable).with_name("passerelle"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port held open by this test, so that whoever binds it next fails."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def _write_config(tmp_path: Path, *, mllp: int, http: int, **extra: Any) -> Path:
    data = make_config(tmp_path, **extra).data
    data["sources"][0].update(host="0.0.0.0", port=mllp)  # a wildcard, reached at 127.0.0.1
    data["http"]["port"] = http
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), "utf-8")
    return path


async def _two_dead(gw: Any) -> bool:
    return len(await gw.store.dead_letters(None, 10)) == 2


async def _cli(*args: str, cwd: Path) -> tuple[int, str, str]:
    """`passerelle ARGS` in a process of its own (its stdout is then the command's alone)."""
    proc = await asyncio.create_subprocess_exec(
        PASSERELLE,
        *args,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != "PASSERELLE_TOKEN"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return int(proc.returncode or 0), out.decode(), err.decode()


async def test_send_dlq_and_replay_find_the_gateway_in_its_config(
    tmp_path: Path, start_gateway: GatewayFactory
) -> None:
    mllp, http = _free_port(), _free_port()
    path = _write_config(tmp_path, mllp=mllp, http=http)
    data = yaml.safe_load(path.read_text("utf-8"))
    data["channels"][0]["destinations"][0].update(plan=["permanent"], retry={"max_attempts": 1})
    path.write_text(yaml.safe_dump(data, allow_unicode=True), "utf-8")
    gw = await start_gateway(config_mod.load(path))
    assert gw.http_port_bound == http and gw.sources["hospital"].bound_port == mllp  # type: ignore[attr-defined]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "a01.hl7").write_bytes(adt("CFG1"))
    (tmp_path / "a01.hl7").write_bytes(adt("CFG2"))

    # --config names the file: the first MLLP source's port, 0.0.0.0 reached on loopback
    code, out, _ = await _cli("send", "a01.hl7", "--config", str(path), cwd=elsewhere)
    assert code == 0 and "MSA|AA|CFG1" in out
    # without --config, ./config.yaml is read when there is one
    code, out, _ = await _cli("send", "a01.hl7", "--json", cwd=tmp_path)
    answer = orjson.loads(out)
    assert code == 0 and answer["code"] == "AA" and "CFG2" in answer["ack"]
    await until(lambda: _two_dead(gw), what="two dead letters")

    # no token anywhere: the 401 comes with where a token is looked for
    code, _, err = await _cli("dlq", "list", cwd=tmp_path)
    assert code == 1 and "HTTP 401" in err and "PASSERELLE_TOKEN" in err and "--data-dir" in err
    # dlq and replay: the HTTP port from ./config.yaml, the token from its data_dir's admin-token
    (Path(data["data_dir"]) / "admin-token").write_text(ADMIN_TOKEN, "ascii")
    code, table, _ = await _cli("dlq", "list", cwd=tmp_path)
    assert code == 0
    assert "Dead letters: 2" in table and "CFG1" in table and "CFG2" in table and "Control id" in table
    code, out, _ = await _cli("dlq", "list", "--json", cwd=tmp_path)
    listed = orjson.loads(out)["messages"]
    assert code == 0 and sorted(m["control_id"] for m in listed) == ["CFG1", "CFG2"]
    first = listed[0]["id"]
    code, out, _ = await _cli("replay", first, "--config", str(path), cwd=elsewhere)
    assert code == 0 and out.strip() == f"{first}: replayed (now RECEIVED)"

    # an explicit --api wins over the config
    code, _, err = await _cli("dlq", "list", "--api", f"http://127.0.0.1:{_free_port()}", cwd=tmp_path)
    assert code == 1 and "cannot reach the gateway" in err


def test_a_config_named_but_broken_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write_config(tmp_path, mllp=2575, http=8080)
    path.write_text(path.read_text("utf-8").replace("port: 8080", "port: nine"), "utf-8")
    number = next(i for i, row in enumerate(path.read_text("utf-8").splitlines(), 1) if "port: nine" in row)
    assert main(["dlq", "list", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and f"config.yaml:{number}: http.port" in err
    message = tmp_path / "m.hl7"
    message.write_bytes(adt("X"))
    assert main(["send", str(message), "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: file not found" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1", "65536", "http"])
def test_run_refuses_a_port_out_of_range(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    for option in ("--mllp-port", "--http-port"):
        with pytest.raises(SystemExit) as caught:
            build_parser().parse_args(["run", option, value])
        assert caught.value.code == 2 and option in capsys.readouterr().err


def test_run_refuses_a_data_dir_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = tmp_path / "plain"
    plain.write_text("", "utf-8")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--data-dir", str(plain)])
    assert "is not a directory" in capsys.readouterr().err


def _standalone(tmp_path: Path, *, mllp: int, http: int) -> Path:
    """A config `passerelle run` can start on its own (a file destination, no test fake)."""
    archive = {"name": "archive", "type": "file", "directory": str(tmp_path / "out")}
    return _write_config(tmp_path, mllp=mllp, http=http, destinations=[archive])


def _run(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PASSERELLE, "run", "--config", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=config.parent,
        check=False,
    )


def test_a_busy_mllp_port_names_the_file_the_key_and_the_port(tmp_path: Path, busy_port: int) -> None:
    config = _standalone(tmp_path, mllp=busy_port, http=_free_port())
    done = _run(config)
    assert done.returncode == 2
    text = config.read_text("utf-8").splitlines()
    number = next(i for i, row in enumerate(text, 1) if row.strip() == f"port: {busy_port}")
    assert f"{config}:{number}: sources[0].port: cannot listen on port {busy_port}" in done.stderr


def test_a_busy_http_port_given_on_the_command_line_says_so(tmp_path: Path, busy_port: int) -> None:
    config = _standalone(tmp_path, mllp=_free_port(), http=_free_port())
    done = _run(config, "--http-port", str(busy_port), "--data-dir", str(tmp_path / "other"))
    assert done.returncode == 2
    assert f"http.port: cannot listen on port {busy_port}" in done.stderr
    assert "(the port given by --http-port)" in done.stderr and str(config) in done.stderr
    assert (tmp_path / "other").is_dir()  # --data-dir was taken


def test_the_clients_read_the_admin_token_where_the_gateway_writes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from argparse import Namespace

    from gateway.cli import _token

    monkeypatch.delenv("PASSERELLE_TOKEN", raising=False)
    token_file = tmp_path / "secrets" / "gateway-token"
    token_file.parent.mkdir()
    token_file.write_text(ADMIN_TOKEN + "\n", "ascii")
    path = _write_config(tmp_path, mllp=2575, http=8080)
    data = yaml.safe_load(path.read_text("utf-8"))
    data["auth"] = {"admin_token_file": str(token_file)}
    path.write_text(yaml.safe_dump(data), "utf-8")
    # auth.admin_token_file, not <data_dir>/admin-token: the file the gateway wrote
    assert _token(Namespace(token=None, config=str(path), data_dir=None)) == ADMIN_TOKEN
    # without it, admin-token in --data-dir (else the config's data_dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "admin-token").write_text("other-token\n", "ascii")
    del data["auth"]
    path.write_text(yaml.safe_dump(data), "utf-8")
    assert _token(Namespace(token=None, config=str(path), data_dir=str(elsewhere))) == "other-token"
    assert _token(Namespace(token=None, config=str(path), data_dir=None)) is None
