"""The gateway opens its parts in order and, when one fails to open, closes those already open."""

from __future__ import annotations

import socket
from pathlib import Path

import asyncpg
import pytest

from gateway.app import Gateway
from gateway.core.errors import StoreError
from gateway.store.messages.sqlite import SqliteStore
from gateway.store.pg_fhir import PgFhirRepository
from tests.conftest import make_config
from tests.scale.conftest import PG_DSN, LiveNames, require_live
from tests.waiting import until


async def test_a_repository_that_cannot_open_closes_the_store_opened_before_it(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    gw = Gateway(config)
    fhir_db = gw.data_dir / "fhir.db"
    fhir_db.mkdir(parents=True)  # SQLite cannot open a directory as its database
    with pytest.raises(StoreError, match="cannot open the FHIR repository"):
        await gw.start()
    assert isinstance(gw.store, SqliteStore)
    assert not gw.store.is_open
    assert gw.http_port_bound is None  # nothing after the repository was started

    # The journal is free again: the next gateway on the same directory starts and takes it.
    fhir_db.rmdir()
    again = Gateway(config)
    await again.start()
    try:
        assert again.store.is_open
        assert (await again.readiness())["fhir"] == {"ok": True}
    finally:
        await again.stop()
    assert not again.store.is_open


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _no_backend_left(pids: list[int]) -> bool:
    admin = await asyncpg.connect(PG_DSN)
    try:
        return not await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)", pids)
    finally:
        await admin.close()


@pytest.mark.live
async def test_a_postgresql_store_is_closed_when_the_repository_cannot_connect(tmp_path: Path) -> None:
    require_live()
    live = LiveNames()
    try:
        await _start_with_an_unreachable_repository(tmp_path, live.schema)
    finally:
        await live.cleanup()


async def _start_with_an_unreachable_repository(tmp_path: Path, schema: str) -> None:
    gw = Gateway(make_config(tmp_path), store_dsn=PG_DSN)
    gw.store.schema = schema  # type: ignore[union-attr]
    dsn = f"postgresql://postgres@127.0.0.1:{_closed_port()}/test"
    repository = PgFhirRepository(dsn)
    pids: list[int] = []

    async def open_noting_the_store() -> None:
        async with gw.store._pool.acquire() as conn:  # type: ignore[union-attr]
            pids.append(conn.get_server_pid())
        await PgFhirRepository.open(repository)

    repository.open = open_noting_the_store  # type: ignore[method-assign]
    gw.fhir = repository
    with pytest.raises(StoreError, match=f"cannot connect to PostgreSQL at {dsn}") as failed:
        await gw.start()
    assert isinstance(failed.value.__cause__, OSError)  # the refusal, kept as the cause
    assert not gw.store.is_open
    assert pids  # the store had opened
    await until(lambda: _no_backend_left(pids), 10, "the store's connections closed")
