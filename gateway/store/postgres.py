"""PostgreSQL connections shared by the stores: the pool, schema migrations, a DSN fit to show."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from gateway.core.errors import StoreError
from gateway.store.pg_errors import POSTGRES_ERRORS, translate


def redacted(dsn: str) -> str:
    """The DSN as it may be shown: without its password."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


# A malformed DSN is a ValueError from asyncpg.
_CONNECT_ERRORS: tuple[type[BaseException], ...] = (*POSTGRES_ERRORS, ValueError)


async def connect_pool(dsn: str, schema: str | None, *, max_size: int = 8) -> Any:
    """A pool on ``dsn``; a start-up failure is a StoreError naming the URL."""
    settings = {"search_path": schema} if schema else {}
    try:
        if schema:
            conn = await asyncpg.connect(dsn, timeout=10)
            try:
                # IF NOT EXISTS is not atomic: a node starting at the same moment may win the race.
                with contextlib.suppress(asyncpg.UniqueViolationError):
                    await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{_ident(schema)}"')
            finally:
                await conn.close()
        return await asyncpg.create_pool(
            dsn, min_size=1, max_size=max_size, server_settings=settings, timeout=10
        )
    except _CONNECT_ERRORS as exc:
        raise translate(exc, f"cannot connect to PostgreSQL at {redacted(dsn)}", detail=True) from exc


def _ident(name: str) -> str:
    if not name.replace("_", "").isalnum():
        raise StoreError(f"invalid schema name {name!r}: letters, digits and _ only")
    return name


async def migrate(pool: Any, migrations: Sequence[str], table: str) -> int:
    """Apply the migrations not yet applied; returns the schema version."""
    async with pool.acquire() as conn, conn.transaction():
        # One node migrates at a time; the others wait, then find nothing left to do.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext(current_schema() || $1))", table)
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (version INTEGER NOT NULL)")
        current = await conn.fetchval(f"SELECT max(version) FROM {table}")  # noqa: S608 - constant
        version = int(current or 0)
        for number, sql in enumerate(migrations, start=1):
            if number > version:
                await conn.execute(sql)
                await conn.execute(f"INSERT INTO {table} (version) VALUES ($1)", number)  # noqa: S608
                version = number
        return version
