"""The PostgreSQL error table: each asyncpg (or OS) failure has one kind, and every kind is
answered with a StoreError, so that the sender sends again."""

from __future__ import annotations

import asyncio
import socket
import uuid
from typing import Any

import asyncpg
import pytest

from gateway.core.errors import AckCode, StoreError
from gateway.store.pg_errors import POSTGRES_ERRORS, TABLE, Kind, classify, translate, unavailable
from gateway.store.postgres import connect_pool
from tests.scale.conftest import PG_DSN, require_live


class _Conn:
    def __init__(self, closed: bool) -> None:
        self.closed = closed

    def is_closed(self) -> bool:
        return self.closed


def _in_class(sqlstate: str) -> asyncpg.PostgresError:
    """A server error asyncpg has no class of its own for, known by its SQLSTATE only."""
    exc = asyncpg.PostgresError("from the server")
    exc.sqlstate = sqlstate
    return exc


CASES: list[tuple[BaseException, Any, Kind | None]] = [
    (ConnectionRefusedError(), None, Kind.LINK_LOST),
    (ConnectionResetError(), None, Kind.LINK_LOST),
    (TimeoutError(), None, Kind.LINK_LOST),
    (asyncpg.PostgresConnectionError("08000"), None, Kind.LINK_LOST),
    (asyncpg.ConnectionDoesNotExistError("closed in the middle of operation"), None, Kind.LINK_LOST),
    (asyncpg.ConnectionFailureError("08006"), None, Kind.LINK_LOST),
    (asyncpg.CannotConnectNowError("the database system is starting up"), None, Kind.LINK_LOST),
    (asyncpg.InterfaceError("connection is closed"), _Conn(closed=True), Kind.LINK_LOST),
    (asyncpg.InterfaceError("another operation is in progress"), _Conn(closed=False), Kind.WRONG),
    (asyncpg.InterfaceError("the server expects 2 arguments"), None, Kind.WRONG),
    (asyncpg.InsufficientResourcesError("53000"), None, Kind.CANNOT_COMMIT),
    (asyncpg.DiskFullError("could not extend file"), None, Kind.CANNOT_COMMIT),
    (asyncpg.OutOfMemoryError("out of memory"), None, Kind.CANNOT_COMMIT),
    (asyncpg.TooManyConnectionsError("too many clients"), None, Kind.CANNOT_COMMIT),
    (asyncpg.PostgresSystemError("58000"), None, Kind.CANNOT_COMMIT),
    (asyncpg.PostgresIOError("could not read block"), None, Kind.CANNOT_COMMIT),
    (_in_class("53999"), None, Kind.CANNOT_COMMIT),
    (asyncpg.DeadlockDetectedError("deadlock detected"), None, Kind.CONFLICT),
    (asyncpg.SerializationError("could not serialize access"), None, Kind.CONFLICT),
    (asyncpg.UniqueViolationError("duplicate key"), None, Kind.CONFLICT),
    (asyncpg.NotNullViolationError("null value in column"), None, Kind.WRONG),
    (asyncpg.DataError("invalid input syntax"), None, Kind.WRONG),
    (asyncpg.UndefinedTableError("relation does not exist"), None, Kind.WRONG),
    (asyncpg.AdminShutdownError("terminating connection"), None, Kind.WRONG),
    (ValueError("a bug"), None, None),
]


@pytest.mark.parametrize(("exc", "conn", "kind"), CASES, ids=lambda v: type(v).__name__)
def test_each_failure_has_the_kind_the_table_gives(exc: BaseException, conn: Any, kind: Kind | None) -> None:
    assert classify(exc, conn) is kind
    assert unavailable(exc, conn) == (kind is not None and kind.transient)
    assert isinstance(exc, POSTGRES_ERRORS) == (kind is not None)


def test_an_interface_error_from_the_pool_is_a_lost_link() -> None:
    assert classify(asyncpg.InterfaceError("pool is closing"), acquiring=True) is Kind.LINK_LOST


def test_only_the_lost_link_and_the_server_that_cannot_commit_are_transient() -> None:
    assert {k for k in Kind if k.transient} == {Kind.LINK_LOST, Kind.CANNOT_COMMIT}


def test_a_subclass_is_listed_before_its_base() -> None:
    for i, (cls, _) in enumerate(TABLE):
        for earlier, _ in TABLE[:i]:
            assert not issubclass(cls, earlier), f"{cls.__name__} is shadowed by {earlier.__name__}"


@pytest.mark.parametrize(("exc", "conn", "kind"), [c for c in CASES if c[2] is not None])
def test_every_kind_is_answered_with_a_store_error_naming_what_failed(
    exc: BaseException, conn: Any, kind: Kind
) -> None:
    error = translate(exc, "store write failed")
    assert isinstance(error, StoreError)
    assert (error.ack_code, error.http_status) == (AckCode.AE, 503)
    assert error.message == f"store write failed: {type(exc).__name__}"
    assert translate(exc, "cannot open", detail=True).message == f"cannot open: {exc}"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.live
async def test_a_real_unique_violation_and_a_real_connection_loss_are_translated_as_the_table_says() -> None:
    require_live()
    conn = await asyncpg.connect(PG_DSN)
    admin = await asyncpg.connect(PG_DSN)
    table = f"t_{uuid.uuid4().hex[:10]}"
    try:
        await conn.execute(f"CREATE TEMP TABLE {table} (k TEXT PRIMARY KEY)")
        await conn.execute(f"INSERT INTO {table} VALUES ('a')")  # noqa: S608 - a generated name
        with pytest.raises(POSTGRES_ERRORS) as dup:
            await conn.execute(f"INSERT INTO {table} VALUES ('a')")  # noqa: S608
        assert classify(dup.value, conn) is Kind.CONFLICT
        assert isinstance(translate(dup.value, "write"), StoreError)

        # The server ends the connection in the middle of a statement, then while it is idle.
        busy = asyncio.ensure_future(conn.fetchval("SELECT pg_sleep(30)"))
        await asyncio.sleep(0.3)
        await admin.execute("SELECT pg_terminate_backend($1)", conn.get_server_pid())
        with pytest.raises(POSTGRES_ERRORS) as lost:
            await asyncio.wait_for(busy, 10)
        assert classify(lost.value, conn) is Kind.LINK_LOST
        with pytest.raises(POSTGRES_ERRORS) as closed:
            await conn.fetchval("SELECT 1")
        assert classify(closed.value, conn) is Kind.LINK_LOST
        assert translate(closed.value, "store read failed").message.startswith("store read failed: ")
    finally:
        await conn.close()
        await admin.close()

    # Nothing listens: the start-up error names the address and the refusal.
    dsn = f"postgresql://postgres@127.0.0.1:{_closed_port()}/test"
    with pytest.raises(StoreError, match=f"cannot connect to PostgreSQL at {dsn}") as refused:
        await connect_pool(dsn, None)
    assert classify(refused.value.__cause__) is Kind.LINK_LOST
