"""The document store on PostgreSQL, beside the PostgreSQL FHIR repository.

The rules (publication, replacement, visibility, patches, metadata checks) are the store's
(``gateway.store.documents.store``), run as coroutines; only the SQL of the document tables is here:

- ``doc_blobs``: each document's bytes once (``bytea``), keyed by SHA-256; ``doc_binaries`` says
  which bytes each Binary stands for;
- ``doc_index`` and ``doc_tokens``: the ITI-67 search parameters in b-tree indexed columns, so
  that patient + status (+ type...) stays an index lookup at millions of documents.

Every request runs in one transaction of the repository: the document tables change in the same
PostgreSQL transaction as the resources, so a failure leaves nothing behind on any node.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, Unpack

from gateway.store import fhir_common as common
from gateway.store.documents.blobs import Blob
from gateway.store.documents.model import Version
from gateway.store.documents.ops import DocOps, index_document
from gateway.store.documents.store import BaseDocumentStore, StoreOptions
from gateway.store.pg_errors import POSTGRES_ERRORS, translate
from gateway.store.pg_fhir import PgFhirRepository, _body, numbered
from gateway.store.postgres import migrate, redacted

Conn = Any  # an asyncpg connection (the library ships no type information)

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE doc_blobs (
        sha256 TEXT COLLATE "C" PRIMARY KEY,
        sha1 BYTEA NOT NULL,
        size BIGINT NOT NULL,
        data BYTEA NOT NULL
    );
    CREATE TABLE doc_binaries (
        id TEXT COLLATE "C" PRIMARY KEY,
        sha256 TEXT COLLATE "C" NOT NULL REFERENCES doc_blobs(sha256),
        content_type TEXT NOT NULL
    );
    CREATE TABLE doc_index (
        id TEXT COLLATE "C" PRIMARY KEY,
        patient TEXT COLLATE "C" NOT NULL,
        status TEXT COLLATE "C" NOT NULL,
        date TEXT COLLATE "C",
        creation TEXT COLLATE "C",
        period_start TEXT COLLATE "C",
        period_end TEXT COLLATE "C",
        archived SMALLINT NOT NULL DEFAULT 0,
        mask INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX doc_index_patient ON doc_index(patient, status, date DESC NULLS LAST, id);
    CREATE TABLE doc_tokens (
        id TEXT COLLATE "C" NOT NULL,
        param TEXT COLLATE "C" NOT NULL,
        system TEXT COLLATE "C" NOT NULL,
        value TEXT COLLATE "C" NOT NULL,
        PRIMARY KEY (id, param, system, value)
    );
    CREATE INDEX doc_tokens_value ON doc_tokens(param, value, system);
    """,
)

_INDEX = """
INSERT INTO doc_index(id, patient, status, date, creation, period_start, period_end, archived, mask)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (id) DO UPDATE SET patient=EXCLUDED.patient, status=EXCLUDED.status, date=EXCLUDED.date,
    creation=EXCLUDED.creation, period_start=EXCLUDED.period_start, period_end=EXCLUDED.period_end,
    archived=EXCLUDED.archived, mask=EXCLUDED.mask
"""
_TOKENS = """
INSERT INTO doc_tokens(id, param, system, value)
SELECT $1, t.param, t.system, t.value
FROM unnest($2::text[], $3::text[], $4::text[]) AS t(param, system, value)
ON CONFLICT DO NOTHING
"""


class _PgOps(DocOps):
    """The document tables on one PostgreSQL connection (inside the repository's transaction for
    writes, so that they see and commit with its resources)."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn

    async def rows(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in await self.conn.fetch(numbered(sql), *args)]

    async def body(self, type_: str, id_: str) -> dict[str, Any] | None:
        text = await self.conn.fetchval(
            "SELECT body::text FROM resources WHERE type=$1 AND id=$2 AND deleted=0", type_, id_
        )
        return _body(text)

    async def store_blob(self, blob: Blob) -> None:
        await self.conn.execute(
            "INSERT INTO doc_blobs(sha256, sha1, size, data) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            blob.sha256,
            blob.sha1,
            len(blob.data),
            blob.data,
        )
        await self.conn.execute(
            "INSERT INTO doc_binaries(id, sha256, content_type) VALUES ($1, $2, $3)"
            " ON CONFLICT (id) DO UPDATE SET sha256=EXCLUDED.sha256, content_type=EXCLUDED.content_type",
            blob.binary_id,
            blob.sha256,
            blob.content_type or "application/octet-stream",
        )

    async def write_index(
        self, id_: str, values: tuple[Any, ...], tokens: list[tuple[str, str, str]]
    ) -> None:
        await self.conn.execute(_INDEX, *values)
        await self.conn.execute("DELETE FROM doc_tokens WHERE id=$1", id_)
        if tokens:
            await self.conn.execute(
                _TOKENS, id_, [t[0] for t in tokens], [t[1] for t in tokens], [t[2] for t in tokens]
            )

    async def documents(
        self, where: str, args: Sequence[Any], count: int, offset: int
    ) -> tuple[int, list[dict[str, Any]]]:
        total = await self.conn.fetchval(numbered(f"SELECT COUNT(*) FROM doc_index d WHERE {where}"), *args)  # noqa: S608
        # The page bounds follow the criteria's placeholders; the SQL text is constants only.
        sql = (
            "SELECT r.body::text FROM doc_index d JOIN resources r ON r.type='DocumentReference'"  # noqa: S608
            f" AND r.id=d.id WHERE {where} ORDER BY d.date DESC NULLS LAST, d.id LIMIT ? OFFSET ?"
        )
        rows = await self.conn.fetch(numbered(sql), *args, count, offset)
        bodies = [_body(r[0]) for r in rows]
        return int(total), [b for b in bodies if b is not None]

    async def patient_lists(self, patient: str) -> list[dict[str, Any]]:
        rows = await self.conn.fetch(
            "SELECT r.body::text FROM search_index s JOIN resources r ON r.type=s.type AND r.id=s.id"
            " WHERE s.type='List' AND s.param='patient' AND s.system='' AND s.value=$1 AND r.deleted=0",
            patient,
        )
        bodies = [_body(r[0]) for r in rows]
        return [b for b in bodies if b is not None]

    async def indexed_document(self, id_: str) -> tuple[dict[str, Any], str | None, int | None] | None:
        row = await self.conn.fetchrow(
            "SELECT r.body::text, d.patient, d.mask FROM resources r LEFT JOIN doc_index d ON d.id=r.id"
            " WHERE r.type='DocumentReference' AND r.id=$1 AND r.deleted=0",
            id_,
        )
        if row is None:
            return None
        body = _body(row[0])
        assert body is not None
        return body, row[1], row[2]

    async def versions(self, type_: str, id_: str) -> list[Version]:
        rows = await self.conn.fetch(
            "SELECT version_id, last_updated, body::text FROM resource_versions WHERE type=$1 AND id=$2"
            " ORDER BY version_id DESC",
            type_,
            id_,
        )
        return [Version(int(r[0]), str(r[1]), _body(r[2])) for r in rows]


class PgDocumentStore(BaseDocumentStore):
    """Implements ``DocumentStore`` beside a ``PgFhirRepository`` (same database and schema)."""

    repository: PgFhirRepository

    def __init__(self, repository: PgFhirRepository, **options: Unpack[StoreOptions]) -> None:
        super().__init__(repository, **options)
        self.repository = repository  # the PostgreSQL type, for the pool and schema it shares
        self.schema_version = 0

    async def _create_tables(self) -> None:
        try:
            self.schema_version = await migrate(
                self.repository._open_pool(), MIGRATIONS, "doc_schema_version"
            )
        except POSTGRES_ERRORS as exc:
            where = redacted(self.repository.dsn)
            raise translate(exc, f"cannot migrate the document store at {where}", detail=True) from exc

    async def _writing(self, fn: Callable[[common.Transaction, DocOps], Coroutine[Any, Any, Any]]) -> Any:
        await self.open()
        return await self.repository._write(lambda tx: fn(tx, _PgOps(tx.conn)))

    async def _reading(self, fn: Callable[[DocOps], Coroutine[Any, Any, Any]]) -> Any:
        await self.open()
        return await self.repository._read(lambda conn: fn(_PgOps(conn)))

    async def bulk_load(self, documents: Sequence[Mapping[str, Any]], *, now: str) -> int:
        """Load already-valid DocumentReferences (each with id and a Patient subject), for
        benchmarks and migrations: no rule runs, one transaction per call."""
        docs = [dict(d) for d in documents]

        async def run(tx: common.Transaction, ops: DocOps) -> int:
            for doc in docs:
                body = {**doc, "meta": {"versionId": "1", "lastUpdated": now}}
                await tx.store("DocumentReference", doc["id"], 1, body)
                await index_document(ops, doc)
            return len(docs)

        loaded: int = await self._writing(run)
        return loaded
