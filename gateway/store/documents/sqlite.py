"""The document store on SQLite: the document tables in the file of a ``SqliteFhirRepository``,
written by its writer thread in the same SAVEPOINT as the resources (inside its group commit).

- ``doc_blobs``: each document's bytes once, keyed by SHA-256; ``doc_binaries`` says which bytes
  each Binary stands for;
- ``doc_index`` and ``doc_tokens``: the ITI-67 search parameters in real columns, so that
  patient + status (+ type...) stays an index lookup at millions of documents.

The store's rules are coroutines that never suspend here: ``common.run_sync`` runs them on the
repository's threads.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, Unpack

import orjson

from gateway.store import fhir_common as common
from gateway.store.documents.blobs import Blob
from gateway.store.documents.model import Version
from gateway.store.documents.ops import DocOps, index_document
from gateway.store.documents.store import BaseDocumentStore, StoreOptions
from gateway.store.fhir import SqliteFhirRepository, _Writer

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS doc_blobs (sha256 TEXT PRIMARY KEY, sha1 BLOB NOT NULL,"
    " size INTEGER NOT NULL, data BLOB NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS doc_binaries (id TEXT PRIMARY KEY, sha256 TEXT NOT NULL,"
    " content_type TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS doc_index (id TEXT PRIMARY KEY, patient TEXT NOT NULL,"
    " status TEXT NOT NULL, date TEXT, creation TEXT, period_start TEXT, period_end TEXT,"
    " archived INTEGER NOT NULL DEFAULT 0, mask INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS doc_index_patient ON doc_index(patient, status, date)",
    "CREATE TABLE IF NOT EXISTS doc_tokens (id TEXT NOT NULL, param TEXT NOT NULL,"
    " system TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (id, param, system, value)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS doc_tokens_value ON doc_tokens(param, value)",
)


class _SqliteOps(DocOps):
    """The document tables on a SQLite connection; nothing here suspends (see ``run_sync``)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    async def rows(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self.conn.execute(sql, tuple(args)).fetchall()]

    async def body(self, type_: str, id_: str) -> dict[str, Any] | None:
        row = self.conn.execute(
            "SELECT body FROM resources WHERE type=? AND id=? AND deleted=0", (type_, id_)
        ).fetchone()
        return orjson.loads(row[0]) if row is not None else None

    async def store_blob(self, blob: Blob) -> None:
        self.conn.execute(
            "INSERT OR IGNORE INTO doc_blobs(sha256, sha1, size, data) VALUES (?,?,?,?)",
            (blob.sha256, blob.sha1, len(blob.data), blob.data),
        )
        self.conn.execute(
            "INSERT OR REPLACE INTO doc_binaries(id, sha256, content_type) VALUES (?,?,?)",
            (blob.binary_id, blob.sha256, blob.content_type or "application/octet-stream"),
        )

    async def write_index(
        self, id_: str, values: tuple[Any, ...], tokens: list[tuple[str, str, str]]
    ) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO doc_index(id, patient, status, date, creation, period_start,"
            " period_end, archived, mask) VALUES (?,?,?,?,?,?,?,?,?)",
            values,
        )
        self.conn.execute("DELETE FROM doc_tokens WHERE id=?", (id_,))
        self.conn.executemany(
            "INSERT OR IGNORE INTO doc_tokens(id, param, system, value) VALUES (?,?,?,?)",
            [(id_, *row) for row in tokens],
        )

    async def documents(
        self, where: str, args: Sequence[Any], count: int, offset: int
    ) -> tuple[int, list[dict[str, Any]]]:
        count_sql = f"SELECT COUNT(*) FROM doc_index d WHERE {where}"  # noqa: S608
        total = self.conn.execute(count_sql, tuple(args)).fetchone()[0]
        rows = self.conn.execute(
            f"SELECT r.body FROM doc_index d JOIN resources r ON r.type='DocumentReference' AND r.id=d.id"  # noqa: S608
            f" WHERE {where} ORDER BY d.date DESC, d.id LIMIT ? OFFSET ?",
            (*args, count, offset),
        ).fetchall()
        return int(total), [orjson.loads(r[0]) for r in rows]

    async def patient_lists(self, patient: str) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT r.body FROM search_index s JOIN resources r ON r.type=s.type AND r.id=s.id"
            " WHERE s.type='List' AND s.param='patient' AND s.system='' AND s.value=?"
            " AND r.deleted=0",
            (patient,),
        ).fetchall()
        return [orjson.loads(r[0]) for r in rows]

    async def indexed_document(self, id_: str) -> tuple[dict[str, Any], str | None, int | None] | None:
        row = self.conn.execute(
            "SELECT r.body, d.patient, d.mask FROM resources r LEFT JOIN doc_index d ON d.id=r.id"
            " WHERE r.type='DocumentReference' AND r.id=? AND r.deleted=0",
            (id_,),
        ).fetchone()
        return None if row is None else (orjson.loads(row[0]), row[1], row[2])

    async def versions(self, type_: str, id_: str) -> list[Version]:
        rows = self.conn.execute(
            "SELECT version_id, last_updated, body FROM resource_versions WHERE type=? AND id=?"
            " ORDER BY version_id DESC",
            (type_, id_),
        ).fetchall()
        return [Version(int(v), str(t), orjson.loads(b) if b is not None else None) for v, t, b in rows]


class SqliteDocumentStore(BaseDocumentStore):
    """Implements ``DocumentStore`` beside a ``SqliteFhirRepository`` (same file, same writer)."""

    repository: SqliteFhirRepository

    def __init__(self, repository: SqliteFhirRepository, **options: Unpack[StoreOptions]) -> None:
        super().__init__(repository, **options)
        self.repository = repository  # the SQLite type, for the file and writer it shares

    async def _create_tables(self) -> None:
        def create(w: _Writer) -> None:
            for statement in _SCHEMA:
                w.conn.execute(statement)

        await self.repository._write(create)

    async def _writing(self, fn: Callable[[common.Transaction, DocOps], Coroutine[Any, Any, Any]]) -> Any:
        await self.open()
        return await self.repository._write(lambda w: common.run_sync(fn(w, _SqliteOps(w.conn))))

    async def _reading(self, fn: Callable[[DocOps], Coroutine[Any, Any, Any]]) -> Any:
        await self.open()
        return await self.repository._read(lambda conn: common.run_sync(fn(_SqliteOps(conn))))

    async def bulk_load(self, documents: Iterable[dict[str, Any]], *, now: str) -> int:
        """Load already-valid DocumentReferences (each with id and a Patient subject) fast, for
        benchmarks and migrations: no rule runs, one transaction per call."""
        docs = list(documents)

        def run(w: _Writer) -> int:
            rows = []
            for doc in docs:
                body = {**doc, "meta": {"versionId": "1", "lastUpdated": now}}
                rows.append(("DocumentReference", doc["id"], 1, now, 0, orjson.dumps(body)))
            w.conn.executemany(
                "INSERT OR REPLACE INTO resources(type, id, version_id, last_updated, deleted, body)"
                " VALUES (?,?,?,?,?,?)",
                rows,
            )
            ops = _SqliteOps(w.conn)
            for doc in docs:
                common.run_sync(index_document(ops, doc))
            return len(docs)

        loaded: int = await self.repository._write(run)
        return loaded
