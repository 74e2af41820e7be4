"""Journal and message store on PostgreSQL (asyncpg), for several gateway nodes sharing one database.

Same semantics as the SQLite store (gateway.store.sqlite): dedupe by channel + sender + MSH-10,
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
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import asyncpg
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
from gateway.store.pg_errors import POSTGRES_ERRORS, Kind, classify, translate, unavailable

log = get_logger("passerelle.store")

Conn = Any  # an asyncpg connection (the library ships no type information)
Op = Callable[[Conn], Awaitable[Any]]

# Each entry upgrades the schema by one version; applied in order at start-up, under a lock,
# so that nodes starting together do not race.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE messages (
        seq BIGSERIAL PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        channel TEXT NOT NULL,
        source TEXT NOT NULL,
        received_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        status TEXT NOT NULL,
        sender TEXT NOT NULL,
        control_id TEXT NOT NULL,
        message_type TEXT NOT NULL,
        partition_key TEXT NOT NULL,
        content_type TEXT NOT NULL,
        charset TEXT NOT NULL,
        trace_id TEXT NOT NULL,
        peer TEXT NOT NULL,
        raw BYTEA,
        error TEXT,
        dedupe_key TEXT UNIQUE,
        discarded_at DOUBLE PRECISION
    );
    CREATE INDEX messages_status ON messages(status, seq);
    CREATE INDEX messages_channel ON messages(channel, seq);
    CREATE INDEX messages_control ON messages(control_id);
    CREATE INDEX messages_updated ON messages(updated_at);
    CREATE TABLE stages (
        seq BIGSERIAL PRIMARY KEY,
        message_id TEXT NOT NULL,
        stage TEXT NOT NULL,
        status TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        content_type TEXT,
        payload BYTEA,
        detail JSONB
    );
    CREATE INDEX stages_message ON stages(message_id, seq);
    CREATE TABLE deliveries (
        message_id TEXT NOT NULL,
        destination TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        updated_at DOUBLE PRECISION NOT NULL,
        last_error TEXT,
        PRIMARY KEY (message_id, destination)
    );
    """,
    # Settings every node must share, e.g. the key of the patients' partition digests.
    "CREATE TABLE installation (name TEXT PRIMARY KEY, value BYTEA NOT NULL);",
    # /api/messages?since=&until= filters on the receipt time.
    "CREATE INDEX IF NOT EXISTS messages_received ON messages(received_at);",
    # A digest of the raw bytes, compared where the dedupe key is checked (see _insert). Rows
    # written before have none: their raw bytes are digested when needed.
    "ALTER TABLE messages ADD COLUMN IF NOT EXISTS digest TEXT;",
)

_MSG_COLUMNS = (
    "seq, id, channel, source, received_at, updated_at, status, sender, control_id, message_type, "
    "partition_key, content_type, charset, trace_id, peer, error, discarded_at"
)
# Built from constants only: no caller text ever reaches an SQL string.
_SELECT_BY_ID = "SELECT " + _MSG_COLUMNS + ", raw FROM messages WHERE id=$1"  # noqa: S608
_PENDING_STATUSES = [Status.RECEIVED.value, Status.TRANSFORMED.value, Status.QUEUED.value, Status.ERROR.value]
_INSERT_STAGE = (
    "INSERT INTO stages (message_id, stage, status, at, content_type, payload, detail)"
    " VALUES ($1,$2,$3,$4,$5,$6,$7::jsonb)"
)
_INSERT_MESSAGE = (
    "INSERT INTO messages (id, channel, source, received_at, updated_at, status, sender, control_id,"
    " message_type, partition_key, content_type, charset, trace_id, peer, raw, dedupe_key, digest)"
    " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17) ON CONFLICT DO NOTHING"
    " RETURNING seq"
)
_KEY = 15  # positions in a message row (see _message_row)
_DIGEST = 16


def redacted(dsn: str) -> str:
    """The DSN as it may be shown: without its password."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


# A malformed DSN is a ValueError from asyncpg.
_CONNECT_ERRORS: tuple[type[BaseException], ...] = (*POSTGRES_ERRORS, ValueError)


async def connect_pool(dsn: str, schema: str | None, *, max_size: int = 8) -> Any:
    """A pool on ``dsn``; a start-up failure is a StoreError naming the URL."""
    settings = {"search_path": schema} if schema else {}
    try:
        if schema:
            conn = await asyncpg.connect(dsn, timeout=10)
            try:
                # IF NOT EXISTS is not atomic: a node starting at the same moment may win the race.
                with contextlib.suppress(asyncpg.UniqueViolationError):
                    await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{_ident(schema)}"')
            finally:
                await conn.close()
        return await asyncpg.create_pool(
            dsn, min_size=1, max_size=max_size, server_settings=settings, timeout=10
        )
    except _CONNECT_ERRORS as exc:
        raise translate(exc, f"cannot connect to PostgreSQL at {redacted(dsn)}", detail=True) from exc


def _ident(name: str) -> str:
    if not name.replace("_", "").isalnum():
        raise StoreError(f"invalid schema name {name!r}: letters, digits and _ only")
    return name


async def migrate(pool: Any, migrations: Sequence[str], table: str) -> int:
    """Apply the migrations not yet applied; returns the schema version."""
    async with pool.acquire() as conn, conn.transaction():
        # One node migrates at a time; the others wait, then find nothing left to do.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext(current_schema() || $1))", table)
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (version INTEGER NOT NULL)")
        current = await conn.fetchval(f"SELECT max(version) FROM {table}")  # noqa: S608 - constant
        version = int(current or 0)
        for number, sql in enumerate(migrations, start=1):
            if number > version:
                await conn.execute(sql)
                await conn.execute(f"INSERT INTO {table} (version) VALUES ($1)", number)  # noqa: S608
                version = number
        return version


class PostgresStore:
    """Journal + message store. Implements ``gateway.core.protocols.MessageStore``."""

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
        await self._read(lambda c: c.fetchval("SELECT 1"))

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

    def _submit_quiet(self, op: Op) -> asyncio.Future[Any]:
        fut = self._submit(op)
        fut.add_done_callback(_log_failure)
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
                        "store_connection_lost" if kind is Kind.LINK_LOST else "store_cannot_commit",
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
        await self._submit(_nothing)

    # -- journal -------------------------------------------------------------

    async def append(
        self, envelopes: Sequence[Envelope], *, ack: tuple[bytes, str] | None = None
    ) -> list[AppendResult]:
        fut: asyncio.Future[list[AppendResult]] = asyncio.get_running_loop().create_future()

        def done(result: list[AppendResult] | BaseException) -> None:
            if not fut.done():
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
        rows = [_message_row(e) for e in envelopes]

        async def op(conn: Conn) -> list[AppendResult]:
            out = []
            for row in rows:
                result, _ = await _insert(conn, row, ack)
                out.append(result)
            return out

        self._enqueue(op, None, then)

    async def admit(
        self, envelope: Envelope, ack: tuple[bytes, str] | None
    ) -> tuple[AppendResult, str | None]:
        """Journal an envelope taken from a shared queue, which may be a redelivery of one already here.

        Returns the append result and, when this very envelope was already stored, its status.
        """
        row = _message_row(envelope)

        async def op(conn: Conn) -> tuple[AppendResult, str | None]:
            return await _insert(conn, row, ack)

        result: tuple[AppendResult, str | None] = await self._submit(op)
        return result

    def record(self, message_id: str, stage: StageRecord, *, status: Status | None = None) -> Awaitable[None]:
        now = time.time()
        stage_row = _stage_row(message_id, stage, now)
        status_value = status.value if status is not None else None

        async def op(conn: Conn) -> None:
            await conn.execute(_INSERT_STAGE, *stage_row)
            if status_value is not None:
                await conn.execute(
                    "UPDATE messages SET status=$1, updated_at=$2, error=$3 WHERE id=$4",
                    status_value,
                    now,
                    _error_of(stage),
                    message_id,
                )

        return self._submit_quiet(op)

    def queue_deliveries(
        self, message_id: str, stage: StageRecord, destinations: Sequence[str], *, sent: bool = False
    ) -> Awaitable[None]:
        now = time.time()
        stage_row = _stage_row(message_id, stage, now)
        status = Status.QUEUED.value if destinations and not sent else Status.SENT.value
        attempts = 1 if sent else 0
        dests = list(destinations)

        async def op(conn: Conn) -> None:
            await conn.execute(_INSERT_STAGE, *stage_row)
            if dests:
                await conn.executemany(
                    "INSERT INTO deliveries (message_id, destination, status, attempts, updated_at)"
                    " VALUES ($1,$2,$3,$4,$5) ON CONFLICT (message_id, destination) DO UPDATE SET"
                    " status=excluded.status, attempts=excluded.attempts, updated_at=excluded.updated_at,"
                    " last_error=NULL",
                    [(message_id, d, status, attempts, now) for d in dests],
                )
            await conn.execute(
                "UPDATE messages SET status=$1, updated_at=$2, error=NULL WHERE id=$3",
                status,
                now,
                message_id,
            )

        return self._submit_quiet(op)

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

        async def op(conn: Conn) -> None:
            await conn.execute(
                "UPDATE deliveries SET status=$1, attempts=$2, updated_at=$3, last_error=$4"
                " WHERE message_id=$5 AND destination=$6",
                status.value,
                attempts,
                now,
                error,
                message_id,
                destination,
            )
            if stage_row is not None:
                await conn.execute(_INSERT_STAGE, *stage_row)
            if msg_status is not None:
                await conn.execute(
                    "UPDATE messages SET status=$1, updated_at=$2, error=$3 WHERE id=$4",
                    msg_status,
                    now,
                    error,
                    message_id,
                )

        return self._submit_quiet(op)

    def finish(self, message_id: str) -> Awaitable[None]:
        """Every delivery is settled: the message is DEAD when one of them is, SENT otherwise."""
        now = time.time()

        async def op(conn: Conn) -> None:
            await conn.execute(
                "UPDATE messages SET status = CASE WHEN EXISTS (SELECT 1 FROM deliveries"
                " WHERE message_id=$1 AND status=$2) THEN $2 ELSE $3 END, updated_at=$4 WHERE id=$1",
                message_id,
                Status.DEAD.value,
                Status.SENT.value,
                now,
            )

        return self._submit_quiet(op)

    async def shared_secret(self, name: str) -> bytes:
        """A random secret made by the first node that asks, then the same for all."""
        candidate = os.urandom(32)

        async def op(conn: Conn) -> bytes:
            await conn.execute(
                "INSERT INTO installation (name, value) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                name,
                candidate,
            )
            return bytes(await conn.fetchval("SELECT value FROM installation WHERE name=$1", name))

        result: bytes = await self._submit(op)
        return result

    def release_dedupe(self, message_id: str) -> Awaitable[None]:
        async def op(conn: Conn) -> None:
            await conn.execute("UPDATE messages SET dedupe_key=NULL WHERE id=$1", message_id)

        return self._submit_quiet(op)

    # -- reads -----------------------------------------------------------------

    async def _read(self, fn: Callable[[Conn], Awaitable[Any]]) -> Any:
        if self._pool is None:
            raise StoreError("the store is not open")
        try:
            async with self._pool.acquire(timeout=5) as conn:
                return await fn(conn)
        except POSTGRES_ERRORS as exc:
            raise translate(exc, "store read failed") from exc

    async def work_item(self, message_id: str) -> WorkItem | None:
        """The pending work of one message (None when nothing is left to do)."""

        async def fn(conn: Conn) -> WorkItem | None:
            row = await conn.fetchrow(_SELECT_BY_ID, message_id)
            return None if row is None else await _work_of(conn, row)

        result: WorkItem | None = await self._read(fn)
        return result

    async def pending(
        self,
        channel: str,
        after_seq: int,
        limit: int,
        *,
        recovering: bool,
        shard: tuple[int, int] | None = None,
    ) -> list[WorkItem]:
        statuses = _PENDING_STATUSES if recovering else [Status.RECEIVED.value]

        async def fn(conn: Conn) -> list[WorkItem]:
            items: list[WorkItem] = []
            cursor = after_seq
            while len(items) < limit:
                rows = await conn.fetch(
                    f"SELECT {_MSG_COLUMNS}, raw FROM messages WHERE channel=$1 AND seq>$2"  # noqa: S608
                    " AND status = ANY($3::text[]) AND discarded_at IS NULL ORDER BY seq LIMIT $4",
                    channel,
                    cursor,
                    statuses,
                    limit,
                )
                for row in rows:
                    cursor = row["seq"]
                    # The shard filter runs here: PostgreSQL has no crc32 of its own.
                    if shard is not None and shard_of(row["partition_key"], shard[1]) != shard[0]:
                        continue
                    item = await _work_of(conn, row)
                    if item is not None:
                        items.append(item)
                        if len(items) == limit:
                            break
                if len(rows) < limit:
                    break
            return items

        result: list[WorkItem] = await self._read(fn)
        return result

    async def get_message(self, message_id: str, *, with_payloads: bool) -> dict[str, Any] | None:
        async def fn(conn: Conn) -> dict[str, Any] | None:
            row = await conn.fetchrow(_SELECT_BY_ID, message_id)
            if row is None:
                return None
            msg = dict(row)
            if not with_payloads:
                msg.pop("raw")
            msg["stages"] = [
                trace_stage(s, with_payloads=with_payloads)
                for s in await conn.fetch(
                    "SELECT stage, status, at, content_type, payload, detail FROM stages"
                    " WHERE message_id=$1 ORDER BY seq",
                    message_id,
                )
            ]
            msg["deliveries"] = [
                dict(d)
                for d in await conn.fetch(
                    "SELECT destination, status, attempts, updated_at, last_error FROM deliveries"
                    " WHERE message_id=$1 ORDER BY destination",
                    message_id,
                )
            ]
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
        where = ["TRUE", *(f"{column}{operator}${n}" for n, (column, operator, _) in enumerate(filters, 1))]
        args: list[Any] = [value for _, _, value in filters]
        args.append(limit)
        sql = (
            f"SELECT {_MSG_COLUMNS} FROM messages WHERE {' AND '.join(where)}"  # noqa: S608
            f" ORDER BY seq DESC LIMIT ${len(args)}"
        )

        async def fn(conn: Conn) -> list[dict[str, Any]]:
            return [dict(r) for r in await conn.fetch(sql, *args)]

        result: list[dict[str, Any]] = await self._read(fn)
        return result

    async def dead_letters(self, channel: str | None, limit: int) -> list[dict[str, Any]]:
        async def fn(conn: Conn) -> list[dict[str, Any]]:
            rows = await conn.fetch(
                f"SELECT {_MSG_COLUMNS} FROM messages WHERE status=$1 AND discarded_at IS NULL"  # noqa: S608
                " AND ($2::text IS NULL OR channel=$2) ORDER BY seq LIMIT $3",
                Status.DEAD.value,
                channel,
                limit,
            )
            return [dict(r) for r in rows]

        result: list[dict[str, Any]] = await self._read(fn)
        return result

    async def stats(self) -> dict[str, Any]:
        async def fn(conn: Conn) -> dict[str, Any]:
            by_channel, by_type = message_counts(
                await conn.fetch(
                    "SELECT channel, message_type, status, COUNT(*) FROM messages"
                    " GROUP BY channel, message_type, status"
                )
            )
            deliveries: dict[str, dict[str, int]] = {}
            for row in await conn.fetch(
                "SELECT destination, status, COUNT(*) FROM deliveries GROUP BY destination, status"
            ):
                deliveries.setdefault(row[0], {})[row[1]] = row[2]
            duplicates = await conn.fetchval("SELECT COUNT(*) FROM stages WHERE stage='duplicate'")
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
            "queued_writes": len(self._queue),
        }
        return result

    # -- operator actions --------------------------------------------------------

    async def reset_for_replay(self, message_id: str) -> WorkItem | None:
        now = time.time()

        async def op(conn: Conn) -> WorkItem | None:
            row = await conn.fetchrow(_SELECT_BY_ID, message_id)
            if row is None or row["raw"] is None:
                return None
            await conn.execute("DELETE FROM deliveries WHERE message_id=$1", message_id)
            await conn.execute(
                "UPDATE messages SET status=$1, updated_at=$2, error=NULL, discarded_at=NULL WHERE id=$3",
                Status.RECEIVED.value,
                now,
                message_id,
            )
            await conn.execute(
                _INSERT_STAGE, message_id, "replay", Status.RECEIVED.value, now, None, None, "{}"
            )
            return WorkItem(row["seq"], _envelope_of(row, Status.RECEIVED), Status.RECEIVED, None, (), {})

        result: WorkItem | None = await self._submit(op)
        return result

    async def discard(self, message_id: str) -> bool:
        now = time.time()

        async def op(conn: Conn) -> bool:
            done = await conn.fetchval(
                "UPDATE messages SET discarded_at=$1 WHERE id=$2 AND status=$3 AND discarded_at IS NULL"
                " RETURNING 1",
                now,
                message_id,
                Status.DEAD.value,
            )
            if done:
                await conn.execute(
                    _INSERT_STAGE, message_id, "discard", Status.DEAD.value, now, None, None, "{}"
                )
            return bool(done)

        result: bool = await self._submit(op)
        return result

    async def prune(self, *, payload_before: float, message_before: float) -> tuple[int, int]:
        """Retention: drop payloads, then whole messages, of terminal messages older than the limits."""
        terminal = [Status.FILTERED.value, Status.SENT.value, Status.DEAD.value]

        async def op(conn: Conn) -> tuple[int, int]:
            ids = [
                r[0]
                for r in await conn.fetch(
                    "SELECT id FROM messages WHERE updated_at<$1 AND status = ANY($2::text[])",
                    message_before,
                    terminal,
                )
            ]
            await conn.execute("DELETE FROM stages WHERE message_id = ANY($1::text[])", ids)
            await conn.execute("DELETE FROM deliveries WHERE message_id = ANY($1::text[])", ids)
            await conn.execute("DELETE FROM messages WHERE id = ANY($1::text[])", ids)
            dropped = await conn.fetch(
                "UPDATE messages SET raw=NULL WHERE updated_at<$1 AND raw IS NOT NULL"
                " AND status = ANY($2::text[]) RETURNING id",
                payload_before,
                terminal,
            )
            await conn.execute(
                "UPDATE stages SET payload=NULL WHERE payload IS NOT NULL AND message_id IN"
                " (SELECT id FROM messages WHERE raw IS NULL)"
            )
            return len(dropped), len(ids)

        result: tuple[int, int] = await self._submit(op)
        return result


_Entry = tuple[Op, "asyncio.Future[Any] | None", "Callable[[Any], None] | None"]


async def _nothing(conn: Conn) -> None:
    return None


async def _probe(conn: Conn) -> None:
    """A real write (a row version, WAL): lands only when the database commits again."""
    await conn.execute(
        "INSERT INTO installation (name, value) VALUES ('write_probe', $1)"
        " ON CONFLICT (name) DO UPDATE SET value=excluded.value",
        os.urandom(8),
    )


def _message_row(e: Envelope) -> tuple[Any, ...]:
    return (
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
        content_digest(e.raw),
    )


async def _insert(
    conn: Conn, row: tuple[Any, ...], ack: tuple[bytes, str] | None
) -> tuple[AppendResult, str | None]:
    """Insert one message row: new, the same envelope again (a redelivery), or a duplicate of another."""
    seq = await conn.fetchval(_INSERT_MESSAGE, *row)
    if seq is not None:
        if ack is not None:
            detail = orjson.dumps({"code": ack[1]}).decode()
            await conn.execute(_INSERT_STAGE, row[0], "ack", row[5], row[3], HL7_V2, ack[0], detail)
        return AppendResult(row[0], False, seq), None
    same = await conn.fetchrow("SELECT seq, status FROM messages WHERE id=$1", row[0])
    if same is not None:
        return AppendResult(row[0], False, same["seq"]), str(same["status"])
    first = await conn.fetchrow(
        "SELECT id, seq, status, digest, CASE WHEN digest IS NULL THEN raw END AS old_raw FROM messages"
        " WHERE dedupe_key=$1",
        row[_KEY],
    )
    if first is None:  # the first one was pruned meanwhile: keep this one
        return await _insert(conn, (*row[:_KEY], None, row[_DIGEST]), ack)
    if not same_content(first["digest"], first["old_raw"], row[_DIGEST]):
        return await _insert_conflict(conn, row, first["id"]), None
    detail = orjson.dumps({"duplicate_of_envelope": row[0], "peer": row[13]}).decode()
    await conn.execute(
        "INSERT INTO stages (message_id, stage, status, at, detail) VALUES ($1,$2,$3,$4,$5::jsonb)",
        first["id"],
        "duplicate",
        first["status"],
        row[3],
        detail,
    )
    return AppendResult(first["id"], True, first["seq"]), None


async def _insert_conflict(conn: Conn, row: tuple[Any, ...], first_id: str) -> AppendResult:
    """Keep a message that reuses another's MSH-10: its own row, ERROR, no key (see AppendResult)."""
    kept = (*row[:5], Status.ERROR.value, *row[6:_KEY], None, row[_DIGEST])
    seq = await conn.fetchval(_INSERT_MESSAGE, *kept)
    if seq is None:  # this very envelope again (a redelivery): the row is there already
        seq = await conn.fetchval("SELECT seq FROM messages WHERE id=$1", row[0])
        return AppendResult(row[0], True, seq, conflict=True)
    await conn.execute("UPDATE messages SET error=$1 WHERE seq=$2", CONFLICT_CODE, seq)
    detail = {
        "error": CONFLICT_CODE,
        "text": "MSH-10 is already used by another message with other content",
        "location": "MSH-10",
        "conflicts_with": first_id,
        "peer": row[13],
    }
    await conn.execute(
        _INSERT_STAGE, row[0], "intake", Status.ERROR.value, row[3], None, None, orjson.dumps(detail).decode()
    )
    return AppendResult(row[0], True, seq, conflict=True)


async def _work_of(conn: Conn, row: Any) -> WorkItem | None:
    status = Status(row["status"])
    env = _envelope_of(row, status)
    if status is Status.RECEIVED:
        return WorkItem(row["seq"], env, status, None, (), {})
    if status not in (Status.TRANSFORMED, Status.QUEUED, Status.ERROR):
        return None
    deliveries = await conn.fetch(
        "SELECT destination, attempts FROM deliveries WHERE message_id=$1 AND status = ANY($2::text[])"
        " ORDER BY destination",
        row["id"],
        [Status.QUEUED.value, Status.ERROR.value],
    )
    if not deliveries:
        if status is Status.TRANSFORMED:  # crashed between transform and queueing
            return WorkItem(row["seq"], env, Status.RECEIVED, None, (), {})
        return None
    payload = await conn.fetchval(
        "SELECT payload FROM stages WHERE message_id=$1 AND payload IS NOT NULL"
        " AND stage LIKE 'step:%' ORDER BY seq DESC LIMIT 1",
        row["id"],
    )
    return WorkItem(
        row["seq"],
        env,
        status,
        payload,
        tuple(d["destination"] for d in deliveries),
        {d["destination"]: d["attempts"] for d in deliveries},
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


def _error_of(stage: StageRecord) -> str | None:
    code = stage.detail.get("error")
    return str(code) if code else None


def _envelope_of(row: Any, status: Status) -> Envelope:
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
        status=status,
    )


def _log_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and (exc := fut.exception()) is not None:
        log.error("journal_write_failed", error=type(exc).__name__, sqlstate=getattr(exc, "sqlstate", None))
