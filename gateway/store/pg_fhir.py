"""The FHIR repository on PostgreSQL (asyncpg), shared by every node of a scale-out deployment.

Same Protocol and same semantics as the SQLite repository (gateway.store.fhir): the write logic,
the search parsing and the index rows come from gateway.store.fhir_common; only the SQL differs.

- ``resources`` holds each resource's current version as JSONB, ``resource_versions`` every
  version, ``search_index`` one row per (resource, search parameter, value), with b-tree indexes
  for the lookups the search parameters make. Text columns use the "C" collation, so that ids
  and instants sort as they do in SQLite (byte order), whatever the database's locale.
- The schema is migrated at start-up (``fhir_schema_version`` in the configured schema).
- Every write (a whole transaction Bundle included) runs in one PostgreSQL transaction.
- Nodes may write concurrently. A transaction takes an advisory lock on each resource before
  reading its current version (so versions are consecutive; a resource created under an id just
  minted is neither read nor locked, no other transaction can name it), and on the criteria of each
  conditional create/update before matching them (so two nodes applying the same replayed
  Bundle find each other's resources instead of creating two). A deadlock between two such
  transactions aborts one of them; it is run again.

JSONB keeps no key order: a read puts ``resourceType``, ``id`` and ``meta`` first again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson

from gateway.core.errors import BadRequest, StoreError
from gateway.core.logging import get_logger
from gateway.fhir.search import (
    CHAINED_PARAMS,
    DEFAULT_COUNT,
    MAX_COUNT,
    RESULT_PARAMS,
    instant,
    split_value,
    unescape,
)
from gateway.store import fhir_common as common
from gateway.store.fhir_common import (
    POSTGRESQL,
    SearchQuery,
    SearchResult,
    index_rows,
    parse_search,
)
from gateway.store.pg_errors import POSTGRES_ERRORS, Kind, classify, translate
from gateway.store.postgres import connect_pool, migrate, redacted

log = get_logger("passerelle.fhir")

T = TypeVar("T")
Conn = Any  # an asyncpg connection (the library ships no type information)

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE resources (
        type TEXT COLLATE "C" NOT NULL,
        id TEXT COLLATE "C" NOT NULL,
        version_id INTEGER NOT NULL,
        last_updated TEXT COLLATE "C" NOT NULL,
        deleted SMALLINT NOT NULL DEFAULT 0,
        body JSONB,
        PRIMARY KEY (type, id)
    );
    CREATE INDEX resources_updated ON resources(type, deleted, last_updated, id);
    CREATE TABLE resource_versions (
        type TEXT COLLATE "C" NOT NULL,
        id TEXT COLLATE "C" NOT NULL,
        version_id INTEGER NOT NULL,
        last_updated TEXT COLLATE "C" NOT NULL,
        deleted SMALLINT NOT NULL DEFAULT 0,
        body JSONB,
        PRIMARY KEY (type, id, version_id)
    );
    CREATE TABLE search_index (
        type TEXT COLLATE "C" NOT NULL,
        id TEXT COLLATE "C" NOT NULL,
        param TEXT COLLATE "C" NOT NULL,
        system TEXT COLLATE "C" NOT NULL DEFAULT '',
        value TEXT COLLATE "C" NOT NULL
    );
    CREATE INDEX search_index_lookup ON search_index(type, param, system, value);
    CREATE INDEX search_index_value ON search_index(type, param, value);
    CREATE INDEX search_index_owner ON search_index(type, id);
    """,
)

# One round trip per write: the current version, its history row, and its index rows.
_STORE = """
WITH current AS (
    INSERT INTO resources(type, id, version_id, last_updated, deleted, body)
    VALUES ($1, $2, $3, $4, $5, $6::jsonb)
    ON CONFLICT (type, id) DO UPDATE SET version_id=EXCLUDED.version_id,
        last_updated=EXCLUDED.last_updated, deleted=EXCLUDED.deleted, body=EXCLUDED.body
), history AS (
    INSERT INTO resource_versions(type, id, version_id, last_updated, deleted, body)
    VALUES ($1, $2, $3, $4, $5, $6::jsonb)
), gone AS (
    DELETE FROM search_index WHERE type=$1 AND id=$2
)
INSERT INTO search_index(type, id, param, system, value)
SELECT $1, $2, t.param, t.system, t.value
FROM unnest($7::text[], $8::text[], $9::text[]) AS t(param, system, value)
"""
# A transaction lock named by text; held until COMMIT or ROLLBACK.
_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))"
_LOCK_MANY = (
    "SELECT pg_advisory_xact_lock(hashtextextended(k, 0))"
    " FROM unnest($1::text[]) WITH ORDINALITY AS t(k, n) ORDER BY n"
)
ATTEMPTS = 5


def numbered(sql: str, first: int = 1) -> str:
    """``?`` placeholders → ``$n``. The search SQL holds no ``?`` other than its placeholders."""
    parts = sql.split("?")
    out = [parts[0]]
    for n, part in enumerate(parts[1:], start=first):
        out.append(f"${n}{part}")
    return "".join(out)


def _body(text: str | None) -> dict[str, Any] | None:
    """A stored body, with the elements a reader expects first in their usual order."""
    if text is None:
        return None
    data: dict[str, Any] = orjson.loads(text)
    out: dict[str, Any] = {k: data.pop(k) for k in ("resourceType", "id", "meta") if k in data}
    meta = out.get("meta")
    if isinstance(meta, dict):
        out["meta"] = {k: meta.pop(k) for k in ("versionId", "lastUpdated") if k in meta} | meta
    out.update(data)
    return out


def lock_keys(type_: str, params: Sequence[tuple[str, str]]) -> list[str]:
    """The advisory locks a conditional operation takes before it matches its criteria.

    Identifier criteria lock each identifier value (with or without its system, so that
    ``identifier=S|v`` and ``identifier=v`` meet); any other criteria lock the criteria text.
    """
    keys: set[str] = set()
    other: list[str] = []
    for name, raw in params:
        if name in ("identifier", *CHAINED_PARAMS) and raw:
            for token in split_value(raw, ","):
                keys.add(f"{type_}?{name}={unescape(split_value(token, '|')[-1])}")
        elif name not in RESULT_PARAMS and raw:
            other.append(f"{name}={raw}")
    if other:
        keys.add(f"{type_}?" + "&".join(sorted(other)))
    return sorted(keys)  # one order for every transaction: fewer deadlocks


def _parse(type_: str, params: Sequence[tuple[str, str]]) -> SearchQuery:
    """``parse_search`` for PostgreSQL, whose text cannot hold NUL: such a value is a BadRequest."""
    query = parse_search(type_, params, POSTGRESQL)
    for arg in query.args:
        if isinstance(arg, str) and "\x00" in arg:
            raise BadRequest("a search value holds a NUL character", location="query")
    return query


async def _search(
    conn: Conn, query: SearchQuery, *, count: int = DEFAULT_COUNT, offset: int = 0
) -> SearchResult:
    count = min(max(query.count if query.count is not None else count, 0), MAX_COUNT)
    offset = max(query.offset if query.offset is not None else offset, 0)
    where = numbered(query.where)
    total = await conn.fetchval("SELECT COUNT(*) FROM resources r WHERE " + where, *query.args)  # noqa: S608
    order = "DESC" if query.descending else "ASC"
    n = len(query.args)
    rows = await conn.fetch(
        f"SELECT r.body::text FROM resources r WHERE {where}"  # noqa: S608
        f" ORDER BY r.last_updated {order}, r.id {order} LIMIT ${n + 1} OFFSET ${n + 2}",
        *query.args,
        count,
        offset,
    )
    matches = [b for row in rows if (b := _body(row[0])) is not None]
    included = await _included(conn, query, matches) if query.includes and matches else []
    return SearchResult(matches, int(total), included, count, offset)


async def _included(conn: Conn, query: SearchQuery, matches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ids = [m["id"] for m in matches]
    targets: dict[str, None] = {}  # ordered set of "Type/id"
    for param, target_type in query.includes:
        rows = await conn.fetch(
            "SELECT DISTINCT value FROM search_index WHERE type=$1 AND param=$2 AND system=''"
            " AND id = ANY($3::text[]) ORDER BY value",
            query.type_,
            param,
            ids,
        )
        for (value,) in rows:
            if target_type is None or value.startswith(target_type + "/"):
                targets[value] = None
    seen = {f"{query.type_}/{i}" for i in ids}
    wanted = [t.partition("/") for t in targets if t not in seen]
    if not wanted:
        return []
    rows = await conn.fetch(
        "SELECT r.type, r.id, r.body::text FROM resources r"
        " JOIN unnest($1::text[], $2::text[]) AS t(type, id) ON r.type=t.type AND r.id=t.id"
        " WHERE r.deleted=0",
        [w[0] for w in wanted],
        [w[2] for w in wanted],
    )
    found = {f"{row[0]}/{row[1]}": _body(row[2]) for row in rows}
    return [b for t in targets if (b := found.get(t)) is not None]


async def _match(conn: Conn, type_: str, params: Sequence[tuple[str, str]], limit: int) -> list[str]:
    parsed = _parse(type_, params)
    n = len(parsed.args)
    rows = await conn.fetch(
        f"SELECT r.id FROM resources r WHERE {numbered(parsed.where)} ORDER BY r.id LIMIT ${n + 1}",  # noqa: S608
        *parsed.args,
        limit,
    )
    return [str(row[0]) for row in rows]


class _PgTransaction(common.Transaction):
    """One PostgreSQL transaction of the repository."""

    def __init__(self, conn: Conn, now: str) -> None:
        self.conn = conn
        self.now = now
        self._locked: set[str] = set()

    async def _lock(self, key: str) -> None:
        if key not in self._locked:
            await self.conn.execute(_LOCK, key)
            self._locked.add(key)

    async def fetch(self, type_: str, id_: str) -> common.Row | None:
        # Lock first, then read: the read (a new statement) sees what the lock holder committed.
        await self._lock(f"{type_}/{id_}")
        row = await self.conn.fetchrow(
            "SELECT version_id, deleted, body::text FROM resources WHERE type=$1 AND id=$2", type_, id_
        )
        if row is None:
            return None
        return int(row[0]), bool(row[1]), _body(row[2])

    async def fetch_many(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], common.Row]:
        # Every lock in one statement (in one order: fewer deadlocks), then one read.
        wanted = sorted({f"{t}/{i}" for t, i in keys} - self._locked)
        if wanted:
            await self.conn.execute(_LOCK_MANY, wanted)
            self._locked.update(wanted)
        rows = await self.conn.fetch(
            "SELECT r.type, r.id, r.version_id, r.deleted, r.body::text FROM resources r"
            " JOIN unnest($1::text[], $2::text[]) AS t(type, id) ON r.type=t.type AND r.id=t.id",
            [k[0] for k in keys],
            [k[1] for k in keys],
        )
        return {(str(r[0]), str(r[1])): (int(r[2]), bool(r[3]), _body(r[4])) for r in rows}

    async def store(self, type_: str, id_: str, version: int, body: dict[str, Any] | None) -> None:
        rows = index_rows(type_, id_, body) if body is not None else []
        await self.conn.execute(
            _STORE,
            type_,
            id_,
            version,
            self.now,
            int(body is None),
            orjson.dumps(body).decode() if body is not None else None,
            [r[2] for r in rows],
            [r[3] for r in rows],
            [r[4] for r in rows],
        )

    async def match(self, type_: str, params: Sequence[tuple[str, str]], limit: int) -> list[str]:
        for key in lock_keys(type_, params):
            await self._lock(key)
        return await _match(self.conn, type_, params, limit)

    async def find(self, type_: str, params: Sequence[tuple[str, str]]) -> SearchResult:
        return await _search(self.conn, _parse(type_, params))

    async def savepoint(self) -> None:
        await self.conn.execute("SAVEPOINT entry")

    async def rollback_savepoint(self) -> None:
        await self.conn.execute("ROLLBACK TO SAVEPOINT entry")

    async def release_savepoint(self) -> None:
        await self.conn.execute("RELEASE SAVEPOINT entry")


def _utcnow() -> datetime:
    return datetime.now(UTC)


class PgFhirRepository(common.RepositoryBase):
    """FHIR resources in PostgreSQL. Implements ``gateway.store.fhir.FhirRepository``."""

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        pool_size: int = 4,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.dsn = dsn
        self.schema = schema
        self._pool_size = pool_size
        self._clock = clock  # tests pin lastUpdated with it
        self._pool: Any = None
        self._opening = asyncio.Lock()
        self.schema_version = 0
        self.retries = 0  # transactions run again after a deadlock or serialisation failure

    async def open(self) -> None:
        async with self._opening:  # concurrent first callers (a destination's sends) share one pool
            if self._pool is not None:
                return
            pool = await connect_pool(self.dsn, self.schema, max_size=self._pool_size)
            try:
                self.schema_version = await migrate(pool, MIGRATIONS, "fhir_schema_version")
            except POSTGRES_ERRORS as exc:
                await pool.close()
                where = redacted(self.dsn)
                raise translate(exc, f"cannot migrate the FHIR repository at {where}", detail=True) from exc
            self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 10)
            except TimeoutError:
                pool.terminate()

    def _open_pool(self) -> Any:
        if self._pool is None:
            raise StoreError("the FHIR repository is not open")
        return self._pool

    async def _read(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        pool = self._open_pool()
        try:
            async with pool.acquire() as conn:
                return await fn(conn)
        except POSTGRES_ERRORS as exc:
            log.warning("fhir_read_failed", error=type(exc).__name__)
            raise translate(exc, "FHIR repository read failed") from exc

    async def _write(self, fn: Callable[[_PgTransaction], Awaitable[T]]) -> T:
        """Run ``fn`` in one transaction; a PasserelleError from it rolls everything back."""
        pool = self._open_pool()
        for attempt in range(1, ATTEMPTS + 1):
            try:
                async with pool.acquire() as conn, conn.transaction():
                    return await fn(_PgTransaction(conn, instant(self._clock())))
            except POSTGRES_ERRORS as exc:
                # A concurrent transaction won (deadlock, serialisation, same new key): run it again.
                conflict = classify(exc) is Kind.CONFLICT
                if conflict and attempt < ATTEMPTS:
                    self.retries += 1
                    await asyncio.sleep(0.01 * attempt)
                    continue
                if conflict:
                    log.error("fhir_write_failed", error=type(exc).__name__, attempts=attempt)
                else:
                    log.error("fhir_write_failed", error=type(exc).__name__)
                raise translate(exc, "FHIR repository write failed") from exc
        raise AssertionError("unreachable")

    async def ping(self) -> None:
        await self._read(lambda conn: conn.fetchval("SELECT 1"))

    async def read(self, type_: str, id_: str) -> dict[str, Any] | None:
        async def fn(conn: Conn) -> dict[str, Any] | None:
            text = await conn.fetchval(
                "SELECT body::text FROM resources WHERE type=$1 AND id=$2 AND deleted=0", type_, id_
            )
            return _body(text)

        return await self._read(fn)

    async def is_deleted(self, type_: str, id_: str) -> bool:
        async def fn(conn: Conn) -> bool:
            deleted = await conn.fetchval("SELECT deleted FROM resources WHERE type=$1 AND id=$2", type_, id_)
            return bool(deleted)

        return await self._read(fn)

    async def search(
        self, type_: str, params: Sequence[tuple[str, str]], *, count: int = DEFAULT_COUNT, offset: int = 0
    ) -> SearchResult:
        query = _parse(type_, params)  # a BadRequest leaves before any I/O
        return await self._read(lambda conn: _search(conn, query, count=count, offset=offset))

    async def _scan_page(self, where: str, args: list[Any], limit: int) -> list[dict[str, Any]]:
        sql = numbered(f"SELECT body::text FROM resources WHERE {where} ORDER BY type, id LIMIT ?")  # noqa: S608

        async def fn(conn: Conn) -> list[dict[str, Any]]:
            rows = await conn.fetch(sql, *args, limit)
            return [b for row in rows if (b := _body(row[0])) is not None]

        return await self._read(fn)

    async def _apply(self, work: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
        return await self._write(work)
