"""The MessageStore contract (gateway.core.protocols), on SQLite, PostgreSQL and JetStream.

The JetStream store journals intake in the stream and keeps everything else in PostgreSQL: a
message reaches the table once the channel's consumer admits it (``Messages.journaled`` does that
step). Where the stream answers instead of the table, the test says so and asserts the
JetStream behaviour under its own id.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from gateway.core.envelope import HL7_V2
from gateway.core.errors import StoreError
from gateway.core.protocols import AppendResult, StageRecord, shard_of
from gateway.core.status import Status
from tests.contracts.conftest import Messages, envelope
from tests.waiting import until

ACK = (b"MSH|^~\\&|GW|GW|||20240514||ACK|A1|P|2.5\rMSA|AA|C1\r", "AA")


def transform(payload: bytes | None = b"out", **detail: Any) -> StageRecord:
    return StageRecord("step:map", Status.TRANSFORMED, payload, "application/fhir+json", detail)


async def message(m: Messages, message_id: str, *, payloads: bool = False) -> dict[str, Any]:
    await m.store.flush()
    got = await m.store.get_message(message_id, with_payloads=payloads)
    assert got is not None
    return got


def stage_names(msg: dict[str, Any]) -> list[str]:
    return [s["stage"] for s in msg["stages"]]


def deliveries(msg: dict[str, Any]) -> dict[str, tuple[str, int, str | None]]:
    return {d["destination"]: (d["status"], d["attempts"], d["last_error"]) for d in msg["deliveries"]}


async def dead(m: Messages, control_id: str, **kw: Any) -> str:
    """A message whose one destination gave up."""
    res = await m.one(envelope(control_id, **kw))
    m.store.queue_deliveries(res.message_id, transform(), ["far"])
    m.store.delivery_update(
        res.message_id, "far", Status.DEAD, 3, message_status=Status.DEAD, stage=None, error="AE 207"
    )
    await m.store.flush()
    return res.message_id


# -- append ---------------------------------------------------------------------------------------


async def test_append_answers_each_envelope_in_order(messages: Messages) -> None:
    a, b = envelope("C1"), envelope("C2")
    results = await messages.store.append([a, b])
    assert [(r.message_id, r.duplicate, r.conflict) for r in results] == [
        (a.id, False, False),
        (b.id, False, False),
    ]
    assert results[0].seq < results[1].seq


async def test_an_appended_message_is_read_back_as_received(messages: Messages) -> None:
    env = envelope("C1", at=1_700_000_000.0)
    (appended,) = await messages.store.append([env])
    if messages.streamed:
        # By design the stream holds it until a consumer admits it into the table.
        assert await messages.store.get_message(env.id, with_payloads=False) is None
        (admitted,) = await messages.take("adt", 1)
        assert admitted.message_id == env.id and not admitted.duplicate
    msg = await message(messages, env.id, payloads=True)
    assert {k: msg[k] for k in ("id", "channel", "source", "status", "sender", "control_id")} == {
        "id": env.id,
        "channel": "adt",
        "source": "hospital",
        "status": "RECEIVED",
        "sender": "APP^FAC",
        "control_id": "C1",
    }
    assert msg["raw"] == env.raw
    assert msg["received_at"] == 1_700_000_000.0
    assert (msg["message_type"], msg["partition_key"], msg["trace_id"]) == ("ADT^A01", "pk-1", env.trace_id)
    assert msg["error"] is None and msg["discarded_at"] is None
    assert msg["stages"] == [] and msg["deliveries"] == []
    if not messages.streamed:
        assert msg["seq"] == appended.seq


async def test_a_resend_of_the_same_bytes_is_a_duplicate_of_the_first(messages: Messages) -> None:
    first = envelope("C1")
    (appended,) = await messages.store.append([first])
    if messages.streamed:
        await messages.take("adt", 1)
    resend = envelope("C1")
    (again,) = await messages.store.append([resend])
    assert again.duplicate and not again.conflict
    assert again.seq == appended.seq
    if messages.streamed:
        # The stream's duplicate window answers: it knows where the first is, not its id.
        assert again.message_id == resend.id
    else:
        assert again.message_id == first.id

    async def traced() -> bool:
        await messages.store.flush()
        msg = await messages.store.get_message(first.id, with_payloads=False)
        return msg is not None and "duplicate" in stage_names(msg)

    await until(traced, 5, "the duplicate is traced on the first message")
    listed = await messages.store.list_messages(
        status=None, control_id="C1", channel=None, limit=10, before_seq=None
    )
    assert [r["id"] for r in listed] == [first.id]
    assert await messages.store.get_message(resend.id, with_payloads=False) is None
    assert (await messages.store.stats())["duplicates"] == 1


async def test_dedupe_is_per_channel_and_can_be_turned_off(messages: Messages) -> None:
    await messages.journaled([envelope("C1")])
    other_channel, undeduped = envelope("C1", channel="orm"), envelope("C1", dedupe=False)
    results = await messages.journaled([other_channel])
    results += await messages.journaled([undeduped])
    assert [(r.message_id, r.duplicate) for r in results] == [
        (other_channel.id, False),
        (undeduped.id, False),
    ]


async def test_other_bytes_under_a_used_control_id_are_a_conflict_kept_as_error(messages: Messages) -> None:
    first = envelope("C1")
    await messages.journaled([first])
    other = envelope("C1", raw=b"MSH|^~\\&|APP|FAC|||20240514||ADT^A08|C1|P|2.5\r")
    (res,) = await messages.store.append([other])
    assert (res.message_id, res.duplicate, res.conflict) == (other.id, True, True)
    msg = await message(messages, other.id)
    assert (msg["status"], msg["error"]) == ("ERROR", "205")
    (intake,) = msg["stages"]
    assert intake["stage"] == "intake" and intake["detail"]["conflicts_with"] == first.id
    assert (await message(messages, first.id))["status"] == "RECEIVED"


async def test_a_conflict_with_a_message_not_yet_processed(messages: Messages) -> None:
    first = envelope("C1")
    other = envelope("C1", raw=b"MSH|^~\\&|APP|FAC|||20240514||ADT^A08|C1|P|2.5\r")
    appended = await messages.store.append([first])
    appended += await messages.store.append([other])
    if messages.streamed:
        # By design the intake cannot see a message still in the stream: both are published, and
        # the consumer's admit keeps the second as the conflict.
        assert [(r.message_id, r.duplicate, r.conflict) for r in appended] == [
            (first.id, False, False),
            (other.id, False, False),
        ]
        admitted = await messages.take("adt", 2)
    else:
        admitted = appended
    assert [(r.message_id, r.duplicate, r.conflict) for r in admitted] == [
        (first.id, False, False),
        (other.id, True, True),
    ]
    msg = await message(messages, other.id)
    assert (msg["status"], msg["error"]) == ("ERROR", "205")


async def test_release_dedupe_lets_the_same_bytes_in_again(messages: Messages) -> None:
    first = await messages.one(envelope("C1"))
    await messages.store.release_dedupe(first.message_id)
    resend = envelope("C1")
    (again,) = await messages.journaled([resend])
    assert (again.message_id, again.duplicate, again.conflict) == (resend.id, False, False)
    assert (await message(messages, resend.id))["status"] == "RECEIVED"


async def test_append_with_an_ack_traces_it_in_the_same_write(messages: Messages) -> None:
    res = await messages.one(envelope("C1"), ack=ACK)
    with_payloads = await message(messages, res.message_id, payloads=True)
    (ack,) = with_payloads["stages"]
    assert {k: ack[k] for k in ("stage", "status", "content_type", "detail", "payload")} == {
        "stage": "ack",
        "status": "RECEIVED",
        "content_type": HL7_V2,
        "detail": {"code": "AA"},
        "payload": ACK[0],
    }
    (bare,) = (await message(messages, res.message_id))["stages"]
    assert "payload" not in bare and bare["detail"] == {"code": "AA"}


async def test_append_then_hands_the_results_to_the_callback(messages: Messages) -> None:
    got: asyncio.Future[list[AppendResult] | BaseException] = asyncio.get_running_loop().create_future()
    work, filtered = envelope("C1"), envelope("C2", status=Status.FILTERED)
    messages.store.append_then([work, filtered], got.set_result)
    result = await asyncio.wait_for(got, 10)
    assert isinstance(result, list)
    assert [(r.message_id, r.duplicate, r.conflict) for r in result] == [
        (work.id, False, False),
        (filtered.id, False, False),
    ]
    if messages.streamed:
        await messages.take("adt", 1)
    assert (await message(messages, work.id))["status"] == "RECEIVED"
    assert (await message(messages, filtered.id))["status"] == "FILTERED"


async def test_append_then_hands_a_refused_write_to_the_callback(messages: Messages) -> None:
    # FILTERED: not work, so every backend writes it to its table straight away.
    bad = envelope("C1", status=Status.FILTERED, message_type=None)  # type: ignore[arg-type]
    got: asyncio.Future[list[AppendResult] | BaseException] = asyncio.get_running_loop().create_future()
    messages.store.append_then([bad], got.set_result)
    assert isinstance(await asyncio.wait_for(got, 10), StoreError)
    assert await messages.store.get_message(bad.id, with_payloads=False) is None
    ok = envelope("C2", status=Status.FILTERED)
    assert [r.message_id for r in await messages.store.append([ok])] == [ok.id]


# -- the trace ------------------------------------------------------------------------------------


async def test_record_adds_a_stage_and_sets_the_status_when_asked(messages: Messages) -> None:
    mid = (await messages.one(envelope("C1"))).message_id
    messages.store.record(mid, StageRecord("intake", Status.RECEIVED, detail={"warnings": ["MSH-15"]}))
    messages.store.record(mid, transform(b"{}", steps=2), status=Status.TRANSFORMED)
    msg = await message(messages, mid, payloads=True)
    assert msg["status"] == "TRANSFORMED"
    assert [(s["stage"], s["status"], s["detail"]) for s in msg["stages"]] == [
        ("intake", "RECEIVED", {"warnings": ["MSH-15"]}),
        ("step:map", "TRANSFORMED", {"steps": 2}),
    ]
    assert [s["payload"] for s in msg["stages"]] == [None, b"{}"]
    assert msg["stages"][1]["content_type"] == "application/fhir+json"


async def test_record_of_an_error_keeps_its_code_on_the_message(messages: Messages) -> None:
    mid = (await messages.one(envelope("C1"))).message_id
    await messages.store.record(
        mid, StageRecord("step:map", Status.ERROR, detail={"error": "MAP01"}), status=Status.ERROR
    )
    msg = await message(messages, mid)
    assert (msg["status"], msg["error"]) == ("ERROR", "MAP01")
    await messages.store.record(mid, StageRecord("note", Status.ERROR))
    assert (await message(messages, mid))["status"] == "ERROR"  # no status given: unchanged


async def test_queue_deliveries_queues_each_destination(messages: Messages) -> None:
    mid = (await messages.one(envelope("C1"))).message_id
    await messages.store.queue_deliveries(mid, transform(), ["a", "b"])
    msg = await message(messages, mid)
    assert msg["status"] == "QUEUED"
    assert deliveries(msg) == {"a": ("QUEUED", 0, None), "b": ("QUEUED", 0, None)}
    assert stage_names(msg) == ["step:map"]


@pytest.mark.parametrize("payload", [None, b"out"])
async def test_queue_deliveries_sent_at_the_first_try(messages: Messages, payload: bytes | None) -> None:
    mid = (await messages.one(envelope("C1"))).message_id
    await messages.store.queue_deliveries(mid, transform(payload), ["a", "b"], sent=True)
    msg = await message(messages, mid, payloads=True)
    assert (msg["status"], msg["error"]) == ("SENT", None)
    assert deliveries(msg) == {"a": ("SENT", 1, None), "b": ("SENT", 1, None)}
    assert [(s["stage"], s["payload"]) for s in msg["stages"]] == [("step:map", payload)]
    assert (await messages.store.stats())["destinations"] == {"a": {"SENT": 1}, "b": {"SENT": 1}}


async def test_queue_deliveries_to_nowhere_is_sent(messages: Messages) -> None:
    mid = (await messages.one(envelope("C1"))).message_id
    await messages.store.queue_deliveries(mid, transform(), [])
    msg = await message(messages, mid)
    assert (msg["status"], msg["deliveries"]) == ("SENT", [])


async def test_delivery_update_tracks_attempts_errors_and_the_message_status(messages: Messages) -> None:
    mid = (await messages.one(envelope("C1"))).message_id
    store = messages.store
    store.queue_deliveries(mid, transform(), ["a", "b"])
    store.delivery_update(
        mid,
        "a",
        Status.ERROR,
        1,
        message_status=Status.ERROR,
        stage=StageRecord("deliver:a", Status.ERROR, b"MSA|AE", HL7_V2, {"code": "AE"}),
        error="AE 207",
    )
    msg = await message(messages, mid)
    assert (msg["status"], msg["error"]) == ("ERROR", "AE 207")
    assert deliveries(msg) == {"a": ("ERROR", 1, "AE 207"), "b": ("QUEUED", 0, None)}
    assert stage_names(msg) == ["step:map", "deliver:a"]
    # No message status: the message keeps its own.
    await store.delivery_update(mid, "b", Status.SENT, 1, message_status=None, stage=None)
    msg = await message(messages, mid)
    assert msg["status"] == "ERROR" and deliveries(msg)["b"] == ("SENT", 1, None)
    await store.delivery_update(mid, "a", Status.SENT, 2, message_status=Status.SENT, stage=None)
    msg = await message(messages, mid)
    assert (msg["status"], msg["error"]) == ("SENT", None)
    assert deliveries(msg) == {"a": ("SENT", 2, None), "b": ("SENT", 1, None)}
    assert stage_names(msg) == ["step:map", "deliver:a"]


async def test_flush_waits_for_every_queued_write(messages: Messages) -> None:
    mids = [r.message_id for r in await messages.journaled([envelope(f"C{i}") for i in range(5)])]
    for mid in mids:
        messages.store.queue_deliveries(mid, transform(), ["a"], sent=True)
    await messages.store.flush()
    for mid in mids:
        got = await messages.store.get_message(mid, with_payloads=False)
        assert got is not None and got["status"] == "SENT"


# -- reads ----------------------------------------------------------------------------------------


async def test_get_message_of_an_unknown_id_is_none(messages: Messages) -> None:
    assert await messages.store.get_message("no-such-message", with_payloads=True) is None


async def test_get_message_with_and_without_payloads(messages: Messages) -> None:
    env = envelope("C1")
    mid = (await messages.one(env, ack=ACK)).message_id
    messages.store.queue_deliveries(mid, transform(b"out"), ["a"])
    full = await message(messages, mid, payloads=True)
    bare = await message(messages, mid)
    assert full["raw"] == env.raw and "raw" not in bare
    assert [s.get("payload") for s in full["stages"]] == [ACK[0], b"out"]
    assert all("payload" not in s for s in bare["stages"])
    assert {k: v for k, v in full.items() if k not in ("raw", "stages")} == {
        k: v for k, v in bare.items() if k != "stages"
    }


async def test_list_messages_newest_first_with_each_filter(messages: Messages) -> None:
    t = 1_700_000_000.0
    a = await messages.one(envelope("L1", at=t))
    b = await messages.one(envelope("L2", at=t + 10, channel="orm"))
    c = await messages.one(envelope("L3", at=t + 20))
    await messages.store.record(c.message_id, transform(), status=Status.TRANSFORMED)
    store = messages.store

    async def ids(limit: int = 10, **kw: Any) -> list[str]:
        args: dict[str, Any] = {"status": None, "control_id": None, "channel": None, "before_seq": None}
        args.update(kw)
        return [r["id"] for r in await store.list_messages(limit=limit, **args)]

    assert await ids() == [c.message_id, b.message_id, a.message_id]
    assert await ids(limit=2) == [c.message_id, b.message_id]
    assert await ids(status="TRANSFORMED") == [c.message_id]
    assert await ids(control_id="L2") == [b.message_id]
    assert await ids(channel="adt") == [c.message_id, a.message_id]
    assert await ids(before_seq=c.seq) == [b.message_id, a.message_id]
    assert await ids(since=t + 10) == [c.message_id, b.message_id]
    assert await ids(until=t + 10) == [b.message_id, a.message_id]
    assert await ids(since=t + 5, until=t + 15) == [b.message_id]
    assert await ids(control_id="nothing") == []
    row = (await store.list_messages(status=None, control_id="L1", channel=None, limit=1, before_seq=None))[0]
    assert "raw" not in row and (row["seq"], row["status"], row["channel"]) == (a.seq, "RECEIVED", "adt")


async def test_stats_count_messages_deliveries_and_duplicates(messages: Messages) -> None:
    a = await messages.one(envelope("S1"))
    await messages.one(envelope("S2", message_type="ADT^A08"))
    await messages.one(envelope("S3", channel="orm", status=Status.FILTERED))
    messages.store.queue_deliveries(a.message_id, transform(), ["far", "near"])
    await messages.store.delivery_update(a.message_id, "far", Status.SENT, 1, message_status=None, stage=None)
    await messages.store.append([envelope("S1")])  # a resend
    await messages.store.flush()

    async def settled() -> dict[str, Any] | None:
        got = await messages.store.stats()
        return got if got["duplicates"] == 1 else None

    stats = await until(settled, 5, "the duplicate is counted")
    assert stats["channels"] == {"adt": {"QUEUED": 1, "RECEIVED": 1}, "orm": {"FILTERED": 1}}
    assert stats["by_type"] == {
        "adt": {"ADT^A01": {"QUEUED": 1}, "ADT^A08": {"RECEIVED": 1}},
        "orm": {"ADT^A01": {"FILTERED": 1}},
    }
    assert stats["destinations"] == {"far": {"SENT": 1}, "near": {"QUEUED": 1}}
    assert isinstance(stats["journal"], dict)


# -- pending work ---------------------------------------------------------------------------------
# The engine reads pending work from the table on SQLite and PostgreSQL. On JetStream the stream's
# consumers hand out the work instead, but the store answers from its table just the same.


async def test_pending_lists_received_messages_in_journal_order(messages: Messages) -> None:
    results = await messages.journaled([envelope(f"P{i}") for i in range(4)])
    await messages.one(envelope("X1", channel="orm"))
    await messages.store.record(results[1].message_id, transform(), status=Status.TRANSFORMED)
    store = messages.store
    items = await store.pending("adt", 0, 10, recovering=False)
    assert [i.envelope.id for i in items] == [results[n].message_id for n in (0, 2, 3)]
    assert [i.seq for i in items] == [results[n].seq for n in (0, 2, 3)]
    first = items[0]
    assert (first.status, first.payload, first.pending_destinations, dict(first.attempts)) == (
        Status.RECEIVED,
        None,
        (),
        {},
    )
    assert first.envelope.raw.startswith(b"MSH|") and first.envelope.control_id == "P0"
    assert [i.envelope.id for i in await store.pending("adt", results[0].seq, 1, recovering=False)] == [
        results[2].message_id
    ]
    assert await store.pending("adt", results[3].seq, 10, recovering=False) == []


async def test_pending_when_recovering_resumes_each_message_where_it_stopped(messages: Messages) -> None:
    store = messages.store
    fresh, transformed, queued, retrying, sent, filtered = await messages.journaled(
        [envelope(f"R{i}") for i in range(6)]
    )
    await store.record(transformed.message_id, transform(), status=Status.TRANSFORMED)
    store.queue_deliveries(queued.message_id, transform(b"q"), ["a", "b"])
    store.queue_deliveries(retrying.message_id, transform(b"r"), ["a", "b"])
    store.delivery_update(
        retrying.message_id, "a", Status.ERROR, 2, message_status=Status.ERROR, stage=None, error="x"
    )
    store.delivery_update(retrying.message_id, "b", Status.SENT, 1, message_status=None, stage=None)
    store.queue_deliveries(sent.message_id, transform(), ["a"], sent=True)
    store.record(filtered.message_id, StageRecord("filter", Status.FILTERED), status=Status.FILTERED)
    await store.flush()
    items = {i.envelope.id: i for i in await store.pending("adt", 0, 100, recovering=True)}
    assert set(items) == {fresh.message_id, transformed.message_id, queued.message_id, retrying.message_id}
    # Transformed but never queued: it starts again from the beginning.
    assert (items[transformed.message_id].status, items[transformed.message_id].payload) == (
        Status.RECEIVED,
        None,
    )
    q = items[queued.message_id]
    assert (q.status, q.payload, q.pending_destinations, dict(q.attempts)) == (
        Status.QUEUED,
        b"q",
        ("a", "b"),
        {"a": 0, "b": 0},
    )
    r = items[retrying.message_id]
    assert (r.status, r.payload, r.pending_destinations, dict(r.attempts)) == (
        Status.ERROR,
        b"r",
        ("a",),
        {"a": 2},
    )
    assert [i.envelope.id for i in await store.pending("adt", 0, 100, recovering=False)] == [fresh.message_id]


async def test_pending_of_one_shard_holds_its_partitions_only(messages: Messages) -> None:
    keys = [f"patient-{n}" for n in range(12)]
    results = await messages.journaled([envelope(f"H{n}", partition_key=k) for n, k in enumerate(keys)])
    seen: list[str] = []
    for index in range(3):
        items = await messages.store.pending("adt", 0, 100, recovering=False, shard=(index, 3))
        assert all(shard_of(i.envelope.partition_key, 3) == index for i in items)
        assert [i.seq for i in items] == sorted(i.seq for i in items)
        seen += [i.envelope.id for i in items]
    assert sorted(seen) == sorted(r.message_id for r in results)
    limited = await messages.store.pending("adt", 0, 2, recovering=False, shard=(0, 3))
    assert [i.envelope.id for i in limited] == [
        r.message_id for r, k in zip(results, keys, strict=True) if shard_of(k, 3) == 0
    ][:2]


# -- operator actions -----------------------------------------------------------------------------


async def test_dead_letters_lists_dead_messages_oldest_first(messages: Messages) -> None:
    first = await dead(messages, "D1")
    other = await dead(messages, "D2", channel="orm")
    second = await dead(messages, "D3")
    await messages.one(envelope("D4"))
    store = messages.store
    assert [r["id"] for r in await store.dead_letters(None, 10)] == [first, other, second]
    assert [r["id"] for r in await store.dead_letters("adt", 10)] == [first, second]
    assert [r["id"] for r in await store.dead_letters(None, 1)] == [first]
    row = (await store.dead_letters("orm", 10))[0]
    assert (row["status"], row["error"], row["control_id"]) == ("DEAD", "AE 207", "D2")


async def test_discard_takes_a_dead_message_off_the_dead_letters(messages: Messages) -> None:
    mid = await dead(messages, "D1")
    live = (await messages.one(envelope("D2"))).message_id
    store = messages.store
    assert await store.discard(mid) is True
    assert await store.discard(mid) is False
    assert await store.discard(live) is False
    assert await store.discard("no-such-message") is False
    assert await store.dead_letters(None, 10) == []
    msg = await message(messages, mid)
    assert msg["status"] == "DEAD" and msg["discarded_at"] is not None
    assert stage_names(msg)[-1] == "discard"
    assert (await message(messages, live))["discarded_at"] is None


async def test_reset_for_replay_makes_a_message_received_again(messages: Messages) -> None:
    # On JetStream the channel then publishes the item to the stream again; the store's part is the same.
    env = envelope("D1")
    (res,) = await messages.journaled([env])
    messages.store.queue_deliveries(res.message_id, transform(), ["far"])
    messages.store.delivery_update(
        res.message_id, "far", Status.DEAD, 3, message_status=Status.DEAD, stage=None, error="AE 207"
    )
    await messages.store.discard(res.message_id)
    item = await messages.store.reset_for_replay(res.message_id)
    assert item is not None
    assert (item.seq, item.status, item.payload, item.pending_destinations, dict(item.attempts)) == (
        res.seq,
        Status.RECEIVED,
        None,
        (),
        {},
    )
    assert (item.envelope.id, item.envelope.raw, item.envelope.control_id) == (env.id, env.raw, "D1")
    assert item.envelope.status is Status.RECEIVED
    msg = await message(messages, res.message_id)
    assert (msg["status"], msg["error"], msg["discarded_at"], msg["deliveries"]) == (
        "RECEIVED",
        None,
        None,
        [],
    )
    assert stage_names(msg)[-1] == "replay" and "step:map" in stage_names(msg)
    pending = await messages.store.pending("adt", 0, 10, recovering=False)
    assert [i.envelope.id for i in pending] == [res.message_id]
    assert await messages.store.reset_for_replay("no-such-message") is None


async def test_prune_drops_payloads_then_messages_of_finished_work(messages: Messages) -> None:
    store = messages.store
    sent, gone, waiting, fresh = await messages.journaled(
        [envelope("T1"), envelope("T2"), envelope("T3"), envelope("T4")], ack=ACK
    )
    store.queue_deliveries(sent.message_id, transform(b"out"), ["a"], sent=True)
    store.queue_deliveries(gone.message_id, transform(b"out"), ["a"])
    store.delivery_update(gone.message_id, "a", Status.DEAD, 3, message_status=Status.DEAD, stage=None)
    store.queue_deliveries(waiting.message_id, transform(b"out"), ["a"])
    await store.flush()
    later = time.time() + 60
    assert await store.prune(payload_before=later, message_before=0) == (2, 0)
    for mid in (sent.message_id, gone.message_id):
        msg = await message(messages, mid, payloads=True)
        assert msg["raw"] is None and all(s["payload"] is None for s in msg["stages"])
        assert stage_names(msg)[0] == "ack"
    kept = await message(messages, waiting.message_id, payloads=True)
    assert kept["raw"] is not None and [s["payload"] for s in kept["stages"]] == [ACK[0], b"out"]
    assert await store.reset_for_replay(sent.message_id) is None  # nothing left to replay
    assert await store.prune(payload_before=0, message_before=later) == (0, 2)
    assert await store.get_message(sent.message_id, with_payloads=False) is None
    assert await store.get_message(gone.message_id, with_payloads=False) is None
    assert await store.dead_letters(None, 10) == []
    left = await store.list_messages(status=None, control_id=None, channel=None, limit=10, before_seq=None)
    assert {r["id"] for r in left} == {waiting.message_id, fresh.message_id}
    assert await store.prune(payload_before=0, message_before=time.time() - 60) == (0, 0)


# -- life cycle -----------------------------------------------------------------------------------


async def test_what_was_written_is_there_after_close_and_open(messages: Messages) -> None:
    env = envelope("C1")
    mid = (await messages.one(env, ack=ACK)).message_id
    messages.store.queue_deliveries(mid, transform(b"out"), ["a"], sent=True)
    before = await message(messages, mid, payloads=True)
    await messages.store.close()
    again = messages.build()
    await again.open()
    try:
        assert await again.get_message(mid, with_payloads=True) == before
        (resend,) = await again.append([envelope("C1")])
        assert resend.duplicate  # the dedupe key outlives the process
    finally:
        await again.close()
    messages.store = again  # closed; the fixture's close is then a no-op


async def test_a_closed_store_refuses_work(messages: Messages) -> None:
    await messages.store.ping()  # open: it answers
    await messages.store.close()
    with pytest.raises(StoreError):
        await messages.store.append([envelope("C1")])
    with pytest.raises(StoreError):
        await messages.store.ping()
    with pytest.raises(StoreError):
        await messages.store.get_message("any", with_payloads=False)
