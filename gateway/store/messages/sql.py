"""The message store's SQL, written once for every backend.

Each operation is a generator: it yields the statements it needs, as ``Query`` values, and is
sent back what each returned; a backend's driver runs it on its own connection (SQLite on the
writer or a reader thread, asyncpg with ``await``). The logic, the statements and the shape of
the results live here; a ``Dialect`` says the few things the backends do differently.
Statements use ``?`` placeholders; the PostgreSQL driver numbers them (``$1``…).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

import orjson

from gateway.core.envelope import HL7_V2, Envelope
from gateway.core.protocols import AppendResult, StageRecord, WorkItem, shard_of
from gateway.core.status import Status
from gateway.store.messages.views import (
    CONFLICT_CODE,
    message_counts,
    same_content,
    trace_stage,
)

T = TypeVar("T")


class Kind(Enum):
    EXECUTE = "execute"  # answers the number of rows changed
    MANY = "many"  # one statement, many argument rows; answers None
    ONE = "one"  # the first row or None
    ALL = "all"  # every row
    VALUE = "value"  # the first column of the first row, or None


Query = tuple[Kind, str, Sequence[Any]]
# An operation: yields queries, is sent their answers, returns its result.
Ops = Generator[Query, Any, T]


def row_dict(row: Any) -> dict[str, Any]:
    """A sqlite3.Row or asyncpg Record as a dict (neither is a Mapping)."""
    return {k: row[k] for k in row.keys()}  # noqa: SIM118


@functools.lru_cache(maxsize=256)
def numbered(sql: str) -> str:
    """``?`` placeholders as PostgreSQL's ``$1, $2…`` (no statement here has a ``?`` in a literal)."""
    parts = sql.split("?")
    return "".join(f"{part}${n}" for n, part in enumerate(parts[:-1], 1)) + parts[-1]


@dataclass(frozen=True, slots=True)
class Dialect:
    """What a backend does its own way.

    ``folded``: the ACK and a first-try delivery to every destination are kept in the message
    row itself (SQLite: fewer statements and WAL pages on the hot path); readers show them as
    the stages and deliveries they are. ``shard_in_sql``: the database computes ``shard_of``
    (SQLite registers the function; PostgreSQL has no crc32, so the filter runs here).
    """

    name: str
    folded: bool
    shard_in_sql: bool
    arrays: bool  # ``= ANY(?)`` with one list argument, rather than ``IN (?, ?, …)``
    serial: str  # the column types, in the dialect's words
    real: str
    blob: str
    json: str

    def one_of(self, column: str, values: Sequence[Any]) -> tuple[str, tuple[Any, ...]]:
        if self.arrays:
            return f"{column} = ANY(?::text[])", (list(values),)
        return f"{column} IN ({','.join('?' * len(values))})", tuple(values)

    def tables(self, *, exists: str = "", message_columns: str = "", table_options: str = "") -> str:
        """The messages, stages and deliveries tables (indexes and later columns are the backend's)."""
        real, blob = self.real, self.blob
        return f"""
CREATE TABLE {exists}messages (
    seq {self.serial},
    id TEXT NOT NULL UNIQUE,
    channel TEXT NOT NULL,
    source TEXT NOT NULL,
    received_at {real} NOT NULL,
    updated_at {real} NOT NULL,
    status TEXT NOT NULL,
    sender TEXT NOT NULL,
    control_id TEXT NOT NULL,
    message_type TEXT NOT NULL,
    partition_key TEXT NOT NULL,
    content_type TEXT NOT NULL,
    charset TEXT NOT NULL,
    trace_id TEXT NOT NULL,
    peer TEXT NOT NULL,
    raw {blob},
    error TEXT,
    dedupe_key TEXT UNIQUE,
    discarded_at {real}{message_columns}
);
CREATE TABLE {exists}stages (
    seq {self.serial},
    message_id TEXT NOT NULL,
    stage TEXT NOT NULL,
    status TEXT NOT NULL,
    at {real} NOT NULL,
    content_type TEXT,
    payload {blob},
    detail {self.json}
);
CREATE TABLE {exists}deliveries (
    message_id TEXT NOT NULL,
    destination TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    updated_at {real} NOT NULL,
    last_error TEXT,
    PRIMARY KEY (message_id, destination)
){table_options};
"""


SQLITE = Dialect(
    "sqlite",
    folded=True,
    shard_in_sql=True,
    arrays=False,
    serial="INTEGER PRIMARY KEY AUTOINCREMENT",  # a seq is never used twice, even after deletes
    real="REAL",
    blob="BLOB",
    json="TEXT",
)
POSTGRES = Dialect(
    "postgresql",
    folded=False,
    shard_in_sql=False,
    arrays=True,
    serial="BIGSERIAL PRIMARY KEY",
    real="DOUBLE PRECISION",
    blob="BYTEA",
    json="JSONB",
)

MSG_COLUMNS = (
    "seq, id, channel, source, received_at, updated_at, status, sender, control_id, message_type, "
    "partition_key, content_type, charset, trace_id, peer, error, discarded_at"
)
_ROW_COLUMNS = (
    "id, channel, source, received_at, updated_at, status, sender, control_id, message_type,"
    " partition_key, content_type, charset, trace_id, peer, raw, dedupe_key, digest"
)
# Positions in a message row (see message_row).
_ID, _RECEIVED, _STATUS, _PEER, _KEY, _DIGEST, _ACK = 0, 3, 5, 13, 15, 16, 17
_FOLDED = ", ack, ack_meta, outcome"
PENDING_STATUSES = (Status.RECEIVED.value, Status.TRANSFORMED.value, Status.QUEUED.value, Status.ERROR.value)
TERMINAL_STATUSES = (Status.FILTERED.value, Status.SENT.value, Status.DEAD.value)

INSERT_STAGE = (
    "INSERT INTO stages (message_id, stage, status, at, content_type, payload, detail) VALUES (?,?,?,?,?,?,?)"
)
UPSERT_DELIVERY = (
    "INSERT INTO deliveries (message_id, destination, status, attempts, updated_at, last_error)"
    " VALUES (?,?,?,?,?,?) ON CONFLICT (message_id, destination) DO UPDATE SET status=excluded.status,"
    " attempts=excluded.attempts, updated_at=excluded.updated_at, last_error=excluded.last_error"
)
UPDATE_DELIVERY = (
    "UPDATE deliveries SET status=?, attempts=?, updated_at=?, last_error=?"
    " WHERE message_id=? AND destination=?"
)
SET_STATUS = "UPDATE messages SET status=?, updated_at=?, error=? WHERE id=?"
RELEASE_KEY = "UPDATE messages SET dedupe_key=NULL WHERE id=?"


def insert_message(dialect: Dialect) -> str:
    """The message insert; a row already there (same id, or same dedupe key) inserts nothing."""
    columns = _ROW_COLUMNS + (", ack, ack_meta" if dialect.folded else "")
    marks = ",".join("?" * (17 + (2 if dialect.folded else 0)))
    return f"INSERT INTO messages ({columns}) VALUES ({marks}) ON CONFLICT DO NOTHING RETURNING seq"  # noqa: S608


def select_by_id(dialect: Dialect) -> str:
    # Built from constants only: no caller text ever reaches an SQL string.
    return f"SELECT {MSG_COLUMNS}, raw{_FOLDED if dialect.folded else ''} FROM messages WHERE id=?"  # noqa: S608


# -- rows -------------------------------------------------------------------------------


def message_row(e: Envelope, digest: str) -> tuple[Any, ...]:
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
        digest,
    )


@functools.lru_cache(maxsize=32)
def ack_meta(code: str, status: str) -> str:
    # A handful of (code, status) pairs, one per message on the hot path: serialise each once.
    return orjson.dumps({"code": code, "status": status}).decode()


def stage_row(message_id: str, stage: StageRecord, now: float) -> tuple[Any, ...]:
    return (
        message_id,
        stage.stage,
        stage.status.value,
        now,
        stage.content_type,
        stage.payload,
        orjson.dumps(dict(stage.detail)).decode() if stage.detail else None,
    )


def error_of(stage: StageRecord) -> str | None:
    code = stage.detail.get("error")
    return str(code) if code else None


def envelope_of(row: Any, status: Status, *, dedupe: bool = True) -> Envelope:
    """An envelope from a stored row (or any mapping with its fields)."""
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
        dedupe=dedupe,
    )


# -- the journal ----------------------------------------------------------------------


def append_rows(
    dialect: Dialect,
    rows: Sequence[tuple[Any, ...]],
    ack: tuple[bytes, str] | None,
    released: Callable[[str], bool] | None = None,
) -> Ops[list[AppendResult]]:
    out = []
    for row in rows:
        result, _ = yield from insert(dialect, row, ack, released)
        out.append(result)
    return out


def insert(
    dialect: Dialect,
    row: tuple[Any, ...],
    ack: tuple[bytes, str] | None,
    released: Callable[[str], bool] | None = None,
) -> Ops[tuple[AppendResult, str | None]]:
    """Insert one message row: new, the same envelope again (a redelivery), or a duplicate of another.

    Dedupe: an envelope whose key (channel, sender, MSH-10) is already held is a duplicate only
    when its bytes are the same (their digests match). Another message under a seen MSH-10 is kept
    as a row of its own, status ERROR, without key nor ACK, and answered as a conflict (see
    AppendResult): the sender is told, and nothing is thrown away. Returns the result and, when
    this very envelope was stored already, its status. ``released(id)``: whether a release of
    that message's key is decided but not written yet (it is applied first).
    """
    full = row
    if dialect.folded:
        full = (*row, ack[0] if ack else None, ack_meta(ack[1], row[_STATUS]) if ack else None)
    seq = yield Kind.VALUE, insert_message(dialect), full
    if seq is not None:
        if ack is not None and not dialect.folded:
            detail = orjson.dumps({"code": ack[1]}).decode()
            yield (
                Kind.EXECUTE,
                INSERT_STAGE,
                (row[_ID], "ack", row[_STATUS], row[_RECEIVED], HL7_V2, ack[0], detail),
            )
        return AppendResult(row[_ID], False, seq), None
    same = yield Kind.ONE, "SELECT seq, status FROM messages WHERE id=?", (row[_ID],)
    if same is not None:
        return AppendResult(row[_ID], False, same["seq"]), str(same["status"])
    first = yield (
        Kind.ONE,
        "SELECT id, seq, status, digest, CASE WHEN digest IS NULL THEN raw END AS old_raw FROM messages"
        " WHERE dedupe_key=?",
        (row[_KEY],),
    )
    if first is None:  # the first one was pruned meanwhile: keep this one
        return (yield from insert(dialect, (*row[:_KEY], None, row[_DIGEST]), ack))
    if released is not None and released(first["id"]):
        # Its sender was answered AE and the release waits to be written: apply it now.
        yield Kind.EXECUTE, RELEASE_KEY, (first["id"],)
        return (yield from insert(dialect, row, ack))
    if not same_content(first["digest"], first["old_raw"], row[_DIGEST]):
        return (yield from _insert_conflict(dialect, row, first["id"])), None
    detail = orjson.dumps({"duplicate_of_envelope": row[_ID], "peer": row[_PEER]}).decode()
    yield (
        Kind.EXECUTE,
        "INSERT INTO stages (message_id, stage, status, at, detail) VALUES (?,?,?,?,?)",
        (first["id"], "duplicate", first["status"], row[_RECEIVED], detail),
    )
    return AppendResult(first["id"], True, first["seq"]), None


def _insert_conflict(dialect: Dialect, row: tuple[Any, ...], first_id: str) -> Ops[AppendResult]:
    """Keep a message that reuses another's MSH-10: its own row, ERROR, no key, no ACK yet."""
    kept = (*row[:_STATUS], Status.ERROR.value, *row[_STATUS + 1 : _KEY], None, row[_DIGEST])
    if dialect.folded:
        kept = (*kept, None, None)
    seq = yield Kind.VALUE, insert_message(dialect), kept
    if seq is None:  # this very envelope again (a redelivery): the row is there already
        seq = yield Kind.VALUE, "SELECT seq FROM messages WHERE id=?", (row[_ID],)
        return AppendResult(row[_ID], True, seq, conflict=True)
    yield Kind.EXECUTE, "UPDATE messages SET error=? WHERE seq=?", (CONFLICT_CODE, seq)
    detail = {
        "error": CONFLICT_CODE,
        "text": "MSH-10 is already used by another message with other content",
        "location": "MSH-10",
        "conflicts_with": first_id,
        "peer": row[_PEER],
    }
    yield (
        Kind.EXECUTE,
        INSERT_STAGE,
        (row[_ID], "intake", Status.ERROR.value, row[_RECEIVED], None, None, orjson.dumps(detail).decode()),
    )
    return AppendResult(row[_ID], True, seq, conflict=True)


# -- the trace --------------------------------------------------------------------------

# Stage rows kept per waiting message: the first half and the latest, with a count of the others.
MAX_HELD_STAGES = 64


class Trace:
    """The trace writes about one message, as data: applied by one write, and merged with the
    message's later writes while they wait (so that a backlog holds one per message)."""

    __slots__ = ("deliveries", "dropped", "first_try", "message_id", "release", "stages", "status")

    def __init__(self, message_id: str) -> None:
        self.message_id = message_id
        self.stages: list[tuple[Any, ...]] = []  # stage rows (see stage_row), in order
        # destination → (status, attempts, at, last error, may insert the row)
        self.deliveries: dict[str, tuple[str, int, float, str | None, bool]] = {}
        self.status: tuple[str, float, str | None] | None = None  # (status, at, error)
        self.release = False  # the dedupe key is released
        self.dropped = 0  # stage rows left out to bound the memory a waiting message holds
        # A payload-less transform that every destination took at once (a backend may fold it).
        self.first_try = False

    @classmethod
    def of_stage(cls, message_id: str, stage: StageRecord | None, now: float) -> Trace:
        trace = cls(message_id)
        if stage is not None:
            trace.stages.append(stage_row(message_id, stage, now))
        return trace

    def merge(self, later: Trace) -> None:
        """Add ``later``'s writes after these: rows append, states take the latest value."""
        self.stages += later.stages
        self.dropped += later.dropped
        excess = len(self.stages) - MAX_HELD_STAGES
        if excess > 0:
            half = MAX_HELD_STAGES // 2
            del self.stages[half : half + excess]
            self.dropped += excess
        for destination, state in later.deliveries.items():
            before = self.deliveries.get(destination)
            self.deliveries[destination] = state if before is None else (*state[:4], state[4] or before[4])
        if later.status is not None:
            self.status = later.status
        self.release = self.release or later.release
        self.first_try = False

    def __reduce__(self) -> tuple[Any, ...]:
        # Sent from the worker to the main process: pickled as its fields, not slot by slot.
        state = (self.stages, self.deliveries, self.status, self.release, self.dropped, self.first_try)
        return _restored, (self.message_id, state)

    def apply(self) -> Ops[None]:
        mid = self.message_id
        if len(self.stages) == 1:
            yield Kind.EXECUTE, INSERT_STAGE, self.stages[0]
        elif self.stages:
            yield Kind.MANY, INSERT_STAGE, self.stages
        if self.dropped:
            last = self.stages[-1]
            detail = orjson.dumps({"stages_left_out": self.dropped}).decode()
            yield Kind.EXECUTE, INSERT_STAGE, (mid, "trace_coalesced", last[2], last[3], None, None, detail)
        inserted = [(mid, d, *state[:4]) for d, state in self.deliveries.items() if state[4]]
        if inserted:
            yield Kind.MANY, UPSERT_DELIVERY, inserted
        for destination, (status, attempts, at, error, insert) in self.deliveries.items():
            if not insert:
                yield Kind.EXECUTE, UPDATE_DELIVERY, (status, attempts, at, error, mid, destination)
        if self.status is not None:
            yield Kind.EXECUTE, SET_STATUS, (*self.status, mid)
        if self.release:
            yield Kind.EXECUTE, RELEASE_KEY, (mid,)


def _restored(message_id: str, state: tuple[Any, ...]) -> Trace:
    trace = Trace(message_id)
    trace.stages, trace.deliveries, trace.status, trace.release, trace.dropped, trace.first_try = state
    return trace


def delivery_trace(
    message_id: str, stage: StageRecord, destinations: Sequence[str], *, sent: bool, now: float
) -> Trace:
    """The transform and one delivery row per destination: QUEUED, or SENT when ``sent``
    (every destination already took the message on its first attempt)."""
    status = Status.QUEUED.value if destinations and not sent else Status.SENT.value
    trace = Trace.of_stage(message_id, stage, now)
    for d in destinations:
        trace.deliveries[d] = (status, 1 if sent else 0, now, None, True)
    trace.status = (status, now, None)
    trace.first_try = status == Status.SENT.value and stage.payload is None
    return trace


# -- reads --------------------------------------------------------------------------------


def work_of(row: Any) -> Ops[WorkItem | None]:
    """The pending work of one message row (None when nothing is left to do)."""
    status = Status(row["status"])
    env = envelope_of(row, status)
    if status is Status.RECEIVED:
        return WorkItem(row["seq"], env, status, None, (), {})
    if status not in (Status.TRANSFORMED, Status.QUEUED, Status.ERROR):
        return None
    deliveries = yield (
        Kind.ALL,
        "SELECT destination, attempts FROM deliveries WHERE message_id=? AND status IN (?,?)"
        " ORDER BY destination",
        (row["id"], Status.QUEUED.value, Status.ERROR.value),
    )
    if not deliveries:
        if status is Status.TRANSFORMED:  # crashed between transform and queueing
            return WorkItem(row["seq"], env, Status.RECEIVED, None, (), {})
        return None
    payload = yield (
        Kind.VALUE,
        "SELECT payload FROM stages WHERE message_id=? AND payload IS NOT NULL"
        " AND stage LIKE 'step:%' ORDER BY seq DESC LIMIT 1",
        (row["id"],),
    )
    return WorkItem(
        row["seq"],
        env,
        status,
        payload,
        tuple(d["destination"] for d in deliveries),
        {d["destination"]: d["attempts"] for d in deliveries},
    )


def work_item(dialect: Dialect, message_id: str) -> Ops[WorkItem | None]:
    row = yield Kind.ONE, select_by_id(dialect), (message_id,)
    return None if row is None else (yield from work_of(row))


def pending(
    dialect: Dialect,
    channel: str,
    after_seq: int,
    limit: int,
    *,
    recovering: bool,
    shard: tuple[int, int] | None,
) -> Ops[list[WorkItem]]:
    statuses = PENDING_STATUSES if recovering else (Status.RECEIVED.value,)
    among, status_args = dialect.one_of("status", statuses)
    sharded = shard is not None and shard[1] > 1
    in_sql = sharded and dialect.shard_in_sql
    sql = (
        f"SELECT {MSG_COLUMNS}, raw FROM messages WHERE channel=? AND seq>? AND {among}"  # noqa: S608
        f" AND discarded_at IS NULL{' AND shard_of(partition_key, ?) = ?' if in_sql else ''}"
        " ORDER BY seq LIMIT ?"
    )
    shard_args = (shard[1], shard[0]) if in_sql and shard is not None else ()
    items: list[WorkItem] = []
    cursor = after_seq
    while len(items) < limit:
        rows = yield Kind.ALL, sql, (channel, cursor, *status_args, *shard_args, limit)
        for row in rows:
            cursor = row["seq"]
            if (
                sharded
                and not in_sql
                and shard is not None
                and shard_of(row["partition_key"], shard[1]) != shard[0]
            ):
                continue
            item = yield from work_of(row)
            if item is not None:
                items.append(item)
                if len(items) == limit:
                    break
        if len(rows) < limit:
            break
    return items


def get_message(dialect: Dialect, message_id: str, *, with_payloads: bool) -> Ops[dict[str, Any] | None]:
    row = yield Kind.ONE, select_by_id(dialect), (message_id,)
    if row is None:
        return None
    msg = row_dict(row)
    for column in ("ack", "ack_meta", "outcome"):
        msg.pop(column, None)
    if not with_payloads:
        msg.pop("raw")
    # Folded stages are placed by their time, and so is a transform a replay moved out of the row.
    order = "at, seq" if dialect.folded else "seq"
    stages: list[Mapping[str, Any]] = list(
        (
            yield (
                Kind.ALL,
                "SELECT stage, status, at, content_type, payload, detail FROM stages"  # noqa: S608
                f" WHERE message_id=? ORDER BY {order}",
                (message_id,),
            )
        )
    )
    deliveries = [
        row_dict(d)
        for d in (
            yield (
                Kind.ALL,
                "SELECT destination, status, attempts, updated_at, last_error FROM deliveries"
                " WHERE message_id=? ORDER BY destination",
                (message_id,),
            )
        )
    ]
    if dialect.folded:
        folded_stages, folded_deliveries = folded(row)
        for stage in folded_stages:
            _insert_in_time(stages, stage)
        deliveries += folded_deliveries
    msg["stages"] = [trace_stage(s, with_payloads=with_payloads) for s in stages]
    msg["deliveries"] = deliveries
    return msg


def list_messages(filters: Sequence[tuple[str, str, Any]], limit: int) -> Ops[list[dict[str, Any]]]:
    """Newest first, under ``views.message_filters``' (column, operator, value) filters."""
    where = " AND ".join(["1=1", *(f"{column}{operator}?" for column, operator, _ in filters)])
    args = [value for _, _, value in filters]
    rows = yield (
        Kind.ALL,
        f"SELECT {MSG_COLUMNS} FROM messages WHERE {where} ORDER BY seq DESC LIMIT ?",  # noqa: S608
        (*args, limit),
    )
    return [row_dict(r) for r in rows]


def dead_letters(channel: str | None, limit: int) -> Ops[list[dict[str, Any]]]:
    by_channel = " AND channel=?" if channel is not None else ""
    rows = yield (
        Kind.ALL,
        f"SELECT {MSG_COLUMNS} FROM messages WHERE status=? AND discarded_at IS NULL{by_channel}"  # noqa: S608
        " ORDER BY seq LIMIT ?",
        (Status.DEAD.value, *((channel,) if channel is not None else ()), limit),
    )
    return [row_dict(r) for r in rows]


def stats(dialect: Dialect) -> Ops[dict[str, Any]]:
    by_channel, by_type = message_counts(
        (
            yield (
                Kind.ALL,
                "SELECT channel, message_type, status, COUNT(*) FROM messages"
                " GROUP BY channel, message_type, status",
                (),
            )
        )
    )
    deliveries: dict[str, dict[str, int]] = {}
    for row in (
        yield (
            Kind.ALL,
            "SELECT destination, status, COUNT(*) FROM deliveries GROUP BY destination, status",
            (),
        )
    ):
        deliveries.setdefault(row[0], {})[row[1]] = row[2]
    if dialect.folded:
        for row in (
            yield (
                Kind.ALL,
                "SELECT d.value, COUNT(*) FROM messages, json_each(messages.outcome, '$.destinations') AS d"
                " WHERE messages.outcome IS NOT NULL GROUP BY d.value",
                (),
            )
        ):
            counts = deliveries.setdefault(row[0], {})
            counts[Status.SENT.value] = counts.get(Status.SENT.value, 0) + row[1]
    duplicates = yield Kind.VALUE, "SELECT COUNT(*) FROM stages WHERE stage='duplicate'", ()
    return {"channels": by_channel, "by_type": by_type, "destinations": deliveries, "duplicates": duplicates}


# -- operator actions ---------------------------------------------------------------------


def reset_for_replay(dialect: Dialect, message_id: str) -> Ops[WorkItem | None]:
    now = time.time()
    row = yield Kind.ONE, select_by_id(dialect), (message_id,)
    if row is None or row["raw"] is None:
        return None
    if dialect.folded and row["outcome"]:
        # The earlier run's transform stays in the trace, as a stage row of its own now.
        was = orjson.loads(row["outcome"])
        yield (
            Kind.EXECUTE,
            INSERT_STAGE,
            (message_id, was["stage"], was["status"], was["at"], was["content_type"], None, was["detail"]),
        )
    yield Kind.EXECUTE, "DELETE FROM deliveries WHERE message_id=?", (message_id,)
    yield (
        Kind.EXECUTE,
        "UPDATE messages SET status=?, updated_at=?, error=NULL, discarded_at=NULL"  # noqa: S608
        f"{', outcome=NULL' if dialect.folded else ''} WHERE id=?",
        (Status.RECEIVED.value, now, message_id),
    )
    yield Kind.EXECUTE, INSERT_STAGE, (message_id, "replay", Status.RECEIVED.value, now, None, None, "{}")
    return WorkItem(row["seq"], envelope_of(row, Status.RECEIVED), Status.RECEIVED, None, (), {})


def discard(message_id: str) -> Ops[bool]:
    now = time.time()
    changed = yield (
        Kind.EXECUTE,
        "UPDATE messages SET discarded_at=? WHERE id=? AND status=? AND discarded_at IS NULL",
        (now, message_id, Status.DEAD.value),
    )
    if changed:
        yield Kind.EXECUTE, INSERT_STAGE, (message_id, "discard", Status.DEAD.value, now, None, None, "{}")
    return bool(changed)


def prune(dialect: Dialect, *, payload_before: float, message_before: float) -> Ops[tuple[int, int]]:
    """Retention: drop payloads, then whole messages, of terminal messages older than the limits."""
    terminal, terminal_args = dialect.one_of("status", TERMINAL_STATUSES)
    old = yield (
        Kind.ALL,
        f"SELECT id FROM messages WHERE updated_at<? AND {terminal}",  # noqa: S608
        (message_before, *terminal_args),
    )
    ids = [(r[0],) for r in old]
    if ids:
        yield Kind.MANY, "DELETE FROM stages WHERE message_id=?", ids
        yield Kind.MANY, "DELETE FROM deliveries WHERE message_id=?", ids
        yield Kind.MANY, "DELETE FROM messages WHERE id=?", ids
    dropped = yield (
        Kind.EXECUTE,
        f"UPDATE messages SET raw=NULL{', ack=NULL' if dialect.folded else ''}"  # noqa: S608
        f" WHERE updated_at<? AND raw IS NOT NULL AND {terminal}",
        (payload_before, *terminal_args),
    )
    yield (
        Kind.EXECUTE,
        "UPDATE stages SET payload=NULL WHERE payload IS NOT NULL AND message_id IN"
        " (SELECT id FROM messages WHERE raw IS NULL)",
        (),
    )
    return int(dropped), len(ids)


def finish(message_id: str) -> Ops[None]:
    """Every delivery is settled: the message is DEAD when one of them is, SENT otherwise."""
    yield (
        Kind.EXECUTE,
        "UPDATE messages SET status = CASE WHEN EXISTS (SELECT 1 FROM deliveries"
        " WHERE message_id=? AND status=?) THEN ? ELSE ? END, updated_at=? WHERE id=?",
        (message_id, Status.DEAD.value, Status.DEAD.value, Status.SENT.value, time.time(), message_id),
    )


def shared_secret(name: str, candidate: bytes) -> Ops[bytes]:
    """A secret made by the first node that asks (``candidate``), then the same for all."""
    yield (
        Kind.EXECUTE,
        "INSERT INTO installation (name, value) VALUES (?, ?) ON CONFLICT DO NOTHING",
        (name, candidate),
    )
    return bytes((yield Kind.VALUE, "SELECT value FROM installation WHERE name=?", (name,)))


def ping() -> Ops[None]:
    yield Kind.VALUE, "SELECT 1", ()


def nothing() -> Ops[None]:
    """Asks for nothing: a flush waits for its turn in the queue."""
    yield from ()


# -- the folded row (SQLite) ---------------------------------------------------------------


def outcome_of(row: tuple[Any, ...], destinations: Iterable[str]) -> str:
    """A payload-less stage row (see stage_row) and the destinations that took the message.
    "detail" keeps the row's text, so a replay can move it into a row of its own unchanged."""
    _, stage, status, at, content_type, _, detail = row
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


def folded(row: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
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
