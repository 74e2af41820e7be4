"""Embedded journal and message store on SQLite (WAL, group commit).

Writes are queued and applied once per event-loop turn: everything queued since
the last commit goes into one transaction, so one fsync covers many envelopes.
``append`` resolves only after that commit: the ACK follows durability, never
precedes it. Reads run on a small pool of reader
threads, each with its own connection; WAL checkpoints run on their own too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from gateway.core.envelope import HL7_V2, Envelope
from gateway.core.errors import StoreError
from gateway.core.logging import get_logger
from gateway.core.protocols import AppendResult, StageRecord, WorkItem, shard_of
from gateway.core.status import Status
from gateway.store.message_views import message_counts, message_filters, trace_stage

log = get_logger("passerelle.store")

Op = Callable[[sqlite3.Connection], Any]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    channel TEXT NOT NULL,
    source TEXT NOT NULL,
    received_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    status TEXT NOT NULL,
    sender TEXT NOT NULL,
    control_id TEXT NOT NULL,
    message_type TEXT NOT NULL,
    partition_key TEXT NOT NULL,
    content_type TEXT NOT NULL,
    charset TEXT NOT NULL,
    trace_id TEXT NOT NULL,
    peer TEXT NOT NULL,
    raw BLOB,
    error TEXT,
    dedupe_key TEXT UNIQUE,
    discarded_at REAL,
    ack BLOB,
    ack_meta TEXT,
    outcome TEXT
);
CREATE INDEX IF NOT EXISTS messages_status ON messages(status, seq);
CREATE INDEX IF NOT EXISTS messages_channel ON messages(channel, seq);
CREATE INDEX IF NOT EXISTS messages_control ON messages(control_id);
CREATE INDEX IF NOT EXISTS messages_received ON messages(received_at);
CREATE TABLE IF NOT EXISTS stages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL,
    stage TEXT NOT NULL,
    status TEXT NOT NULL,
    at REAL NOT NULL,
    content_type TEXT,
    payload BLOB,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS stages_message ON stages(message_id, seq);
CREATE TABLE IF NOT EXISTS deliveries (
    message_id TEXT NOT NULL,
    destination TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL,
    last_error TEXT,
    PRIMARY KEY (message_id, destination)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', '2');
"""
# The commonest trace entries live in the message's own row instead of rows of their own: the ACK
# sent on commit (ack, ack_meta) and a first-try delivery to every destination (outcome). Each saves
# statements and WAL pages on the hot path; readers show them as the stages and deliveries they are.
_V2_COLUMNS = (("ack", "BLOB"), ("ack_meta", "TEXT"), ("outcome", "TEXT"))

_MSG_COLUMNS = (
    "seq, id, channel, source, received_at, updated_at, status, sender, control_id, message_type, "
    "partition_key, content_type, charset, trace_id, peer, error, discarded_at"
)
# Built from constants only: no caller text ever reaches an SQL string.
_SELECT_BY_ID = "SELECT " + _MSG_COLUMNS + ", raw, ack, ack_meta, outcome FROM messages WHERE id=?"  # noqa: S608
# What the WAL file is cut back to when the writer rewinds it after a complete checkpoint.
_WAL_LIMIT = 64 * 1024 * 1024
_PENDING_STATUSES = (Status.RECEIVED.value, Status.TRANSFORMED.value, Status.QUEUED.value, Status.ERROR.value)


@functools.lru_cache(maxsize=32)
def _ack_meta(code: str, status: str) -> str:
    # A handful of (code, status) pairs, one per message on the hot path: serialise each once.
    return orjson.dumps({"code": code, "status": status}).decode()


def _row_to_message(row: sqlite3.Row) -> dict[str, Any]:
    return {k: row[k] for k in row.keys()}  # noqa: SIM118 - sqlite3.Row is not a Mapping


class SqliteStore:
    """Journal + message store. Implements ``gateway.core.protocols.MessageStore``."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "FULL",
        max_batch: int = 4096,
        writer: bool = True,
        wal_limit: int = _WAL_LIMIT,
    ) -> None:
        self.path = path
        self._writer = writer  # False: a read-only view, as the worker process has
        self._synchronous = synchronous
        self._wal_limit = wal_limit
        self._max_batch = max_batch
        # Appends gate ACKs, so they jump ahead of trace writes. Safe: any later write about a
        # message is only submitted once that message's append has committed.
        self._appends: list[_Entry] = []
        self._pending: list[_Entry] = []
        self._checkpointer: asyncio.Task[None] | None = None
        self._flush_scheduled = False
        self._opened = False
        self._committing = False
        self._cexec: ThreadPoolExecutor | None = None
        self._rexec: ThreadPoolExecutor | None = None
        self._wconn: sqlite3.Connection | None = None
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closing = False
        self.commits = 0  # counters read by the benchmark and /api/stats
        self.committed_ops = 0

    @property
    def is_open(self) -> bool:
        return self._wconn is not None

    # -- life cycle -------------------------------------------------------

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._rexec = ThreadPoolExecutor(2, thread_name_prefix="store-reader")
        self._opened = True
        if not self._writer:
            return
        self._cexec = ThreadPoolExecutor(1, thread_name_prefix="journal-commit")
        self._committing = False
        try:
            self._wconn = self._connect_writer()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the journal at {self.path}: {exc}") from exc
        self._closing = False
        self._flush_scheduled = False
        self._checkpointer = asyncio.create_task(self._checkpoint_loop(), name="journal-checkpoint")

    async def _checkpoint_loop(self, interval: float = 1.0) -> None:
        """Copy the WAL back into the database in the background so it does not grow without end."""
        loop = asyncio.get_running_loop()
        ckpt = ThreadPoolExecutor(1, thread_name_prefix="journal-checkpoint")
        conn: sqlite3.Connection | None = None
        try:
            conn = await loop.run_in_executor(ckpt, self._connect)
            while True:
                await asyncio.sleep(interval)
                try:
                    # PASSIVE only: it never blocks the writer. A TRUNCATE checkpoint takes the write
                    # lock, and the writer's BEGIN then sleeps in SQLite's busy handler on the event
                    # loop (measured: ACK p99 at 1,000 msg/s 23-27 ms with it, 13-22 ms without).
                    # The file stays bounded by ``journal_size_limit``, applied by the writer itself
                    # when it rewinds a fully checkpointed WAL.
                    await loop.run_in_executor(
                        ckpt, lambda: conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    )
                except sqlite3.Error as exc:
                    log.warning("journal_checkpoint_failed", error=type(exc).__name__)
        finally:
            if conn is not None:
                await loop.run_in_executor(ckpt, conn.close)
            ckpt.shutdown(wait=False)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout=30000")
        # Workers reload only their own patients' messages (see protocols.shard_of).
        conn.create_function("shard_of", 2, shard_of, deterministic=True)
        return conn

    def _connect_writer(self) -> sqlite3.Connection:
        conn = self._connect()
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsynced at every commit, so an ACKed message survives power loss.
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        # Checkpoints run on their own connection (see _checkpoint_loop), not inside a commit.
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute(f"PRAGMA journal_size_limit={int(self._wal_limit)}")
        conn.executescript(_SCHEMA)
        _migrate(conn)
        return conn

    async def close(self) -> None:
        if not self._opened:
            return
        self._opened = False
        if self._wconn is None:
            self._close_readers()
            return
        self._closing = True
        while self._appends or self._pending or self._committing:
            if not self._committing:
                self._flush()
            await asyncio.sleep(0.001)
        if self._checkpointer is not None:
            self._checkpointer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpointer
            self._checkpointer = None
        self._wconn.close()
        self._wconn = None
        self._close_readers()

    def _close_readers(self) -> None:
        with self._readers_lock:
            for reader in self._readers:
                reader.close()
            self._readers.clear()
        for ex in (self._rexec, self._cexec):
            if ex is not None:
                ex.shutdown(wait=True)

    async def ping(self) -> None:
        await self._read(lambda c: c.execute("SELECT 1").fetchone())

    # -- the group-commit writer -------------------------------------------
    #
    # Writes are applied on the event loop's own thread, once per loop turn: every write submitted
    # meanwhile shares one transaction. Only COMMIT (the fsync) goes to a thread, one hop per batch,
    # and the loop gathers the next batch meanwhile. Running the SQL itself on a writer thread
    # measured slower here: GIL hand-offs for every statement.

    def _submit(self, op: Op, *, append: bool = False) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._enqueue((op, fut, None), append)
        return fut

    def _enqueue(self, entry: _Entry, append: bool) -> None:
        if self._wconn is None or self._closing:
            raise StoreError("the journal is not open")
        (self._appends if append else self._pending).append(entry)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _submit_quiet(self, op: Op) -> asyncio.Future[Any]:
        """A write nobody has to await; a failure is logged instead of lost."""
        fut = self._submit(op)
        fut.add_done_callback(_log_failure)
        return fut

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._committing:
            return  # the commit in flight reschedules when it lands
        batch, self._appends = self._appends, []
        # Trace writes fill the rest, bounded so that one commit stays short for the next ACKs.
        room = max(self._max_batch - len(batch), 64)
        batch += self._pending[:room]
        del self._pending[:room]
        if not batch:
            return
        conn = self._wconn
        assert conn is not None
        try:
            conn.execute("BEGIN IMMEDIATE")
            results = [op(conn) for op, _, _ in batch]
        except sqlite3.Error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._settle(batch, self._run_isolated([op for op, _, _ in batch]))
            self._reschedule()
            return
        # The fsync of COMMIT runs on a thread (the GIL is released meanwhile): the loop goes on
        # reading frames and gathering the next batch while the disk works.
        self._committing = True
        assert self._cexec is not None
        commit = asyncio.get_running_loop().run_in_executor(self._cexec, conn.execute, "COMMIT")
        commit.add_done_callback(lambda f: self._committed(f, batch, results))

    def _committed(self, fut: asyncio.Future[Any], batch: list[_Entry], results: list[Any]) -> None:
        self._committing = False
        exc = fut.exception()
        if exc is not None:
            conn = self._wconn
            if conn is not None and conn.in_transaction:
                conn.execute("ROLLBACK")
            results = [StoreError(f"journal commit failed: {type(exc).__name__}")] * len(batch)
        else:
            self.commits += 1
            self.committed_ops += len(batch)
        self._settle(batch, results)
        self._reschedule()

    def _reschedule(self) -> None:
        if (self._appends or self._pending) and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _settle(self, batch: list[_Entry], results: list[Any]) -> None:
        for (_, fut, callback), result in zip(batch, results, strict=True):
            if isinstance(result, _Failed):
                result = StoreError(f"journal write failed: {result.kind}")
            if callback is not None:
                # Called now, in this turn: the ACK leaves without another loop turn.
                try:
                    callback(result)
                except Exception as exc:  # one bad continuation must not stop the rest
                    log.exception("journal_callback_failed", error=type(exc).__name__)
            elif fut is not None and not fut.done():
                if isinstance(result, BaseException):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)

    def _run_isolated(self, ops: list[Op]) -> list[Any]:
        """After a failed batch: each op in its own transaction, so one bad write does not sink the rest."""
        conn = self._wconn
        assert conn is not None
        results: list[Any] = []
        for op in ops:
            try:
                conn.execute("BEGIN IMMEDIATE")
                results.append(op(conn))
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                results.append(_Failed(type(exc).__name__))
        self.commits += 1
        self.committed_ops += len(ops)
        return results

    async def flush(self) -> None:
        """Wait until every write queued so far is committed."""
        await self._submit(lambda conn: None)

    # -- journal ---------------------------------------------------------------

    async def append(
        self, envelopes: Sequence[Envelope], *, ack: tuple[bytes, str] | None = None
    ) -> list[AppendResult]:
        """Commit the envelopes; ``ack`` (payload, code), known in advance, is traced in the same write."""
        fut: asyncio.Future[list[AppendResult]] = asyncio.get_running_loop().create_future()

        def done(result: list[AppendResult] | BaseException) -> None:
            if fut.done():
                return
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)

        self.append_then(envelopes, done, ack=ack)
        return await fut

    def append_then(
        self,
        envelopes: Sequence[Envelope],
        then: Callable[[list[AppendResult] | BaseException], None],
        *,
        ack: tuple[bytes, str] | None = None,
    ) -> None:
        """Like ``append``, but ``then`` is called right after the commit, in the same loop turn."""
        ack_payload = ack[0] if ack else None
        rows = [
            (
                e.id,
                e.channel,
                e.source,
                e.received_at,
                e.received_at,
                e.status.value,
                e.sender,
                e.control_id,
                e.message_type,
                e.partition_key,
                e.content_type,
                e.charset,
                e.trace_id,
                e.peer,
                e.raw,
                e.dedupe_key if e.control_id and e.dedupe else None,
                ack_payload,
                _ack_meta(ack[1], e.status.value) if ack else None,
            )
            for e in envelopes
        ]

        def op(conn: sqlite3.Connection) -> list[AppendResult]:
            out = []
            for row in rows:
                got = conn.execute(
                    "INSERT INTO messages (id, channel, source, received_at, updated_at, status, sender,"
                    " control_id, message_type, partition_key, content_type, charset, trace_id, peer, raw,"
                    " dedupe_key, ack, ack_meta) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
                    " ON CONFLICT(dedupe_key) DO NOTHING RETURNING seq",
                    row,
                ).fetchone()
                if got is not None:
                    out.append(AppendResult(row[0], False, got[0]))
                    continue
                first = conn.execute("SELECT id, seq FROM messages WHERE dedupe_key=?", (row[15],)).fetchone()
                conn.execute(
                    "INSERT INTO stages (message_id, stage, status, at, detail) VALUES (?,?,?,?,?)",
                    (
                        first[0],
                        "duplicate",
                        first_status(conn, first[0]),
                        row[3],
                        orjson.dumps({"duplicate_of_envelope": row[0], "peer": row[13]}).decode(),
                    ),
                )
                out.append(AppendResult(first[0], True, first[1]))
            return out

        self._enqueue((op, None, then), True)

    def record(self, message_id: str, stage: StageRecord, *, status: Status | None = None) -> Awaitable[None]:
        now = time.time()
        stage_row = _stage_row(message_id, stage, now)
        status_value = status.value if status is not None else None

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(_INSERT_STAGE, stage_row)
            if status_value is not None:
                conn.execute(
                    "UPDATE messages SET status=?, updated_at=?, error=? WHERE id=?",
                    (status_value, now, _error_of(stage), message_id),
                )

        return self._submit_quiet(op)

    def queue_deliveries(
        self, message_id: str, stage: StageRecord, destinations: Sequence[str], *, sent: bool = False
    ) -> Awaitable[None]:
        """Record the transform and one delivery row per destination: QUEUED, or SENT when ``sent``
        (every destination already took the message on its first attempt)."""
        now = time.time()
        stage_row = _stage_row(message_id, stage, now)
        status = Status.QUEUED.value if destinations and not sent else Status.SENT.value
        attempts = 1 if sent else 0

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(_INSERT_STAGE, stage_row)
            conn.executemany(
                "INSERT INTO deliveries (message_id, destination, status, attempts, updated_at)"
                " VALUES (?,?,?,?,?) ON CONFLICT DO UPDATE SET status=excluded.status,"
                " attempts=excluded.attempts, updated_at=excluded.updated_at, last_error=NULL",
                [(message_id, d, status, attempts, now) for d in destinations],
            )
            conn.execute(
                "UPDATE messages SET status=?, updated_at=?, error=NULL WHERE id=?", (status, now, message_id)
            )

        if status != Status.SENT.value or stage.payload is not None:
            return self._submit_quiet(op)
        # Delivered at the first try (or nowhere to deliver): one UPDATE keeps it in the message row.
        outcome = _outcome(stage_row, destinations)

        def folded(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                "UPDATE messages SET status=?, updated_at=?, error=NULL, outcome=?"
                " WHERE id=? AND outcome IS NULL",
                (status, now, outcome, message_id),
            )
            if not cur.rowcount:  # the row already holds one: rows of their own, as before
                op(conn)

        return self._submit_quiet(folded)

    def delivery_update(
        self,
        message_id: str,
        destination: str,
        status: Status,
        attempts: int,
        *,
        message_status: Status | None,
        stage: StageRecord | None,
        error: str | None = None,
    ) -> Awaitable[None]:
        now = time.time()
        stage_row = _stage_row(message_id, stage, now) if stage is not None else None
        msg_status = message_status.value if message_status is not None else None

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE deliveries SET status=?, attempts=?, updated_at=?, last_error=?"
                " WHERE message_id=? AND destination=?",
                (status.value, attempts, now, error, message_id, destination),
            )
            if stage_row is not None:
                conn.execute(_INSERT_STAGE, stage_row)
            if msg_status is not None:
                conn.execute(
                    "UPDATE messages SET status=?, updated_at=?, error=? WHERE id=?",
                    (msg_status, now, error, message_id),
                )

        return self._submit_quiet(op)

    def release_dedupe(self, message_id: str) -> Awaitable[None]:
        """The sender was told AE/AR: let a resend of the same MSH-10 be processed afresh."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE messages SET dedupe_key=NULL WHERE id=?", (message_id,))

        return self._submit_quiet(op)

    # -- reads -----------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    async def _read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        if self._rexec is None:
            raise StoreError("the store is not open")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._rexec, lambda: fn(self._reader()))
        except sqlite3.Error as exc:
            raise StoreError(f"store read failed: {type(exc).__name__}") from exc

    async def pending(
        self,
        channel: str,
        after_seq: int,
        limit: int,
        *,
        recovering: bool,
        shard: tuple[int, int] | None = None,
    ) -> list[WorkItem]:
        statuses = _PENDING_STATUSES if recovering else (Status.RECEIVED.value,)
        marks = ",".join("?" * len(statuses))
        index, count = shard if shard is not None else (0, 1)

        def fn(conn: sqlite3.Connection) -> list[WorkItem]:
            rows = conn.execute(
                f"SELECT {_MSG_COLUMNS}, raw FROM messages WHERE channel=? AND seq>? AND status IN ({marks})"  # noqa: S608
                " AND discarded_at IS NULL AND (? = 1 OR shard_of(partition_key, ?) = ?)"
                " ORDER BY seq LIMIT ?",
                (channel, after_seq, *statuses, count, count, index, limit),
            ).fetchall()
            items = []
            for row in rows:
                status = Status(row["status"])
                env = _envelope_of(row)
                if status is Status.RECEIVED:
                    items.append(WorkItem(row["seq"], env, status, None, (), {}))
                    continue
                deliveries = conn.execute(
                    "SELECT destination, attempts FROM deliveries WHERE message_id=? AND status IN (?,?)",
                    (row["id"], Status.QUEUED.value, Status.ERROR.value),
                ).fetchall()
                if not deliveries:
                    if status is Status.TRANSFORMED:  # crashed between transform and queueing
                        items.append(WorkItem(row["seq"], env, Status.RECEIVED, None, (), {}))
                    continue
                payload = conn.execute(
                    "SELECT payload FROM stages WHERE message_id=? AND payload IS NOT NULL"
                    " AND stage LIKE 'step:%' ORDER BY seq DESC LIMIT 1",
                    (row["id"],),
                ).fetchone()
                items.append(
                    WorkItem(
                        row["seq"],
                        env,
                        status,
                        payload[0] if payload else None,
                        tuple(d["destination"] for d in deliveries),
                        {d["destination"]: d["attempts"] for d in deliveries},
                    )
                )
            return items

        result: list[WorkItem] = await self._read(fn)
        return result

    async def get_message(self, message_id: str, *, with_payloads: bool) -> dict[str, Any] | None:
        def fn(conn: sqlite3.Connection) -> dict[str, Any] | None:
            row = conn.execute(_SELECT_BY_ID, (message_id,)).fetchone()
            if row is None:
                return None
            msg = _row_to_message(row)
            for column, _ in _V2_COLUMNS:
                del msg[column]
            if not with_payloads:
                msg.pop("raw")
            stages: list[Mapping[str, Any]] = list(
                conn.execute(
                    # In time order: the folded stages are placed by their time, and so is a
                    # transform a replay moved out of the row (see reset_for_replay).
                    "SELECT stage, status, at, content_type, payload, detail FROM stages"
                    " WHERE message_id=? ORDER BY at, seq",
                    (message_id,),
                )
            )
            deliveries = [
                dict(d)
                for d in conn.execute(
                    "SELECT destination, status, attempts, updated_at, last_error FROM deliveries"
                    " WHERE message_id=?",
                    (message_id,),
                )
            ]
            folded_stages, folded_deliveries = _folded(row)
            for stage in folded_stages:
                _insert_in_time(stages, stage)
            deliveries += folded_deliveries
            msg["stages"] = [trace_stage(s, with_payloads=with_payloads) for s in stages]
            msg["deliveries"] = deliveries
            return msg

        result: dict[str, Any] | None = await self._read(fn)
        return result

    async def list_messages(
        self,
        *,
        status: str | None,
        control_id: str | None,
        channel: str | None,
        limit: int,
        before_seq: int | None,
        since: float | None = None,
        until: float | None = None,
    ) -> list[dict[str, Any]]:
        filters = message_filters(
            status=status,
            control_id=control_id,
            channel=channel,
            before_seq=before_seq,
            since=since,
            until=until,
        )
        where = ["1=1", *(f"{column}{operator}?" for column, operator, _ in filters)]
        args = [value for _, _, value in filters]

        def fn(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                f"SELECT {_MSG_COLUMNS} FROM messages WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?",  # noqa: S608
                (*args, limit),
            ).fetchall()
            return [_row_to_message(r) for r in rows]

        result: list[dict[str, Any]] = await self._read(fn)
        return result

    async def dead_letters(self, channel: str | None, limit: int) -> list[dict[str, Any]]:
        def fn(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                f"SELECT {_MSG_COLUMNS} FROM messages WHERE status=? AND discarded_at IS NULL"  # noqa: S608
                " AND (? IS NULL OR channel=?) ORDER BY seq LIMIT ?",
                (Status.DEAD.value, channel, channel, limit),
            ).fetchall()
            return [_row_to_message(r) for r in rows]

        result: list[dict[str, Any]] = await self._read(fn)
        return result

    async def stats(self) -> dict[str, Any]:
        def fn(conn: sqlite3.Connection) -> dict[str, Any]:
            by_channel, by_type = message_counts(
                conn.execute(
                    "SELECT channel, message_type, status, COUNT(*) FROM messages"
                    " GROUP BY channel, message_type, status"
                )
            )
            deliveries: dict[str, dict[str, int]] = {}
            for row in conn.execute(
                "SELECT destination, status, COUNT(*) FROM deliveries GROUP BY destination, status"
            ):
                deliveries.setdefault(row[0], {})[row[1]] = row[2]
            for row in conn.execute(
                "SELECT d.value, COUNT(*) FROM messages, json_each(messages.outcome, '$.destinations') AS d"
                " WHERE messages.outcome IS NOT NULL GROUP BY d.value"
            ):
                counts = deliveries.setdefault(row[0], {})
                counts[Status.SENT.value] = counts.get(Status.SENT.value, 0) + row[1]
            duplicates = conn.execute("SELECT COUNT(*) FROM stages WHERE stage='duplicate'").fetchone()[0]
            return {
                "channels": by_channel,
                "by_type": by_type,
                "destinations": deliveries,
                "duplicates": duplicates,
            }

        result: dict[str, Any] = await self._read(fn)
        result["journal"] = {
            "commits": self.commits,
            "ops": self.committed_ops,
            "queued_writes": len(self._pending),
        }
        return result

    # -- operator actions --------------------------------------------------------

    async def reset_for_replay(self, message_id: str) -> WorkItem | None:
        now = time.time()

        def op(conn: sqlite3.Connection) -> WorkItem | None:
            row = conn.execute(_SELECT_BY_ID, (message_id,)).fetchone()
            if row is None or row["raw"] is None:
                return None
            if row["outcome"]:
                # The earlier run's transform stays in the trace, as a stage row of its own now.
                folded = orjson.loads(row["outcome"])
                conn.execute(
                    _INSERT_STAGE,
                    (
                        message_id,
                        folded["stage"],
                        folded["status"],
                        folded["at"],
                        folded["content_type"],
                        None,
                        folded["detail"],
                    ),
                )
            conn.execute("DELETE FROM deliveries WHERE message_id=?", (message_id,))
            conn.execute(
                "UPDATE messages SET status=?, updated_at=?, error=NULL, discarded_at=NULL, outcome=NULL"
                " WHERE id=?",
                (Status.RECEIVED.value, now, message_id),
            )
            conn.execute(_INSERT_STAGE, (message_id, "replay", Status.RECEIVED.value, now, None, None, "{}"))
            return WorkItem(row["seq"], _envelope_of(row), Status.RECEIVED, None, (), {})

        result: WorkItem | None = await self._submit(op)
        return result

    async def discard(self, message_id: str) -> bool:
        now = time.time()

        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE messages SET discarded_at=? WHERE id=? AND status=? AND discarded_at IS NULL",
                (now, message_id, Status.DEAD.value),
            )
            if cur.rowcount:
                conn.execute(_INSERT_STAGE, (message_id, "discard", Status.DEAD.value, now, None, None, "{}"))
            return bool(cur.rowcount)

        result: bool = await self._submit(op)
        return result

    async def prune(self, *, payload_before: float, message_before: float) -> tuple[int, int]:
        """Retention: drop payloads, then whole messages, of terminal messages older than the limits."""
        terminal = (Status.FILTERED.value, Status.SENT.value, Status.DEAD.value)

        def op(conn: sqlite3.Connection) -> tuple[int, int]:
            old = conn.execute(
                "SELECT id FROM messages WHERE updated_at<? AND status IN (?,?,?)",
                (message_before, *terminal),
            ).fetchall()
            ids = [(r[0],) for r in old]
            conn.executemany("DELETE FROM stages WHERE message_id=?", ids)
            conn.executemany("DELETE FROM deliveries WHERE message_id=?", ids)
            conn.executemany("DELETE FROM messages WHERE id=?", ids)
            cur = conn.execute(
                "UPDATE messages SET raw=NULL, ack=NULL"
                " WHERE updated_at<? AND raw IS NOT NULL AND status IN (?,?,?)",
                (payload_before, *terminal),
            )
            conn.execute(
                "UPDATE stages SET payload=NULL WHERE payload IS NOT NULL AND message_id IN"
                " (SELECT id FROM messages WHERE raw IS NULL)"
            )
            return cur.rowcount, len(ids)

        result: tuple[int, int] = await self._submit(op)
        return result


_Entry = tuple[Op, "asyncio.Future[Any] | None", "Callable[[Any], None] | None"]


class _Failed:
    __slots__ = ("kind",)

    def __init__(self, kind: str) -> None:
        self.kind = kind


_INSERT_STAGE = (
    "INSERT INTO stages (message_id, stage, status, at, content_type, payload, detail) VALUES (?,?,?,?,?,?,?)"
)


def _stage_row(message_id: str, stage: StageRecord, now: float) -> tuple[Any, ...]:
    return (
        message_id,
        stage.stage,
        stage.status.value,
        now,
        stage.content_type,
        stage.payload,
        orjson.dumps(dict(stage.detail)).decode() if stage.detail else None,
    )


def _migrate(conn: sqlite3.Connection) -> None:
    """Schema 1 → 2: the folded trace columns (see _V2_COLUMNS)."""
    have = {r[1] for r in conn.execute("PRAGMA table_info(messages)")}
    missing = [(name, kind) for name, kind in _V2_COLUMNS if name not in have]
    if not missing:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        for name, kind in missing:
            conn.execute(f"ALTER TABLE messages ADD COLUMN {name} {kind}")
        conn.execute("UPDATE meta SET value='2' WHERE key='schema_version'")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _outcome(stage_row: tuple[Any, ...], destinations: Sequence[str]) -> str:
    """A payload-less stage row (see _stage_row) and the destinations that took the message.
    "detail" keeps the row's text, so a replay can move it into a row of its own unchanged."""
    _, stage, status, at, content_type, _, detail = stage_row
    return orjson.dumps(
        {
            "stage": stage,
            "status": status,
            "at": at,
            "detail": detail,
            "content_type": content_type,
            "destinations": list(destinations),
        }
    ).decode()


def _folded(row: sqlite3.Row) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The stages and deliveries kept in the message row, shaped as rows of their own tables."""
    stages: list[dict[str, Any]] = []
    deliveries: list[dict[str, Any]] = []
    if row["ack_meta"]:
        meta = orjson.loads(row["ack_meta"])
        stages.append(
            {
                "stage": "ack",
                "status": meta["status"],
                "at": row["received_at"],
                "content_type": HL7_V2,
                "payload": row["ack"],
                "detail": orjson.dumps({"code": meta["code"]}).decode(),
            }
        )
    if row["outcome"]:
        outcome = orjson.loads(row["outcome"])
        stages.append(
            {**{k: outcome[k] for k in ("stage", "status", "at", "detail", "content_type")}, "payload": None}
        )
        deliveries = [
            {
                "destination": d,
                "status": Status.SENT.value,
                "attempts": 1,
                "updated_at": outcome["at"],
                "last_error": None,
            }
            for d in outcome["destinations"]
        ]
    return stages, deliveries


def _insert_in_time(stages: list[Mapping[str, Any]], stage: Mapping[str, Any]) -> None:
    """Place a folded stage before the first stage written after it; rows keep their order."""
    for i, other in enumerate(stages):
        if other["at"] > stage["at"]:
            stages.insert(i, stage)
            return
    stages.append(stage)


def _error_of(stage: StageRecord) -> str | None:
    code = stage.detail.get("error")
    return str(code) if code else None


def first_status(conn: sqlite3.Connection, message_id: str) -> str:
    row = conn.execute("SELECT status FROM messages WHERE id=?", (message_id,)).fetchone()
    return str(row[0]) if row else Status.RECEIVED.value


def _envelope_of(row: sqlite3.Row) -> Envelope:
    return Envelope(
        id=row["id"],
        channel=row["channel"],
        source=row["source"],
        raw=row["raw"] or b"",
        content_type=row["content_type"],
        sender=row["sender"],
        control_id=row["control_id"],
        message_type=row["message_type"],
        partition_key=row["partition_key"],
        received_at=row["received_at"],
        trace_id=row["trace_id"],
        charset=row["charset"],
        peer=row["peer"],
        status=Status(row["status"]),
    )


def _log_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and (exc := fut.exception()) is not None:
        log.error("journal_write_failed", error=type(exc).__name__, sqlstate=getattr(exc, "sqlstate", None))
