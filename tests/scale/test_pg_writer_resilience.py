"""The PostgreSQL store's writer: a wrong write is answered, never retried forever; the writer
survives anything one write does, and comes back if it stops."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from gateway.core.envelope import HL7_V2, Envelope
from gateway.core.errors import StoreError
from gateway.store.messages.postgres import PostgresStore
from gateway.store.pg_errors import connection_lost
from tests.scale.conftest import PG_DSN, LiveNames
from tests.waiting import until

pytestmark = pytest.mark.live


def env(i: str) -> Envelope:
    return Envelope(i, "adt", "hospital", b"MSH|", HL7_V2, "A^B", f"C-{i}", "ADT^A01", "k", 1.0, i)


@pytest.fixture
async def store(live: LiveNames) -> AsyncIterator[PostgresStore]:
    s = PostgresStore(PG_DSN, schema=live.schema, pool_size=2)
    await s.open()
    yield s
    await s.close()


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("a bug in one write"),
        asyncpg.InterfaceError("the server expects 2 arguments, 1 was passed"),
    ],
)
async def test_a_write_failing_outside_postgres_errors_is_answered_and_the_writer_goes_on(
    store: PostgresStore, exc: BaseException
) -> None:
    async def poison(conn: Any) -> Any:
        raise exc

    bad = store._submit(poison)
    good = asyncio.ensure_future(store.append([env("01GOOD")]))
    with pytest.raises(StoreError, match=type(exc).__name__):
        await asyncio.wait_for(bad, 20)
    results = await asyncio.wait_for(good, 20)  # the same batch's other write is committed
    assert not results[0].duplicate
    assert store.connected  # a programming error is not a lost database
    assert (await store.append([env("01AFTER")]))[0].seq > results[0].seq
    await store.ping()


async def test_a_stopped_writer_is_restarted_and_its_writes_answered(store: PostgresStore) -> None:
    assert store._writer is not None
    store._writer.cancel()
    await until(lambda: store.writer_restarts == 1, 20, "writer restarted")
    assert (await asyncio.wait_for(store.append([env("01REST")]), 20))[0].seq > 0
    await store.ping()


def test_only_real_link_failures_count_as_connection_loss() -> None:
    class Closed:
        def is_closed(self) -> bool:
            return True

    class Open:
        def is_closed(self) -> bool:
            return False

    assert connection_lost(ConnectionResetError())
    assert connection_lost(asyncpg.ConnectionDoesNotExistError("closed in the middle of operation"))
    assert connection_lost(asyncpg.InterfaceError("connection is closed"), Closed())
    assert not connection_lost(asyncpg.InterfaceError("another operation is in progress"), Open())
    assert not connection_lost(asyncpg.InterfaceError("no connection known"))
    assert not connection_lost(asyncpg.UniqueViolationError("duplicate key"))
    assert not connection_lost(ValueError("bug"))
