"""Errors aiohttp answers itself (request line or header over the limit, malformed requests) are
OperationOutcomes, and nothing of the request line or headers reaches any log.

A Patient search carries names, a birth date and an INS in its query; a header carries a bearer
token. aiohttp's defaults answered such an oversized request with ``text/plain`` quoting the line
and logged a traceback quoting it too (``aiohttp.server``, then the root logger's handlers).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.http.app import build_app
from gateway.http.auth import TokenTable
from gateway.http.server import GatewayRunner
from gateway.store.fhir import SqliteFhirRepository
from tests.conftest import ADMIN_ENTRY, ADMIN_TOKEN
from tests.fhir.conftest import FhirOnlyRuntime

MAX_LINE = 8190  # the gateway's default http.max_header_bytes
SECRETS = ("1984-07-07", "2840775123456", "Lef", "family=", "birthdate=", ADMIN_TOKEN)
SEARCH = (
    "/fhir/Patient?family=Lef%C3%A8vre&given=Am%C3%A9lie&birthdate=1984-07-07"
    "&identifier=urn:oid:1.2.250.1.213.1.4.8%7C2840775123456"
)


class Records(logging.Handler):
    """Every record that reaches the root logger's handlers, formatted as a handler would."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def logs() -> Iterator[tuple[Records, list[dict[str, Any]]]]:
    """Root handlers' view (aiohttp's loggers opened to DEBUG) and the gateway's own events."""
    records = Records()
    root, aio = logging.getLogger(), logging.getLogger("aiohttp")
    level = aio.level
    aio.setLevel(logging.DEBUG)
    root.addHandler(records)
    try:
        with structlog.testing.capture_logs() as events:
            yield records, events
    finally:
        root.removeHandler(records)
        aio.setLevel(level)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[int]:
    """The application as the gateway serves it (GatewayRunner, the gateway's limits)."""
    repo = SqliteFhirRepository(tmp_path / "fhir.db")
    await repo.open()
    app = build_app(FhirOnlyRuntime(repo), authenticator=TokenTable([ADMIN_ENTRY]))
    runner = GatewayRunner(
        app, access_log=None, handle_signals=False, max_line_size=MAX_LINE, max_field_size=MAX_LINE
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()
        await repo.close()


async def raw_request(port: int, head: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    header, _, body = data.partition(b"\r\n\r\n")
    lines = header.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    return status, headers, body


def oversized_requests() -> dict[str, bytes]:
    pad = "&note=" + "x" * MAX_LINE
    return {
        "request line": f"GET {SEARCH}{pad} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        "bearer token": (
            f"GET /fhir/Patient HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}{'A' * MAX_LINE}"
            "\r\n\r\n"
        ).encode(),
        "a header quoting patient data": (
            f"GET /fhir/Patient HTTP/1.1\r\nHost: x\r\nReferer: http://x{SEARCH}{pad}\r\n\r\n"
        ).encode(),
        "a malformed header": f"GET {SEARCH} HTTP/1.1\r\nHost: x\r\nBad {ADMIN_TOKEN}\r\n\r\n".encode(),
        "a malformed request line": f"GET {SEARCH} HTTP/9.Z\r\n\r\n".encode(),
    }


def _clean(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, secret


@pytest.mark.parametrize("case", sorted(oversized_requests()))
async def test_parser_errors_are_operation_outcomes_that_log_nothing_of_the_request(
    served: int, logs: tuple[Records, list[dict[str, Any]]], case: str
) -> None:
    records, events = logs
    status, headers, body = await raw_request(served, oversized_requests()[case])
    assert status == 400, body
    assert headers["content-type"].startswith("application/fhir+json")
    outcome = orjson.loads(body)
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] in ("too-long", "structure")
    _clean(body.decode("utf-8", "replace"))  # the answer does not echo the request either
    await asyncio.sleep(0.05)  # let the server finish with the connection
    _clean("\n".join(records.lines))
    _clean(orjson.dumps(events).decode())
    assert [e["event"] for e in events] == ["http_protocol_error"]
    assert events[0]["status"] == 400 and "message" not in events[0]


async def test_the_server_keeps_serving_after_a_parser_error(served: int) -> None:
    status, _, _ = await raw_request(served, oversized_requests()["request line"])
    assert status == 400
    health = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    status, _, _ = await raw_request(served, health)
    assert status == 200


async def test_under_any_runner_aiohttp_logs_nothing_of_the_request(
    tmp_path: Path, logs: tuple[Records, list[dict[str, Any]]]
) -> None:
    """Under aiohttp's own runner (the test server's): its answer is aiohttp's, its logs are ours."""
    records, events = logs
    repo = SqliteFhirRepository(tmp_path / "fhir.db")
    await repo.open()
    app = build_app(FhirOnlyRuntime(repo), authenticator=TokenTable([ADMIN_ENTRY]))
    try:
        async with TestClient(TestServer(app, host="127.0.0.1", port=0)) as client:
            port = client.server.port
            assert port is not None
            for head in oversized_requests().values():
                await raw_request(port, head)
            # an ordinary request: no access-log line with its query either
            search = "/fhir/Patient?identifier=urn:oid:1.2.250.1.213.1.4.8%7C2840775123456"
            resp = await client.get(search, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            assert resp.status == 200
            await asyncio.sleep(0.05)
    finally:
        await repo.close()
    _clean("\n".join(records.lines))
    _clean(orjson.dumps(events).decode())
