"""File and FHIR REST destinations: short writes, failed flushes, unsafe types, huge answers."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

import connectors.file as file_mod
from connectors.fhir_rest import FhirRestDestination
from connectors.file import FileDestination
from gateway.core.errors import PermanentDeliveryError, RetryLater
from gateway.core.status import Status
from tests.test_fhir_rest import envelope

DATA = b"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5\r" * 50


async def test_short_writes_are_continued_until_every_byte_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write

    def dribble(fd: int, data: bytes | memoryview) -> int:
        return real_write(fd, bytes(data[:7]))  # the kernel may take less than asked

    monkeypatch.setattr(file_mod.os, "write", dribble)
    dest = FileDestination("out", {"directory": str(tmp_path)})
    result = await dest.send(envelope(), DATA)
    assert result.status is Status.SENT
    assert (tmp_path / result.detail).read_bytes() == DATA


async def test_a_write_that_stops_short_is_retried_and_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write
    budget = [100]

    def full_disk(fd: int, data: bytes | memoryview) -> int:
        n = min(len(data), budget[0])
        budget[0] -= n
        return real_write(fd, bytes(data[:n])) if n else 0

    monkeypatch.setattr(file_mod.os, "write", full_disk)
    dest = FileDestination("out", {"directory": str(tmp_path)})
    with pytest.raises(RetryLater):
        await dest.send(envelope(), DATA)
    assert list(tmp_path.iterdir()) == []  # neither the truncated file nor its temporary


async def test_any_failure_of_the_flush_fails_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(dirs: set[str]) -> None:
        raise ValueError("not an OSError")

    monkeypatch.setattr(FileDestination, "_make_durable", staticmethod(broken))
    dest = FileDestination("out", {"directory": str(tmp_path), "fsync": True})
    with pytest.raises(RetryLater, match="ValueError"):
        await dest.send(envelope(), DATA)


class Echo:
    def __init__(self) -> None:
        self.paths: list[str] = []
        self.size = 0
        self.port = 0


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    server = Echo()

    async def handle(request: web.Request) -> web.StreamResponse:
        server.paths.append(request.path)
        await request.read()
        if server.size:
            resp = web.StreamResponse(status=200, headers={"Content-Type": "application/fhir+json"})
            await resp.prepare(request)  # chunked, no Content-Length: the size shows only while reading
            for _ in range(server.size // 65536):
                await resp.write(b" " * 65536)
            await resp.write_eof()
            return resp
        return web.json_response({"resourceType": "OperationOutcome"}, status=201)

    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield server
    await runner.cleanup()


@settings(max_examples=40, deadline=None)
@given(kind=st.text(max_size=20))
def test_only_a_fhir_type_name_becomes_a_url_segment(kind: str) -> None:
    import asyncio

    from gateway.fhir.resource import TYPE_RE

    async def attempt() -> str:
        dest = FhirRestDestination("r", {"base_url": "http://127.0.0.1:9/fhir"})
        try:
            await dest.send(envelope(), orjson.dumps({"resourceType": kind}))
        except PermanentDeliveryError as exc:
            return str(exc)
        except RetryLater:
            return "sent"  # nothing listens on port 9: the type passed the check
        finally:
            await dest.aclose()
        return "sent"

    outcome = asyncio.run(attempt())
    if TYPE_RE.fullmatch(kind):
        assert outcome == "sent"
    else:
        assert "resourceType" in outcome


async def test_unsafe_resource_types_never_reach_the_server(echo: Echo) -> None:
    dest = FhirRestDestination("r", {"base_url": f"http://127.0.0.1:{echo.port}/fhir"})
    try:
        for kind in ("../admin", "Patient?_format=xml", "Patient/1", "", 42):
            with pytest.raises(PermanentDeliveryError):
                await dest.send(envelope(), orjson.dumps({"resourceType": kind}))
        result = await dest.send(envelope(), orjson.dumps({"resourceType": "Patient"}))
        assert result.status is Status.SENT and echo.paths == ["/fhir/Patient"]
    finally:
        await dest.aclose()


async def test_a_huge_answer_is_not_kept(echo: Echo) -> None:
    echo.size = 4 * 65536
    dest = FhirRestDestination(
        "r", {"base_url": f"http://127.0.0.1:{echo.port}/fhir", "max_response_bytes": 65536}
    )
    try:
        result = await dest.send(envelope(), orjson.dumps({"resourceType": "Patient"}))
        assert result.status is Status.SENT
        assert result.response is None and "not kept" in result.detail
        echo.size = 65536  # at the limit: kept
        result = await dest.send(envelope(), orjson.dumps({"resourceType": "Patient"}))
        assert result.response == b" " * 65536
    finally:
        await dest.aclose()
