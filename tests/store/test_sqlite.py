"""The SQLite journal: durable group commit, dedupe, recovery queries, retention."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.core.envelope import Envelope
from gateway.core.errors import StoreError
from gateway.core.ids import new_id
from gateway.core.protocols import StageRecord
from gateway.core.status import Status
from gateway.store.messages.sqlite import SqliteStore


def env(
    cid: str, *, channel: str = "c", status: Status = Status.RECEIVED, at: float | None = None
) -> Envelope:
    return Envelope(
        id=new_id(),
        channel=channel,
        source="s",
        raw=f"MSH|{cid}".encode(),
        content_type="application/hl7-v2",
        sender="APP^FAC",
        control_id=cid,
        message_type="ADT^A01",
        partition_key="p1",
        received_at=at or time.time(),
        trace_id="t",
        status=status,
    )


@pytest.fixture
async def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = SqliteStore(tmp_path / "j.db")
    await s.open()
    yield s
    await s.close()


async def test_concurrent_appends_share_commits(store: SqliteStore) -> None:
    results = await asyncio.gather(*(store.append([env(f"G{i}")]) for i in range(500)))
    assert all(not r[0].duplicate for r in results)
    assert len({r[0].seq for r in results}) == 500
    assert store.commits < 500  # group commit: many envelopes per fsync


async def test_append_is_visible_to_a_new_connection_once_resolved(
    store: SqliteStore, tmp_path: Path
) -> None:
    (res,) = await store.append([env("V1")])
    other = sqlite3.connect(tmp_path / "j.db")
    try:
        assert other.execute("SELECT control_id FROM messages WHERE id=?", (res.message_id,)).fetchone() == (
            "V1",
        )
    finally:
        other.close()


async def test_duplicates_resolve_to_the_first_message(store: SqliteStore) -> None:
    (first,) = await store.append([env("D1")])
    (again,) = await store.append([env("D1")])
    assert again.duplicate and again.message_id == first.message_id
    (other_channel,) = await store.append([env("D1", channel="c2")])
    assert not other_channel.duplicate
    await store.release_dedupe(first.message_id)
    (after_release,) = await store.append([env("D1")])
    assert not after_release.duplicate


async def test_pending_returns_work_in_journal_order_with_delivery_state(store: SqliteStore) -> None:
    a, b, c = [(await store.append([env(f"P{i}")]))[0] for i in range(3)]
    await store.queue_deliveries(b.message_id, StageRecord("transformed", Status.TRANSFORMED), ["d1", "d2"])
    await store.delivery_update(b.message_id, "d1", Status.SENT, 1, message_status=None, stage=None)
    await store.delivery_update(b.message_id, "d2", Status.ERROR, 2, message_status=Status.ERROR, stage=None)
    await store.record(c.message_id, StageRecord("filter", Status.FILTERED), status=Status.FILTERED)
    items = await store.pending("c", 0, 10, recovering=True)
    assert [i.envelope.id for i in items] == [a.message_id, b.message_id]
    assert items[0].status is Status.RECEIVED
    assert items[1].pending_destinations == ("d2",)
    assert items[1].attempts == {"d2": 2}
    # outside recovery, only messages never processed are reloaded
    assert [i.envelope.id for i in await store.pending("c", 0, 10, recovering=False)] == [a.message_id]
    assert await store.pending("c", a.seq, 10, recovering=False) == []


async def test_retention_drops_payloads_then_messages(store: SqliteStore) -> None:
    old = time.time() - 10 * 86400
    (done,) = await store.append([env("R1", at=old)])
    (live,) = await store.append([env("R2", at=old)])
    await store.record(done.message_id, StageRecord("ack", Status.SENT, b"MSA|AA"), status=Status.SENT)
    await store._submit(lambda conn: conn.execute("UPDATE messages SET updated_at=?", (old,)))
    payloads, messages = await store.prune(payload_before=time.time() - 86400, message_before=old - 1)
    assert (payloads, messages) == (1, 0)
    kept = await store.get_message(done.message_id, with_payloads=True)
    assert kept is not None and kept["raw"] is None and kept["stages"][0]["payload"] is None
    assert (await store.get_message(live.message_id, with_payloads=True))["raw"] == b"MSH|R2"  # type: ignore[index]
    _, messages = await store.prune(payload_before=time.time(), message_before=time.time())
    assert messages == 1
    assert await store.get_message(done.message_id, with_payloads=False) is None
    assert await store.get_message(live.message_id, with_payloads=False) is not None  # not finished: kept


async def test_replay_resets_a_message(store: SqliteStore) -> None:
    (res,) = await store.append([env("RP1")])
    await store.queue_deliveries(res.message_id, StageRecord("transformed", Status.TRANSFORMED), ["d"])
    await store.delivery_update(res.message_id, "d", Status.DEAD, 3, message_status=Status.DEAD, stage=None)
    item = await store.reset_for_replay(res.message_id)
    assert item is not None and item.status is Status.RECEIVED
    msg = await store.get_message(res.message_id, with_payloads=False)
    assert msg is not None and msg["status"] == "RECEIVED" and msg["deliveries"] == []
    assert await store.reset_for_replay("missing") is None


async def test_closed_store_refuses_writes(tmp_path: Path) -> None:
    from gateway.core.errors import StoreError

    s = SqliteStore(tmp_path / "x.db")
    with pytest.raises(StoreError):
        await s.append([env("Z")])


async def test_pending_can_be_limited_to_one_workers_share(store: SqliteStore) -> None:
    from dataclasses import replace

    from gateway.core.protocols import shard_of

    keys = [f"patient-{i}" for i in range(20)]
    for i, key in enumerate(keys):
        await store.append([replace(env(f"SH{i}"), partition_key=key)])
    shares = [await store.pending("c", 0, 100, recovering=True, shard=(i, 2)) for i in range(2)]
    assert sorted(len(s) for s in shares) != [0, 20]  # both workers get some
    assert sum(len(s) for s in shares) == 20
    for index, share in enumerate(shares):
        assert all(shard_of(item.envelope.partition_key, 2) == index for item in share)
    assert shard_of("x", 1) == 0


class _CommitFailsOnce:
    """The writer's connection, except that its next COMMIT fails as a full disk would."""

    def __init__(self, real: sqlite3.Connection) -> None:
        self.real = real
        self.armed = True

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT" and self.armed:
            self.armed = False
            raise sqlite3.OperationalError("database or disk is full")
        return self.real.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)


async def test_a_failed_commit_fails_its_batch_and_the_next_one_commits(store: SqliteStore) -> None:
    real = store._wconn
    assert real is not None
    store._wconn = _CommitFailsOnce(real)  # type: ignore[assignment]
    lost, kept = env("LOST1"), env("KEPT1")
    try:
        with pytest.raises(StoreError, match="commit failed"):
            await store.append([lost])  # no ACK can follow: the caller sees the failure
        assert not real.in_transaction  # rolled back, nothing half-written
        [result] = await store.append([kept])
        assert not result.duplicate
    finally:
        store._wconn = real
    assert await store.get_message(lost.id, with_payloads=False) is None
    assert (await store.get_message(kept.id, with_payloads=False) or {}).get("control_id") == "KEPT1"


async def test_the_wal_is_cut_back_once_checkpointed_without_blocking_the_writer(tmp_path: Path) -> None:
    limit = 64 * 1024
    store = SqliteStore(tmp_path / "j.db", wal_limit=limit)
    await store.open()
    wal = tmp_path / "j.db-wal"
    try:
        for b in range(20):  # far more than the limit goes through the WAL
            await store.append([env(f"W{b}-{i}") for i in range(20)])
        grown = wal.stat().st_size
        assert grown > limit
        # the background checkpoint (PASSIVE) copies it back; the next write rewinds and cuts the file
        for _ in range(100):
            await asyncio.sleep(0.05)
            await store.append([env(f"X{_}")])
            if wal.stat().st_size <= limit:
                break
        assert wal.stat().st_size <= limit
    finally:
        await store.close()
