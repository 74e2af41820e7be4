"""A routed request answered after delivery: if storing it then fails, a resend is processed again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import AUTH, GatewayFactory
from tests.fakes import Receiver
from tests.reverse import fhir_data as d
from tests.reverse.test_fhir_intake import base, config, post, trace


async def test_a_failed_store_after_delivery_releases_the_request_id(
    tmp_path: Path, start_gateway: GatewayFactory, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = await start_gateway(config(tmp_path, receiver.port, queue=False, ack={"timing": "after_delivery"}))
    real_create = gw.fhir.create
    calls = 0

    async def create_failing_once(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("disk gone")
        return await real_create(*args, **kwargs)

    monkeypatch.setattr(gw.fhir, "create", create_failing_once)
    headers = {"X-Request-Id": "req-7c1e"}
    status, body, _ = await post(gw, "/fhir/Patient", d.patient(), headers)
    assert status == 500 and body["resourceType"] == "OperationOutcome"
    assert len(receiver.received) == 1  # delivered before the store was tried
    await gw.store.flush()
    rows = await gw.store.list_messages(
        status=None, control_id="req-7c1e", channel=None, limit=10, before_seq=None
    )
    assert len(rows) == 1
    first_id = rows[0]["id"]
    msg = await trace(gw, first_id)
    assert msg["status"] == "ERROR"
    assert any(s["status"] == "ERROR" and s["detail"].get("error") == "OSError" for s in msg["stages"])
    # the same request again is not "already received": it is delivered and stored this time
    status, body, again = await post(gw, "/fhir/Patient", d.patient(), headers)
    assert status == 201 and body["resourceType"] == "Patient"
    assert again["X-Passerelle-Message-Id"] != first_id
    assert len(receiver.received) == 2
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{base(gw)}/fhir/Patient", headers=AUTH) as resp,
    ):
        assert (await resp.json(content_type=None))["total"] == 1
