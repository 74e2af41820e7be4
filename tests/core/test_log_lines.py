"""Every JSON log line is written whole, even when processes share stdout (defect 14)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import orjson
import pytest
import structlog

from gateway.core.logging import configure, get_logger


@pytest.fixture
def restore_logging() -> Iterator[None]:
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def test_each_line_is_one_write_of_the_whole_line(
    restore_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    r, w = os.pipe()
    writes: list[tuple[int, bytes]] = []
    real_write = os.write

    def spy(fd: int, data: bytes) -> int:
        if fd == w:
            writes.append((fd, bytes(data)))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spy)
    with os.fdopen(w, "w", closefd=True) as stream:
        configure("info", stream)
        log = get_logger("passerelle.test")
        log.info("channel_recovered", channel="adt", watermark=12)
        log.warning("message_rejected", control_id="NC0007", code="102")
        log.info("wide", text="x" * 20000)  # longer than any stdio buffer
    monkeypatch.undo()
    with os.fdopen(r, "rb") as f:
        data = f.read()
    assert [orjson.loads(line)["event"] for line in data.splitlines()] == [
        "channel_recovered",
        "message_rejected",
        "wide",
    ]
    assert len(writes) == 3
    assert all(chunk.endswith(b"\n") and chunk.count(b"\n") == 1 for _, chunk in writes)


def test_a_stream_without_a_descriptor_gets_whole_lines(restore_logging: None) -> None:
    class Recording(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[str] = []

        def write(self, s: str) -> int:
            self.calls.append(s)
            return super().write(s)

    stream = Recording()
    configure("info", stream)
    get_logger("passerelle.test").info("channel_recovered", channel="adt")
    assert len(stream.calls) == 1
    assert stream.calls[0].endswith("\n")
    assert orjson.loads(stream.calls[0])["event"] == "channel_recovered"


_CHILD = r"""
import sys, time
from gateway.core.logging import configure, get_logger
configure("info")
log = get_logger("passerelle.channel")
start = float(sys.argv[1])
while time.time() < start:
    pass
for i in range(int(sys.argv[2])):
    log.info("channel_recovered", channel="adt" * (i % 7), watermark=i, worker=int(sys.argv[3]))
"""


def test_processes_sharing_stdout_never_share_a_line() -> None:
    """Two processes (the main one and a worker, say) log at once into one pipe, unbuffered as
    in a container (PYTHONUNBUFFERED=1): every line read back is one whole JSON document."""
    r, w = os.pipe()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.time() + 1.0
    count = 3000
    procs = [
        subprocess.Popen([sys.executable, "-c", _CHILD, str(start), str(count), str(k)], stdout=w, env=env)
        for k in range(2)
    ]
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    for p in procs:
        assert p.wait(60) == 0
    lines = data.split(b"\n")
    assert lines[-1] == b""
    parsed = []
    broken = 0
    for line in lines[:-1]:
        try:
            parsed.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            broken += 1
    assert broken == 0
    assert sorted((p["worker"], p["watermark"]) for p in parsed) == [
        (k, i) for k in range(2) for i in range(count)
    ]
