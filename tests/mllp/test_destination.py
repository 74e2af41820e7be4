"""The MLLP destination against a real receiver on 127.0.0.1 that answers as scripted."""

from __future__ import annotations

import asyncio

import pytest

from connectors.mllp.destination import MllpDestination
from gateway.core.envelope import Envelope
from gateway.core.errors import RetryLater
from gateway.core.status import Status
from tests.conftest import wait_for
from tests.fakes import Receiver
from tests.messages import adt


def envelope(cid: str) -> Envelope:
    return Envelope(
        id="01TEST",
        channel="c",
        source="s",
        raw=adt(cid),
        content_type="application/hl7-v2",
        sender="A^B",
        control_id=cid,
        message_type="ADT^A01",
        partition_key="p",
        received_at=0.0,
        trace_id="t",
        charset="UNICODE UTF-8",
    )


async def test_aa_is_sent_and_the_ack_kept(receiver: Receiver) -> None:
    dest = MllpDestination("sih", {"host": "127.0.0.1", "port": receiver.port, "ack_timeout_s": 2})
    try:
        result = await dest.send(envelope("M1"), adt("M1"))
        assert result.status is Status.SENT
        assert result.response is not None and b"MSA|AA|M1" in result.response
        assert receiver.received == [adt("M1")]
        # the connection is reused for the next message
        assert (await dest.send(envelope("M2"), adt("M2"))).status is Status.SENT
    finally:
        await dest.aclose()


@pytest.mark.parametrize("answer", ["AE", "AR"])
async def test_ae_and_ar_are_errors_worth_retrying(receiver: Receiver, answer: str) -> None:
    receiver.plan = [answer]
    dest = MllpDestination("sih", {"host": "127.0.0.1", "port": receiver.port})
    try:
        result = await dest.send(envelope("M1"), adt("M1"))
        assert result.status is Status.ERROR
        assert result.retry is True
        assert result.detail.startswith(answer)
    finally:
        await dest.aclose()


async def test_wrong_msa2_is_an_error(receiver: Receiver) -> None:
    receiver.plan = ["wrong-id"]
    dest = MllpDestination("sih", {"host": "127.0.0.1", "port": receiver.port})
    try:
        result = await dest.send(envelope("M1"), adt("M1"))
        assert result.status is Status.ERROR
        assert "MSA-2" in result.detail
    finally:
        await dest.aclose()


async def test_timeout_and_refused_connection_are_retry_later(receiver: Receiver) -> None:
    receiver.plan = ["silent", "AA"]
    dest = MllpDestination("sih", {"host": "127.0.0.1", "port": receiver.port, "ack_timeout_s": 0.2})
    try:
        with pytest.raises(RetryLater):
            await dest.send(envelope("M1"), adt("M1"))
        # after a timeout the stream is out of step: a fresh connection is used
        assert (await dest.send(envelope("M1"), adt("M1"))).status is Status.SENT
    finally:
        await dest.aclose()
    closed = MllpDestination("sih", {"host": "127.0.0.1", "port": 1})
    with pytest.raises(RetryLater):
        await closed.send(envelope("M1"), adt("M1"))


async def test_channel_to_mllp_destination_retries_then_dead(
    start_gateway, client_for, receiver: Receiver
) -> None:
    receiver.plan = ["AE", "AE", "AA"]
    gw = await start_gateway(
        destinations=[
            {
                "name": "sih",
                "type": "mllp",
                "host": "127.0.0.1",
                "port": receiver.port,
                "retry": {"max_attempts": 5, "initial_backoff_s": 0.01},
            }
        ]
    )
    await client_for(gw).send(adt("FW1"))
    await wait_for(lambda: len(receiver.received) == 3)
    await asyncio.sleep(0.05)
    await gw.store.flush()
    rows = await gw.store.list_messages(
        status="SENT", control_id="FW1", channel=None, limit=1, before_seq=None
    )
    assert len(rows) == 1
    trace = await gw.store.get_message(rows[0]["id"], with_payloads=True)
    assert trace is not None
    deliveries = [s for s in trace["stages"] if s["stage"] == "delivery:sih"]
    assert [s["status"] for s in deliveries] == ["ERROR", "ERROR", "SENT"]
    assert b"MSA|AE|FW1" in deliveries[0]["payload"]

    receiver.plan = ["AR"]
    await client_for(gw).send(adt("FW2"))
    await wait_for(lambda: len(receiver.received) == 8)
    await asyncio.sleep(0.05)
    await gw.store.flush()
    assert [d["control_id"] for d in await gw.store.dead_letters(None, 5)] == ["FW2"]
