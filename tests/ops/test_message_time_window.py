"""/api/messages time window: ``since`` / ``until`` run in the store (SQLite and PostgreSQL)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.core.envelope import HL7_V2, Envelope
from gateway.core.protocols import MessageStore
from gateway.http.app import build_app
from gateway.http.auth import TokenTable
from gateway.store.messages.postgres import PostgresStore
from gateway.store.messages.sqlite import SqliteStore
from tests.conftest import ADMIN_ENTRY, AUTH
from tests.scale.conftest import PG_DSN, require_live

Client = TestClient[Any, Any]

# Three messages an hour apart, on 2024-05-14 (UTC).
T0 = datetime(2024, 5, 14, 8, 0, tzinfo=UTC).timestamp()
TIMES = {"M1": T0, "M2": T0 + 3600, "M3": T0 + 7200}


def envelope(control_id: str, at: float) -> Envelope:
    return Envelope(
        id=f"id-{control_id}",
        channel="adt",
        source="mllp",
        raw=b"MSH|^~\\&|A|B|C|D|20240514||ADT^A01|" + control_id.encode() + b"|P|2.5\r",
        content_type=HL7_V2,
        sender="A^B",
        control_id=control_id,
        message_type="ADT^A01",
        partition_key="p",
        received_at=at,
        trace_id="t",
    )


class StoreRuntime:
    """Just enough of gateway.http.app.Runtime to serve /api/messages."""

    def __init__(self, store: MessageStore) -> None:
        self.store = store
        self.fhir: Any = None

    async def replay(self, message_id: str) -> bool:
        return False

    async def readiness(self) -> Mapping[str, Any]:
        return {}

    def snapshot(self) -> Mapping[str, Any]:
        return {}


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(tmp_path / "journal.db")
    await store.open()
    await store.append([envelope(cid, at) for cid, at in TIMES.items()])
    yield store
    await store.close()


@pytest.fixture
async def api(sqlite_store: SqliteStore) -> AsyncIterator[Client]:
    app = build_app(StoreRuntime(sqlite_store), authenticator=TokenTable([ADMIN_ENTRY]))
    async with TestClient(TestServer(app, host="127.0.0.1", port=0)) as client:
        yield client


async def control_ids(client: Client, query: str) -> list[str]:
    resp = await client.get(f"/api/messages?{query}", headers=AUTH)
    assert resp.status == 200, await resp.text()
    return [m["control_id"] for m in (await resp.json())["messages"]]


async def test_since_and_until_bound_the_receive_time(api: Client) -> None:
    assert await control_ids(api, "") == ["M3", "M2", "M1"]
    assert await control_ids(api, "since=2024-05-14T09:00:00Z") == ["M3", "M2"]  # inclusive
    assert await control_ids(api, "until=2024-05-14T09:00:00Z") == ["M2", "M1"]  # inclusive
    assert await control_ids(api, "since=2024-05-14T08:30:00Z&until=2024-05-14T09:30:00Z") == ["M2"]
    # an offset other than Z: 11:30+02:00 is 09:30Z
    assert await control_ids(api, "since=" + quote("2024-05-14T11:30:00+02:00")) == ["M3"]
    # a "+" left unencoded arrives as a space, and still means +02:00
    assert await control_ids(api, "since=2024-05-14T11:30:00+02:00") == ["M3"]
    assert await control_ids(api, "since=2024-05-14T10:00:01Z") == []
    # with the other filters
    assert await control_ids(api, "since=2024-05-14T09:00:00Z&control_id=M2") == ["M2"]
    assert await control_ids(api, "since=2024-05-14T09:00:00Z&channel=other") == []


async def test_next_page_keeps_the_time_window(api: Client) -> None:
    resp = await api.get("/api/messages?since=2024-05-14T08:00:00Z&limit=1&channel=adt", headers=AUTH)
    body = await resp.json()
    assert [m["control_id"] for m in body["messages"]] == ["M3"]
    pages = ["M3"]
    while "next" in body:
        assert "since=2024-05-14T08%3A00%3A00Z" in body["next"] and "channel=adt" in body["next"]
        resp = await api.get(body["next"], headers=AUTH)
        body = await resp.json()
        pages += [m["control_id"] for m in body["messages"]]
    assert pages == ["M3", "M2", "M1"]


@pytest.mark.parametrize(
    ("query", "where"),
    [
        ("since=yesterday", "since"),
        ("until=2024-13-01T00:00:00Z", "until"),
        ("since=2024-05-14", "since"),  # a date is not an instant
        ("since=2024-05-14T10:00:00", "since"),  # no offset: which time zone?
        ("since=2024-05-14T10:00:00Z&until=2024-05-14T09:00:00Z", "since"),  # an empty window
    ],
)
async def test_a_bad_instant_is_a_400_operation_outcome(api: Client, query: str, where: str) -> None:
    resp = await api.get(f"/api/messages?{query}", headers=AUTH)
    assert resp.status == 400
    body = await resp.json(content_type=None)
    assert body["resourceType"] == "OperationOutcome"
    issue = body["issue"][0]
    assert issue["severity"] == "error" and where in issue["diagnostics"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.text(max_size=40))
async def test_any_since_value_is_answered_200_or_400(api: Client, raw: str) -> None:
    resp = await api.get("/api/messages", params={"since": raw}, headers=AUTH)
    assert resp.status in (200, 400)
    body = await resp.json(content_type=None)
    if resp.status == 400:
        assert body["resourceType"] == "OperationOutcome"
    else:
        assert isinstance(body["messages"], list)


@pytest.mark.live
async def test_postgres_store_filters_the_same_way() -> None:
    require_live()
    schema = f"t_{uuid.uuid4().hex[:10]}"
    store = PostgresStore(PG_DSN, schema=schema)
    await store.open()
    try:
        await store.append([envelope(cid, at) for cid, at in TIMES.items()])

        async def between(since: float | None, until: float | None) -> list[str]:
            rows = await store.list_messages(
                status=None,
                control_id=None,
                channel=None,
                limit=10,
                before_seq=None,
                since=since,
                until=until,
            )
            return [str(r["control_id"]) for r in rows]

        assert await between(None, None) == ["M3", "M2", "M1"]
        assert await between(T0 + 3600, None) == ["M3", "M2"]
        assert await between(None, T0 + 3600) == ["M2", "M1"]
        assert await between(T0 + 1, T0 + 3601) == ["M2"]
    finally:
        await store.close()
        conn = await asyncpg.connect(PG_DSN)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
