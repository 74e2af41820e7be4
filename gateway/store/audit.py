"""The audit trail: FHIR AuditEvents in an append-only, hash-chained SQLite log.

Each entry's hash is SHA-256 over the previous entry's hash and the entry's exact stored
bytes, so editing, removing or reordering any entry breaks the chain from that entry on
(``verify``). Triggers refuse UPDATE and DELETE, so a mistake cannot rewrite history;
someone who bypasses them is caught by ``verify``.

Two inflows, neither able to slow the MLLP hot path:
- API accesses (``write``): awaited by the request, batched with every other pending
  entry into one transaction (group commit). The queue is bounded: when it is full a
  request waits for room; nothing is dropped.
- received messages: followed from the journal itself (a cursor over ``messages.seq``,
  committed in the same transaction as the entries it produced), so an entry per
  received message costs the intake nothing and survives a crash. With worker
  processes the first worker follows, off the main process's GIL; the main process
  still follows on ``flush`` and ``close``.

Several writers, in one process or several, may share the log: the cursor and the
chain's head are read inside the write transaction, which SQLite serialises.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from gateway.core.errors import StoreError
from gateway.core.ids import new_id
from gateway.core.logging import get_logger

log = get_logger("passerelle.audit")

GENESIS = "0" * 64
DCM = "http://dicom.nema.org/resources/ontology/DCM"
EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
INTERACTION = "http://hl7.org/fhir/restful-interaction"
# DICOM audit event ids (DCM): data received from outside, and use of the audit log itself.
IMPORT = {"system": DCM, "code": "110107", "display": "Import"}
AUDIT_LOG_USED = {"system": DCM, "code": "110101", "display": "Audit Log Used"}
REST = {"system": EVENT_TYPE, "code": "rest", "display": "RESTful Operation"}
# AuditEvent.outcome (R4): 0 success, 4 minor failure, 8 serious failure, 12 major failure.
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = "0", "4", "8"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    recorded REAL NOT NULL,
    action TEXT NOT NULL,
    agent TEXT NOT NULL,
    resource BLOB NOT NULL,
    prev TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_recorded ON audit(recorded);
CREATE TABLE IF NOT EXISTS cursors (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""

_JOURNAL_QUERY = (
    "SELECT seq, id, channel, source, received_at, status, sender, control_id, message_type, peer"
    " FROM messages WHERE seq > ? ORDER BY seq LIMIT ?"
)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def chain_hash(prev: str, resource: bytes) -> str:
    return hashlib.sha256(prev.encode("ascii") + b"\n" + resource).hexdigest()


def event(
    *,
    type_: Mapping[str, str],
    action: str,
    outcome: str,
    who: str,
    role: str | None = None,
    address: str | None = None,
    requestor: bool = True,
    subtype: Mapping[str, str] | None = None,
    entities: Sequence[Mapping[str, Any]] = (),
    description: str | None = None,
    at: float | None = None,
) -> dict[str, Any]:
    """An R4 AuditEvent (who, what, when, outcome). ``who`` is an opaque id, never a name."""
    agent: dict[str, Any] = {"who": {"identifier": {"value": who}}, "requestor": requestor}
    if role:
        agent["type"] = {"text": role}
    if address:
        agent["network"] = {"address": address, "type": "2"}  # 2: IP address
    resource: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "type": dict(type_),
        "action": action,
        "recorded": _iso(time.time() if at is None else at),
        "outcome": outcome,
        "agent": [agent],
        "source": {"observer": {"display": "passerelle"}},
    }
    if subtype:
        resource["subtype"] = [dict(subtype)]
    if description:
        resource["outcomeDesc"] = description
    if entities:
        resource["entity"] = [dict(e) for e in entities]
    return resource


def query_entity(query: str) -> dict[str, Any]:
    return {"query": base64.b64encode(query.encode()).decode("ascii")}


def message_received_event(row: Mapping[str, Any]) -> dict[str, Any]:
    """One received message, from its journal row (ids and codes only)."""
    return event(
        type_=IMPORT,
        action="C",
        outcome=SUCCESS if row["status"] != "ERROR" else MINOR_FAILURE,
        who=str(row["sender"] or row["source"]),
        role="hl7v2-sender",
        address=str(row["peer"]).rsplit(":", 1)[0] if row["peer"] else None,
        entities=[
            {
                "what": {"identifier": {"system": "urn:passerelle:message", "value": row["id"]}},
                "type": {"code": "hl7v2", "display": str(row["message_type"])},
                "name": str(row["control_id"]),
                "description": f"channel {row['channel']}",
            }
        ],
        at=float(row["received_at"]),
    )


_dump = orjson.dumps


def receipt_bytes(row: Sequence[Any], rid: str) -> bytes:
    """``message_received_event`` of a journal row with ``id`` = rid, serialized as stored.

    The same bytes as ``orjson.dumps({**event, "id": rid}, option=OPT_SORT_KEYS)`` (a test holds
    the two together), written out directly: one entry per received message is the audit
    trail's hot path, and building then sorting the nested dicts cost several times more.
    """
    _, mid, channel, source, received_at, status, sender, control_id, message_type, peer = row
    address = str(peer).rsplit(":", 1)[0] if peer else None
    network = b'"network":{"address":' + _dump(address) + b',"type":"2"},' if address else b""
    return b"".join(
        (
            b'{"action":"C","agent":[{',
            network,
            b'"requestor":true,"type":{"text":"hl7v2-sender"},"who":{"identifier":{"value":',
            _dump(str(sender or source)),
            b'}}}],"entity":[{"description":',
            _dump(f"channel {channel}"),
            b',"name":',
            _dump(str(control_id)),
            b',"type":{"code":"hl7v2","display":',
            _dump(str(message_type)),
            b'},"what":{"identifier":{"system":"urn:passerelle:message","value":',
            _dump(str(mid)),
            b'}}}],"id":',
            _dump(rid),
            b',"outcome":"',
            b"0" if status != "ERROR" else b"4",
            b'","recorded":"',
            _iso(float(received_at)).encode("ascii"),
            b'","resourceType":"AuditEvent","source":{"observer":{"display":"passerelle"}},"type":',
            _IMPORT_BYTES,
            b"}",
        )
    )


_IMPORT_BYTES = orjson.dumps(IMPORT, option=orjson.OPT_SORT_KEYS)


@dataclass(frozen=True, slots=True)
class Verification:
    ok: bool
    entries: int
    head: str  # the last entry's hash: keep a copy elsewhere to detect truncation
    bad_seq: int | None = None
    reason: str = ""


class AuditLog:
    """The hash-chained log; one writer task owns the connection."""

    def __init__(
        self,
        path: Path,
        *,
        journal: Path | None = None,
        max_queue: int = 10_000,
        max_batch: int = 1000,
        poll_s: float = 0.25,
        follow: bool = True,
    ) -> None:
        self.path = path
        self.journal = journal
        # False: the journal is followed only on flush and close (another process follows it).
        self.follow = follow
        self.max_batch = max_batch
        self.poll_s = poll_s
        self._queue: asyncio.Queue[tuple[dict[str, Any], asyncio.Future[str]]] = asyncio.Queue(max_queue)
        self._conn: sqlite3.Connection | None = None
        self._journal_conn: sqlite3.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._closing = False
        self._idle = False
        self.written = 0

    # -- lifecycle ---------------------------------------------------------------

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = await asyncio.to_thread(self._connect)
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=30000")  # another process may be writing a round
        conn.executescript(_SCHEMA)
        return conn

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            if self._idle:
                self._task.cancel()  # only while waiting on the queue, which is cancellation-safe
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._conn is not None:
            # What is still queued is written before closing: nothing is dropped on a clean stop.
            await self._commit_round(None, follow=True)
            self._conn.close()
            self._conn = None
        if self._journal_conn is not None:
            self._journal_conn.close()
            self._journal_conn = None

    # -- writing ---------------------------------------------------------------

    async def write(self, resource: dict[str, Any]) -> str:
        """Append one AuditEvent; returns its id once it is committed."""
        if self._conn is None or self._closing:
            raise StoreError("the audit log is not open")
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        await self._queue.put((resource, fut))  # waits for room: bounded, never dropped
        return await fut

    async def flush(self) -> None:
        """Commit what is queued and what the journal holds now (tests, shutdown)."""
        await self._commit_round(None, follow=True)

    async def _run(self) -> None:
        while not self._closing:
            first = None
            self._idle = True
            try:
                async with asyncio.timeout(self.poll_s):
                    first = await self._queue.get()
            except TimeoutError:
                pass
            finally:
                self._idle = False
            try:
                await self._commit_round(first, follow=self.follow)
            except (sqlite3.Error, OSError) as exc:
                log.error("audit_write_failed", error=type(exc).__name__)
                await asyncio.sleep(self.poll_s)

    async def _commit_round(
        self, first: tuple[dict[str, Any], asyncio.Future[str]] | None, *, follow: bool
    ) -> None:
        async with self._lock:
            batch = [first] if first is not None else []
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            if not batch and not (follow and self.journal is not None):
                return
            try:
                ids = await asyncio.to_thread(self._commit, [r for r, _ in batch], follow)
            except (sqlite3.Error, OSError) as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(StoreError(f"audit write failed: {type(exc).__name__}"))
                raise
            for (_, fut), rid in zip(batch, ids, strict=True):
                if not fut.done():
                    fut.set_result(rid)

    def _journal_rows(self, after: int) -> list[tuple[Any, ...]]:
        if self.journal is None or not self.journal.exists():
            return []
        if self._journal_conn is None:
            uri = f"file:{self.journal}?mode=ro"
            self._journal_conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        try:
            return self._journal_conn.execute(_JOURNAL_QUERY, (after, self.max_batch)).fetchall()
        except sqlite3.OperationalError:
            return []  # the journal's tables are not there yet

    def _commit(self, resources: list[dict[str, Any]], follow: bool = True) -> list[str]:
        conn = self._conn
        assert conn is not None
        # Built before the lock: nothing here depends on the chain.
        now = time.time()
        written: list[tuple[str, dict[str, Any], bytes]] = []
        for resource in resources:
            rid = new_id(now)
            resource = {**resource, "id": rid}
            written.append((rid, resource, orjson.dumps(resource, option=orjson.OPT_SORT_KEYS)))
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Cursor and head are read under the write lock: another writer may have moved them.
            journal: list[tuple[Any, ...]] = []
            if follow:
                row = conn.execute("SELECT value FROM cursors WHERE name='journal'").fetchone()
                journal = self._journal_rows(int(row[0]) if row else 0)
            if not written and not journal:
                conn.execute("ROLLBACK")
                return []
            row = conn.execute("SELECT hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            head = row[0] if row else GENESIS
            # Rows are chained in memory, then written with one executemany: the chain is still one
            # SHA-256 per entry over its exact stored bytes, as ``verify`` recomputes.
            rows: list[tuple[str, float, str, str, bytes, str, str]] = []
            for j in journal:
                rid = new_id(now)
                data = receipt_bytes(j, rid)
                digest = chain_hash(head, data)
                rows.append((rid, now, "C", str(j[6] or j[3]), data, head, digest))
                head = digest
            for rid, resource, data in written:
                digest = chain_hash(head, data)
                agent = resource["agent"][0]["who"]["identifier"]["value"]
                rows.append((rid, now, resource["action"], agent, data, head, digest))
                head = digest
            conn.executemany(
                "INSERT INTO audit(id, recorded, action, agent, resource, prev, hash)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            if journal:
                conn.execute(
                    "INSERT INTO cursors(name, value) VALUES ('journal', ?)"
                    " ON CONFLICT(name) DO UPDATE SET value=excluded.value",
                    (int(journal[-1][0]),),
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.written += len(rows)
        return [rid for rid, _, _ in written]

    # -- reading ---------------------------------------------------------------

    async def search(
        self,
        *,
        count: int = 50,
        agent: str | None = None,
        action: str | None = None,
        since: float | None = None,
        until: float | None = None,
        before_seq: int | None = None,
    ) -> list[tuple[int, dict[str, Any]]]:
        """Newest first: (seq, AuditEvent)."""
        where: list[str] = ["1=1"]
        args: list[Any] = []
        if agent is not None:
            where.append("agent=?")
            args.append(agent)
        if action is not None:
            where.append("action=?")
            args.append(action)
        if since is not None:
            where.append("recorded>=?")
            args.append(since)
        if until is not None:
            where.append("recorded<=?")
            args.append(until)
        if before_seq is not None:
            where.append("seq<?")
            args.append(before_seq)
        sql = f"SELECT seq, resource FROM audit WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?"  # noqa: S608
        args.append(count)

        def fn() -> list[tuple[int, dict[str, Any]]]:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            try:
                return [(int(s), orjson.loads(r)) for s, r in conn.execute(sql, args)]
            finally:
                conn.close()

        return await asyncio.to_thread(fn)

    async def get(self, rid: str) -> dict[str, Any] | None:
        def fn() -> dict[str, Any] | None:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            try:
                row = conn.execute("SELECT resource FROM audit WHERE id=?", (rid,)).fetchone()
            finally:
                conn.close()
            return orjson.loads(row[0]) if row else None

        return await asyncio.to_thread(fn)


def iter_entries(path: Path) -> Iterator[tuple[int, str, bytes, str, str]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        yield from conn.execute("SELECT seq, id, resource, prev, hash FROM audit ORDER BY seq")
    finally:
        conn.close()


def verify(path: Path) -> Verification:
    """Walk the chain from the first entry; the first entry that does not fit is reported."""
    if not path.is_file():
        return Verification(False, 0, GENESIS, None, f"no audit log at {path}")
    prev, expected_seq, n = GENESIS, 1, 0
    try:
        for seq, rid, data, stored_prev, stored_hash in iter_entries(path):
            if seq != expected_seq:
                return Verification(False, n, prev, expected_seq, "entry missing (sequence gap)")
            if stored_prev != prev:
                return Verification(False, n, prev, seq, "previous-hash link broken")
            if chain_hash(prev, bytes(data)) != stored_hash:
                return Verification(False, n, prev, seq, "content does not match its hash")
            try:
                if orjson.loads(data).get("id") != rid:
                    return Verification(False, n, prev, seq, "entry id changed")
            except orjson.JSONDecodeError:
                return Verification(False, n, prev, seq, "entry is not JSON")
            prev, expected_seq, n = stored_hash, seq + 1, n + 1
    except sqlite3.DatabaseError as exc:
        return Verification(False, n, prev, expected_seq, f"unreadable: {type(exc).__name__}")
    return Verification(True, n, prev)
