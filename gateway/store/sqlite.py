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
import itertools
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
from gateway.store.message_views import (
    CONFLICT_CODE,
    content_digest,
    message_counts,
    message_filters,
    same_content,
    settle,
    trace_stage,
)

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
    outcome TEXT,
    digest TEXT
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
INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', '3');
"""
# The commonest trace entries live in the message's own row instead of rows of their own: the ACK
# sent on commit (ack, ack_meta) and a first-try delivery to every destination (outcome). Each saves
# statements and WAL pages on the hot path; readers show them as the stages and deliveries they are.
_V2_COLUMNS = (("ack", "BLOB"), ("ack_meta", "TEXT"), ("outcome", "TEXT"))
# Schema 3: a digest of the raw bytes, compared where the dedupe key is checked, so that a resend is
# told from another message that reuses an MSH-10 (see append_then). Rows written before have none:
# their raw bytes are digested when needed.
_V3_COLUMNS = (("digest", "TEXT"),)
SCHEMA_VERSION = 3

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
        # Trace writes that could not be committed yet, per message, oldest first (see _defer).
        self._backlog: dict[str, _Trace] = {}
        self._deferring = False
        self._write_error: str | None = None  # why the last commit failed, until one succeeds
        self._retry_handle: asyncio.TimerHandle | None = None
        self._retry_delay = _RETRY_FIRST
        self.close_grace = 5.0  # how long close() keeps trying to write the backlog
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
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.close_grace
        pause = 0.001
        while self._appends or self._pending or self._committing or self._backlog:
            if not self._committing:
                self._flush()
                if self._backlog and not self._committing:
                    if loop.time() >= give_up:
                        break
                    pause = min(pause * 2, 0.25)  # the disk is still full: back off
            await asyncio.sleep(pause)
        if self._retry_handle is not None:
            self._retry_handle.cancel()
            self._retry_handle = None
        if self._backlog:
            log.error("journal_trace_lost", messages=len(self._backlog), error=self._write_error or "unknown")
            self._backlog.clear()
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

    def write_health(self) -> dict[str, Any]:
        """Whether the journal commits: readiness says not ready while the last commit failed or
        trace writes wait to be written again (a full disk, an I/O error)."""
        health: dict[str, Any] = {
            "ok": self._write_error is None and not self._backlog,
            "deferred_messages": len(self._backlog),
        }
        if self._write_error is not None:
            health["error"] = self._write_error
        return health

    # -- the group-commit writer -------------------------------------------
    #
    # Writes are applied on the event loop's own thread, once per loop turn: every write submitted
    # meanwhile shares one transaction. Only COMMIT (the fsync) goes to a thread, one hop per batch,
    # and the loop gathers the next batch meanwhile. Running the SQL itself on a writer thread
    # measured slower here: GIL hand-offs for every statement.
    #
    # Trace writes (stages, deliveries, statuses) are data (a _Trace per message). One that cannot
    # be committed for a reason that time can cure (a full disk, an I/O error, a lock) is kept in
    # the backlog, merged with the message's other waiting writes, and written again ahead of the
    # next batches, with back-off while nothing else is written: a write of a message's trace is
    # never lost nor applied before the ones that came before it. Readiness says not ready meanwhile.

    def _submit(self, op: Op, *, append: bool = False) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._enqueue((op, fut, None, None), append)
        return fut

    def _enqueue(self, entry: _Entry, append: bool) -> None:
        if self._wconn is None or self._closing:
            raise StoreError("the journal is not open")
        (self._appends if append else self._pending).append(entry)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _trace_write(self, trace: _Trace, op: Op | None = None) -> asyncio.Future[Any]:
        """A trace write nobody has to await (``op``: a faster form of ``trace.apply``). Kept and
        written again when the journal cannot commit it now; a write given up is logged."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_log_failure)
        self._enqueue((op or trace.apply, fut, None, trace), False)
        return fut

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._committing:
            return  # the commit in flight reschedules when it lands
        # What waits in the backlog goes first (the oldest writes), then the appends, which gate
        # ACKs and so jump ahead of the trace writes. Safe: any later write about a message is
        # only submitted once that message's append has committed.
        batch = self._take_backlog(self._max_batch)
        batch += self._appends
        self._appends = []
        # Trace writes fill the rest, bounded so that one commit stays short for the next ACKs.
        room = max(self._max_batch - len(batch), 64)
        taken = self._pending[:room]
        del self._pending[:room]
        for entry in taken:
            trace = entry[3]
            if trace is not None and trace.message_id in self._backlog:
                # Older writes of this message still wait: this one waits behind them.
                self._defer(trace)
                _settle_entry(entry, _DEFERRED)
            else:
                batch.append(entry)
        if not batch:
            return
        conn = self._wconn
        assert conn is not None
        try:
            conn.execute("BEGIN IMMEDIATE")
            results = [op(conn) for op, _, _, _ in batch]
        except sqlite3.Error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._settle(batch, self._run_isolated(batch))
            self._after_write()
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
            # Nothing of the batch is written: trace writes are kept, the rest is answered.
            retry = _retryable(exc)
            results = []
            for _, _, _, trace in batch:
                if trace is not None and retry:
                    self._defer(trace)
                    results.append(_DEFERRED)
                else:
                    results.append(StoreError(f"journal commit failed: {type(exc).__name__}"))
            self._commit_failed(exc)
        else:
            self.commits += 1
            self.committed_ops += len(batch)
            self._commit_succeeded()
        self._settle(batch, results)
        self._after_write()

    def _reschedule(self) -> None:
        if (self._appends or self._pending) and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _after_write(self) -> None:
        self._reschedule()
        if self._backlog and self._write_error is None:
            # The journal commits again: what still waits goes next, without waiting for a timer.
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
        elif self._backlog or self._write_error is not None:
            self._arm_retry()

    def _settle(self, batch: list[_Entry], results: list[Any]) -> None:
        for entry, result in zip(batch, results, strict=True):
            _settle_entry(entry, result)

    def _run_isolated(self, batch: list[_Entry]) -> list[Any]:
        """After a failed batch: each write in its own transaction, so one bad write does not sink
        the rest. A trace write that fails for a reason time can cure is kept for later."""
        conn = self._wconn
        assert conn is not None
        results: list[Any] = []
        failure: BaseException | None = None
        landed = 0
        for op, _, _, trace in batch:
            if trace is not None and trace.message_id in self._backlog:
                self._defer(trace)  # an earlier write of this message failed just now
                results.append(_DEFERRED)
                continue
            try:
                conn.execute("BEGIN IMMEDIATE")
                results.append(op(conn))
                conn.execute("COMMIT")
                landed += 1
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if _retryable(exc):
                    failure = exc
                    if trace is not None:
                        self._defer(trace)
                        results.append(_DEFERRED)
                        continue
                results.append(_Failed(type(exc).__name__))
        self.commits += 1
        self.committed_ops += landed
        if failure is not None:
            self._commit_failed(failure)
        elif landed:
            self._commit_succeeded()
        return results

    # -- the backlog: trace writes the journal could not commit yet --------------

    def _defer(self, trace: _Trace) -> None:
        held = self._backlog.get(trace.message_id)
        if held is None:
            if not self._deferring:
                self._deferring = True
                log.warning("journal_trace_deferred")
            self._backlog[trace.message_id] = trace
        elif held is not trace:
            held.merge(trace)

    def _take_backlog(self, limit: int) -> list[_Entry]:
        """The oldest waiting traces, as writes of the next batch (the rest keep waiting)."""
        if not self._backlog:
            return []
        ids = list(itertools.islice(self._backlog, limit))
        return [(t.apply, None, None, t) for t in (self._backlog.pop(mid) for mid in ids)]

    def _commit_failed(self, exc: BaseException) -> None:
        kind = _error_kind(exc)
        if self._write_error is None:
            log.error("journal_commit_failed", error=kind)
        self._write_error = kind

    def _commit_succeeded(self) -> None:
        if self._write_error is not None:
            log.info("journal_commit_restored", deferred_messages=len(self._backlog))
            self._write_error = None
        if not self._backlog:
            self._retry_delay = _RETRY_FIRST
            if self._deferring:
                self._deferring = False
                log.info("journal_trace_written")

    def _arm_retry(self) -> None:
        """While the backlog waits or the last commit failed, try again after a back-off even
        when nothing else is written: the backlog itself, else a small write that needs a page."""
        if self._retry_handle is not None or self._closing or self._wconn is None:
            return
        delay = self._retry_delay
        self._retry_delay = min(delay * 2, _RETRY_LONGEST)
        self._retry_handle = asyncio.get_running_loop().call_later(delay, self._retry)

    def _retry(self) -> None:
        self._retry_handle = None
        if self._closing or self._wconn is None:
            return
        if self._backlog:
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
        elif self._write_error is not None:
            self._enqueue((_probe, None, None, None), False)
        # Each try ends in _after_write, which arms the next one while still needed.

    def _backlog_releases(self, message_id: str) -> bool:
        """A release of this message's dedupe key waits in the backlog (it was decided before)."""
        held = self._backlog.get(message_id)
        return held is not None and held.release

    async def flush(self) -> None:
        """Wait until every write queued so far is committed (StoreError while some must wait)."""
        await self._submit(lambda conn: None)
        if self._backlog:
            raise StoreError("trace writes are waiting for the journal to commit again")

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
        """Like ``append``, but ``then`` is called right after the commit, in the same loop turn.

        Dedupe: an envelope whose key (channel, sender, MSH-10) is already held is a duplicate
        only when its bytes are the same (their digests match). Another message under a seen
        MSH-10 is kept as a row of its own, status ERROR, without key nor ACK, and answered as a
        conflict (see AppendResult): the sender is told, and nothing is thrown away.
        """
        ack_payload = ack[0] if ack else None
        rows: list[tuple[Any, ...]] = [
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
                content_digest(e.raw),
            )
            for e in envelopes
        ]
        releases = self._backlog_releases

        def op(conn: sqlite3.Connection) -> list[AppendResult]:
            out = []
            for row in rows:
                got = conn.execute(_INSERT_MESSAGE, row).fetchone()
                if got is not None:
                    out.append(AppendResult(row[0], False, got[0]))
                    continue
                first = conn.execute(
                    "SELECT id, seq, digest, CASE WHEN digest IS NULL THEN raw END FROM messages"
                    " WHERE dedupe_key=?",
                    (row[_KEY],),
                ).fetchone()
                if releases(first[0]):
                    # Its sender was answered AE and the release waits in the backlog: apply it now.
                    conn.execute("UPDATE messages SET dedupe_key=NULL WHERE id=?", (first[0],))
                    got = conn.execute(_INSERT_MESSAGE, row).fetchone()
                    out.append(AppendResult(row[0], False, got[0]))
                    continue
                if not same_content(first[2], first[3], row[_DIGEST]):
                    out.append(_insert_conflict(conn, row, first[0]))
                    continue
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

        self._enqueue((op, None, then, None), True)

    def record(self, message_id: str, stage: StageRecord, *, status: Status | None = None) -> Awaitable[None]:
        now = time.time()
        trace = _Trace(message_id)
        trace.stages.append(_stage_row(message_id, stage, now))
        if status is not None:
            trace.status = (status.value, now, _error_of(stage))
        return self._trace_write(trace)

    def queue_deliveries(
        self, message_id: str, stage: StageRecord, destinations: Sequence[str], *, sent: bool = False
    ) -> Awaitable[None]:
        """Record the transform and one delivery row per destination: QUEUED, or SENT when ``sent``
        (every destination already took the message on its first attempt)."""
        now = time.time()
        stage_row = _stage_row(message_id, stage, now)
        status = Status.QUEUED.value if destinations and not sent else Status.SENT.value
        attempts = 1 if sent else 0
        trace = _Trace(message_id)
        trace.stages.append(stage_row)
        for d in destinations:
            trace.deliveries[d] = (status, attempts, now, None, True)
        trace.status = (status, now, None)
        if status != Status.SENT.value or stage.payload is not None:
            return self._trace_write(trace)
        # Delivered at the first try (or nowhere to deliver): one UPDATE keeps it in the message row.
        outcome = _outcome(stage_row, destinations)

        def folded(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                "UPDATE messages SET status=?, updated_at=?, error=NULL, outcome=?"
                " WHERE id=? AND outcome IS NULL",
                (status, now, outcome, message_id),
            )
            if not cur.rowcount:  # the row already holds one: rows of their own, as before
                trace.apply(conn)

        # Kept for later as rows of their own (the trace), should this write have to wait.
        return self._trace_write(trace, folded)

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
        trace = _Trace(message_id)
        trace.deliveries[destination] = (status.value, attempts, now, error, False)
        if stage is not None:
            trace.stages.append(_stage_row(message_id, stage, now))
        if message_status is not None:
            trace.status = (message_status.value, now, error)
        return self._trace_write(trace)

    def release_dedupe(self, message_id: str) -> Awaitable[None]:
        """The sender was told AE/AR: let a resend of the same MSH-10 be processed afresh."""
        trace = _Trace(message_id)
        trace.release = True
        return self._trace_write(trace)

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
            "deferred_messages": len(self._backlog),
            "commit_failing": self._write_error is not None,
        }
        return result

    # -- operator actions --------------------------------------------------------

    def _settled(self, message_id: str) -> None:
        if message_id in self._backlog:
            raise StoreError("this message's trace is still waiting to be written; try again shortly")

    async def reset_for_replay(self, message_id: str) -> WorkItem | None:
        self._settled(message_id)
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
        self._settled(message_id)
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


class _Failed:
    __slots__ = ("kind",)

    def __init__(self, kind: str) -> None:
        self.kind = kind


class _DeferredError(StoreError):
    """A trace write that could not be committed now: it is kept and written later."""


_DEFERRED = _Failed("deferred")
_RETRY_FIRST = 0.05
_RETRY_LONGEST = 2.0
# Stage rows kept per waiting message: the first half and the latest, with a count of the others.
_MAX_DEFERRED_STAGES = 64

# SQLite result codes (the primary code, the low byte) that time or an operator can cure.
_TRANSIENT_CODES = frozenset(
    {
        5,  # SQLITE_BUSY
        6,  # SQLITE_LOCKED
        7,  # SQLITE_NOMEM
        8,  # SQLITE_READONLY
        10,  # SQLITE_IOERR
        13,  # SQLITE_FULL
        14,  # SQLITE_CANTOPEN
        15,  # SQLITE_PROTOCOL
    }
)


def _retryable(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return (code & 0xFF) in _TRANSIENT_CODES
    return isinstance(exc, sqlite3.OperationalError)


def _error_kind(exc: BaseException) -> str:
    name = getattr(exc, "sqlite_errorname", None)
    return name if isinstance(name, str) else type(exc).__name__


class _Trace:
    """The trace writes about one message, as data: applied by one write, and merged with the
    message's later writes while they wait (so that the backlog holds one per message)."""

    __slots__ = ("deliveries", "dropped", "message_id", "release", "stages", "status")

    def __init__(self, message_id: str) -> None:
        self.message_id = message_id
        self.stages: list[tuple[Any, ...]] = []  # stage rows (see _stage_row), in order
        # destination → (status, attempts, at, last error, may insert the row)
        self.deliveries: dict[str, tuple[str, int, float, str | None, bool]] = {}
        self.status: tuple[str, float, str | None] | None = None  # (status, at, error)
        self.release = False  # the dedupe key is released
        self.dropped = 0  # stage rows left out to bound the memory a waiting message holds

    def merge(self, later: _Trace) -> None:
        """Add ``later``'s writes after these: rows append, states take the latest value."""
        self.stages += later.stages
        self.dropped += later.dropped
        excess = len(self.stages) - _MAX_DEFERRED_STAGES
        if excess > 0:
            half = _MAX_DEFERRED_STAGES // 2
            del self.stages[half : half + excess]
            self.dropped += excess
        for destination, state in later.deliveries.items():
            before = self.deliveries.get(destination)
            self.deliveries[destination] = state if before is None else (*state[:4], state[4] or before[4])
        if later.status is not None:
            self.status = later.status
        self.release = self.release or later.release

    def apply(self, conn: sqlite3.Connection) -> None:
        mid = self.message_id
        if len(self.stages) == 1:
            conn.execute(_INSERT_STAGE, self.stages[0])
        elif self.stages:
            conn.executemany(_INSERT_STAGE, self.stages)
        if self.dropped:
            last = self.stages[-1]
            detail = orjson.dumps({"stages_left_out": self.dropped}).decode()
            conn.execute(_INSERT_STAGE, (mid, "trace_coalesced", last[2], last[3], None, None, detail))
        for destination, (status, attempts, at, error, insert) in self.deliveries.items():
            if insert:
                conn.execute(_UPSERT_DELIVERY, (mid, destination, status, attempts, at, error))
            else:
                conn.execute(
                    "UPDATE deliveries SET status=?, attempts=?, updated_at=?, last_error=?"
                    " WHERE message_id=? AND destination=?",
                    (status, attempts, at, error, mid, destination),
                )
        if self.status is not None:
            conn.execute(
                "UPDATE messages SET status=?, updated_at=?, error=? WHERE id=?", (*self.status, mid)
            )
        if self.release:
            conn.execute("UPDATE messages SET dedupe_key=NULL WHERE id=?", (mid,))


_UPSERT_DELIVERY = (
    "INSERT INTO deliveries (message_id, destination, status, attempts, updated_at, last_error)"
    " VALUES (?,?,?,?,?,?) ON CONFLICT DO UPDATE SET status=excluded.status, attempts=excluded.attempts,"
    " updated_at=excluded.updated_at, last_error=excluded.last_error"
)

_Entry = tuple[Op, "asyncio.Future[Any] | None", "Callable[[Any], None] | None", "_Trace | None"]


def _settle_entry(entry: _Entry, result: Any) -> None:
    _, fut, callback, trace = entry
    if result is _DEFERRED:
        result = _DeferredError("the journal could not commit this write now; it is kept and retried")
    elif isinstance(result, _Failed):
        result = StoreError(f"journal write failed: {result.kind}")
    if fut is None and callback is None:
        if trace is not None and isinstance(result, StoreError) and not isinstance(result, _DeferredError):
            # A write from the backlog, given up (a failure time does not cure): say so once.
            log.error("journal_write_failed", error=result.message, message_id=trace.message_id)
        return
    settle(fut, callback, result)  # a callback now, in this turn: the ACK leaves without another


def _probe(conn: sqlite3.Connection) -> None:
    """A write that needs pages, rolled into nothing: succeeds only when the journal can commit."""
    conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('write_probe', ?)", ("." * 8192,))
    conn.execute("DELETE FROM meta WHERE key='write_probe'")


_INSERT_MESSAGE = (
    "INSERT INTO messages (id, channel, source, received_at, updated_at, status, sender,"
    " control_id, message_type, partition_key, content_type, charset, trace_id, peer, raw,"
    " dedupe_key, ack, ack_meta, digest) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT(dedupe_key) DO NOTHING RETURNING seq"
)
_KEY = 15  # positions in a message row (see append_then)
_DIGEST = 18


def _insert_conflict(conn: sqlite3.Connection, row: tuple[Any, ...], first_id: str) -> AppendResult:
    """Keep a message that reuses another's MSH-10: its own row, ERROR, no key, no ACK yet."""
    kept = (*row[:5], Status.ERROR.value, *row[6:_KEY], None, None, None, row[_DIGEST])
    seq = conn.execute(_INSERT_MESSAGE, kept).fetchone()[0]
    conn.execute("UPDATE messages SET error=? WHERE seq=?", (CONFLICT_CODE, seq))
    detail = {
        "error": CONFLICT_CODE,
        "text": "MSH-10 is already used by another message with other content",
        "location": "MSH-10",
        "conflicts_with": first_id,
        "peer": row[13],
    }
    conn.execute(
        _INSERT_STAGE,
        (row[0], "intake", Status.ERROR.value, row[3], None, None, orjson.dumps(detail).decode()),
    )
    return AppendResult(row[0], True, seq, conflict=True)


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
    """Schema 1 → 2: the folded trace columns (see _V2_COLUMNS); 2 → 3: the content digest
    (_V3_COLUMNS). Columns only are added, so a journal of any earlier version opens in place."""
    have = {r[1] for r in conn.execute("PRAGMA table_info(messages)")}
    missing = [(name, kind) for name, kind in (*_V2_COLUMNS, *_V3_COLUMNS) if name not in have]
    if not missing:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        for name, kind in missing:
            conn.execute(f"ALTER TABLE messages ADD COLUMN {name} {kind}")
        conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))
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
    if not fut.cancelled() and (exc := fut.exception()) is not None and not isinstance(exc, _DeferredError):
        log.error("journal_write_failed", error=type(exc).__name__, sqlstate=getattr(exc, "sqlstate", None))
