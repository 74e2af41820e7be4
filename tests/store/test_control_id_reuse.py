"""Dedupe compares content (defect 9): a resend is the same bytes under the same key; another
message under a seen key is kept (ERROR, its own row) and reported as a conflict, on SQLite and
PostgreSQL alike. A journal of schema 2 (no digests) is migrated in place and still compared."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest

from gateway.core.envelope import Envelope
from gateway.core.status import Status
from gateway.store.messages import sqlite as sqlite_store
from gateway.store.messages.postgres import PostgresStore
from gateway.store.messages.sqlite import SqliteStore
from tests.messages import adt, journal_envelope
from tests.scale.conftest import PG_DSN, require_live

Store = SqliteStore | PostgresStore


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.live)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store
    if request.param == "sqlite":
        s = SqliteStore(tmp_path / "j.db")
    else:
        require_live()
        s = PostgresStore(PG_DSN, schema=f"t_{uuid.uuid4().hex[:10]}")
    await s.open()
    yield s
    await s.close()
    if isinstance(s, PostgresStore):
        conn = await asyncpg.connect(PG_DSN)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{s.schema}" CASCADE')
        finally:
            await conn.close()


def other_patient(env: Envelope, patient: str) -> Envelope:
    """The same header (MSH-10 included), another message: a new envelope as the intake makes it."""
    fresh = journal_envelope(env.control_id)
    return replace(fresh, raw=adt(env.control_id, patient=patient))


async def test_a_resend_of_the_same_bytes_is_a_duplicate(store: Store) -> None:
    first = journal_envelope("K1")
    (a,) = await store.append([first])
    (b,) = await store.append([journal_envelope("K1")])
    assert b.duplicate and not b.conflict and b.message_id == a.message_id


async def test_another_message_under_a_seen_key_is_kept_as_a_conflict(store: Store) -> None:
    first = journal_envelope("K2")
    (a,) = await store.append([first])
    reuse = other_patient(first, "700012")
    (b,) = await store.append([reuse])
    assert b.duplicate and b.conflict
    assert b.message_id == reuse.id != a.message_id
    await store.flush()
    kept = await store.get_message(reuse.id, with_payloads=True)
    assert kept is not None
    assert (kept["status"], kept["error"], kept["control_id"]) == (Status.ERROR.value, "205", "K2")
    assert kept["raw"] == reuse.raw
    (intake,) = [s for s in kept["stages"] if s["stage"] == "intake"]
    assert intake["detail"]["conflicts_with"] == a.message_id
    assert intake["detail"]["location"] == "MSH-10"
    # the conflict holds no key: the first message still answers for K2, resends included
    (c,) = await store.append([journal_envelope("K2")])
    assert c.duplicate and not c.conflict and c.message_id == a.message_id
    # and it is not work: recovery does not hand it to the channel
    pending = await store.pending("adt", 0, 10, recovering=True)
    assert [item.envelope.id for item in pending] == [a.message_id]
    rows = await store.list_messages(status=None, control_id="K2", channel=None, limit=10, before_seq=None)
    assert sorted(r["status"] for r in rows) == ["ERROR", "RECEIVED"]


async def test_after_a_release_another_message_under_the_key_is_new(store: Store) -> None:
    """The existing dedupe semantics hold: once the first message's key is released (its sender
    was answered AE), the next message under that MSH-10 is processed, whatever its content."""
    first = journal_envelope("K3")
    (a,) = await store.append([first])
    await store.release_dedupe(a.message_id)
    (b,) = await store.append([other_patient(first, "700012")])
    assert not b.duplicate and not b.conflict


async def test_refusals_without_a_key_are_never_conflicts(store: Store) -> None:
    env = replace(journal_envelope("K4"), dedupe=False, status=Status.ERROR, channel="source:hospital")
    (a,) = await store.append([env])
    (b,) = await store.append([replace(other_patient(env, "700012"), dedupe=False)])
    assert not a.duplicate and not b.duplicate and not b.conflict


async def test_a_schema_2_journal_gains_digests_and_compares_its_old_rows(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    schema_2 = sqlite_store._SCHEMA.replace(",\n    digest TEXT\n", "\n").replace(
        "'schema_version', '3'", "'schema_version', '2'"
    )
    assert "digest" not in schema_2
    old = journal_envelope("K5")
    db = sqlite3.connect(path)
    db.executescript(schema_2)
    db.execute(
        "INSERT INTO messages (id, channel, source, received_at, updated_at, status, sender, control_id,"
        " message_type, partition_key, content_type, charset, trace_id, peer, raw, dedupe_key)"
        " VALUES (?,?,?,?,?,'SENT',?,?,?,?,?,'',?,'',?,?)",
        (
            old.id,
            old.channel,
            old.source,
            old.received_at,
            old.received_at,
            old.sender,
            old.control_id,
            old.message_type,
            old.partition_key,
            old.content_type,
            old.trace_id,
            old.raw,
            old.dedupe_key,
        ),
    )
    db.commit()
    db.close()
    store = SqliteStore(path)
    await store.open()
    try:
        db = sqlite3.connect(path)
        assert "digest" in {r[1] for r in db.execute("PRAGMA table_info(messages)")}
        assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("3",)
        db.close()
        (same,) = await store.append([journal_envelope("K5")])
        assert same.duplicate and not same.conflict and same.message_id == old.id
        (other,) = await store.append([other_patient(old, "700012")])
        assert other.conflict
        # a row whose payload retention removed cannot be compared: a duplicate, as before
        await store._submit(lambda c: c.execute("UPDATE messages SET raw=NULL WHERE id=?", (old.id,)))
        (pruned,) = await store.append([other_patient(old, "700013")])
        assert pruned.duplicate and not pruned.conflict
    finally:
        await store.close()
