"""Journal and message store on PostgreSQL (asyncpg), for several gateway nodes sharing one database.

Same semantics as the SQLite store (gateway.store.messages.sqlite): dedupe by channel + sender + MSH-10,
a per-stage trace, per-destination delivery rows, replay, dead letters, retention. Writes are
grouped like there: everything queued while a transaction runs goes into the next one, so one
commit (one WAL flush on the server) covers many writes.

When the connection is lost, trace writes stay queued and are retried until the database is
back (``ping`` fails meanwhile, so ``/ready`` says not ready); journal appends fail at once with
StoreError, so that the sender is answered AE and sends again instead of waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from gateway.core.envelope import Envelope
from gateway.core.errors import StoreError
from gateway.core.logging import get_logger
from gateway.core.protocols import AppendResult
from gateway.store.messages import sql
from gateway.store.messages.core import Ack, SqlMessageStore, Then
from gateway.store.messages.sql import POSTGRES, Kind, Ops, Trace
from gateway.store.messages.views import content_digest, settle
from gateway.store.pg_errors import POSTGRES_ERRORS, classify, translate, unavailable
from gateway.store.pg_errors import Kind as ErrorKind
from gateway.store.postgres import connect_pool, migrate, redacted

log = get_logger("passerelle.store")

Conn = Any  # an asyncpg connection (the library ships no type information)
Op = Callable[[Conn], Any]  # a coroutine function of the connection
T = TypeVar("T")

# Each entry upgrades the schema by one version; applied in order at start-up, under a lock,
# so that nodes starting together do not race.
MIGRATIONS: tuple[str, ...] = (
    POSTGRES.tables()
    + """
    CREATE INDEX messages_status ON messages(status, seq);
    CREATE INDEX messages_channel ON messages(channel, seq);
    CREATE INDEX messages_control ON messages(control_id);
    CREATE INDEX messages_updated ON messages(updated_at);
    CREATE INDEX stages_message ON stages(message_id, seq);
    """,
    # Settings every node must share, e.g. the key of the patients' partition digests.
    "CREATE TABLE installation (name TEXT PRIMARY KEY, value BYTEA NOT NULL);",
    # /api/messages?since=&until= filters on the receipt time.
    "CREATE INDEX IF NOT EXISTS messages_received ON messages(received_at);",
    # A digest of the raw bytes, compared where the dedupe key is checked (see sql.insert). Rows
    # written before have none: their raw bytes are digested when needed.
    "ALTER TABLE messages ADD COLUMN IF NOT EXISTS digest TEXT;",
)


class PostgresStore(SqlMessageStore):
    """Journal + message store on PostgreSQL (see ``SqlMessageStore``)."""

    dialect = POSTGRES

    def __init__(
        self, dsn: str, *, schema: str | None = None, max_batch: int = 1024, pool_size: int = 8
    ) -> None:
        self.dsn = dsn
        self.schema = schema
        self._max_batch = max_batch
        self._pool_size = pool_size
        self._pool: Any = None
        self._queue: list[_Entry] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self.connected = False
        self.writer_restarts = 0
        self.retry_backoff = (0.1, 5.0)  # first and longest wait between tries while unreachable
        self.lost_batches = 0  # batches put back because the database could not be reached
        self.schema_version = 0
        self.commits = 0
        self.committed_ops = 0

    @property
    def is_open(self) -> bool:
        return self._pool is not None

    # -- life cycle -------------------------------------------------------

    async def open(self) -> None:
        self._pool = await connect_pool(self.dsn, self.schema, max_size=self._pool_size)
        try:
            self.schema_version = await migrate(self._pool, MIGRATIONS, "message_schema_version")
        except POSTGRES_ERRORS as exc:
            await self._pool.close()
            self._pool = None
            raise translate(exc, f"cannot migrate the store at {redacted(self.dsn)}", detail=True) from exc
        self.connected = True
        self._closing = False
        self._start_writer()

    async def close(self) -> None:
        if self._pool is None:
            return
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            try:
                async with asyncio.timeout(10):
                    await self._writer
            except TimeoutError:
                self._writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._writer
            self._writer = None
        for _, fut, callback in self._queue:
            settle(fut, callback, StoreError("the store closed before this write"))
        self._queue.clear()
        await self._pool.close()
        self._pool = None

    async def ping(self) -> None:
        if self._writer is None or self._writer.done():
            raise StoreError("the store's writer is not running")
        await self.read(sql.ping)

    def write_health(self) -> dict[str, Any]:
        """Whether the store commits. After a failed batch (link lost, disk full) it does not until
        a batch lands: trace writes wait in the queue meanwhile, and when none does, a small write
        is queued in their place, so that the state is found again without outside traffic."""
        if not self.connected and not self._queue and self._pool is not None and not self._closing:
            self._enqueue(_probe, None, None)  # kept and retried like a trace write
        return {"ok": self.connected, "queued_writes": len(self._queue)}

    # -- the grouped writer -------------------------------------------------

    def _start_writer(self) -> None:
        self._writer = asyncio.create_task(self._write_loop(), name="pg-store-writer")
        self._writer.add_done_callback(self._writer_stopped)

    def _writer_stopped(self, task: asyncio.Task[None]) -> None:
        """The writer must outlive every write: if it stops before close(), the writes at the
        head of the queue are failed (they may be what stopped it) and a new writer starts."""
        if self._closing or self._pool is None:
            return
        exc = None if task.cancelled() else task.exception()
        log.error("store_writer_stopped", error=type(exc).__name__ if exc else "cancelled")
        self.writer_restarts += 1
        head, self._queue[: self._max_batch] = self._queue[: self._max_batch], []
        for _, fut, callback in head:
            settle(fut, callback, StoreError("the store's writer stopped during this write"))
        self._start_writer()

    def _enqueue(
        self, op: Op, fut: asyncio.Future[Any] | None, callback: Callable[[Any], None] | None
    ) -> None:
        if self._pool is None or self._closing:
            raise StoreError("the store is not open")
        self._queue.append((op, fut, callback))
        self._wake.set()

    def _submit(self, op: Op) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._enqueue(op, fut, None)
        return fut

    async def _write_loop(self) -> None:
        backoff, failures = self.retry_backoff[0], 0
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = self._queue[: self._max_batch]
            try:
                results = await self._run_batch(batch)
            except Exception as exc:  # noqa: BLE001 - the writer must not die with one batch
                # What escapes _run_batch is a lost link or a failure to get a connection at all
                # (an InterfaceError from the pool); a wrong write is answered inside it.
                kind = classify(exc, acquiring=True)
                if kind is None or not kind.transient:
                    log.error("store_batch_failed", error=type(exc).__name__)
                    results = [translate(exc, "store write failed")] * len(batch)
                    del self._queue[: len(batch)]
                    for (_, fut, callback), result in zip(batch, results, strict=True):
                        settle(fut, callback, result)
                    continue
                if self.connected:
                    state = getattr(exc, "sqlstate", None)
                    log.error(
                        "store_connection_lost" if kind is ErrorKind.LINK_LOST else "store_cannot_commit",
                        error=type(exc).__name__,
                        sqlstate=state if isinstance(state, str) else None,
                    )
                self.connected = False
                # Appends answer the sender now (AE: send again); trace writes wait for the database.
                keep = []
                for entry in batch:
                    if entry[2] is not None:
                        settle(entry[1], entry[2], StoreError("the store is unreachable"))
                    else:
                        keep.append(entry)
                self._queue[: len(batch)] = keep
                failures += 1
                if self._closing and failures >= 3:
                    for _, fut, cb in self._queue:
                        settle(fut, cb, StoreError("the store is unreachable"))
                    self._queue.clear()
                    return
                self.lost_batches += 1
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.retry_backoff[1])
                continue
            del self._queue[: len(batch)]
            if not self.connected:
                log.info("store_connection_restored")
            self.connected = True
            backoff, failures = self.retry_backoff[0], 0
            self.commits += 1
            self.committed_ops += len(batch)
            for (_, fut, callback), result in zip(batch, results, strict=True):
                settle(fut, callback, result)

    async def _run_batch(self, batch: list[_Entry]) -> list[Any]:
        async with self._pool.acquire() as conn:
            try:
                async with conn.transaction():
                    return [await op(conn) for op, _, _ in batch]
            except Exception as exc:  # sorted below: lost link, full disk, or one wrong write
                if unavailable(exc, conn):
                    raise
            # One write is wrong: each in its own transaction, so it does not sink the others.
            results: list[Any] = []
            for op, _, _ in batch:
                try:
                    async with conn.transaction():
                        results.append(await op(conn))
                except Exception as exc:  # any failure of one write is that write's answer
                    if unavailable(exc, conn):
                        raise
                    results.append(translate(exc, "store write failed"))
            return results

    async def flush(self) -> None:
        """Wait until every write queued so far is committed."""
        await self.write(sql.nothing)

    # -- journal -------------------------------------------------------------

    def append_then(self, envelopes: Sequence[Envelope], then: Then, *, ack: Ack = None) -> None:
        rows = [sql.message_row(e, content_digest(e.raw)) for e in envelopes]
        self._enqueue(_op(lambda: sql.append_rows(POSTGRES, rows, ack)), None, then)

    async def admit(
        self, envelope: Envelope, ack: tuple[bytes, str] | None
    ) -> tuple[AppendResult, str | None]:
        """Journal an envelope taken from a shared queue, which may be a redelivery of one already here.

        Returns the append result and, when this very envelope was already stored, its status.
        """
        row = sql.message_row(envelope, content_digest(envelope.raw))
        return await self.write(lambda: sql.insert(POSTGRES, row, ack))

    def write_trace(self, trace: Trace) -> asyncio.Future[Any]:
        fut = self._submit(_op(trace.apply))
        fut.add_done_callback(_log_failure)
        return fut

    def finish(self, message_id: str) -> asyncio.Future[Any]:
        """Every delivery is settled: the message is DEAD when one of them is, SENT otherwise."""
        fut = self._submit(_op(lambda: sql.finish(message_id)))
        fut.add_done_callback(_log_failure)
        return fut

    async def shared_secret(self, name: str) -> bytes:
        """A random secret made by the first node that asks, then the same for all."""
        return await self.write(lambda: sql.shared_secret(name, os.urandom(32)))

    def _journal_stats(self) -> dict[str, Any]:
        return {"commits": self.commits, "ops": self.committed_ops, "queued_writes": len(self._queue)}

    # -- running operations --------------------------------------------------------

    async def read(self, ops: Callable[[], Ops[T]]) -> T:
        if self._pool is None:
            raise StoreError("the store is not open")
        try:
            async with self._pool.acquire(timeout=5) as conn:
                return await run(conn, ops())
        except POSTGRES_ERRORS as exc:
            raise translate(exc, "store read failed") from exc

    async def write(self, ops: Callable[[], Ops[T]]) -> T:
        result: T = await self._submit(_op(ops))
        return result


async def run(conn: Conn, ops: Ops[T]) -> T:
    """Drive one operation of ``sql`` on this connection."""
    try:
        query = next(ops)
        while True:
            kind, statement, args = query
            text = sql.numbered(statement)
            answer: Any
            if kind is Kind.VALUE:
                answer = await conn.fetchval(text, *args)
            elif kind is Kind.ONE:
                answer = await conn.fetchrow(text, *args)
            elif kind is Kind.ALL:
                answer = await conn.fetch(text, *args)
            elif kind is Kind.MANY:
                answer = await conn.executemany(text, args)
            else:
                status = await conn.execute(text, *args)  # e.g. "UPDATE 3"
                answer = int(status.rsplit(" ", 1)[-1]) if status[-1:].isdigit() else 0
            query = ops.send(answer)
    except StopIteration as stop:
        result: T = stop.value
        return result


def _op(ops: Callable[[], Ops[Any]]) -> Op:
    async def op(conn: Conn) -> Any:
        return await run(conn, ops())

    return op


_Entry = tuple[Op, "asyncio.Future[Any] | None", "Callable[[Any], None] | None"]


async def _probe(conn: Conn) -> None:
    """A real write (a row version, WAL): lands only when the database commits again."""
    await conn.execute(
        "INSERT INTO installation (name, value) VALUES ('write_probe', $1)"
        " ON CONFLICT (name) DO UPDATE SET value=excluded.value",
        os.urandom(8),
    )


def _log_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and (exc := fut.exception()) is not None:
        log.error("journal_write_failed", error=type(exc).__name__, sqlstate=getattr(exc, "sqlstate", None))
