"""Records in and out of a gateway, for an establishment that moves or leaves.

- ``import_files``: FHIR NDJSON (a Bulk Data export's files) into the configured repository, on
  either backend, keeping ids, versions, ``lastUpdated`` and so references; documents' bytes
  (Binary ``data``) back into the document store, DocumentReferences indexed again.
- ``export_messages``: the journal's messages with their trace (stages, deliveries) as NDJSON,
  payloads optional, filtered by time, channel and status.
- ``export_audit``: the hash-chained audit trail as NDJSON, checked first.

Reports name files and line numbers, never a resource's content.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from gateway.config import Config
from gateway.core.errors import BadRequest, StoreError
from gateway.core.protocols import MessageStore
from gateway.fhir.resource import ID_RE, TYPE_RE
from gateway.fhir.search import date_range
from gateway.store import backends, bulk
from gateway.store.audit import iter_entries, verify
from gateway.store.documents import BaseDocumentStore
from gateway.store.messages.postgres import PostgresStore
from gateway.store.messages.sqlite import SqliteStore

BATCH = 500
_VERSION = re.compile(r"[1-9][0-9]{0,8}")
_INSTANT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})")


# -- import ------------------------------------------------------------------------------------------


def parse_line(line: bytes) -> dict[str, Any]:
    """One NDJSON line → a resource ready to restore; BadRequest saying what is wrong."""
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"not JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise BadRequest("not a JSON object")
    type_ = data.get("resourceType")
    if not isinstance(type_, str) or not TYPE_RE.fullmatch(type_):
        raise BadRequest("resourceType is missing or invalid", location="resourceType")
    if type_ == "AuditEvent":  # the trail is its own store (passerelle archive audit), append-only
        raise BadRequest("AuditEvent belongs to the audit trail, not the repository", location="resourceType")
    id_ = data.get("id")
    if not isinstance(id_, str) or not ID_RE.fullmatch(id_):
        raise BadRequest("id is missing or invalid (1-64 of A-Z a-z 0-9 - .)", location="id")
    meta = data.get("meta")
    if not isinstance(meta, dict):
        raise BadRequest("meta (versionId, lastUpdated) is missing", location="meta")
    version = meta.get("versionId")
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise BadRequest("meta.versionId must be a positive integer", location="meta.versionId")
    updated = meta.get("lastUpdated")
    if not isinstance(updated, str) or not _INSTANT.fullmatch(updated):
        raise BadRequest("meta.lastUpdated must be an instant with its offset", location="meta.lastUpdated")
    date_range(updated, "meta.lastUpdated")  # a real date, not only its shape
    if type_ == "Binary" and "data" in data:
        if not isinstance(data["data"], str):
            raise BadRequest("Binary.data must be base64 text", location="data")
        try:
            base64.b64decode(data["data"].encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise BadRequest("Binary.data is not valid base64", location="data") from None
    return data


@dataclass(slots=True)
class ImportReport:
    created: int = 0
    unchanged: int = 0
    replaced: int = 0
    documents_indexed: int = 0
    bad_lines: list[str] = field(default_factory=list)  # "file:line: reason"
    conflicts: list[str] = field(default_factory=list)  # "file:line: Type/id ..."

    @property
    def ok(self) -> bool:
        return not self.bad_lines and not self.conflicts

    def summary(self) -> str:
        return (
            f"{self.created} created, {self.replaced} replaced, {self.unchanged} already present,"
            f" {len(self.conflicts)} conflicts, {len(self.bad_lines)} bad lines;"
            f" {self.documents_indexed} documents indexed"
        )


def ndjson_files(paths: Sequence[Path]) -> list[Path]:
    """The files named, a directory standing for its ``*.ndjson`` files (sorted)."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out += sorted(p for p in path.iterdir() if p.suffix == ".ndjson" and p.is_file())
        else:
            out.append(path)
    return out


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield number, line


async def import_files(
    store: BaseDocumentStore, paths: Sequence[Path], *, replace: bool = False, batch: int = BATCH
) -> ImportReport:
    """Load NDJSON files into the repository beside ``store``, ``batch`` resources a transaction.

    A bad line is reported (file and line) and skipped; a resource stored already with other
    content is a conflict, reported and left as it is, unless ``replace``."""
    report = ImportReport()
    documents: list[str] = []
    for path in ndjson_files(paths):
        pending: list[tuple[int, dict[str, Any]]] = []
        for number, line in _lines(path):
            try:
                pending.append((number, parse_line(line)))
            except BadRequest as exc:
                report.bad_lines.append(f"{path}:{number}: {exc.message}")
                continue
            if len(pending) >= batch:
                await _flush(store, path, pending, replace, report, documents)
                pending = []
        if pending:
            await _flush(store, path, pending, replace, report, documents)
    for start in range(0, len(documents), batch):
        report.documents_indexed += await bulk.reindex(store, documents[start : start + batch])
    return report


async def _flush(
    store: BaseDocumentStore,
    path: Path,
    pending: list[tuple[int, dict[str, Any]]],
    replace: bool,
    report: ImportReport,
    documents: list[str],
) -> None:
    outcomes = await bulk.restore(store, [r for _, r in pending], replace=replace)
    for (number, resource), outcome in zip(pending, outcomes, strict=True):
        name = f"{resource['resourceType']}/{resource['id']}"
        if outcome is bulk.Outcome.CONFLICT:
            report.conflicts.append(
                f"{path}:{number}: {name} is stored already with other content (--replace overwrites it)"
            )
            continue
        if outcome is bulk.Outcome.CREATED:
            report.created += 1
        elif outcome is bulk.Outcome.REPLACED:
            report.replaced += 1
        else:
            report.unchanged += 1
        if resource["resourceType"] == "DocumentReference" and outcome is not bulk.Outcome.UNCHANGED:
            documents.append(str(resource["id"]))


# -- message archive ----------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A trace as JSON: bytes (payloads) as base64 text under the same key."""
    if isinstance(value, bytes | bytearray | memoryview):
        return {"base64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


async def export_messages(
    store: MessageStore,
    out: IO[bytes],
    *,
    since: float | None = None,
    until: float | None = None,
    channel: str | None = None,
    status: str | None = None,
    payloads: bool = False,
    page: int = 200,
) -> int:
    """Write each message (newest first) with its trace as one JSON line; the count written.

    Payloads (the received bytes, each stage's output) are base64 (``{"base64": …}``) when asked."""
    written = 0
    before: int | None = None
    while True:
        rows = await store.list_messages(
            status=status,
            control_id=None,
            channel=channel,
            limit=page,
            before_seq=before,
            since=since,
            until=until,
        )
        for row in rows:
            message = await store.get_message(str(row["id"]), with_payloads=payloads)
            if message is None:  # pruned by retention meanwhile
                continue
            out.write(orjson.dumps(_plain({**message, "seq": row.get("seq")})) + b"\n")
            written += 1
        if len(rows) < page:
            return written
        before = int(rows[-1]["seq"])


def export_audit(path: Path, out: IO[bytes]) -> tuple[int, str | None]:
    """Write the audit trail (oldest first) as NDJSON: per entry its ``seq``, ``id``, ``prev`` and
    ``hash``, and its AuditEvent as the very bytes the hash covers, so that the chain can be
    checked again from the file alone (SHA-256 of prev, a newline, then those bytes).

    Returns (entries written, why the chain is broken or None). The entries are written even when
    it is broken: the file is evidence either way."""
    check = verify(path)
    written = 0
    for seq, rid, data, prev, digest in iter_entries(path):
        stored = bytes(data)
        if b"\n" in stored:  # never written so (compact JSON); kept readable if it were
            stored = orjson.dumps(orjson.loads(stored))
        head = orjson.dumps({"seq": seq, "id": rid, "prev": prev, "hash": digest})
        out.write(head[:-1] + b',"resource":' + stored + b"}\n")
        written += 1
    return written, None if check.ok else f"entry {check.bad_seq}: {check.reason}"


# -- what the CLI runs ------------------------------------------------------------------------------


def data_dir_of(config: Config, data_dir: Path | None) -> Path:
    return config.overridden(data_dir=data_dir).settings.data_dir


async def run_import(
    config: Config, data_dir: Path | None, store_dsn: str | None, paths: Sequence[Path], *, replace: bool
) -> ImportReport:
    """``import_files`` into the repository ``config`` (or ``--store``) names."""
    settings = config.overridden(data_dir=data_dir, store_dsn=store_dsn).settings
    root = settings.data_dir
    repository = backends.select(settings, root).fhir_repository(root)
    store = backends.document_store(repository)
    if store is None:  # pragma: no cover - every built-in repository has one
        raise StoreError("this repository has no document store to import into")
    await store.open()
    try:
        return await import_files(store, paths, replace=replace)
    finally:
        await repository.close()


async def run_message_export(
    config: Config,
    data_dir: Path | None,
    store_dsn: str | None,
    out: IO[bytes],
    **filters: Any,
) -> int:
    """``export_messages`` from the message store ``config`` (or ``--store``) names, read-only on
    SQLite (a running gateway keeps writing)."""
    settings = config.overridden(data_dir=data_dir, store_dsn=store_dsn).settings
    chosen = backends.select(settings, settings.data_dir)
    store: MessageStore
    if chosen.postgres is not None:
        store = PostgresStore(chosen.postgres.dsn, schema=chosen.postgres.schema)
    else:
        assert isinstance(chosen.store, SqliteStore)  # the one other backend
        store = SqliteStore(chosen.store.path, writer=False)
    await store.open()
    try:
        return await export_messages(store, out, **filters)
    finally:
        await store.close()
