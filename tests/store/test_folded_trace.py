"""The SQLite journal keeps the commonest trace entries in the message's own row: the ACK sent on
commit and a first-try delivery to every destination. What a reader sees must not change for it.

Random message histories (ACK or none, filtered, resent, steps with payloads, delivered on the first
try or queued then retried, failed, replayed, discarded) are applied in step to the SQLite store and
to the PostgreSQL store, which writes every stage and delivery as a row of its own: each message's
trace, its deliveries and the statistics must be the same. A journal written before the change
(schema 1) is migrated in place and still reads as it did.
"""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.core.envelope import HL7_V2
from gateway.core.protocols import MessageStore, StageRecord
from gateway.core.status import Status
from gateway.store.messages import sqlite as sqlite_store
from gateway.store.messages.postgres import PostgresStore
from gateway.store.messages.sqlite import SqliteStore
from tests.messages import journal_envelope
from tests.scale.conftest import PG_DSN, require_live

DESTINATIONS = ["files", "mllp", "rest"]

# One message's history: how it is acknowledged, what happens to it, and what the operator does.
HISTORY = st.fixed_dictionaries(
    {
        "ack": st.sampled_from([None, "AA", "CA"]),
        "filtered": st.booleans(),
        "resent": st.integers(0, 2),
        "steps": st.integers(0, 2),
        "path": st.sampled_from(["sent", "queued", "error", "none", "after_processing"]),
        "destinations": st.lists(st.sampled_from(DESTINATIONS), unique=True, max_size=3),
        "retries": st.lists(st.sampled_from(["SENT", "ERROR", "DEAD"]), max_size=3),
        "replay": st.booleans(),
        "discard": st.booleans(),
    }
)


def _ack(code: str, control_id: str) -> bytes:
    return (
        f"MSH|^~\\&|PASSERELLE||APP|FAC|20261124||ACK|{control_id}|P|2.5\rMSA|{code}|{control_id}\r".encode()
    )


async def _deliver(store: MessageStore, mid: str, h: dict[str, Any], replayed: bool) -> None:
    transformed = StageRecord(
        "transformed", Status.TRANSFORMED, detail={"destinations": h["destinations"], "replayed": replayed}
    )
    path = h["path"]
    if path == "error":
        store.record(
            mid, StageRecord("transform", Status.ERROR, detail={"error": "207"}), status=Status.ERROR
        )
    elif path == "sent":
        store.queue_deliveries(mid, transformed, h["destinations"], sent=True)
    elif path == "queued":
        store.queue_deliveries(mid, transformed, h["destinations"])
        for attempt, outcome in enumerate(h["retries"], start=1):
            for dest in h["destinations"]:
                status = Status(outcome)
                store.delivery_update(
                    mid,
                    dest,
                    status,
                    attempt,
                    message_status=status,
                    stage=StageRecord(f"deliver:{dest}", status, detail={"attempt": attempt}),
                    error=None if status is Status.SENT else "timeout",
                )
    elif path == "after_processing":
        store.queue_deliveries(mid, transformed, [], sent=True)
        store.record(
            mid, StageRecord("ack", Status.RECEIVED, _ack("AA", "processed"), HL7_V2, {"code": "AA"})
        )


async def _apply(store: MessageStore, histories: list[dict[str, Any]], tag: str) -> list[str]:
    """Run every history on ``store``; returns the message ids, in order."""
    ids = []
    for n, h in enumerate(histories):
        control_id = f"{tag}-{n}"
        ack = (_ack(h["ack"], control_id), h["ack"]) if h["ack"] else None
        status = Status.FILTERED if h["filtered"] else Status.RECEIVED
        (first,) = await store.append([journal_envelope(control_id, status=status)], ack=ack)
        for _ in range(h["resent"]):
            await store.append([journal_envelope(control_id, status=status)], ack=ack)
        mid = first.message_id
        ids.append(mid)
        if h["filtered"]:
            continue
        for step in range(h["steps"]):
            store.record(mid, StageRecord(f"step:s{step}", Status.TRANSFORMED, f"out{step}".encode(), HL7_V2))
        await _deliver(store, mid, h, replayed=False)
        await store.flush()
        if h["replay"] and await store.reset_for_replay(mid) is not None:
            await _deliver(store, mid, {**h, "path": "sent"}, replayed=True)
        await store.flush()
        if h["discard"]:
            await store.discard(mid)
    await store.flush()
    return ids


def _shape(msg: dict[str, Any] | None) -> Any:
    """What a reader is shown, without the clock readings each store took for itself."""
    assert msg is not None
    return {
        "status": msg["status"],
        "error": msg["error"],
        "discarded": msg["discarded_at"] is not None,
        "raw": msg.get("raw"),
        # (a resend's own envelope id is minted by each store for itself)
        "stages": [
            {k: v for k, v in s.items() if k != "at"}
            | {"detail": {k: v for k, v in s["detail"].items() if k != "duplicate_of_envelope"}}
            for s in msg["stages"]
        ],
        "deliveries": sorted(
            ({k: v for k, v in d.items() if k != "updated_at"} for d in msg["deliveries"]),
            key=lambda d: d["destination"],
        ),
    }


async def _compare(histories: list[dict[str, Any]], sqlite_path: Path, schema: str) -> None:
    lite = SqliteStore(sqlite_path)
    pg = PostgresStore(PG_DSN, schema=schema)
    await lite.open()
    await pg.open()
    try:
        tag = uuid.uuid4().hex[:8]
        lite_ids = await _apply(lite, histories, tag)
        pg_ids = await _apply(pg, histories, tag)
        for a, b in zip(lite_ids, pg_ids, strict=True):
            for with_payloads in (True, False):
                got = _shape(await lite.get_message(a, with_payloads=with_payloads))
                assert got == _shape(await pg.get_message(b, with_payloads=with_payloads))
        lite_stats, pg_stats = await lite.stats(), await pg.stats()
        for key in ("channels", "by_type", "destinations", "duplicates"):
            assert lite_stats[key] == pg_stats[key], key
    finally:
        await lite.close()
        await pg.close()


@settings(database=None, deadline=None, max_examples=30, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(HISTORY, min_size=1, max_size=6))
def test_folded_trace_reads_as_the_row_per_stage_store(histories: list[dict[str, Any]]) -> None:
    require_live()
    schema = f"t_fold_{uuid.uuid4().hex[:10]}"

    async def go() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                await _compare(histories, Path(tmp) / "j.db", schema)
            finally:
                conn = await asyncpg.connect(PG_DSN)
                try:
                    await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
                finally:
                    await conn.close()

    asyncio.run(go())


# -- a journal written before the change -------------------------------------------------------


def _schema_1() -> str:
    """The journal's schema as the earlier release created it: today's, less the folded columns
    (schema 2) and the content digest (schema 3)."""
    later = ",\n    ack BLOB,\n    ack_meta TEXT,\n    outcome TEXT,\n    digest TEXT\n"
    assert later in sqlite_store._SCHEMA
    return sqlite_store._SCHEMA.replace(later, "\n").replace("'schema_version', '3'", "'schema_version', '1'")


async def test_a_schema_1_journal_is_migrated_and_reads_as_before(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    # A message as the earlier release stored it: the ACK and the transform as stage rows.
    db = sqlite3.connect(path)
    db.executescript(_schema_1())
    now = time.time()
    db.execute(
        "INSERT INTO messages (id, channel, source, received_at, updated_at, status, sender, control_id,"
        " message_type, partition_key, content_type, charset, trace_id, peer, raw)"
        " VALUES ('m-old','adt','hospital',?,?,'SENT','APP^FAC','C1','ADT^A01','p',?,'','m-old','',?)",
        (now, now, HL7_V2, b"MSH|old"),
    )
    db.execute(
        "INSERT INTO stages (message_id, stage, status, at, content_type, payload, detail)"
        " VALUES ('m-old','ack','RECEIVED',?,?,?,'{\"code\":\"AA\"}')",
        (now, HL7_V2, b"ACK|old"),
    )
    db.execute(
        "INSERT INTO stages (message_id, stage, status, at, detail)"
        " VALUES ('m-old','transformed','TRANSFORMED',?,'{\"destinations\":[\"files\"]}')",
        (now + 0.001,),
    )
    db.execute(
        "INSERT INTO deliveries (message_id, destination, status, attempts, updated_at)"
        " VALUES ('m-old','files','SENT',1,?)",
        (now,),
    )
    db.commit()
    columns = {r[1] for r in db.execute("PRAGMA table_info(messages)")}
    db.close()
    assert not {"ack", "ack_meta", "outcome"} & columns

    store = SqliteStore(path)
    await store.open()
    try:
        db = sqlite3.connect(path)
        assert {"ack", "ack_meta", "outcome"} <= {r[1] for r in db.execute("PRAGMA table_info(messages)")}
        assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("3",)
        db.close()
        old_msg = await store.get_message("m-old", with_payloads=True)
        assert old_msg is not None
        assert [(s["stage"], s["payload"]) for s in old_msg["stages"]] == [
            ("ack", b"ACK|old"),
            ("transformed", None),
        ]
        assert [(d["destination"], d["status"]) for d in old_msg["deliveries"]] == [("files", "SENT")]

        # A new message in the same journal: ACK and delivery folded, read back the same way.
        env = journal_envelope("C2")
        (res,) = await store.append([env], ack=(b"ACK|new", "AA"))
        store.queue_deliveries(
            res.message_id,
            StageRecord("transformed", Status.TRANSFORMED, detail={"destinations": ["files"]}),
            ["files"],
            sent=True,
        )
        await store.flush()
        new_msg = await store.get_message(res.message_id, with_payloads=True)
        assert new_msg is not None
        assert [(s["stage"], s["status"], s["payload"], s["detail"]) for s in new_msg["stages"]] == [
            ("ack", "RECEIVED", b"ACK|new", {"code": "AA"}),
            ("transformed", "TRANSFORMED", None, {"destinations": ["files"]}),
        ]
        assert new_msg["status"] == "SENT"
        assert "ack" not in new_msg and "outcome" not in new_msg
        stats = await store.stats()
        assert stats["destinations"] == {"files": {"SENT": 2}}
        # Retention drops the folded ACK with the other payloads.
        assert await store.prune(payload_before=time.time() + 1, message_before=0) == (2, 0)
        pruned = await store.get_message(res.message_id, with_payloads=True)
        assert pruned is not None
        assert [s["payload"] for s in pruned["stages"]] == [None, None]
    finally:
        await store.close()


@pytest.mark.parametrize("sent", [True, False])
async def test_a_replay_keeps_the_first_runs_transform_in_the_trace(tmp_path: Path, sent: bool) -> None:
    store = SqliteStore(tmp_path / "j.db")
    await store.open()
    try:
        (res,) = await store.append([journal_envelope("R1")], ack=(b"ACK", "AA"))
        mid = res.message_id
        first = StageRecord("transformed", Status.TRANSFORMED, content_type=HL7_V2, detail={"run": 1})
        store.queue_deliveries(mid, first, ["files"], sent=sent)
        await store.flush()
        assert await store.reset_for_replay(mid) is not None
        store.queue_deliveries(
            mid, StageRecord("transformed", Status.TRANSFORMED, detail={"run": 2}), ["files"], sent=True
        )
        await store.flush()
        msg = await store.get_message(mid, with_payloads=False)
        assert msg is not None
        assert [(s["stage"], s["content_type"], s["detail"]) for s in msg["stages"]] == [
            ("ack", HL7_V2, {"code": "AA"}),
            ("transformed", HL7_V2, {"run": 1}),
            ("replay", None, {}),
            ("transformed", None, {"run": 2}),
        ]
        assert [(d["destination"], d["status"], d["attempts"]) for d in msg["deliveries"]] == [
            ("files", "SENT", 1)
        ]
    finally:
        await store.close()
