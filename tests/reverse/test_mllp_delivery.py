"""MLLP delivery of reverse-mapped messages: several per request, charset per destination, ACK checks."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from connectors.mllp.destination import MllpDestination
from gateway.core.envelope import FHIR_JSON, Envelope
from gateway.core.errors import PermanentDeliveryError, RetryLater
from gateway.core.status import Status
from gateway.hl7.er7 import Message
from tests.fakes import Receiver
from tests.reverse import fhir_data as d
from tests.reverse.test_golden import LIB

NOW = datetime(2026, 11, 25, 15, 0, tzinfo=UTC)
ENV = Envelope(
    id="01TEST",
    channel="c",
    source="city",
    raw=b"{}",
    content_type=FHIR_JSON,
    sender="gp",
    control_id="",
    message_type="POST Bundle^transaction",
    partition_key="p",
    received_at=0.0,
    trace_id="t",
    charset="UNICODE UTF-8",
)


def two_encounters() -> bytes:
    bundle = d.encounter_bundle()
    second = {**bundle["entry"][1], "fullUrl": "urn:uuid:enc2"}  # type: ignore[index]
    second["resource"] = {**second["resource"], "identifier": [{"value": "V2"}]}
    bundle["entry"].append(second)  # type: ignore[attr-defined]
    result = LIB.map(bundle, control_id="CTRL", now=NOW)
    assert [m.control_id for m in result.messages] == ["CTRL1", "CTRL2"]
    return b"".join(m.encode() for m in result.messages)


def dest(receiver: Receiver, **settings: object) -> MllpDestination:
    return MllpDestination(
        "sih", {"host": "127.0.0.1", "port": receiver.port, "ack_timeout_s": 1, **settings}
    )


async def test_each_message_of_a_request_is_sent_and_acknowledged(receiver: Receiver) -> None:
    sih = dest(receiver)
    try:
        result = await sih.send(ENV, two_encounters())
    finally:
        await sih.aclose()
    assert result.status is Status.SENT
    assert [Message.decode(r).control_id for r in receiver.received] == ["CTRL1", "CTRL2"]
    assert result.response is not None and result.response.count(b"MSA|AA|") == 2


async def test_an_ae_on_the_second_stops_there_and_is_worth_a_retry(receiver: Receiver) -> None:
    receiver.plan = ["AA", "AE"]
    sih = dest(receiver)
    try:
        result = await sih.send(ENV, two_encounters())
    finally:
        await sih.aclose()
    assert result.status is Status.ERROR and result.retry and result.detail.startswith("AE")
    assert result.response is not None and b"MSA|AE|CTRL2" in result.response


async def test_charset_setting_reencodes_and_rewrites_msh18(receiver: Receiver) -> None:
    payload = LIB.map(d.patient(), control_id="C1", now=NOW).messages[0].encode()
    assert b"UNICODE UTF-8" in payload
    sih = dest(receiver, charset="8859/15")
    try:
        assert (await sih.send(ENV, payload)).status is Status.SENT
    finally:
        await sih.aclose()
    sent = receiver.received[0]
    assert Message.decode(sent).charset == "8859/15"
    assert "Françoise".encode("iso8859_15") in sent and "Françoise".encode() not in sent


async def test_a_character_the_charset_lacks_is_a_permanent_failure(receiver: Receiver) -> None:
    patient = d.patient()
    patient["name"][0]["family"] = "Wałęsa"  # type: ignore[index]
    payload = LIB.map(patient, control_id="C1", now=NOW).messages[0].encode()
    sih = dest(receiver, charset="8859/15")
    try:
        with pytest.raises(PermanentDeliveryError, match="8859/15"):
            await sih.send(ENV, payload)
    finally:
        await sih.aclose()
    assert receiver.received == []


async def test_no_ack_in_time_is_retry_later(receiver: Receiver) -> None:
    receiver.plan = ["silent", "AA"]
    payload = LIB.map(d.patient(), control_id="C1", now=NOW).messages[0].encode()
    sih = dest(receiver, ack_timeout_s=0.2)
    try:
        with pytest.raises(RetryLater):
            await sih.send(ENV, payload)
        assert (await sih.send(ENV, payload)).status is Status.SENT
    finally:
        await sih.aclose()
