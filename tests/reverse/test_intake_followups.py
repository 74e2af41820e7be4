"""FHIR → HL7v2 through the running gateway: the Patient named by id only is read from the repository,
content no reverse rule reads is reported (or refused), and a batch routes only its accepted entries."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.app import Gateway
from gateway.hl7.er7 import Message
from tests.conftest import AUTH, GatewayFactory, wait_for, with_settings
from tests.fakes import Receiver
from tests.reverse import fhir_data as d
from tests.reverse.test_fhir_intake import base, config, post, trace


def heart_rate(subject: str) -> dict[str, Any]:
    obs = copy.deepcopy(d.device_bundle()["entry"][1]["resource"])
    obs.pop("id", None)
    obs["subject"] = {"reference": subject}
    return obs


async def stored_patient(gw: Gateway) -> str:
    """A Patient already in the repository (the admin's write is not routed)."""
    status, body, headers = await post(gw, "/fhir/Patient", d.patient(), headers=AUTH)
    assert status == 201 and "X-Passerelle-Message-Id" not in headers
    return str(body["id"])


async def channel_counters(gw: Gateway) -> dict[str, int]:
    async with aiohttp.ClientSession() as http, http.get(f"{base(gw)}/api/stats", headers=AUTH) as resp:
        assert resp.status == 200
        data = await resp.json()
    (channel,) = [c for c in data["runtime"]["channels"] if c["name"] == "city-to-sih"]
    counters: dict[str, int] = channel["counters"]
    return counters


# -- the Patient named by id only ----------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 1])
async def test_patient_referenced_by_id_is_read_from_the_repository(
    tmp_path: Path, start_gateway: GatewayFactory, receiver: Receiver, workers: int
) -> None:
    cfg = config(tmp_path, receiver.port)
    cfg = with_settings(cfg, workers=workers)  # with a worker, the worker reads the repository's file itself
    gw = await start_gateway(cfg)
    pid = await stored_patient(gw)
    status, _, _ = await post(gw, "/fhir/Observation", heart_rate(f"Patient/{pid}"))
    assert status == 201
    await wait_for(lambda: len(receiver.received) == 1, timeout=30)
    sent = Message.decode(receiver.received[0])
    assert (sent.message_type, sent.trigger) == ("ORU", "R01")
    assert sent.get("PID-5.1") == "LEFÈVRE" and sent.get("PID-3[1].1") == "100001"
    assert sent.get("OBX[1]-5") == "72"


async def test_absolute_reference_and_unknown_id_error_with_a_clear_reason(
    tmp_path: Path, start_gateway: GatewayFactory, receiver: Receiver
) -> None:
    gw = await start_gateway(config(tmp_path, receiver.port))
    pid = await stored_patient(gw)
    status, _, _ = await post(gw, "/fhir/Observation", heart_rate(f"{base(gw)}/fhir/Patient/{pid}"))
    assert status == 201
    await wait_for(lambda: len(receiver.received) == 1)
    status, _, headers = await post(gw, "/fhir/Observation", heart_rate("Patient/not-there"))
    assert status == 201
    await wait_for(lambda: gw.channels["city-to-sih"].counters["errors"] == 1)
    msg = await trace(gw, headers["X-Passerelle-Message-Id"])
    assert msg["status"] == "ERROR" and len(receiver.received) == 1
    error = next(s for s in msg["stages"] if s["status"] == "ERROR")
    assert "Patient/not-there" in error["detail"]["text"]
    assert "neither in the request nor in the repository" in error["detail"]["text"]


# -- content no reverse rule reads ----------------------------------------------------------------------


def patient_with_extras() -> dict[str, Any]:
    patient = d.patient()
    patient["maritalStatus"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
                                            "code": "M"}]}  # fmt: skip
    patient["multipleBirthBoolean"] = False
    return patient


async def test_unmapped_content_is_on_the_trace_and_counted(
    tmp_path: Path, start_gateway: GatewayFactory, receiver: Receiver
) -> None:
    gw = await start_gateway(config(tmp_path, receiver.port))
    status, _, headers = await post(gw, "/fhir/Patient", patient_with_extras())
    assert status == 201
    await wait_for(lambda: len(receiver.received) == 1)
    await wait_for(lambda: gw.channels["city-to-sih"].counters["sent"] == 1)
    msg = await trace(gw, headers["X-Passerelle-Message-Id"])
    transformed = next(s for s in msg["stages"] if s["stage"] == "transformed")
    unmapped = transformed["detail"]["unmapped"]
    assert "Patient.maritalStatus" in unmapped and "Patient.multipleBirthBoolean" in unmapped
    assert not any(u.startswith(("Patient.name", "Patient.birthDate", "Patient.gender")) for u in unmapped)
    assert (await channel_counters(gw))["unmapped"] == 1


def rejecting(tmp_path: Path, port: int, **channel: Any) -> Any:
    cfg = config(tmp_path, port, **channel)
    cfg.data["channels"][0]["steps"][0]["unmapped"] = "reject"
    return cfg


async def test_unmapped_reject_after_transform_is_422_and_nothing_stored(
    tmp_path: Path, start_gateway: GatewayFactory, receiver: Receiver
) -> None:
    gw = await start_gateway(
        rejecting(tmp_path, receiver.port, queue=False, ack={"timing": "after_transform"})
    )
    status, body, _ = await post(gw, "/fhir/Patient", patient_with_extras())
    assert status == 422 and body["resourceType"] == "OperationOutcome"
    assert "Patient.maritalStatus" in body["issue"][0]["diagnostics"]
    assert receiver.received == []
    async with aiohttp.ClientSession() as http, http.get(f"{base(gw)}/fhir/Patient", headers=AUTH) as resp:
        assert (await resp.json(content_type=None))["total"] == 0  # refused: not stored either
    # the same request, corrected, goes through (its resend is processed afresh)
    plain = d.patient()
    for ident in plain["identifier"]:  # what PID-3 has no place for
        ident.pop("use", None)
        ident["type"]["coding"][0].pop("system", None)
    status, _, _ = await post(gw, "/fhir/Patient", plain)
    assert status == 201 and len(receiver.received) == 1


async def test_unmapped_reject_on_a_queued_channel_keeps_the_message_in_error(
    tmp_path: Path, start_gateway: GatewayFactory, receiver: Receiver
) -> None:
    gw = await start_gateway(rejecting(tmp_path, receiver.port))
    status, _, headers = await post(gw, "/fhir/Patient", patient_with_extras())
    assert status == 201  # answered at the journal commit, as an MLLP ACK before processing
    await wait_for(lambda: gw.channels["city-to-sih"].counters["errors"] == 1)
    msg = await trace(gw, headers["X-Passerelle-Message-Id"])
    assert msg["status"] == "ERROR" and receiver.received == []
    error = next(s for s in msg["stages"] if s["status"] == "ERROR")
    assert "Patient.maritalStatus" in error["detail"]["text"]


# -- batch: only the accepted entries are routed ---------------------------------------------------------


def patient_entry(ipp: str, family: str, **request: Any) -> dict[str, Any]:
    patient = d.patient()
    patient["identifier"][0]["value"] = ipp
    patient["name"][0]["family"] = family
    return {"resource": patient, "request": {"method": "POST", "url": "Patient", **request}}


async def test_batch_routes_only_the_entries_that_were_accepted(
    tmp_path: Path, start_gateway: GatewayFactory, receiver: Receiver
) -> None:
    gw = await start_gateway(config(tmp_path, receiver.port))
    invalid = patient_entry("200002", "INVALIDE")
    invalid["resource"]["birthDate"] = "le 3 mars"  # the models refuse it: answered, not routed
    refused = patient_entry("200003", "REFUSE", method="PUT", url="Patient/absent", ifMatch='W/"7"')
    refused["resource"]["id"] = "absent"  # a version that is not there: the repository refuses it
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [patient_entry("200001", "ACCEPTE"), invalid, refused, patient_entry("200004", "AUSSI")],
    }
    status, body, headers = await post(gw, "/fhir", batch)
    assert status == 200 and body["type"] == "batch-response"
    codes = [e["response"]["status"][:3] for e in body["entry"]]
    assert codes[0] == "201" and codes[3] == "201"
    assert codes[1].startswith("4") and codes[2].startswith("4")
    await wait_for(lambda: gw.channels["city-to-sih"].counters["sent"] == 1)
    families = sorted(Message.decode(raw).get("PID-5.1") for raw in receiver.received)
    assert families == ["ACCEPTE", "AUSSI"]
    msg = await trace(gw, headers["X-Passerelle-Message-Id"])
    assert msg["status"] == "SENT"
    intake = next(s for s in msg["stages"] if s["stage"] == "intake")
    assert intake["detail"]["not_routed"] == [1]  # among the entries journaled (the valid ones)


async def test_batch_whose_entries_all_failed_is_not_routed(
    tmp_path: Path, start_gateway: GatewayFactory, receiver: Receiver
) -> None:
    gw = await start_gateway(config(tmp_path, receiver.port))
    invalid = patient_entry("300001", "INVALIDE")
    invalid["resource"]["gender"] = "inconnu"
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [invalid]}
    status, body, headers = await post(gw, "/fhir", batch)
    assert status == 200 and body["entry"][0]["response"]["status"].startswith("4")
    assert "X-Passerelle-Message-Id" not in headers
    assert gw.channels["city-to-sih"].counters["received"] == 0 and receiver.received == []
