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
import itertools
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from gateway.core.envelope import Envelope
from gateway.core.errors import StoreError
from gateway.core.logging import get_logger
from gateway.core.protocols import AppendResult, shard_of
from gateway.store.messages import sql
from gateway.store.messages.core import Ack, SqlMessageStore, Then
from gateway.store.messages.sql import SQLITE, Kind, Ops, Trace
from gateway.store.messages.views import content_digest, settle

log = get_logger("passerelle.store")

Op = Callable[[sqlite3.Connection], Any]

_SCHEMA = (
    SQLITE.tables(
        exists="IF NOT EXISTS ",
        message_columns=",\n    ack BLOB,\n    ack_meta TEXT,\n    outcome TEXT,\n    digest TEXT",
        table_options=" WITHOUT ROWID",
    )
    + """
CREATE INDEX IF NOT EXISTS messages_status ON messages(status, seq);
CREATE INDEX IF NOT EXISTS messages_channel ON messages(channel, seq);
CREATE INDEX IF NOT EXISTS messages_control ON messages(control_id);
CREATE INDEX IF NOT EXISTS messages_received ON messages(received_at);
CREATE INDEX IF NOT EXISTS stages_message ON stages(message_id, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', '3');
"""
)
# The commonest trace entries live in the message's own row instead of rows of their own: the ACK
# sent on commit (ack, ack_meta) and a first-try delivery to every destination (outcome). Each saves
# statements and WAL pages on the hot path; readers show them as the stages and deliveries they are.
_V2_COLUMNS = (("ack", "BLOB"), ("ack_meta", "TEXT"), ("outcome", "TEXT"))
# Schema 3: a digest of the raw bytes, compared where the dedupe key is checked, so that a resend is
# told from another message that reuses an MSH-10 (see append_then). Rows written before have none:
# their raw bytes are digested when needed.
_V3_COLUMNS = (("digest", "TEXT"),)
SCHEMA_VERSION = 3

# What the WAL file is cut back to when the writer rewinds it after a complete checkpoint.
_WAL_LIMIT = 64 * 1024 * 1024
T = TypeVar("T")


class SqliteStore(SqlMessageStore):
    """Journal + message store on one SQLite file (see ``SqlMessageStore``)."""

    dialect = SQLITE

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
        self._backlog: dict[str, Trace] = {}
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
        # Reads then say the store is not open (a StoreError), not the pool's RuntimeError.
        self._rexec = self._cexec = None

    async def ping(self) -> None:
        await self.read(sql.ping)

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
    # Trace writes (stages, deliveries, statuses) are data (a Trace per message). One that cannot
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
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        """Commit in the next loop turn, once however many writes are queued meanwhile."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def write_trace(self, trace: Trace) -> asyncio.Future[Any]:
        """A trace write nobody has to await. Kept and written again when the journal cannot
        commit it now; a write given up is logged."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_log_failure)
        self._enqueue((_folded(trace) if trace.first_try else _applied(trace), fut, None, trace), False)
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

    def _after_write(self) -> None:
        if self._appends or self._pending:
            self._schedule_flush()
        if self._backlog and self._write_error is None:
            # The journal commits again: what still waits goes next, without waiting for a timer.
            self._schedule_flush()
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

    def _defer(self, trace: Trace) -> None:
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
        return [(_applied(t), None, None, t) for t in (self._backlog.pop(mid) for mid in ids)]

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
            self._schedule_flush()
        elif self._write_error is not None:
            self._enqueue((_probe, None, None, None), False)
        # Each try ends in _after_write, which arms the next one while still needed.

    def _backlog_releases(self, message_id: str) -> bool:
        """A release of this message's dedupe key waits in the backlog (it was decided before)."""
        held = self._backlog.get(message_id)
        return held is not None and held.release

    async def flush(self) -> None:
        """Wait until every write queued so far is committed (StoreError while some must wait)."""
        await self.write(sql.nothing)
        if self._backlog:
            raise StoreError("trace writes are waiting for the journal to commit again")

    # -- journal ---------------------------------------------------------------

    def append_then(self, envelopes: Sequence[Envelope], then: Then, *, ack: Ack = None) -> None:
        rows = [sql.message_row(e, content_digest(e.raw)) for e in envelopes]
        releases = self._backlog_releases

        def op(conn: sqlite3.Connection) -> list[AppendResult]:
            return run(conn, sql.append_rows(SQLITE, rows, ack, releases))

        self._enqueue((op, None, then, None), True)

    def _settled(self, message_id: str) -> None:
        if message_id in self._backlog:
            raise StoreError("this message's trace is still waiting to be written; try again shortly")

    def _journal_stats(self) -> dict[str, Any]:
        return {
            "commits": self.commits,
            "ops": self.committed_ops,
            "queued_writes": len(self._pending),
            "deferred_messages": len(self._backlog),
            "commit_failing": self._write_error is not None,
        }

    # -- running operations --------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    async def read(self, ops: Callable[[], Ops[T]]) -> T:
        if self._rexec is None:
            raise StoreError("the store is not open")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._rexec, lambda: run(self._reader(), ops()))
        except sqlite3.Error as exc:
            raise StoreError(f"store read failed: {type(exc).__name__}") from exc

    async def write(self, ops: Callable[[], Ops[T]]) -> T:
        result: T = await self._submit(lambda conn: run(conn, ops()))
        return result


def run(conn: sqlite3.Connection, ops: Ops[T]) -> T:
    """Drive one operation of ``sql`` on this connection."""
    try:
        query = next(ops)
        while True:
            kind, statement, args = query
            if kind is Kind.MANY:
                conn.executemany(statement, args)
                answer: Any = None
            else:
                cur = conn.execute(statement, args)
                if kind is Kind.VALUE:
                    row = cur.fetchone()
                    answer = None if row is None else row[0]
                elif kind is Kind.ONE:
                    answer = cur.fetchone()
                elif kind is Kind.ALL:
                    answer = cur.fetchall()
                else:
                    answer = cur.rowcount
            query = ops.send(answer)
    except StopIteration as stop:
        result: T = stop.value
        return result


def _applied(trace: Trace) -> Op:
    return lambda conn: run(conn, trace.apply())


def _folded(trace: Trace) -> Op:
    """Delivered at the first try (or nowhere to deliver): one UPDATE keeps it in the message row."""
    assert trace.status is not None
    status, now, _ = trace.status
    outcome = sql.outcome_of(trace.stages[0], trace.deliveries)

    def op(conn: sqlite3.Connection) -> None:
        cur = conn.execute(
            "UPDATE messages SET status=?, updated_at=?, error=NULL, outcome=?"
            " WHERE id=? AND outcome IS NULL",
            (status, now, outcome, trace.message_id),
        )
        if not cur.rowcount:  # the row already holds one: rows of their own, as before
            run(conn, trace.apply())

    return op


class _Failed:
    __slots__ = ("kind",)

    def __init__(self, kind: str) -> None:
        self.kind = kind


class _DeferredError(StoreError):
    """A trace write that could not be committed now: it is kept and written later."""


_DEFERRED = _Failed("deferred")
_RETRY_FIRST = 0.05
_RETRY_LONGEST = 2.0
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


_Entry = tuple[Op, "asyncio.Future[Any] | None", "Callable[[Any], None] | None", "Trace | None"]


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


def _log_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and (exc := fut.exception()) is not None and not isinstance(exc, _DeferredError):
        log.error("journal_write_failed", error=type(exc).__name__, sqlstate=getattr(exc, "sqlstate", None))
