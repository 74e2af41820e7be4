"""Fixtures for the scale-out backends: the live PostgreSQL and NATS JetStream on 127.0.0.1.

Each test gets its own PostgreSQL schema and its own stream names, so tests are isolated and can
run side by side. Without the services the live tests skip locally, and FAIL when ``CI`` is set.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest
import yaml

from gateway import config as config_mod
from tests.conftest import make_config

PG_DSN = os.environ.get("PASSERELLE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
NATS_URL = os.environ.get("PASSERELLE_TEST_NATS", "nats://127.0.0.1:4222")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_live() -> None:
    missing = [
        name
        for name, port in (("PostgreSQL 127.0.0.1:5432", 5432), ("NATS 127.0.0.1:4222", 4222))
        if not _reachable("127.0.0.1", port)
    ]
    if not missing:
        return
    reason = f"live services unreachable: {', '.join(missing)}"
    if os.environ.get("CI"):
        pytest.fail(reason + " (CI must exercise them)")
    pytest.skip(reason)


class LiveNames:
    """A fresh schema and stream prefix; dropped at the end."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:10]
        self.schema = f"t_{tag}"
        self.prefix = f"T{tag}"

    def journal(self, **extra: Any) -> dict[str, Any]:
        return {
            "backend": "nats",
            "url": NATS_URL,
            "stream_prefix": self.prefix,
            "partitions": 4,
            "ack_wait_s": 5,
            **extra,
        }

    def store(self) -> dict[str, Any]:
        return {"backend": "postgresql", "dsn": PG_DSN, "schema": self.schema}

    async def cleanup(self) -> None:
        conn = await asyncpg.connect(PG_DSN)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
        finally:
            await conn.close()
        nc = await nats.connect(NATS_URL)
        try:
            js = nc.jetstream()
            for stream in (f"{self.prefix}_IN", f"{self.prefix}_DLQ"):
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await js.delete_stream(stream)
        finally:
            await nc.close()


@pytest.fixture
async def live() -> AsyncIterator[LiveNames]:
    require_live()
    names = LiveNames()
    yield names
    await names.cleanup()


ConfigFor = Callable[..., config_mod.Config]


@pytest.fixture(params=["sqlite", "nats+postgresql"])
async def backend_config(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ConfigFor]:
    """``config(**channel)``: the standard test config on one backend or the other."""
    names: LiveNames | None = None
    if request.param != "sqlite":
        require_live()
        names = LiveNames()

    def build(**channel: Any) -> config_mod.Config:
        cfg = make_config(tmp_path, **channel)
        if names is None:
            return cfg
        data = dict(cfg.data)
        data["journal"] = names.journal()
        data["store"] = names.store()
        return config_mod.parse(yaml.safe_dump(data, allow_unicode=True), cfg.file)

    build.backend = request.param  # type: ignore[attr-defined]
    yield build
    if names is not None:
        await names.cleanup()
