"""What a PostgreSQL (asyncpg) failure means, in one table, and how it is answered.

Every kind is answered with a StoreError (AE on the wire, 503 over HTTP): the sender sends
again in each case. The kind decides what the store does first: keep the write queued until the
database is back, run the transaction again at once, or give up on that one write.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import asyncpg

from gateway.core.errors import StoreError


class Kind(StrEnum):
    LINK_LOST = "link_lost"  # transient: the database went away; retry later
    CANNOT_COMMIT = "cannot_commit"  # transient: reachable but cannot commit (disk full…); retry later
    CONFLICT = "conflict"  # a concurrent transaction won: run it again now
    WRONG = "wrong"  # this statement is wrong: no retry helps

    @property
    def transient(self) -> bool:
        return self in (Kind.LINK_LOST, Kind.CANNOT_COMMIT)


# First match wins, so a subclass comes before its base. An asyncpg.InterfaceError is a misuse
# unless its connection is closed, which only classify can tell.
TABLE: tuple[tuple[type[BaseException], Kind], ...] = (
    (OSError, Kind.LINK_LOST),  # TimeoutError too: it is an OSError
    (asyncpg.PostgresConnectionError, Kind.LINK_LOST),  # SQLSTATE class 08
    (asyncpg.CannotConnectNowError, Kind.LINK_LOST),  # 57P03: starting up or shutting down
    (asyncpg.InsufficientResourcesError, Kind.CANNOT_COMMIT),  # class 53: disk, memory, connections
    (asyncpg.PostgresSystemError, Kind.CANNOT_COMMIT),  # class 58: I/O error
    (asyncpg.DeadlockDetectedError, Kind.CONFLICT),  # 40P01
    (asyncpg.SerializationError, Kind.CONFLICT),  # 40001
    # A concurrent insert of the same key: the FHIR repository runs its transaction again and
    # finds the row; the message store, whose inserts say ON CONFLICT, answers the one write.
    (asyncpg.UniqueViolationError, Kind.CONFLICT),  # 23505
    (asyncpg.PostgresError, Kind.WRONG),
    (asyncpg.InterfaceError, Kind.WRONG),
)

# What callers catch around a PostgreSQL call: every row of the table.
POSTGRES_ERRORS: tuple[type[BaseException], ...] = tuple(cls for cls, _ in TABLE)
# The SQLSTATE classes that mean "cannot commit now", for a server error asyncpg has no class for.
_CANNOT_COMMIT_CLASSES = ("53", "58")


def classify(exc: BaseException, conn: Any = None, *, acquiring: bool = False) -> Kind | None:
    """The kind of ``exc`` (None when it is no database failure). An InterfaceError is a lost
    link when its connection ``conn`` is closed, or when it came from getting a connection from
    the pool (``acquiring``); otherwise it is a misuse a retry cannot cure."""
    if isinstance(exc, asyncpg.InterfaceError):
        closed = conn is not None and bool(conn.is_closed())
        return Kind.LINK_LOST if acquiring or closed else Kind.WRONG
    for cls, kind in TABLE:
        if isinstance(exc, cls):
            state = getattr(exc, "sqlstate", None)
            if kind is Kind.WRONG and isinstance(state, str) and state[:2] in _CANNOT_COMMIT_CLASSES:
                return Kind.CANNOT_COMMIT
            return kind
    return None


def connection_lost(exc: BaseException, conn: Any = None) -> bool:
    return classify(exc, conn) is Kind.LINK_LOST


def unavailable(exc: BaseException, conn: Any = None) -> bool:
    """The database cannot commit now (link lost, disk full…): keep the write and try again."""
    kind = classify(exc, conn)
    return kind is not None and kind.transient


def translate(exc: BaseException, doing: str, *, detail: bool = False) -> StoreError:
    """The StoreError answering ``exc`` raised while ``doing``; raise it ``from exc``. Only the
    exception's type is quoted unless ``detail`` (start-up): a message may quote stored data."""
    return StoreError(f"{doing}: {exc if detail else type(exc).__name__}")
