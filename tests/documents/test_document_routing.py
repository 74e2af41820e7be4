"""Published documents (ITI-65, ITI-105) go through the FHIR intake routing: a channel may route
them, e.g. to a hospital's MDM interface over MLLP, with the DMP rules still applied."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from gateway import config as config_mod
from gateway.app import Gateway
from gateway.hl7.er7 import Message
from tests.conftest import ADMIN_ENTRY, AUTH, FakeDestination, GatewayFactory, wait_for
from tests.documents.conftest import (
    FHIR_JSON,
    PATIENT_INS,
    TOKENS,
    auth,
    document,
    patient_resource,
    provide_bundle,
)
from tests.fakes import Receiver
from tests.fhir.conftest import INS

ROOT = Path(__file__).resolve().parents[2]


def config(tmp_path: Path, port: int | None, **fhir: Any) -> config_mod.Config:
    """Documents routed to MDM over MLLP (``port``), or as they came to a fake far end (None)."""
    channel: dict[str, Any] = {
        "name": "documents-to-mdm",
        "source": "city",
        "fhir": {"resource_types": ["DocumentReference"], **fhir},
        "destinations": [{"name": "far", "type": "fake"}],
    }
    if port is not None:
        channel["steps"] = [
            {
                "type": "hl7v2_mapping",
                "directory": str(ROOT / "mappings" / "reverse"),
                "receiving_application": "DPI",
                "receiving_facility": "CHU",
            }
        ]
        channel["destinations"] = [
            {
                "name": "dpi",
                "type": "mllp",
                "host": "127.0.0.1",
                "port": port,
                "ack_timeout_s": 2,
                "retry": {"max_attempts": 2, "initial_backoff_s": 0.01, "max_backoff_s": 0.02},
            }
        ]
    data = {
        "data_dir": str(tmp_path / "var"),
        "log_level": "warning",
        "workers": 0,
        "http": {"host": "127.0.0.1", "port": 0},
        "auth": {"tokens": [ADMIN_ENTRY, TOKENS["pro"], TOKENS["patient"]]},
        "sources": [{"name": "city", "type": "fhir"}],
        "channels": [channel],
    }
    return config_mod.parse(yaml.safe_dump(data, allow_unicode=True), str(tmp_path / "config.yaml"))


async def call(
    gw: Gateway, method: str, path: str, body: Any, headers: dict[str, str]
) -> tuple[int, Any, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.request(
            method,
            f"http://127.0.0.1:{gw.http_port_bound}{path}",
            json=body,
            headers={"Content-Type": FHIR_JSON, **headers},
        ) as resp,
    ):
        return resp.status, await resp.json(content_type=None), resp.headers.copy()


def with_patient(doc: dict[str, Any]) -> dict[str, Any]:
    """An ITI-65 Bundle that carries its Patient (conditional create), as the MDM mapping needs it."""
    pat_url = "urn:uuid:0b7a1f2e-0000-4000-8000-300000000001"
    doc["subject"] = {"reference": pat_url}
    bundle = provide_bundle(doc)
    bundle["entry"][0]["resource"]["subject"] = {"reference": pat_url}
    bundle["entry"].append(
        {
            "fullUrl": pat_url,
            "resource": patient_resource(),
            "request": {"method": "POST", "url": "Patient", "ifNoneExist": f"identifier={INS}|{PATIENT_INS}"},
        }
    )
    return bundle


MINE = f"/fhir/DocumentReference?patient.identifier={INS}|{PATIENT_INS}&status=current"


async def started(
    tmp_path: Path, start_gateway: GatewayFactory, receiver: Receiver | None, **fhir: Any
) -> Gateway:
    gw: Gateway = await start_gateway(config(tmp_path, receiver.port if receiver else None, **fhir))
    status, _, _ = await call(gw, "POST", "/fhir/Patient", patient_resource(), AUTH)
    assert status == 201  # not routed: the channel takes DocumentReference only
    return gw


async def test_provide_bundle_is_stored_and_routed_to_mdm(
    tmp_path: Path, start_gateway: GatewayFactory, receiver: Receiver
) -> None:
    gw = await started(tmp_path, start_gateway, receiver)
    status, answer, headers = await call(gw, "POST", "/fhir", with_patient(document()), auth("pro"))
    assert status == 200, answer
    assert answer["type"] == "transaction-response"  # the document store's answer
    message_id = headers["X-Passerelle-Message-Id"]
    await wait_for(lambda: len(receiver.received) == 1)
    sent = Message.decode(receiver.received[0])
    assert sent.message_type == "MDM" and sent.get("MSH-5") == "DPI"
    status, found, _ = await call(gw, "GET", MINE, None, auth("pro"))
    assert status == 200 and found["total"] == 1
    await gw.store.flush()
    trace = await gw.store.get_message(message_id, with_payloads=False)
    assert trace is not None and trace["message_type"] == "POST Bundle^transaction"
    assert trace["sender"] == "pro-1"


async def test_simplified_publish_is_routed_too(tmp_path: Path, start_gateway: GatewayFactory) -> None:
    gw = await started(tmp_path, start_gateway, None)
    status, stored, headers = await call(gw, "POST", "/fhir/DocumentReference", document(), auth("patient"))
    assert status == 201, stored
    assert stored["resourceType"] == "DocumentReference" and "X-Passerelle-Message-Id" in headers
    far = FakeDestination.instances["far"]
    await wait_for(lambda: len(far.received) == 1)
    envelope, payload = far.received[0]
    assert envelope.message_type == "POST DocumentReference" and envelope.sender == "patient-1"
    assert orjson.loads(payload)["resourceType"] == "DocumentReference"


async def test_a_refused_publication_is_not_delivered(
    tmp_path: Path, start_gateway: GatewayFactory, receiver: Receiver
) -> None:
    gw = await started(tmp_path, start_gateway, receiver)
    bad = document(hash_="AAAAAAAAAAAAAAAAAAAAAAAAAAA=")
    status, answer, _ = await call(gw, "POST", "/fhir", provide_bundle(bad), auth("pro"))
    assert status == 422 and answer["resourceType"] == "OperationOutcome"
    # a patient writing in another record is refused before anything is journaled
    other = document(subject=f"Patient?identifier={INS}|1950599123456")
    status, _, _ = await call(gw, "POST", "/fhir/DocumentReference", other, auth("patient"))
    assert status == 403
    await asyncio.sleep(0.2)  # give a wrongly routed message the time to arrive
    assert receiver.received == []
    status, found, _ = await call(gw, "GET", MINE, None, auth("pro"))
    assert found["total"] == 0
    rows = await gw.store.list_messages(
        status="SENT", control_id=None, channel=None, limit=5, before_seq=None
    )
    assert rows == []


async def test_a_channel_that_does_not_store_answers_202(
    tmp_path: Path, start_gateway: GatewayFactory, receiver: Receiver
) -> None:
    gw = await started(tmp_path, start_gateway, receiver, store=False)
    status, answer, _ = await call(gw, "POST", "/fhir", with_patient(document()), auth("pro"))
    assert status == 202 and answer["resourceType"] == "OperationOutcome"
    await wait_for(lambda: len(receiver.received) == 1)
    status, found, _ = await call(gw, "GET", MINE, None, auth("pro"))
    assert found["total"] == 0  # delivered, not stored
