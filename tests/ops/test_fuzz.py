"""Hostile input against the running gateway: no crash, no hang, every bad input answered.

MLLP: arbitrary frames over a real socket get an HL7 answer (AA/AE/AR), and the server keeps
serving. HTTP: arbitrary FHIR JSON bodies and search parameters get 2xx or a 4xx
OperationOutcome, never a 5xx. Bounded in CI; ``PASSERELLE_FUZZ_EXAMPLES`` (``make fuzz``,
``bench/fuzz.py``) runs them longer.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.mllp.framing import FrameDecoder, Oversize, frame
from gateway import config as config_mod
from gateway.app import Gateway
from gateway.hl7.ack import parse_ack
from tests.conftest import ADMIN_ENTRY, AUTH
from tests.messages import adt

EXAMPLES = int(os.environ.get("PASSERELLE_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@dataclass
class Running:
    gateway: Gateway
    mllp_port: int
    http: str


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """One gateway for the module, on its own loop in a thread: hypothesis drives it with blocking I/O."""
    root = tmp_path_factory.mktemp("fuzz")
    data = {
        "data_dir": str(root / "var"),
        "log_level": "error",
        "workers": 0,
        "http": {"host": "127.0.0.1", "port": 0, "rate_limit": {"requests_per_s": 1e6, "burst": 1_000_000}},
        "auth": {"tokens": [ADMIN_ENTRY]},
        "sources": [
            {"name": "hospital", "type": "mllp", "host": "127.0.0.1", "port": 0, "max_frame_bytes": 65536}
        ],
        "channels": [
            {
                "name": "adt",
                "source": "hospital",
                "destinations": [{"name": "files", "type": "file", "directory": str(root / "out")}],
            }
        ],
    }
    cfg = config_mod.parse(yaml.safe_dump(data), str(root / "config.yaml"))
    gw = Gateway(cfg)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop = asyncio.Event()

    async def main() -> None:
        await gw.start()
        started.set()
        await stop.wait()
        await gw.stop()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(60), "the gateway did not start"
    port = int(gw.sources["hospital"].bound_port)  # type: ignore[attr-defined]
    yield Running(gw, port, f"http://127.0.0.1:{gw.http_port_bound}")
    loop.call_soon_threadsafe(stop.set)
    thread.join(60)
    loop.close()


def _exchange(port: int, payload: bytes) -> bytes:
    """Send bytes, read one answering frame (or EOF)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(payload)
        decoder = FrameDecoder(1 << 20)
        while True:
            data = sock.recv(65536)
            if not data:
                return b""
            for item in decoder.feed(data):
                assert not isinstance(item, Oversize)
                return item


_NO_FRAMING = st.binary(max_size=2048).map(lambda b: b.replace(b"\x0b", b"").replace(b"\x1c", b""))
_HL7ISH = st.lists(
    st.sampled_from(
        ["MSH|^~\\&|", "PID|", "|", "^", "~", "\\", "&", "\r", "EVN", "2.5", "ADT^A01", "é", "\x00"]
    )
    | st.text(max_size=8),
    max_size=40,
).map(
    lambda parts: "".join(parts).encode("utf-8", "surrogatepass").replace(b"\x0b", b"").replace(b"\x1c", b"")
)


@FUZZ
@given(payload=_NO_FRAMING | _HL7ISH)
def test_any_frame_is_answered(running: Running, payload: bytes) -> None:
    answer = _exchange(running.mllp_port, frame(payload))
    code, _, _ = parse_ack(answer)
    assert code in ("AA", "AE", "AR", "CA", "CE", "CR")


@FUZZ
@given(prefix=_NO_FRAMING, size=st.integers(65537, 200_000))
def test_oversize_frames_are_refused_and_the_server_keeps_serving(
    running: Running, prefix: bytes, size: int
) -> None:
    answer = _exchange(running.mllp_port, frame(prefix + b"x" * size))
    assert parse_ack(answer)[0] == "AR"
    assert parse_ack(_exchange(running.mllp_port, frame(adt("FZ-OK"))))[0] == "AA"


def _http(running: Running, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
    headers = {**AUTH, "Content-Type": "application/fhir+json"}
    request = urllib.request.Request(running.http + path, data=body, method=method, headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=20) as resp:  # noqa: S310 - our own local server
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _assert_answered(status: int, body: bytes) -> None:
    assert status < 500, body[:300]
    if status >= 400:
        outcome = orjson.loads(body)
        assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"]


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
_PATIENTISH = st.fixed_dictionaries(
    {"resourceType": st.sampled_from(["Patient", "Observation", "Bundle", "Unicorn", ""])},
    optional={
        "id": st.text(max_size=70),
        "name": _JSON,
        "birthDate": st.text(max_size=12),
        "identifier": _JSON,
        "entry": _JSON,
        "type": st.sampled_from(["transaction", "batch", "document", "x"]),
    },
)


@FUZZ
@given(body=_JSON | _PATIENTISH, raw=st.binary(max_size=64))
def test_any_fhir_body_gets_an_answer(running: Running, body: Any, raw: bytes) -> None:
    for path in ("/fhir/Patient", "/fhir"):
        _assert_answered(*_http(running, "POST", path, json.dumps(body).encode()))
    _assert_answered(*_http(running, "POST", "/fhir/Patient", raw))
    _assert_answered(*_http(running, "PUT", "/fhir/Patient/fz1", json.dumps(body).encode()))


_PARAM = st.sampled_from(
    ["identifier", "_id", "name", "family", "birthdate", "patient", "patient.identifier", "_count",
     "_sort", "date", "status", "subject", "_lastUpdated", "gender", "code", "x"]
) | st.text(max_size=12)  # fmt: skip


@FUZZ
@given(
    resource=st.sampled_from(["Patient", "Encounter", "Observation", "DocumentReference", "List", "Nope"]),
    params=st.lists(st.tuples(_PARAM, st.text(max_size=40)), max_size=4),
)
def test_any_search_gets_an_answer(running: Running, resource: str, params: list[tuple[str, str]]) -> None:
    query = urllib.parse.urlencode(params)
    _assert_answered(*_http(running, "GET", f"/fhir/{resource}?{query}"))


@FUZZ
@given(
    params=st.lists(
        st.tuples(st.sampled_from(["status", "limit", "before", "control_id", "x"]), st.text(max_size=20)),
        max_size=3,
    )
)
def test_any_admin_query_gets_an_answer(running: Running, params: list[tuple[str, str]]) -> None:
    _assert_answered(*_http(running, "GET", "/api/messages?" + urllib.parse.urlencode(params)))
    _assert_answered(*_http(running, "GET", "/fhir/AuditEvent?" + urllib.parse.urlencode(params)))


def test_the_gateway_is_still_healthy_after_the_fuzzing(running: Running, tmp_path: Path) -> None:
    status, body = _http(running, "GET", "/ready")
    assert status == 200, body
    assert parse_ack(_exchange(running.mllp_port, frame(adt("FZ-END"))))[0] == "AA"
