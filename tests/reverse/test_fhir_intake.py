"""End to end: FHIR POSTed to the running gateway (HTTP on 127.0.0.1) → HL7v2 over MLLP to a real receiver."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway import config as config_mod
from gateway.app import Gateway
from gateway.core.errors import ConfigError
from gateway.hl7.er7 import Message
from tests.conftest import ADMIN_ENTRY, AUTH, GatewayFactory, wait_for, with_settings
from tests.fakes import Receiver
from tests.reverse import fhir_data as d

ROOT = Path(__file__).resolve().parents[2]
GP_TOKEN = "gp-software-token-5e1f0a9c3b7d42aa"  # noqa: S105 - a test credential
GP = {"Authorization": f"Bearer {GP_TOKEN}"}


def config(tmp_path: Path, port: int, **channel: Any) -> config_mod.Config:
    ch: dict[str, Any] = {
        "name": "city-to-sih",
        "source": "city",
        "fhir": {
            "resource_types": [
                "Patient",
                "Encounter",
                "Observation",
                "DiagnosticReport",
                "DocumentReference",
            ],
            "senders": ["gp-software"],
        },
        "steps": [
            {
                "type": "hl7v2_mapping",
                "directory": str(ROOT / "mappings" / "reverse"),
                "receiving_application": "SIH",
                "receiving_facility": "CHU",
            }
        ],
        "destinations": [
            {
                "name": "sih",
                "type": "mllp",
                "host": "127.0.0.1",
                "port": port,
                "ack_timeout_s": 2,
                "charset": "8859/15",
                "retry": {"max_attempts": 2, "initial_backoff_s": 0.01, "max_backoff_s": 0.02},
            }
        ],
    }
    ch.update(channel)
    data = {
        "data_dir": str(tmp_path / "var"),
        "log_level": "warning",
        "workers": 0,
        "http": {"host": "127.0.0.1", "port": 0},
        "auth": {
            "tokens": [ADMIN_ENTRY, {"token": GP_TOKEN, "subject": "gp-software", "role": "professional"}]
        },
        "sources": [{"name": "city", "type": "fhir"}],
        "channels": [ch],
    }
    return config_mod.parse(yaml.safe_dump(data, allow_unicode=True), str(tmp_path / "config.yaml"))


def base(gw: Gateway) -> str:
    return f"http://127.0.0.1:{gw.http_port_bound}"


async def post(gw: Gateway, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            base(gw) + path,
            json=body,
            headers={**GP, "Content-Type": "application/fhir+json", **(headers or {})},
        ) as resp,
    ):
        return resp.status, await resp.json(content_type=None), dict(resp.headers)


async def trace(gw: Gateway, message_id: str) -> dict[str, Any]:
    await gw.store.flush()  # trace writes are group-committed: read what has been committed
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{base(gw)}/api/messages/{message_id}", headers=AUTH) as r,
    ):
        assert r.status == 200
        result: dict[str, Any] = await r.json()
        return result


async def test_patient_posted_is_stored_journaled_and_delivered_as_a28(
    tmp_path: Path, start_gateway: GatewayFactory, receiver: Receiver
) -> None:
    gw = await start_gateway(config(tmp_path, receiver.port))
    status, body, headers = await post(gw, "/fhir/Patient", d.patient())
    assert status == 201 and body["resourceType"] == "Patient"  # stored: the repository's answer
    mid = headers["X-Passerelle-Message-Id"]
    await wait_for(lambda: len(receiver.received) == 1)
    sent = Message.decode(receiver.received[0])
    assert (sent.message_type, sent.trigger, sent.charset) == ("ADT", "A28", "8859/15")
    assert sent.get("PID-5.1") == "LEFÈVRE" and sent.get("MSH-5") == "SIH"
    assert "LEFÈVRE".encode("iso8859_15") in receiver.received[0]
    await wait_for(lambda: gw.channels["city-to-sih"].counters["sent"] == 1)
    msg = await trace(gw, mid)
    assert msg["status"] == "SENT" and msg["content_type"] == "application/fhir+json"
    assert msg["message_type"] == "POST Patient" and msg["sender"] == "gp-software"
    assert any(s["stage"] == "step:1-hl7v2_mapping" for s in msg["stages"])
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{base(gw)}/fhir/Patient/{body['id']}", headers=AUTH) as resp,
    ):
        assert resp.status == 200


async def test_bundle_routed_instead_of_stored_is_202_and_one_oru(
    tmp_path: Path, start_gateway: GatewayFactory, receiver: Receiver
) -> None:
    cfg = config(tmp_path, receiver.port)
    cfg.data["channels"][0]["fhir"]["store"] = False
    gw = await start_gateway(cfg)
    status, body, _ = await post(gw, "/fhir", d.device_bundle())
    assert status == 202 and body["resourceType"] == "OperationOutcome"
    await wait_for(lambda: len(receiver.received) == 1)
    sent = Message.decode(receiver.received[0])
    assert sent.message_type == "ORU" and len(sent.segments_named("OBX")) == 6
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{base(gw)}/fhir/Observation", headers=AUTH) as resp,
    ):
        assert (await resp.json(content_type=None))["total"] == 0  # routed only


async def test_request_from_another_sender_is_only_stored(
    tmp_path: Path, start_gateway: GatewayFactory, receiver: Receiver
) -> None:
    gw = await start_gateway(config(tmp_path, receiver.port))
    status, _, headers = await post(gw, "/fhir/Patient", d.patient(), headers=AUTH)  # the admin, not the GP
    assert status == 201 and "X-Passerelle-Message-Id" not in headers
    assert gw.channels["city-to-sih"].counters["received"] == 0


async def test_resend_with_the_same_request_id_is_not_processed_twice(
    tmp_path: Path, start_gateway: GatewayFactory, receiver: Receiver
) -> None:
    gw = await start_gateway(config(tmp_path, receiver.port))
    first = await post(gw, "/fhir/Patient", d.patient(), headers={"X-Request-Id": "req-42"})
    again = await post(gw, "/fhir/Patient", d.patient(), headers={"X-Request-Id": "req-42"})
    assert first[0] == 201
    assert again[0] == 200 and again[1]["resourceType"] == "OperationOutcome"
    assert again[2]["X-Passerelle-Message-Id"] == first[2]["X-Passerelle-Message-Id"]
    await wait_for(lambda: len(receiver.received) == 1)
    assert gw.channels["city-to-sih"].counters["duplicates"] == 1


async def test_receiver_answering_ae_retries_then_dead_with_the_ack_kept(
    tmp_path: Path, start_gateway: GatewayFactory, receiver: Receiver
) -> None:
    receiver.plan = ["AE"]
    gw = await start_gateway(config(tmp_path, receiver.port))
    status, _, headers = await post(gw, "/fhir", d.encounter_bundle())
    assert status == 200  # the transaction answer: the gateway took it; delivery is its business now
    mid = headers["X-Passerelle-Message-Id"]
    await wait_for(lambda: gw.channels["city-to-sih"].counters["dead"] == 1)
    assert len(receiver.received) == 2  # max_attempts
    assert Message.decode(receiver.received[0]).trigger == "A01"
    msg = await trace(gw, mid)
    assert msg["status"] == "DEAD"
    deliveries = [s for s in msg["stages"] if s["stage"] == "delivery:sih"]
    assert deliveries and all(s["status"] == "ERROR" for s in deliveries)
    assert deliveries[-1]["detail"]["detail"].startswith("AE")
    assert deliveries[-1]["payload"] is not None  # the remote ACK is kept (masked by default)


async def test_unmappable_request_is_error_on_the_trace(
    tmp_path: Path, start_gateway: GatewayFactory, receiver: Receiver
) -> None:
    gw = await start_gateway(config(tmp_path, receiver.port))
    obs = copy.deepcopy(d.device_bundle()["entry"][1]["resource"])
    obs["subject"] = {"reference": "Patient/unknown"}
    status, _, headers = await post(gw, "/fhir/Observation", obs)
    assert status == 201
    await wait_for(lambda: gw.channels["city-to-sih"].counters["errors"] == 1)
    msg = await trace(gw, headers["X-Passerelle-Message-Id"])
    assert msg["status"] == "ERROR" and receiver.received == []


@pytest.mark.parametrize(("answer", "expected"), [("AA", 201), ("AE", 502)])
async def test_after_delivery_answer_follows_the_receiver(
    tmp_path: Path, start_gateway: GatewayFactory, receiver: Receiver, answer: str, expected: int
) -> None:
    receiver.plan = [answer]
    gw = await start_gateway(config(tmp_path, receiver.port, queue=False, ack={"timing": "after_delivery"}))
    status, body, _ = await post(gw, "/fhir/Patient", d.patient())
    assert status == expected
    assert len(receiver.received) == 1  # delivered (or refused) before the answer
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{base(gw)}/fhir/Patient", headers=AUTH) as resp,
    ):
        total = (await resp.json(content_type=None))["total"]
    if answer == "AA":
        assert body["resourceType"] == "Patient" and total == 1
    else:
        assert body["resourceType"] == "OperationOutcome" and total == 0  # not stored when not delivered


async def test_with_a_worker_process_the_route_is_the_same(
    tmp_path: Path, start_gateway: GatewayFactory, receiver: Receiver
) -> None:
    cfg = config(tmp_path, receiver.port)
    # The channel runs in a worker process; the intake stays in the main one.
    cfg = with_settings(cfg, workers=1)
    gw = await start_gateway(cfg)
    status, _, headers = await post(gw, "/fhir", d.report_bundle())
    assert status == 200
    await wait_for(lambda: len(receiver.received) == 1, timeout=30)
    assert Message.decode(receiver.received[0]).get("OBX[1]-3.1") == "2093-3"
    mid = headers["X-Passerelle-Message-Id"]

    async def sent() -> bool:
        return (await trace(gw, mid))["status"] == "SENT"

    for _ in range(300):
        if await sent():
            break
        await asyncio.sleep(0.05)
    assert await sent()


def test_fhir_rules_on_an_hl7_source_are_a_config_error(tmp_path: Path) -> None:
    cfg = config(tmp_path, 2575)
    cfg.data["sources"] = [{"name": "city", "type": "mllp", "host": "127.0.0.1", "port": 0}]
    with pytest.raises(ConfigError) as caught:
        Gateway(cfg)
    assert caught.value.key == "channels[0].fhir"
