"""Tier (b)/(c): a real gateway on 127.0.0.1 port 0, real SQLite, fake far ends."""

from __future__ import annotations

import asyncio
import random
import unicodedata

import aiohttp
import pytest

from connectors.mllp.client import MllpClient
from connectors.mllp.framing import frame
from gateway.core.status import Status
from gateway.hl7.er7 import Message
from tests.conftest import AUTH, FakeDestination, mllp_port, wait_for
from tests.messages import adt


def ack_fields(raw: bytes) -> Message:
    return Message.decode(raw, default_charset="UNICODE UTF-8")


async def test_message_is_acked_after_commit_and_delivered(start_gateway, client_for) -> None:
    gw = await start_gateway()
    ack = ack_fields(await client_for(gw).send(adt("C1")))
    assert ack.get("MSA-1") == "AA"
    assert ack.get("MSA-2") == "C1"
    assert ack.get("MSH-9") == "ACK^A01^ACK"
    assert ack.get("MSH-18") == "UNICODE UTF-8"
    assert ack.get("MSH-12.1") == "2.5"
    far = FakeDestination.instances["far"]
    await wait_for(lambda: len(far.received) == 1)
    env, payload = far.received[0]
    assert payload == adt("C1")
    assert env.control_id == "C1"
    assert env.message_type == "ADT^A01"
    await gw.store.flush()
    stored = await gw.store.get_message(env.id, with_payloads=True)
    assert stored is not None
    assert stored["status"] == Status.SENT
    assert stored["raw"] == adt("C1")
    assert [s["stage"] for s in stored["stages"]] == ["ack", "transformed"]
    ack_stage = stored["stages"][0]
    assert ack_stage["payload"].startswith(b"MSH|^~\\&|PASSERELLE|GHT|DXCARE|HOPITAL-NORD|")
    assert ack_stage["detail"] == {"code": "AA"}
    deliveries = [(d["destination"], d["status"], d["attempts"]) for d in stored["deliveries"]]
    assert deliveries == [("far", "SENT", 1)]


async def test_many_messages_on_one_connection_are_answered_in_order(start_gateway, client_for) -> None:
    gw = await start_gateway()
    client = client_for(gw)
    for i in range(50):
        ack = ack_fields(await client.send(adt(f"SEQ{i}", patient=str(i % 3))))
        assert ack.get("MSA-2") == f"SEQ{i}"


async def test_pipelined_frames_are_all_answered_in_order(start_gateway) -> None:
    gw = await start_gateway()
    reader, writer = await asyncio.open_connection("127.0.0.1", mllp_port(gw))
    writer.write(b"".join(frame(adt(f"P{i}")) for i in range(200)))
    await writer.drain()
    data = b""
    while data.count(b"\x1c\r") < 200:
        chunk = await asyncio.wait_for(reader.read(65536), 10)
        assert chunk
        data += chunk
    acks = [ack_fields(part.lstrip(b"\x0b")) for part in data.split(b"\x1c\r") if part]
    assert [a.get("MSA-2") for a in acks] == [f"P{i}" for i in range(200)]
    writer.close()


async def test_duplicate_control_id_is_acked_but_processed_once(start_gateway, client_for) -> None:
    gw = await start_gateway()
    client = client_for(gw)
    first = ack_fields(await client.send(adt("DUP1")))
    second = ack_fields(await client.send(adt("DUP1")))
    assert first.get("MSA-1") == second.get("MSA-1") == "AA"
    assert second.get("MSA-2") == "DUP1"
    far = FakeDestination.instances["far"]
    await wait_for(lambda: len(far.received) == 1)
    await asyncio.sleep(0.1)
    assert len(far.received) == 1
    await gw.store.flush()
    rows = await gw.store.list_messages(
        status=None, control_id="DUP1", channel=None, limit=10, before_seq=None
    )
    assert len(rows) == 1
    trace = await gw.store.get_message(rows[0]["id"], with_payloads=False)
    assert trace is not None
    assert "duplicate" in [s["stage"] for s in trace["stages"]]
    # same control id from another sending facility is another message
    other = ack_fields(await client.send(adt("DUP1", facility="CLINIQUE-SUD")))
    assert other.get("MSA-1") == "AA"
    await wait_for(lambda: len(far.received) == 2)


@pytest.mark.parametrize(
    ("raw", "code", "err_code", "location"),
    [
        (b"this is not HL7 at all", "AR", "100", None),  # table 0357: segment sequence error
        (b"PID|||100001^^^HOPITAL-NORD^PI\r" + adt("LATE"), "AR", "100", None),
        (adt("X").replace(b"|X|P|", b"||P|"), "AR", "101", "MSH^1^10^1"),
        (adt("X").replace(b"ADT^A01^ADT_A01", b""), "AR", "101", "MSH^1^9^1"),
        (adt("BADUTF").replace("Françoise".encode(), b"Fran\xe7oise"), "AR", "102", "MSH^1^18^1"),
        (adt("BADCS", charset="8859/15").replace(b"8859/15", b"KLINGON"), "AR", "102", "MSH^1^18^1"),
    ],
    ids=[
        "not-hl7",
        "msh-not-first",
        "no-control-id",
        "no-message-type",
        "undecodable-utf8",
        "unknown-charset",
    ],
)
async def test_bad_input_is_answered_ar_with_err_and_kept(
    start_gateway, client_for, raw: bytes, code: str, err_code: str, location: str | None
) -> None:
    gw = await start_gateway()
    client = client_for(gw)
    ack = ack_fields(await client.send(raw))
    assert ack.get("MSA-1") == code
    assert ack.get("ERR-3.1") == err_code
    assert ack.get("ERR-3.3") == "HL70357"
    assert ack.get("ERR-4") == "E"
    if location:
        assert ack.get_raw("ERR-2") == location
    # the connection still serves the next, good message
    assert ack_fields(await client.send(adt("AFTER"))).get("MSA-1") == "AA"
    await gw.store.flush()
    rejected = await gw.store.list_messages(
        status="ERROR", control_id=None, channel=None, limit=5, before_seq=None
    )
    assert len(rejected) == 1
    assert rejected[0]["channel"] == "source:hospital"
    assert FakeDestination.instances["far"].attempts <= 1


async def test_every_charset_is_decoded_by_msh18(start_gateway, client_for) -> None:
    gw = await start_gateway()
    client = client_for(gw)
    for i, charset in enumerate(["UNICODE UTF-8", "8859/15", "8859/1"]):
        ack = await client.send(adt(f"CS{i}", charset=charset, given="Zoé"))
        assert ack_fields(ack).get("MSA-1") == "AA"
        assert ack_fields(ack).get("MSH-18") == charset
    folded = unicodedata.normalize("NFKD", adt("CS9").decode()).encode("ascii", "ignore")
    ascii_msg = folded.replace(b"UNICODE UTF-8", b"ASCII")
    assert ack_fields(await client.send(ascii_msg)).get("MSA-1") == "AA"
    # empty MSH-18 falls back to the source's declared default (8859/15 here), never a guess
    empty = adt("CS10", charset="8859/15").replace(b"|8859/15|", b"||")
    assert ack_fields(await client.send(empty)).get("MSA-1") == "AA"
    far = FakeDestination.instances["far"]
    await wait_for(lambda: len(far.received) == 5)


async def test_oversize_frame_gets_ar_then_close_and_server_keeps_serving(start_gateway, client_for) -> None:
    gw = await start_gateway()
    big = adt("BIG") + b"NTE|1||" + b"x" * 70000 + b"\r"
    reader, writer = await asyncio.open_connection("127.0.0.1", mllp_port(gw))
    writer.write(frame(big))
    await writer.drain()
    data = await asyncio.wait_for(reader.read(65536), 5)
    ack = ack_fields(data.strip(b"\x0b\x1c\r"))
    assert ack.get("MSA-1") == "AR"
    assert ack.get("MSA-2") == "BIG"
    assert ack.get("ERR-3.1") == "100"
    # the AR left only once its beginning was journaled: the refused frame is in the store already
    refused = await gw.store.list_messages(
        status="ERROR", control_id=None, channel=None, limit=10, before_seq=None
    )
    assert [m["message_type"] for m in refused] == ["ADT^A01"]
    stored = await gw.store.get_message(refused[0]["id"], with_payloads=True)
    assert stored is not None and stored["raw"] and big.startswith(stored["raw"])
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
    writer.close()
    assert ack_fields(await client_for(gw).send(adt("NEXT"))).get("MSA-1") == "AA"


async def test_enhanced_mode_commit_acks(start_gateway, client_for) -> None:
    gw = await start_gateway()
    client = client_for(gw)
    ack = ack_fields(await client.send(adt("E1", accept_ack="AL", app_ack="NE")))
    assert ack.get("MSA-1") == "CA"
    assert ack.get("MSA-2") == "E1"
    bad = adt("E2", accept_ack="AL", app_ack="AL").replace(b"|E2|P|", b"||P|")
    nack = ack_fields(await client.send(bad))
    assert nack.get("MSA-1") == "CR"
    assert nack.get("ERR-3.1") == "101"
    # ER: answer only on error. A success gets no ACK at all; the next frame's answer proves the order.
    raw_reader, raw_writer = await asyncio.open_connection("127.0.0.1", mllp_port(gw))
    raw_writer.write(frame(adt("E3", accept_ack="ER")) + frame(adt("E4")))
    await raw_writer.drain()
    data = await asyncio.wait_for(raw_reader.readuntil(b"\x1c\r"), 5)
    assert ack_fields(data.strip(b"\x0b\x1c\r")).get("MSA-2") == "E4"
    raw_writer.close()
    far = FakeDestination.instances["far"]
    await wait_for(lambda: {e.control_id for e, _ in far.received} == {"E1", "E3", "E4"})


async def test_after_delivery_timing_answers_ae_and_a_resend_is_processed(start_gateway, client_for) -> None:
    gw = await start_gateway(
        queue=False,
        ack={"timing": "after_delivery"},
        destinations=[{"name": "far", "type": "fake", "plan": ["error", "ok"]}],
    )
    client = client_for(gw)
    nack = ack_fields(await client.send(adt("AE1")))
    assert nack.get("MSA-1") == "AE"
    assert nack.get("ERR-3.1") == "207"
    assert nack.get("ERR-4") == "E"
    # the sender resends the same MSH-10 after an AE: it must be processed, not deduplicated
    ack = ack_fields(await client.send(adt("AE1")))
    assert ack.get("MSA-1") == "AA"
    assert [e.control_id for e, _ in FakeDestination.instances["far"].received] == ["AE1"]


async def test_after_transform_timing_acks_before_delivery(start_gateway, client_for) -> None:
    gw = await start_gateway(
        queue=False,
        ack={"timing": "after_transform"},
        destinations=[{"name": "far", "type": "fake", "delay_s": 0.3}],
    )
    ack = ack_fields(await client_for(gw).send(adt("AT1")))
    assert ack.get("MSA-1") == "AA"
    assert FakeDestination.instances["far"].received == []  # ACKed before the slow delivery ended
    await wait_for(lambda: len(FakeDestination.instances["far"].received) == 1)


async def test_failed_deliveries_go_dead_after_the_attempts_then_replay(start_gateway, client_for) -> None:
    gw = await start_gateway(
        destinations=[
            {
                "name": "far",
                "type": "fake",
                "plan": ["retry"],
                "retry": {"max_attempts": 3, "initial_backoff_s": 0.01},
            }
        ],
    )
    assert ack_fields(await client_for(gw).send(adt("D1"))).get("MSA-1") == "AA"
    far = FakeDestination.instances["far"]
    await wait_for(lambda: far.attempts == 3)
    await asyncio.sleep(0.05)
    await gw.store.flush()
    dead = await gw.store.dead_letters(None, 10)
    assert [d["control_id"] for d in dead] == ["D1"]
    trace = await gw.store.get_message(dead[0]["id"], with_payloads=False)
    assert trace is not None
    assert trace["deliveries"][0]["status"] == "DEAD"
    assert trace["deliveries"][0]["attempts"] == 3
    assert far.attempts == 3  # no fourth attempt
    far.plan = ["ok"]
    async with aiohttp.ClientSession(headers=AUTH) as http:
        url = f"http://127.0.0.1:{gw.http_port_bound}/api/dlq/{dead[0]['id']}/replay"
        async with http.post(url) as resp:
            assert resp.status == 202
    await wait_for(lambda: len(far.received) == 1)
    await gw.store.flush()
    assert (await gw.store.get_message(dead[0]["id"], with_payloads=False))["status"] == "SENT"  # type: ignore[index]
    assert await gw.store.dead_letters(None, 10) == []


async def test_permanent_failure_is_dead_at_once(start_gateway, client_for) -> None:
    gw = await start_gateway(destinations=[{"name": "far", "type": "fake", "plan": ["permanent"]}])
    await client_for(gw).send(adt("PERM"))
    await wait_for(lambda: FakeDestination.instances["far"].attempts == 1)
    await asyncio.sleep(0.05)
    await gw.store.flush()
    assert [d["control_id"] for d in await gw.store.dead_letters(None, 10)] == ["PERM"]


async def test_discard_removes_from_the_dead_letter_list(start_gateway, client_for) -> None:
    gw = await start_gateway(destinations=[{"name": "far", "type": "fake", "plan": ["permanent"]}])
    await client_for(gw).send(adt("DISC"))
    await wait_for(lambda: FakeDestination.instances["far"].attempts == 1)
    await asyncio.sleep(0.05)
    await gw.store.flush()
    (dead,) = await gw.store.dead_letters(None, 10)
    async with aiohttp.ClientSession(headers=AUTH) as http:
        base = f"http://127.0.0.1:{gw.http_port_bound}"
        async with http.post(f"{base}/api/dlq/{dead['id']}/discard") as resp:
            assert resp.status == 200
        async with http.post(f"{base}/api/dlq/{dead['id']}/discard") as resp:
            assert resp.status == 404
            assert (await resp.json(content_type=None))["resourceType"] == "OperationOutcome"
    assert await gw.store.dead_letters(None, 10) == []


async def test_per_patient_order_holds_with_uneven_delivery_times(start_gateway) -> None:
    gw = await start_gateway(partitions=4)
    far = FakeDestination.instances["far"]
    original = far.send

    async def jittery(envelope, payload):  # type: ignore[no-untyped-def]
        await asyncio.sleep(random.random() / 500)
        return await original(envelope, payload)

    far.send = jittery  # type: ignore[method-assign]
    patients = [f"9{p:04d}" for p in range(12)]
    expected: dict[str, list[str]] = {p: [] for p in patients}

    async def sender(conn: int) -> None:
        client = MllpClient("127.0.0.1", mllp_port(gw))
        try:
            for i in range(40):
                patient = patients[(conn * 7 + i) % len(patients)]
                cid = f"O{conn}-{i}"
                await client.send(adt(cid, patient=patient))
                expected[patient].append(cid)  # appended after the ACK: this is the order of receipt
        finally:
            await client.close()

    await asyncio.gather(*(sender(c) for c in range(4)))
    await wait_for(lambda: len(far.received) == 160)
    seen: dict[str, list[str]] = {p: [] for p in patients}
    for env, _ in far.received:
        patient = Message.decode(env.raw).get("PID-3.1")
        seen[patient].append(env.control_id)
    assert seen == expected


async def test_api_lists_traces_masks_and_reports(start_gateway, client_for) -> None:
    gw = await start_gateway()
    await client_for(gw).send(adt("API1", family="LEFÈVRE"))
    await wait_for(lambda: len(FakeDestination.instances["far"].received) == 1)
    await gw.store.flush()
    base = f"http://127.0.0.1:{gw.http_port_bound}"
    async with aiohttp.ClientSession(headers=AUTH) as http:
        async with http.get(f"{base}/health") as resp:
            assert resp.status == 200
        async with http.get(f"{base}/ready") as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "ready"
        async with http.get(f"{base}/api/messages?status=SENT&control_id=API1") as resp:
            rows = (await resp.json())["messages"]
        assert [r["control_id"] for r in rows] == ["API1"]
        async with http.get(f"{base}/api/messages/{rows[0]['id']}") as resp:
            trace = await resp.json()
        assert trace["masked"] is True
        assert "LEFÈVRE" not in str(trace)
        assert trace["raw"].startswith("MSH|^~\\&|DXCARE|HOPITAL-NORD")
        assert "PID|||***" in trace["raw"]
        assert "100001" not in str(rows) + str(trace)  # the IPP appears in no field of the listing
        async with http.get(f"{base}/api/messages/{rows[0]['id']}?reveal=true") as resp:
            assert "LEFÈVRE" in (await resp.json())["raw"]
        async with http.get(f"{base}/api/stats") as resp:
            stats = await resp.json()
        assert stats["channels"]["adt"]["SENT"] == 1
        assert stats["runtime"]["channels"][0]["counters"]["received"] == 1
        async with http.get(f"{base}/api/messages/NOPE") as resp:
            assert resp.status == 404
            outcome = await resp.json(content_type=None)
            assert outcome["resourceType"] == "OperationOutcome"
            assert outcome["issue"][0]["code"] == "not-found"
        async with http.get(f"{base}/api/messages?status=LOST") as resp:
            assert resp.status == 400
            assert (await resp.json(content_type=None))["issue"][0]["expression"] == ["status"]
        async with http.get(f"{base}/api/messages?limit=abc") as resp:
            assert resp.status == 400


async def test_filtered_messages_are_recorded_not_delivered(start_gateway, client_for) -> None:
    gw = await start_gateway(filter={"triggers": ["A01"]})
    ack = ack_fields(await client_for(gw).send(adt("F1", trigger="A03")))
    assert ack.get("MSA-1") == "AA"
    await gw.store.flush()
    rows = await gw.store.list_messages(
        status="FILTERED", control_id=None, channel=None, limit=5, before_seq=None
    )
    assert [r["control_id"] for r in rows] == ["F1"]
    assert FakeDestination.instances["far"].attempts == 0


async def test_steps_rewrite_and_keep_each_output(start_gateway, client_for) -> None:
    gw = await start_gateway(
        steps=[
            {"type": "set_field", "path": "MSH-5", "value": "SIH"},
            {"type": "remove_segments", "segments": ["ZBE"]},
        ]
    )
    await client_for(gw).send(adt("ST1"))
    far = FakeDestination.instances["far"]
    await wait_for(lambda: len(far.received) == 1)
    out = Message.decode(far.received[0][1])
    assert out.get("MSH-5") == "SIH"
    assert out.segment("ZBE") is None
    assert out.get("PID-5.1") == "LEFÈVRE"
    await gw.store.flush()
    trace = await gw.store.get_message(far.received[0][0].id, with_payloads=True)
    assert trace is not None
    step_stages = [s for s in trace["stages"] if s["stage"].startswith("step:")]
    assert len(step_stages) == 2
    assert step_stages[-1]["payload"] == far.received[0][1]


async def test_max_connections_refuses_extra_connections(start_gateway, tmp_path) -> None:
    from tests.conftest import make_config

    cfg = make_config(tmp_path)
    cfg.data["sources"][0]["max_connections"] = 2
    gw = await start_gateway(cfg)
    clients = [MllpClient("127.0.0.1", mllp_port(gw)) for _ in range(3)]
    try:
        for c in clients[:2]:
            assert ack_fields(await c.send(adt(f"MC{id(c)}"))).get("MSA-1") == "AA"
        with pytest.raises((ConnectionError, OSError)):
            await clients[2].send(adt("MC3"), timeout=2)
        assert gw.sources["hospital"].refused_connections == 1  # type: ignore[attr-defined]
    finally:
        for c in clients:
            await c.close()


async def test_dedupe_can_be_switched_off_per_channel(start_gateway, client_for) -> None:
    gw = await start_gateway(dedupe=False)
    client = client_for(gw)
    for _ in range(2):
        assert ack_fields(await client.send(adt("SAME"))).get("MSA-1") == "AA"
    far = FakeDestination.instances["far"]
    await wait_for(lambda: len(far.received) == 2)
    assert len({env.id for env, _ in far.received}) == 2


async def test_partition_key_is_a_keyed_digest_of_the_patient(start_gateway, client_for) -> None:
    gw = await start_gateway()
    client = client_for(gw)
    for cid, patient in (("PK1", "700001"), ("PK2", "700001"), ("PK3", "700002")):
        await client.send(adt(cid, patient=patient))
    await gw.store.flush()
    rows = await gw.store.list_messages(
        status=None, control_id=None, channel="adt", limit=10, before_seq=None
    )
    keys = {r["control_id"]: r["partition_key"] for r in rows}
    assert keys["PK1"] == keys["PK2"] != keys["PK3"]
    assert all("700001" not in k and "700002" not in k for k in keys.values())
    key_file = gw.data_dir / "partition.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert len(key_file.read_bytes()) == 32
