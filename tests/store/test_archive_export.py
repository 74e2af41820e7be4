"""``passerelle archive``: the journal's messages with their trace as NDJSON (payloads on request,
filtered by time, channel and status) on both message stores; the audit trail with its hash chain,
checkable again from the file alone."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from gateway.cli import main
from gateway.core.protocols import MessageStore, StageRecord
from gateway.core.status import Status
from gateway.store.audit import REST, SUCCESS, AuditLog, chain_hash, event
from gateway.store.messages.postgres import PostgresStore
from gateway.store.messages.sqlite import SqliteStore
from gateway.transfer import export_audit, export_messages
from tests.messages import journal_envelope
from tests.scale.conftest import PG_DSN, require_live

CONFIG = Path(__file__).resolve().parents[2] / "config.yaml"
T0 = 1_715_670_000.0  # 2024-05-14T07:00:00Z


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.live)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MessageStore]:
    if request.param == "sqlite":
        lite = SqliteStore(tmp_path / "var" / "passerelle.db")
        await lite.open()
        yield lite
        await lite.close()
        return
    require_live()
    schema = f"t_{uuid.uuid4().hex[:10]}"
    pg = PostgresStore(PG_DSN, schema=schema)
    await pg.open()
    yield pg
    await pg.close()
    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def journal(store: Any) -> dict[str, str]:
    """Three messages: adt at T0 (traced, SENT), lab at T0+60 (ERROR), adt at T0+120 (RECEIVED)."""
    made = {}
    for name, channel, at, status in (
        ("first", "adt", T0, Status.SENT),
        ("lab", "lab", T0 + 60, Status.ERROR),
        ("last", "adt", T0 + 120, Status.RECEIVED),
    ):
        env = dataclasses.replace(journal_envelope(f"CTRL-{name}"), channel=channel, received_at=at)
        await store.append([env], ack=(b"MSH|^~\\&|ACK|" + name.encode(), "AA"))
        if status is not Status.RECEIVED:
            stage = StageRecord("transform", status, payload=b'{"resourceType":"Bundle"}', content_type="x")
            await store.record(env.id, stage, status=status)
        made[name] = env.id
    await store.flush()
    return made


def lines(data: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in data.splitlines()]


async def test_messages_come_out_with_their_trace(store: MessageStore) -> None:
    made = await journal(store)
    out = io.BytesIO()
    assert await export_messages(store, out, page=2) == 3  # more than one page
    found = {m["id"]: m for m in lines(out.getvalue())}
    assert set(found) == set(made.values())
    first = found[made["first"]]
    assert first["channel"] == "adt" and first["status"] == "SENT" and first["control_id"] == "CTRL-first"
    assert [s["stage"] for s in first["stages"]][-1] == "transform"
    assert "raw" not in first and all("payload" not in s for s in first["stages"])
    assert b"LEF" not in out.getvalue()  # no payload, no patient data


async def test_payloads_on_request(store: MessageStore) -> None:
    made = await journal(store)
    out = io.BytesIO()
    await export_messages(store, out, payloads=True)
    first = next(m for m in lines(out.getvalue()) if m["id"] == made["first"])
    assert base64.b64decode(first["raw"]["base64"]).startswith(b"MSH|")
    transform = next(s for s in first["stages"] if s["stage"] == "transform")
    assert base64.b64decode(transform["payload"]["base64"]) == b'{"resourceType":"Bundle"}'


async def test_filters_by_time_channel_and_status(store: MessageStore) -> None:
    made = await journal(store)

    async def ids(**filters: Any) -> set[str]:
        out = io.BytesIO()
        await export_messages(store, out, **filters)
        return {m["id"] for m in lines(out.getvalue())}

    assert await ids(channel="adt") == {made["first"], made["last"]}
    assert await ids(status="ERROR") == {made["lab"]}
    assert await ids(since=T0 + 30) == {made["lab"], made["last"]}
    assert await ids(since=T0 + 30, until=T0 + 90) == {made["lab"]}
    assert await ids(channel="adt", status="SENT", until=T0 + 1) == {made["first"]}


async def test_archive_command_reads_a_running_gateways_journal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = SqliteStore(tmp_path / "var" / "passerelle.db")
    await store.open()
    try:
        made = await journal(store)
        out = tmp_path / "messages.ndjson"
        args = ["archive", "export", "--config", str(CONFIG), "--data-dir", str(tmp_path / "var")]
        filters = ["--channel", "lab", "--since", "2024-05-14T07:00:30+00:00"]
        # In a thread of its own, as another process would: the gateway's store stays open.
        code = await asyncio.to_thread(main, [*args, "--out", str(out), *filters])
    finally:
        await store.close()
    assert code == 0 and "1 messages written" in capsys.readouterr().out
    assert [m["id"] for m in lines(out.read_bytes())] == [made["lab"]]
    assert main([*args, "--out", str(out), "--since", "2024-05-14"]) == 2  # no offset: refused


async def test_audit_trail_comes_out_checkable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    audit = AuditLog(tmp_path / "var" / "audit.db", follow=False)
    await audit.open()
    for n in range(5):
        await audit.write(event(type_=REST, action="R", outcome=SUCCESS, who=f"pro-{n}", at=time.time()))
    await audit.close()
    out = io.BytesIO()
    count, broken = export_audit(tmp_path / "var" / "audit.db", out)
    assert count == 5 and broken is None
    prev = "0" * 64
    for raw in out.getvalue().splitlines():
        entry = orjson.loads(raw)
        stored = raw[raw.index(b',"resource":') + len(b',"resource":') : -1]
        assert entry["prev"] == prev and chain_hash(prev, stored) == entry["hash"]
        assert entry["resource"]["resourceType"] == "AuditEvent"
        prev = entry["hash"]
    target = tmp_path / "audit.ndjson"
    args = ["archive", "audit", "--config", str(CONFIG), "--data-dir", str(tmp_path / "var")]
    assert main([*args, "--out", str(target)]) == 0
    assert "5 audit entries" in capsys.readouterr().out and target.read_bytes() == out.getvalue()
