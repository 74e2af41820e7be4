"""A full disk, then space again (defect 10): no trace write is lost, nothing is delivered twice,
and readiness says not ready while the journal cannot commit.

The disk is "full" through the journal writer's connection: while the switch is on, every
statement that writes and every COMMIT fails with SQLITE_FULL's message, as they do on a real
full disk in WAL mode (reads go on working). A second test uses SQLite's own SQLITE_FULL
(``PRAGMA max_page_count``). The PostgreSQL store gets SQLSTATE 53100 (disk_full) from the server.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from gateway.core.errors import StoreError
from gateway.core.protocols import StageRecord
from gateway.core.status import Status
from gateway.hl7.er7 import Message
from gateway.store.messages.postgres import PostgresStore
from gateway.store.messages.sqlite import SqliteStore
from tests.conftest import FakeDestination, wait_for
from tests.messages import adt, journal_envelope
from tests.scale.conftest import PG_DSN, require_live

_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE", "COMMIT")


class FullDisk:
    """The writer connection with a switch: while ``full``, writes and COMMIT fail as on a full disk."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.full = False
        self.refused = 0

    def _check(self, sql: str) -> None:
        if self.full and sql.lstrip().upper().startswith(_WRITES):
            self.refused += 1
            raise sqlite3.OperationalError("database or disk is full")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        self._check(sql)
        return self._conn.execute(sql, params)

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        self._check(sql)
        return self._conn.executemany(sql, rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def fill(store: SqliteStore) -> FullDisk:
    disk = FullDisk(store._wconn)  # type: ignore[arg-type]
    store._wconn = disk  # type: ignore[assignment]
    return disk


def transformed() -> StageRecord:
    return StageRecord("transformed", Status.TRANSFORMED, detail={"destinations": ["far"]})


async def statuses(store: SqliteStore | PostgresStore, ids: Sequence[str]) -> list[str]:
    out = []
    for mid in ids:
        msg = await store.get_message(mid, with_payloads=False)
        assert msg is not None
        out.append(msg["status"])
    return out


async def landed(store: SqliteStore, ids: Sequence[str], expected: list[str], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while await statuses(store, ids) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"trace writes never landed: {await statuses(store, ids)}")
        await asyncio.sleep(0.02)


async def test_trace_writes_made_while_the_disk_is_full_land_once_it_has_room(tmp_path: Path) -> None:
    path = tmp_path / "passerelle.db"
    store = SqliteStore(path)
    await store.open()
    ids = [r.message_id for r in await store.append([journal_envelope(f"FD{i}") for i in range(10)])]
    disk = fill(store)
    disk.full = True
    with capture_logs() as logs:
        # 8 messages delivered at the first try (the folded write), one retried then delivered,
        # one given a stage: all while nothing can be committed.
        for mid in ids[:8]:
            store.queue_deliveries(mid, transformed(), ["far"], sent=True)
        store.queue_deliveries(ids[8], transformed(), ["far"])
        store.delivery_update(
            ids[8],
            "far",
            Status.ERROR,
            1,
            message_status=Status.ERROR,
            stage=StageRecord("delivery:far", Status.ERROR, detail={"attempt": 1}),
            error="timeout",
        )
        store.delivery_update(ids[8], "far", Status.SENT, 2, message_status=Status.SENT, stage=None)
        store.record(ids[9], StageRecord("step:x", Status.TRANSFORMED, b"payload", "text/plain"))
        # a new message cannot be journaled meanwhile: its sender is answered AE
        with pytest.raises(StoreError):
            await store.append([journal_envelope("FD-NEW")])
        await asyncio.sleep(0.3)
        assert disk.refused > 0
        # nothing landed yet; reads still work
        assert await statuses(store, ids) == [Status.RECEIVED.value] * 10
        # space comes back: what waited is written, with no other write to carry it
        disk.full = False
        await landed(store, ids, [Status.SENT.value] * 9 + [Status.RECEIVED.value])
    # one line when the trouble starts, not one per write
    events = [e["event"] for e in logs if e["log_level"] in ("error", "warning")]
    assert events.count("journal_write_failed") == 0
    assert events.count("journal_commit_failed") == 1
    assert events.count("journal_trace_deferred") == 1
    retried = await store.get_message(ids[8], with_payloads=False)
    assert retried is not None
    assert [(d["status"], d["attempts"], d["last_error"]) for d in retried["deliveries"]] == [
        ("SENT", 2, None)
    ]
    assert [s["stage"] for s in retried["stages"]] == ["transformed", "delivery:far"]
    staged = await store.get_message(ids[9], with_payloads=True)
    assert staged is not None and [s["payload"] for s in staged["stages"]] == [b"payload"]
    await store.close()

    # A restart resumes only what is left to do: nothing that was delivered is delivered again.
    again = SqliteStore(path)
    await again.open()
    try:
        pending = await again.pending("adt", 0, 100, recovering=True)
        assert [item.envelope.id for item in pending] == [ids[9]]
    finally:
        await again.close()


async def test_write_health_says_when_the_journal_cannot_commit(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "j.db")
    await store.open()
    try:
        ids = [r.message_id for r in await store.append([journal_envelope(f"WH{i}") for i in range(3)])]
        assert store.write_health() == {"ok": True, "deferred_messages": 0}
        disk = fill(store)
        disk.full = True
        for mid in ids:
            store.record(mid, StageRecord("step:x", Status.TRANSFORMED), status=Status.TRANSFORMED)
        await asyncio.sleep(0.1)
        health = store.write_health()
        assert health["ok"] is False and health["deferred_messages"] == 3
        with pytest.raises(StoreError):
            await store.flush()  # what was queued is not all committed
        assert (await store.stats())["journal"]["deferred_messages"] == 3
        disk.full = False
        await wait_for(lambda: store.write_health()["ok"], 5)
        assert store.write_health() == {"ok": True, "deferred_messages": 0}
        await store.flush()
        assert await statuses(store, ids) == [Status.TRANSFORMED.value] * 3
    finally:
        await store.close()


async def test_a_message_s_later_writes_wait_behind_its_deferred_ones(tmp_path: Path) -> None:
    """Order per message: a write made after space came back never lands before the older writes
    of the same message that still wait (a SENT update before its QUEUED insert would be lost)."""
    store = SqliteStore(tmp_path / "j.db")
    await store.open()
    try:
        (res,) = await store.append([journal_envelope("ORD1")])
        disk = fill(store)
        disk.full = True
        store.queue_deliveries(res.message_id, transformed(), ["far"])
        await asyncio.sleep(0.05)
        disk.full = False
        # at once, before the back-off fires: the update must not overtake the queued delivery
        store.delivery_update(res.message_id, "far", Status.SENT, 1, message_status=Status.SENT, stage=None)
        await landed(store, [res.message_id], [Status.SENT.value])
        await asyncio.sleep(0.2)
        msg = await store.get_message(res.message_id, with_payloads=False)
        assert msg is not None and msg["status"] == Status.SENT.value
        assert [(d["status"], d["attempts"]) for d in msg["deliveries"]] == [("SENT", 1)]
    finally:
        await store.close()


async def test_sqlite_s_own_full_error_defers_trace_writes(tmp_path: Path) -> None:
    """SQLITE_FULL as SQLite raises it, at a page limit (the database cannot grow)."""
    store = SqliteStore(tmp_path / "j.db")
    await store.open()
    try:
        (res,) = await store.append([journal_envelope("PG1")])
        conn = store._wconn
        assert conn is not None
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count={pages}")
        big = b"x" * 200_000  # needs pages the database may not take
        with capture_logs() as logs:
            store.record(
                res.message_id,
                StageRecord("step:big", Status.TRANSFORMED, big, "text/plain"),
                status=Status.TRANSFORMED,
            )
            await asyncio.sleep(0.1)
            conn.execute(f"PRAGMA max_page_count={pages + 1000}")
            await landed(store, [res.message_id], [Status.TRANSFORMED.value])
        msg = await store.get_message(res.message_id, with_payloads=True)
        assert msg is not None and [s["payload"] for s in msg["stages"]] == [big]
        failed = [e for e in logs if e["event"] == "journal_commit_failed"]
        assert [e["error"] for e in failed] == ["SQLITE_FULL"]
    finally:
        await store.close()


async def test_a_message_that_keeps_failing_holds_bounded_memory(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "j.db")
    await store.open()
    try:
        (res,) = await store.append([journal_envelope("MEM1")])
        disk = fill(store)
        disk.full = True
        store.queue_deliveries(res.message_id, transformed(), ["far"])
        for attempt in range(1, 501):
            store.delivery_update(
                res.message_id,
                "far",
                Status.ERROR,
                attempt,
                message_status=Status.ERROR,
                stage=StageRecord("delivery:far", Status.ERROR, detail={"attempt": attempt}),
                error="busy",
            )
            await asyncio.sleep(0)
        await asyncio.sleep(0.1)
        held = store._backlog[res.message_id]
        assert len(held.stages) <= 64  # coalesced: one entry per message, its rows bounded
        disk.full = False
        await wait_for(lambda: store.write_health()["ok"], 5)
        msg = await store.get_message(res.message_id, with_payloads=False)
        assert msg is not None
        assert [(d["status"], d["attempts"]) for d in msg["deliveries"]] == [("ERROR", 500)]
        stages = [s["stage"] for s in msg["stages"]]
        assert stages[0] == "transformed" and "trace_coalesced" in stages
        coalesced = next(s for s in msg["stages"] if s["stage"] == "trace_coalesced")
        assert coalesced["detail"]["stages_left_out"] == 501 - len(held.stages)
    finally:
        await store.close()


async def test_readiness_says_not_ready_while_the_journal_cannot_commit(start_gateway, client_for) -> None:
    gw = await start_gateway()
    client = client_for(gw)
    assert Message.decode(await client.send(adt("RD1"))).get("MSA-1") == "AA"
    far = FakeDestination.instances["far"]
    await wait_for(lambda: len(far.received) == 1)
    assert all(check["ok"] for check in (await gw.readiness()).values())
    disk = fill(gw.store)
    disk.full = True
    nack = Message.decode(await client.send(adt("RD2")))
    assert (nack.get("MSA-1"), nack.get("ERR-3.1")) == ("AE", "207")
    checks = await gw.readiness()
    assert not all(check["ok"] for check in checks.values()), "ready while every message gets AE"
    assert checks["journal_writes"]["ok"] is False
    assert checks["store"]["ok"] is True  # reads still work; commits do not
    # space again: ready with no traffic at all (a small write probes the journal)
    disk.full = False
    for _ in range(300):
        checks = await gw.readiness()
        if all(check["ok"] for check in checks.values()):
            break
        await asyncio.sleep(0.02)
    assert all(check["ok"] for check in checks.values()), checks
    assert Message.decode(await client.send(adt("RD2"))).get("MSA-1") == "AA"
    await wait_for(lambda: len(far.received) == 2)


# -- PostgreSQL: SQLSTATE 53100 from the server -------------------------------------------------


@pytest.mark.live
async def test_postgres_keeps_trace_writes_while_the_server_reports_a_full_disk() -> None:
    require_live()
    schema = f"t_{uuid.uuid4().hex[:10]}"
    store = PostgresStore(PG_DSN, schema=schema)
    store.retry_backoff = (0.02, 0.1)
    await store.open()
    admin = await asyncpg.connect(PG_DSN, server_settings={"search_path": schema})
    try:
        ids = [r.message_id for r in await store.append([journal_envelope(f"PF{i}") for i in range(3)])]
        # The server refuses every write with disk_full while the switch is on.
        await admin.execute(
            """
            CREATE TABLE disk (is_full BOOLEAN NOT NULL);
            INSERT INTO disk VALUES (false);
            CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF (SELECT is_full FROM disk) THEN
                    RAISE EXCEPTION 'could not extend file: No space left on device' USING ERRCODE = '53100';
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER messages_full BEFORE INSERT OR UPDATE ON messages
                FOR EACH ROW EXECUTE FUNCTION refuse();
            CREATE TRIGGER stages_full BEFORE INSERT OR UPDATE ON stages
                FOR EACH ROW EXECUTE FUNCTION refuse();
            CREATE TRIGGER deliveries_full BEFORE INSERT OR UPDATE ON deliveries
                FOR EACH ROW EXECUTE FUNCTION refuse();
            CREATE TRIGGER installation_full BEFORE INSERT OR UPDATE ON installation
                FOR EACH ROW EXECUTE FUNCTION refuse();
            """
        )
        await admin.execute("UPDATE disk SET is_full = true")
        for mid in ids:
            store.queue_deliveries(mid, transformed(), ["far"], sent=True)
        with pytest.raises(StoreError):
            await store.append([journal_envelope("PF-NEW")])
        await asyncio.sleep(0.3)
        assert store.connected is False  # what readiness reports (journal_writes)
        assert await statuses(store, ids) == [Status.RECEIVED.value] * 3
        await admin.execute("UPDATE disk SET is_full = false")
        deadline = time.monotonic() + 10
        while await statuses(store, ids) != [Status.SENT.value] * 3:
            assert time.monotonic() < deadline, "trace writes never landed"
            await asyncio.sleep(0.05)
        await wait_for(lambda: store.write_health() == {"ok": True, "queued_writes": 0}, 5)
    finally:
        await admin.close()
        await store.close()
        conn = await asyncpg.connect(PG_DSN)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
