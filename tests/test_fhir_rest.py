"""The FHIR REST destination against a real HTTP server on 127.0.0.1 that answers as scripted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest
from aiohttp import web

from connectors.fhir_rest import FhirRestDestination
from gateway.core.envelope import Envelope
from gateway.core.errors import PermanentDeliveryError, RetryLater
from gateway.core.status import Status
from gateway.hl7.er7 import Message
from tests.conftest import wait_for
from tests.mapping.test_adt import A01, MAPPINGS

BUNDLE = orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": []})


class FhirServer:
    def __init__(self) -> None:
        self.plan: list[int] = [200]
        self.requests: list[tuple[str, str, bytes]] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((request.path, request.headers.get("Authorization", ""), body))
        status = self.plan.pop(0) if len(self.plan) > 1 else self.plan[0]
        if status >= 400:
            outcome = {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "invalid"}],
            }
            headers = {"Retry-After": "0"} if status == 429 else {}
            return web.json_response(outcome, status=status, headers=headers)
        return web.json_response({"resourceType": "Bundle", "type": "transaction-response"}, status=status)


@pytest.fixture
async def fhir_server() -> AsyncIterator[FhirServer]:
    server = FhirServer()
    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", server.handle)
    server.runner = web.AppRunner(app)
    await server.runner.setup()
    site = web.TCPSite(server.runner, "127.0.0.1", 0)
    await site.start()
    server.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield server
    await server.runner.cleanup()


def envelope() -> Envelope:
    return Envelope(
        id="01X",
        channel="c",
        source="s",
        raw=b"",
        content_type="application/fhir+json",
        sender="",
        control_id="C1",
        message_type="ADT^A01",
        partition_key="p",
        received_at=0.0,
        trace_id="t",
    )


async def test_2xx_is_sent_with_the_token_from_the_environment(
    fhir_server: FhirServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PASSERELLE_TEST_TOKEN", "s3cret")
    dest = FhirRestDestination(
        "ehr",
        {
            "base_url": f"http://127.0.0.1:{fhir_server.port}/fhir",
            "bearer_token_env": "PASSERELLE_TEST_TOKEN",
        },
    )
    try:
        result = await dest.send(envelope(), BUNDLE)
    finally:
        await dest.aclose()
    assert result.status is Status.SENT
    assert fhir_server.requests == [("/fhir", "Bearer s3cret", BUNDLE)]


@pytest.mark.parametrize("status", [408, 429, 500, 503])
async def test_transient_answers_are_retried(fhir_server: FhirServer, status: int) -> None:
    fhir_server.plan = [status]
    dest = FhirRestDestination("ehr", {"base_url": f"http://127.0.0.1:{fhir_server.port}/fhir"})
    try:
        with pytest.raises(RetryLater):
            await dest.send(envelope(), BUNDLE)
    finally:
        await dest.aclose()


async def test_other_4xx_is_an_error_kept_with_its_outcome(fhir_server: FhirServer) -> None:
    fhir_server.plan = [422]
    dest = FhirRestDestination("ehr", {"base_url": f"http://127.0.0.1:{fhir_server.port}/fhir"})
    try:
        result = await dest.send(envelope(), orjson.dumps({"resourceType": "Patient"}))
    finally:
        await dest.aclose()
    assert result.status is Status.ERROR
    assert result.retry is False
    assert result.response is not None and b"OperationOutcome" in result.response
    assert fhir_server.requests[0][0] == "/fhir/Patient"  # a single resource goes to its type's endpoint


async def test_unreachable_server_and_bad_settings() -> None:
    dest = FhirRestDestination("ehr", {"base_url": "http://127.0.0.1:1/fhir", "timeout_s": 2})
    try:
        with pytest.raises(RetryLater):
            await dest.send(envelope(), BUNDLE)
    finally:
        await dest.aclose()
    missing = FhirRestDestination(
        "ehr", {"base_url": "http://127.0.0.1:1/fhir", "bearer_token_env": "NOT_SET_X"}
    )
    with pytest.raises(PermanentDeliveryError):
        await missing.send(envelope(), BUNDLE)
    await missing.aclose()


async def test_channel_maps_and_posts_with_retries(
    start_gateway, client_for, fhir_server: FhirServer
) -> None:
    fhir_server.plan = [503, 200]
    gw = await start_gateway(
        steps=[{"type": "fhir_mapping", "directory": str(MAPPINGS)}],
        destinations=[
            {
                "name": "ehr",
                "type": "fhir_rest",
                "base_url": f"http://127.0.0.1:{fhir_server.port}/fhir",
                "retry": {"max_attempts": 3, "initial_backoff_s": 0.01},
            }
        ],
    )
    assert Message.decode(await client_for(gw).send(A01.encode())).get("MSA-1") == "AA"
    await wait_for(lambda: len(fhir_server.requests) == 2)
    bundle = orjson.loads(fhir_server.requests[1][2])
    assert bundle["entry"][0]["resource"]["name"][0]["family"] == "GÉRARD"
    await asyncio.sleep(0.05)
    await gw.store.flush()
    rows = await gw.store.list_messages(
        status="SENT", control_id=None, channel="adt", limit=5, before_seq=None
    )
    assert len(rows) == 1
    trace = await gw.store.get_message(rows[0]["id"], with_payloads=False)
    assert trace is not None
    deliveries = [s for s in trace["stages"] if s["stage"] == "delivery:ehr"]
    assert [s["status"] for s in deliveries] == ["ERROR", "SENT"]
    assert deliveries[1]["content_type"] == "application/fhir+json"
