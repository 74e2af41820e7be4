"""The built-in FHIR R4 repository on SQLite: current versions, their history, a small search index.

Persistence only: callers (the HTTP layer, later the mapping engine) validate resources before
they get here. Every write runs on one writer thread inside ``BEGIN IMMEDIATE``, so that each
read-modify-write (versioning, conditional create/update, a whole transaction Bundle) is atomic,
even when another process (the gateway's worker) writes the same file. Reads run on a small pool
of reader threads, each with its own connection; WAL lets them proceed while a write is under way.

Writes are group-committed, as the journal's are: the writes that arrive while a commit is under
way are applied together, in order, in one SQLite transaction, then one COMMIT (one fsync) covers
them all. A failing write undoes only itself and fails only its caller: the repository's own writes
(Bundles, create, update, delete) run bare and most fail before changing anything; one that fails
after changing rows has the transaction undone and the batch run again with each write inside its
own SAVEPOINT, as the other writes (the document store's) always run. A caller's future resolves
only after the COMMIT that holds its write.

Writes are idempotent where FHIR allows it: an update whose content (meta aside) equals the
current version writes nothing, so a replayed message leaves the repository exactly as it was.
"""

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson

from gateway.core.errors import PasserelleError, StoreError
from gateway.core.logging import get_logger
from gateway.fhir.search import DEFAULT_COUNT, MAX_COUNT, criteria, instant
from gateway.store import fhir_common as common
from gateway.store.fhir_common import SearchQuery, SearchResult, Stored, index_rows, parse_search

log = get_logger("passerelle.fhir")

T = TypeVar("T")

# At most this many writes share one commit, so that a caller never waits behind a huge batch.
MAX_BATCH = 256

_SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
    type TEXT NOT NULL,
    id TEXT NOT NULL,
    version_id INTEGER NOT NULL,
    last_updated TEXT NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,
    body BLOB,
    PRIMARY KEY (type, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS resources_updated ON resources(type, deleted, last_updated, id);
CREATE TABLE IF NOT EXISTS resource_versions (
    type TEXT NOT NULL,
    id TEXT NOT NULL,
    version_id INTEGER NOT NULL,
    last_updated TEXT NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,
    body BLOB,
    PRIMARY KEY (type, id, version_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS search_index (
    type TEXT NOT NULL,
    id TEXT NOT NULL,
    param TEXT NOT NULL,
    system TEXT NOT NULL DEFAULT '',
    value TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS search_index_lookup ON search_index(type, param, system, value);
CREATE INDEX IF NOT EXISTS search_index_value ON search_index(type, param, value);
CREATE INDEX IF NOT EXISTS search_index_owner ON search_index(type, id);
CREATE TABLE IF NOT EXISTS fhir_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO fhir_meta(key, value) VALUES ('schema_version', '1');
"""


def run_search(
    conn: sqlite3.Connection, query: SearchQuery, *, count: int = DEFAULT_COUNT, offset: int = 0
) -> SearchResult:
    """Execute a parsed search; ``_count``/``_offset`` in the query win over the arguments."""
    count = min(max(query.count if query.count is not None else count, 0), MAX_COUNT)
    offset = max(query.offset if query.offset is not None else offset, 0)
    total = conn.execute(
        "SELECT COUNT(*) FROM resources r WHERE " + query.where,  # noqa: S608
        query.args,
    ).fetchone()[0]
    order = "DESC" if query.descending else "ASC"
    rows = conn.execute(
        f"SELECT r.body FROM resources r WHERE {query.where}"  # noqa: S608
        f" ORDER BY r.last_updated {order}, r.id {order} LIMIT ? OFFSET ?",
        (*query.args, count, offset),
    ).fetchall()
    matches = [orjson.loads(row[0]) for row in rows]
    included = _included(conn, query, matches) if query.includes and matches else []
    return SearchResult(matches, int(total), included, count, offset)


def _included(
    conn: sqlite3.Connection, query: SearchQuery, matches: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    ids = [m["id"] for m in matches]
    targets: dict[str, None] = {}  # ordered set of "Type/id"
    marks = ",".join("?" * len(ids))
    for param, target_type in query.includes:
        for (value,) in conn.execute(
            "SELECT DISTINCT value FROM search_index WHERE type=? AND param=? AND system=''"  # noqa: S608
            f" AND id IN ({marks})",
            (query.type_, param, *ids),
        ):
            if target_type is None or value.startswith(target_type + "/"):
                targets[value] = None
    seen = {f"{query.type_}/{i}" for i in ids}
    out = []
    for target in targets:
        if target in seen:
            continue
        type_, _, id_ = target.partition("/")
        row = conn.execute(
            "SELECT body FROM resources WHERE type=? AND id=? AND deleted=0", (type_, id_)
        ).fetchone()
        if row is not None:
            out.append(orjson.loads(row[0]))
    return out


def _match(conn: sqlite3.Connection, type_: str, params: Sequence[tuple[str, str]], limit: int) -> list[str]:
    parsed = parse_search(type_, params)
    rows = conn.execute(
        f"SELECT r.id FROM resources r WHERE {parsed.where} ORDER BY r.id LIMIT ?",  # noqa: S608
        (*parsed.args, limit),
    ).fetchall()
    return [str(row[0]) for row in rows]


def _match_first(
    conn: sqlite3.Connection, type_: str, params: Sequence[tuple[str, str]]
) -> tuple[list[str], common.Row | None]:
    """``_match`` of two ids, with the current version of the first read by the same statement."""
    parsed = parse_search(type_, params)
    rows = conn.execute(
        f"SELECT r.id, r.version_id, r.deleted, r.body FROM resources r WHERE {parsed.where}"  # noqa: S608
        " ORDER BY r.id LIMIT 2",
        parsed.args,
    ).fetchall()
    if len(rows) != 1:
        return [str(row[0]) for row in rows], None
    id_, version, deleted, body = rows[0]
    return [str(id_)], (int(version), bool(deleted), orjson.loads(body) if body is not None else None)


def match_ids(conn: sqlite3.Connection, type_: str, query: str, *, limit: int = 2) -> list[str]:
    """Ids of the live resources a conditional URL's query part selects (at most ``limit``)."""
    return _match(conn, type_, criteria(query), limit)


class _Writer(common.Transaction):
    """One SQLite write transaction: the connection and the instant every write in it shares.

    The primitives never suspend (``run_sync`` drives the shared logic on the writer thread);
    the synchronous methods are for code that runs inside a write, such as the document store.
    """

    def __init__(self, conn: sqlite3.Connection, now: str) -> None:
        self.conn = conn
        self.now = now

    def current(self, type_: str, id_: str) -> common.Row | None:
        row = self.conn.execute(
            "SELECT version_id, deleted, body FROM resources WHERE type=? AND id=?", (type_, id_)
        ).fetchone()
        if row is None:
            return None
        return int(row[0]), bool(row[1]), orjson.loads(row[2]) if row[2] is not None else None

    def _write(self, type_: str, id_: str, version: int, body: dict[str, Any] | None) -> None:
        blob = orjson.dumps(body) if body is not None else None
        deleted = int(body is None)
        self.conn.execute(
            "INSERT INTO resources(type, id, version_id, last_updated, deleted, body) VALUES (?,?,?,?,?,?)"
            " ON CONFLICT(type, id) DO UPDATE SET version_id=excluded.version_id,"
            " last_updated=excluded.last_updated, deleted=excluded.deleted, body=excluded.body",
            (type_, id_, version, self.now, deleted, blob),
        )
        self.conn.execute(
            "INSERT INTO resource_versions(type, id, version_id, last_updated, deleted, body)"
            " VALUES (?,?,?,?,?,?)",
            (type_, id_, version, self.now, deleted, blob),
        )
        if version > 1:  # a first version has no index rows to replace
            self.conn.execute("DELETE FROM search_index WHERE type=? AND id=?", (type_, id_))
        if body is not None:
            self.conn.executemany(
                "INSERT INTO search_index(type, id, param, system, value) VALUES (?,?,?,?,?)",
                index_rows(type_, id_, body),
            )

    # -- primitives (BEGIN IMMEDIATE already serialises every writer) --

    async def fetch(self, type_: str, id_: str) -> common.Row | None:
        return self.current(type_, id_)

    async def store(self, type_: str, id_: str, version: int, body: dict[str, Any] | None) -> None:
        self._write(type_, id_, version, body)

    async def match(self, type_: str, params: Sequence[tuple[str, str]], limit: int) -> list[str]:
        return _match(self.conn, type_, params, limit)

    async def find(self, type_: str, params: Sequence[tuple[str, str]]) -> SearchResult:
        return run_search(self.conn, parse_search(type_, params))

    async def match_first(
        self, type_: str, params: Sequence[tuple[str, str]]
    ) -> tuple[list[str], common.Row | None]:
        return _match_first(self.conn, type_, params)

    async def savepoint(self) -> None:
        self.conn.execute("SAVEPOINT entry")

    async def rollback_savepoint(self) -> None:
        self.conn.execute("ROLLBACK TO entry")

    async def release_savepoint(self) -> None:
        self.conn.execute("RELEASE entry")

    # -- the shared logic, run synchronously --

    def put(
        self, type_: str, id_: str, resource: Mapping[str, Any], *, if_match: str | None = None
    ) -> tuple[Stored, bool]:
        """Create or update ``type_/id_``; (stored, created?). Unchanged content writes nothing."""
        return common.run_sync(common.put(self, type_, id_, resource, if_match=if_match))

    def delete(self, type_: str, id_: str) -> bool:
        return common.run_sync(common.delete(self, type_, id_))

    def create(self, resource: Mapping[str, Any], if_none_exist: str | None) -> tuple[Stored, bool]:
        return common.run_sync(common.create(self, resource, if_none_exist))

    def single_match(self, type_: str, query: str) -> Stored | None:
        return common.run_sync(common.single_match(self, type_, query))

    def conditional_update(self, type_: str, query: str, resource: Mapping[str, Any]) -> tuple[Stored, bool]:
        return common.run_sync(common.conditional_update(self, type_, query, resource))


def _process_bundle(writer: _Writer, bundle: Mapping[str, Any]) -> dict[str, Any]:
    """Runs inside one write transaction. A transaction raises on the first failing entry."""
    return common.run_sync(common.process_bundle(writer, bundle))


# A write, and whether it changes rows only (see ``_write``); queued with its caller's future.
_Job = tuple[Callable[[_Writer], Any], bool]
_Pending = tuple[_Job, "asyncio.Future[Any]"]
# A write's outcome: (succeeded?, result or exception).
_Outcome = tuple[bool, Any]


# -- the repository ------------------------------------------------------------------------------


def _utcnow() -> datetime:
    return datetime.now(UTC)


class SqliteFhirRepository(common.RepositoryBase):
    """FHIR resources in one SQLite file (WAL). Implements ``FhirRepository``."""

    def __init__(self, path: Path, *, clock: Callable[[], datetime] = _utcnow, readers: int = 2) -> None:
        self.path = path
        self._clock = clock  # tests pin lastUpdated with it
        self._readers = readers
        self._rexec: ThreadPoolExecutor | None = None
        self._wexec: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        # Group commit: writes wait in ``_queue`` while a batch is on the writer thread.
        self._queue: list[_Pending] = []
        self._flush_scheduled = False
        self._inflight: asyncio.Future[list[_Outcome]] | None = None
        self.max_batch = MAX_BATCH
        self.commits = 0  # SQLite transactions committed
        self.committed_writes = 0  # writes they held

    async def open(self) -> None:
        if self._wexec is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._wexec = ThreadPoolExecutor(1, thread_name_prefix="fhir-writer")
        self._rexec = ThreadPoolExecutor(self._readers, thread_name_prefix="fhir-reader")
        try:
            await asyncio.get_running_loop().run_in_executor(self._wexec, self._init_schema)
        except sqlite3.Error as exc:
            await self.close()
            raise StoreError(f"cannot open the FHIR repository: {type(exc).__name__}") from exc

    def _init_schema(self) -> None:
        conn = self._conn()
        conn.execute("PRAGMA journal_mode=WAL")
        try:
            conn.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection, made on first use."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            # Another process (the worker) may hold the write lock: wait for it rather than fail.
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA synchronous=FULL")
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    async def close(self) -> None:
        # Whatever was queued is written first: a caller already waiting gets its answer.
        while self._queue or self._inflight is not None:
            if self._inflight is not None:
                await asyncio.wait([self._inflight])
            else:
                self._flush()
            await asyncio.sleep(0)  # let the landing batch settle its callers
        for ex in (self._wexec, self._rexec):
            if ex is not None:
                ex.shutdown(wait=True)
        self._wexec = self._rexec = None
        with self._lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()
        self._local = threading.local()

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._rexec is None:
            raise StoreError("the FHIR repository is not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._rexec, lambda: fn(self._conn()))
        except sqlite3.Error as exc:
            raise StoreError(f"FHIR repository read failed: {type(exc).__name__}") from exc

    async def _write(self, fn: Callable[[_Writer], T], *, rows_only: bool = False) -> T:
        """Run ``fn`` in the next batch; its result once the batch is committed.

        ``rows_only``: ``fn`` changes the database through ``_Writer``'s primitives alone (rows, no
        schema, no transaction control of its own), and fails with nothing to undo unless it
        changed a row. Such a write runs without a savepoint of its own (see ``_run_batch``).
        """
        if self._wexec is None:
            raise StoreError("the FHIR repository is not open")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append(((fn, rows_only), fut))
        if self._inflight is None and not self._flush_scheduled:
            # Once per loop turn: every write submitted in this turn goes into the same batch.
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        result: T = await fut
        return result

    def _flush(self) -> None:
        """Send the queued writes (up to ``max_batch``) to the writer thread: one hop per batch."""
        self._flush_scheduled = False
        if self._inflight is not None or not self._queue:
            return  # the batch in flight reschedules when it lands
        batch = self._queue[: self.max_batch]
        del self._queue[: self.max_batch]
        if self._wexec is None:
            self._settle(batch, [(False, StoreError("the FHIR repository is not open"))] * len(batch))
            return
        jobs = [job for job, _ in batch]
        inflight = asyncio.get_running_loop().run_in_executor(self._wexec, self._run_batch, jobs)
        self._inflight = inflight
        inflight.add_done_callback(lambda f: self._landed(f, batch))

    def _landed(self, fut: asyncio.Future[list[_Outcome]], batch: list[_Pending]) -> None:
        self._inflight = None
        if fut.cancelled():
            outcomes: list[_Outcome] = [(False, StoreError("the FHIR repository write was cancelled"))] * len(
                batch
            )
        elif (exc := fut.exception()) is not None:
            # BEGIN or COMMIT failed: nothing of the batch is stored.
            if isinstance(exc, sqlite3.Error):
                log.error("fhir_write_failed", error=type(exc).__name__, writes=len(batch))
                exc = StoreError(f"FHIR repository write failed: {type(exc).__name__}")
            outcomes = [(False, exc)] * len(batch)
        else:
            outcomes = fut.result()
        self._settle(batch, outcomes)
        if self._queue and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    @staticmethod
    def _settle(batch: list[_Pending], outcomes: list[_Outcome]) -> None:
        for (_, fut), (ok, value) in zip(batch, outcomes, strict=True):
            if fut.done():
                continue  # the caller gave up waiting; its write stands (or not) all the same
            if ok:
                fut.set_result(value)
            else:
                if isinstance(value, sqlite3.Error):
                    log.error("fhir_write_failed", error=type(value).__name__)
                    value = StoreError(f"FHIR repository write failed: {type(value).__name__}")
                fut.set_exception(value)

    def _run_batch(self, jobs: list[_Job]) -> list[_Outcome]:
        """On the writer thread: every write in one transaction, each failing alone.

        A write undoes itself with a savepoint, which costs a copy of every page it changes; a
        ``rows_only`` write goes without. When one of those fails having changed rows, only
        undoing the whole transaction undoes it: then the batch runs again, each write in its own
        savepoint.
        """
        fns = [fn for fn, _ in jobs]
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            outcomes: list[_Outcome] = []
            for fn, rows_only in jobs:
                done = self._run_bare(conn, fn) if rows_only else self._run_one(conn, fn)
                if not conn.in_transaction:
                    # An error made SQLite abandon the whole transaction (disk full, I/O error...):
                    # the writes done before it are gone. Each write gets its own transaction.
                    return self._run_isolated(conn, fns)
                if done is None:
                    conn.execute("ROLLBACK")
                    return self._run_batch([(fn, False) for fn in fns])
                outcomes.append(done)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.commits += 1
        self.committed_writes += len(fns)
        return outcomes

    def _run_bare(self, conn: sqlite3.Connection, fn: Callable[[_Writer], Any]) -> _Outcome | None:
        """A ``rows_only`` write without a savepoint; None when it failed leaving something to undo."""
        changes = conn.total_changes
        try:
            result = fn(_Writer(conn, instant(self._clock())))
        except PasserelleError as exc:
            # Refused (a bad Bundle, a version conflict...) before changing any row: nothing to undo.
            return (False, exc) if conn.total_changes == changes else None
        except Exception:  # noqa: BLE001 - run again in a savepoint, where it meets the same fate
            return None
        return True, result

    def _run_one(self, conn: sqlite3.Connection, fn: Callable[[_Writer], Any]) -> _Outcome:
        conn.execute("SAVEPOINT write")
        try:
            # The instant is taken once the write lock is held, so versions and times agree.
            result = fn(_Writer(conn, instant(self._clock())))
        except Exception as exc:  # noqa: BLE001 - it is the caller's, passed on to it alone
            if conn.in_transaction:
                conn.execute("ROLLBACK TO write")
                conn.execute("RELEASE write")
            return False, exc
        conn.execute("RELEASE write")
        return True, result

    def _run_isolated(self, conn: sqlite3.Connection, fns: list[Callable[[_Writer], Any]]) -> list[_Outcome]:
        outcomes: list[_Outcome] = []
        for fn in fns:
            try:
                conn.execute("BEGIN IMMEDIATE")
                done = self._run_one(conn, fn)
                if conn.in_transaction:
                    conn.execute("COMMIT")
                    self.commits += 1
                    self.committed_writes += 1
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                done = (False, exc)
            outcomes.append(done)
        return outcomes

    async def ping(self) -> None:
        await self._read(lambda c: c.execute("SELECT 1").fetchone())

    async def read(self, type_: str, id_: str) -> dict[str, Any] | None:
        def fn(conn: sqlite3.Connection) -> dict[str, Any] | None:
            row = conn.execute(
                "SELECT body FROM resources WHERE type=? AND id=? AND deleted=0", (type_, id_)
            ).fetchone()
            return orjson.loads(row[0]) if row is not None else None

        return await self._read(fn)

    async def is_deleted(self, type_: str, id_: str) -> bool:
        def fn(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT deleted FROM resources WHERE type=? AND id=?", (type_, id_)).fetchone()
            return bool(row and row[0])

        return await self._read(fn)

    async def search(
        self, type_: str, params: Sequence[tuple[str, str]], *, count: int = DEFAULT_COUNT, offset: int = 0
    ) -> SearchResult:
        query = parse_search(type_, params)  # a BadRequest leaves before any thread hop
        return await self._read(lambda conn: run_search(conn, query, count=count, offset=offset))

    async def _scan_page(self, where: str, args: list[Any], limit: int) -> list[dict[str, Any]]:
        def fn(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                f"SELECT body FROM resources WHERE {where} ORDER BY type, id LIMIT ?",  # noqa: S608
                (*args, limit),
            ).fetchall()
            return [orjson.loads(row[0]) for row in rows]

        return await self._read(fn)

    async def _apply(self, work: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
        # The shared logic runs synchronously on the writer thread; it changes rows only.
        return await self._write(lambda w: common.run_sync(work(w)), rows_only=True)
