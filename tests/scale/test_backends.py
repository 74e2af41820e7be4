"""The spine's behaviour, the same on the embedded backend and on NATS JetStream + PostgreSQL."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import nats
import pytest

from connectors.mllp.client import MllpClient
from gateway.core.errors import RetryLater
from gateway.core.status import Status
from gateway.hl7.er7 import Message
from tests.conftest import FakeDestination, mllp_port, wait_for
from tests.messages import adt
from tests.scale.conftest import ConfigFor
from tests.waiting import until

pytestmark = pytest.mark.live


def ack_of(raw: bytes) -> Message:
    return Message.decode(raw, default_charset="UNICODE UTF-8")


async def settled(gw, message_id: str, status: str) -> dict:  # type: ignore[no-untyped-def, type-arg]
    """The stored trace, once the message reached ``status`` (writes land asynchronously)."""
    for _ in range(500):
        await gw.store.flush()
        msg = await gw.store.get_message(message_id, with_payloads=True)
        if msg is not None and msg["status"] == status:
            return msg  # type: ignore[no-any-return]
        await asyncio.sleep(0.02)
    raise AssertionError(f"message {message_id} never reached {status}")


async def test_ack_after_commit_then_delivered_and_traced(
    backend_config: ConfigFor, start_gateway, client_for
):
    gw = await start_gateway(backend_config())
    ack = ack_of(await client_for(gw).send(adt("C1")))
    assert (ack.get("MSA-1"), ack.get("MSA-2")) == ("AA", "C1")
    far = FakeDestination.instances["far"]
    await wait_for(lambda: len(far.received) == 1)
    env, payload = far.received[0]
    assert payload == adt("C1")
    stored = await settled(gw, env.id, Status.SENT.value)
    assert stored["raw"] == adt("C1")
    assert [s["stage"] for s in stored["stages"]] == ["ack", "transformed"]
    assert stored["stages"][0]["detail"] == {"code": "AA"}
    assert stored["stages"][0]["payload"].startswith(b"MSH|^~\\&|PASSERELLE|GHT|DXCARE|HOPITAL-NORD|")
    assert [(d["destination"], d["status"], d["attempts"]) for d in stored["deliveries"]] == [
        ("far", "SENT", 1)
    ]
    stats = await gw.store.stats()  # the same shape on both backends, per type included
    assert stats["channels"][env.channel] == {"SENT": 1}
    assert stats["by_type"][env.channel] == {"ADT^A01": {"SENT": 1}}


async def test_duplicate_is_acked_and_processed_once(backend_config: ConfigFor, start_gateway, client_for):
    gw = await start_gateway(backend_config())
    client = client_for(gw)
    assert ack_of(await client.send(adt("DUP1"))).get("MSA-1") == "AA"
    assert ack_of(await client.send(adt("DUP1"))).get("MSA-1") == "AA"
    far = FakeDestination.instances["far"]
    await wait_for(lambda: len(far.received) == 1)
    # another facility's DUP1 is another message: once it is delivered, the resend had its chance
    await client.send(adt("DUP1", facility="CLINIQUE-SUD"))
    await wait_for(lambda: len(far.received) == 2)
    rows = await gw.store.list_messages(
        status=None, control_id="DUP1", channel=None, limit=10, before_seq=None
    )
    assert len(rows) == 2
    first = next(r for r in rows if r["sender"] == "DXCARE^HOPITAL-NORD")
    for _ in range(200):
        trace = await gw.store.get_message(first["id"], with_payloads=False)
        if "duplicate" in [s["stage"] for s in trace["stages"]]:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the resend was not traced as a duplicate")
    assert [e.sender for e, _ in far.received] == ["DXCARE^HOPITAL-NORD", "DXCARE^CLINIQUE-SUD"]


async def test_retries_then_delivers(backend_config: ConfigFor, start_gateway, client_for):
    gw = await start_gateway(
        backend_config(
            destinations=[
                {
                    "name": "far",
                    "type": "fake",
                    "plan": ["retry", "error", "ok"],
                    "retry": {"max_attempts": 5, "initial_backoff_s": 0.01},
                }
            ]
        )
    )
    await client_for(gw).send(adt("R1"))
    far = FakeDestination.instances["far"]
    await wait_for(lambda: len(far.received) == 1)
    stored = await settled(gw, far.received[0][0].id, Status.SENT.value)
    assert [(d["status"], d["attempts"]) for d in stored["deliveries"]] == [("SENT", 3)]
    assert [s["stage"] for s in stored["stages"] if s["stage"].startswith("delivery:")] == [
        "delivery:far"
    ] * 3
    assert far.attempts == 3


async def test_dead_after_the_attempts_then_replay(backend_config: ConfigFor, start_gateway, client_for):
    gw = await start_gateway(
        backend_config(
            destinations=[
                {
                    "name": "far",
                    "type": "fake",
                    "plan": ["retry"],
                    "retry": {"max_attempts": 3, "initial_backoff_s": 0.01},
                }
            ]
        )
    )
    assert ack_of(await client_for(gw).send(adt("D1"))).get("MSA-1") == "AA"
    far = FakeDestination.instances["far"]
    await wait_for(lambda: far.attempts == 3)

    async def dead_letters() -> list[dict[str, Any]]:
        await gw.store.flush()
        return await gw.store.dead_letters(None, 10)

    dead = await until(dead_letters, 10, "the message is dead")
    assert [d["control_id"] for d in dead] == ["D1"]
    trace = await gw.store.get_message(dead[0]["id"], with_payloads=False)
    # DEAD is final and recorded with its attempt count: nothing schedules a fourth attempt
    assert [(d["status"], d["attempts"]) for d in trace["deliveries"]] == [("DEAD", 3)]
    if gw.backends.jetstream is not None:
        refs = await gw.backends.jetstream.journal.dead_letters()
        assert [(r["message_id"], r["destination"]) for r in refs] == [(dead[0]["id"], "far")]
    assert far.attempts == 3
    far.plan = ["ok"]
    assert await gw.replay(dead[0]["id"])  # what POST /api/dlq/{id}/replay calls
    await wait_for(lambda: len(far.received) == 1)
    await settled(gw, dead[0]["id"], Status.SENT.value)
    assert await gw.store.dead_letters(None, 10) == []


async def test_permanent_failure_is_dead_at_once(backend_config: ConfigFor, start_gateway, client_for):
    gw = await start_gateway(
        backend_config(destinations=[{"name": "far", "type": "fake", "plan": ["permanent"]}])
    )
    await client_for(gw).send(adt("PERM"))
    await wait_for(lambda: FakeDestination.instances["far"].attempts == 1)
    for _ in range(200):
        await gw.store.flush()
        if await gw.store.dead_letters(None, 10):
            break
        await asyncio.sleep(0.02)
    assert [d["control_id"] for d in await gw.store.dead_letters(None, 10)] == ["PERM"]
    assert FakeDestination.instances["far"].attempts == 1


async def test_per_patient_order_holds(backend_config: ConfigFor, start_gateway):
    gw = await start_gateway(backend_config(partitions=4))
    far = FakeDestination.instances["far"]
    original = far.send
    failed_once: set[str] = set()

    async def jittery(envelope, payload):  # type: ignore[no-untyped-def]
        await asyncio.sleep(random.random() / 500)
        # now and then a retry, which must hold the patient's next messages back
        if envelope.control_id.endswith("7") and envelope.control_id not in failed_once:
            failed_once.add(envelope.control_id)
            raise RetryLater("far end busy", defer=0.01)
        return await original(envelope, payload)

    far.send = jittery  # type: ignore[method-assign]
    patients = [f"9{p:04d}" for p in range(10)]
    expected: dict[str, list[str]] = {p: [] for p in patients}

    async def sender(conn: int) -> None:
        client = MllpClient("127.0.0.1", mllp_port(gw))
        try:
            for i in range(30):
                patient = patients[(conn * 7 + i) % len(patients)]
                cid = f"O{conn}-{i}"
                await client.send(adt(cid, patient=patient))
                expected[patient].append(cid)  # after the ACK: the order of receipt
        finally:
            await client.close()

    await asyncio.gather(*(sender(c) for c in range(4)))
    await wait_for(lambda: len(far.received) == 120, timeout=60)
    seen: dict[str, list[str]] = {p: [] for p in patients}
    for env, _ in far.received:
        seen[Message.decode(env.raw).get("PID-3.1")].append(env.control_id)
    assert seen == expected
    assert len(failed_once) == 12


async def test_filtered_messages_are_recorded_not_delivered(
    backend_config: ConfigFor, start_gateway, client_for
):
    gw = await start_gateway(backend_config(filter={"triggers": ["A01"]}))
    client = client_for(gw)
    assert ack_of(await client.send(adt("F1", trigger="A08"))).get("MSA-1") == "AA"
    await client.send(adt("F2"))
    far = FakeDestination.instances["far"]
    await wait_for(lambda: len(far.received) == 1)
    assert far.received[0][0].control_id == "F2"
    (row,) = await gw.store.list_messages(
        status=None, control_id="F1", channel=None, limit=5, before_seq=None
    )
    assert row["status"] == Status.FILTERED.value


async def test_bad_input_is_answered_ar_and_kept(backend_config: ConfigFor, start_gateway, client_for):
    gw = await start_gateway(backend_config())
    ack = ack_of(await client_for(gw).send(b"this is not HL7 at all"))
    assert (ack.get("MSA-1"), ack.get("ERR-3.1")) == ("AR", "100")  # no MSH first: segment sequence error
    await gw.store.flush()
    rows = await gw.store.list_messages(
        status="ERROR", control_id=None, channel=None, limit=5, before_seq=None
    )
    assert [r["channel"] for r in rows] == ["source:hospital"]


async def test_nats_journal_needs_the_postgresql_store(tmp_path, live) -> None:
    from gateway.app import Gateway
    from gateway.core.errors import ConfigError
    from tests.conftest import make_config

    with pytest.raises(ConfigError) as info:
        Gateway(make_config(tmp_path), journal_url="nats://127.0.0.1:4222")
    assert info.value.key == "store.backend"
    with pytest.raises(ConfigError) as info:
        Gateway(
            make_config(tmp_path, ack={"timing": "after_delivery"}),
            journal_url="nats://127.0.0.1:4222",
            store_dsn="postgresql://127.0.0.1:5432/test",
        )
    assert info.value.key == "channels[0].ack.timing"


async def test_unreachable_services_at_start_are_named(tmp_path, live) -> None:
    from gateway.app import Gateway
    from gateway.core.errors import StoreError
    from tests.conftest import make_config

    with socket_closed_port() as port:
        gw = Gateway(make_config(tmp_path), store_dsn=f"postgresql://postgres@127.0.0.1:{port}/test")
        with pytest.raises(StoreError, match=f"PostgreSQL at postgresql://postgres@127.0.0.1:{port}/test"):
            await gw.start()
        gw = Gateway(
            make_config(tmp_path),
            store_dsn=live.store()["dsn"],
            journal_url=f"nats://127.0.0.1:{port}",
        )
        gw.backends.store.schema = live.schema  # type: ignore[union-attr]
        with pytest.raises(StoreError, match=f"NATS at nats://127.0.0.1:{port}"):
            await gw.start()


def socket_closed_port():  # type: ignore[no-untyped-def]
    """A port nothing listens on (bound then released)."""
    import contextlib
    import socket

    @contextlib.contextmanager
    def cm():  # type: ignore[no-untyped-def]
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        yield port

    return cm()


async def test_dedupe_window_is_jetstreams(live) -> None:
    """A resend within the window never reaches the stream twice (Nats-Msg-Id)."""
    from gateway.core.envelope import HL7_V2, Envelope
    from gateway.store.nats_journal import JetStreamStore, NatsJournal

    store = JetStreamStore(
        live.store()["dsn"], NatsJournal(live.journal()["url"], prefix=live.prefix), schema=live.schema
    )
    await store.open()
    try:

        def env(i: str) -> Envelope:
            return Envelope(i, "adt", "hospital", b"MSH|", HL7_V2, "A^B", "CTRL1", "ADT^A01", "k", 1.0, i)

        first = await store.append([env("m1")])
        again = await store.append([env("m2")])
        assert (first[0].duplicate, again[0].duplicate) == (False, True)
        assert again[0].seq == first[0].seq
    finally:
        await store.close()
    nc = await nats.connect(live.journal()["url"])
    try:
        info = await nc.jetstream().stream_info(f"{live.prefix}_IN")
        assert info.state.messages == 1
    finally:
        await nc.close()
