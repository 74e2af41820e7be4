"""FHIR fixtures: a real SQLite repository in tmp_path with a settable clock, and an HTTP client."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.http.app import build_app
from gateway.http.auth import TokenTable
from gateway.store.documents.postgres import PgDocumentStore
from gateway.store.fhir import SqliteFhirRepository
from gateway.store.pg_fhir import PgFhirRepository
from tests.conftest import ADMIN_ENTRY, AUTH
from tests.scale.conftest import PG_DSN, require_live

INS = "urn:oid:1.2.250.1.213.1.4.8"  # INS-NIR, the French national health identifier
IPP = "urn:oid:1.2.250.1.71.4.2.7"  # a fictional hospital's patient-number system


class Clock:
    """A clock that moves only when told to (or by one millisecond per reading)."""

    def __init__(self) -> None:
        self.now = datetime(2024, 5, 14, 8, 30, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(milliseconds=1)
        return self.now

    def set(self, text: str) -> None:
        self.now = datetime.fromisoformat(text) - timedelta(milliseconds=1)


class FhirOnlyRuntime:
    """Just enough of gateway.http.app.Runtime to serve /fhir."""

    def __init__(self, fhir: SqliteFhirRepository) -> None:
        self.fhir = fhir
        self.store: Any = None

    async def replay(self, message_id: str) -> bool:
        return False

    async def readiness(self) -> Mapping[str, Any]:
        return {}

    def snapshot(self) -> Mapping[str, Any]:
        return {}


def patient(
    family: str = "Lefèvre",
    given: str = "Amélie",
    *,
    ins: str | None = "2840775123456",
    ipp: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    identifiers = []
    if ins:
        identifiers.append({"system": INS, "value": ins})
    if ipp:
        identifiers.append({"system": IPP, "value": ipp})
    return {
        "resourceType": "Patient",
        "identifier": identifiers,
        "name": [{"family": family, "given": [given]}],
        "gender": "female",
        "birthDate": "1984-07-07",
        **extra,
    }


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def repo(tmp_path: Path, clock: Clock) -> AsyncIterator[SqliteFhirRepository]:
    r = SqliteFhirRepository(tmp_path / "fhir.db", clock=clock)
    await r.open()
    yield r
    await r.close()


@pytest.fixture
async def client(repo: SqliteFhirRepository) -> AsyncIterator[TestClient[Any, Any]]:
    app = build_app(FhirOnlyRuntime(repo), authenticator=TokenTable([ADMIN_ENTRY]))
    server = TestServer(app, host="127.0.0.1", port=0)
    async with TestClient(server, headers=AUTH) as c:
        yield c


@pytest.fixture
async def pg_store() -> AsyncIterator[tuple[PgFhirRepository, PgDocumentStore]]:
    """A FHIR repository and its document store on the real PostgreSQL, in a schema of their own."""
    require_live()
    schema = f"t_fhir_{uuid.uuid4().hex[:12]}"
    repository = PgFhirRepository(PG_DSN, schema=schema)
    store = PgDocumentStore(repository)
    await store.open()
    yield repository, store
    await repository.close()
    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()
