"""The audit trail: FHIR AuditEvents for API access and received messages, hash-chained, verifiable."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from fhir.resources.R4B.auditevent import AuditEvent

from gateway.store.audit import AuditLog, event, verify
from gateway.store.messages.sqlite import SqliteStore
from tests.conftest import ADMIN_TOKEN, GatewayFactory
from tests.fhir.conftest import patient
from tests.messages import adt, journal_envelope
from tests.ops.conftest import OPERATOR, PROFESSIONAL, base_url, bearer, ops_config


async def test_api_access_and_received_messages_are_audited(
    tmp_path: Path, start_gateway: GatewayFactory, client_for: Any, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(ops_config(tmp_path))
    await client_for(gw).send(adt("AUD1"))
    base = base_url(gw)
    # FHIR calls as admin (the resource rules are the documents layer's); the trail read as operator
    headers = {**bearer(ADMIN_TOKEN), "Content-Type": "application/fhir+json"}
    async with http.put(f"{base}/fhir/Patient/p1", data=orjson.dumps(patient()), headers=headers) as resp:
        assert resp.status == 201
    async with http.get(f"{base}/fhir/Patient/p1", headers=bearer(ADMIN_TOKEN)) as resp:
        assert resp.status == 200
    async with http.get(f"{base}/fhir/Patient?_id=p1", headers=bearer(ADMIN_TOKEN)) as resp:
        assert resp.status == 200
    async with http.get(f"{base}/fhir/Patient/absent", headers=bearer(ADMIN_TOKEN)) as resp:
        assert resp.status == 404
    await gw.audit.flush()
    async with http.get(f"{base}/fhir/AuditEvent?_count=100", headers=bearer(OPERATOR)) as resp:
        assert resp.status == 200
        bundle = await resp.json(content_type=None)
    events = [e["resource"] for e in bundle["entry"]]
    for resource in events:
        AuditEvent.model_validate(resource)  # every entry is a valid R4 AuditEvent
    rest = [e for e in events if e["type"]["code"] == "rest"]
    seen = {(e["subtype"][0]["code"], e["action"], e["outcome"]) for e in rest}
    assert {("update", "U", "0"), ("read", "R", "0"), ("search-type", "E", "0"), ("read", "R", "4")} <= seen
    read = next(e for e in rest if e["subtype"][0]["code"] == "read" and e["outcome"] == "0")
    assert read["agent"][0]["who"]["identifier"]["value"] == "test-admin"
    assert read["agent"][0]["type"]["text"] == "admin"
    assert read["entity"][0]["what"]["reference"] == "Patient/p1"
    received = [e for e in events if e["type"]["code"] == "110107"]
    assert len(received) == 1 and received[0]["entity"][0]["name"] == "AUD1"
    # reading the audit log is itself audited
    await gw.audit.flush()
    used = await gw.audit.search(action="E")
    assert any(r["type"]["code"] == "110101" for _, r in used)
    # one entry by id; a professional may not read the trail
    one = events[0]["id"]
    async with http.get(f"{base}/fhir/AuditEvent/{one}", headers=bearer(OPERATOR)) as resp:
        assert resp.status == 200 and (await resp.json(content_type=None))["id"] == one
    async with http.get(f"{base}/fhir/AuditEvent", headers=bearer(PROFESSIONAL)) as resp:
        assert resp.status == 403
    async with http.get(f"{base}/fhir/AuditEvent?colour=red", headers=bearer(OPERATOR)) as resp:
        assert resp.status == 400
    assert verify(gw.data_dir / "audit.db").ok


async def _log_with(path: Path, n: int) -> None:
    log = AuditLog(path)
    await log.open()
    for i in range(n):
        await log.write(event(type_={"code": "rest"}, action="R", outcome="0", who=f"user-{i}"))
    await log.close()


async def test_tampering_is_detected_at_the_edited_entry(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    await _log_with(path, 5)
    good = verify(path)
    assert good.ok and good.entries == 5
    conn = sqlite3.connect(path)
    # the log refuses edits outright...
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("UPDATE audit SET agent='x' WHERE seq=3")
    # ...and someone who removes that guard is still caught by the chain
    conn.execute("DROP TRIGGER audit_no_update")
    row = conn.execute("SELECT resource FROM audit WHERE seq=3").fetchone()
    forged = orjson.loads(row[0])
    forged["agent"][0]["who"]["identifier"]["value"] = "someone-else"
    conn.execute(
        "UPDATE audit SET resource=? WHERE seq=3", (orjson.dumps(forged, option=orjson.OPT_SORT_KEYS),)
    )
    conn.commit()
    conn.close()
    bad = verify(path)
    assert not bad.ok and bad.bad_seq == 3 and bad.entries == 2
    run = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "audit", "verify", "--file", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1 and "entry 3" in run.stdout


async def test_a_deleted_entry_breaks_the_sequence(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    await _log_with(path, 4)
    conn = sqlite3.connect(path)
    conn.execute("DROP TRIGGER audit_no_delete")
    conn.execute("DELETE FROM audit WHERE seq=2")
    conn.commit()
    conn.close()
    bad = verify(path)
    assert not bad.ok and bad.bad_seq == 2
    run = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "audit", "verify", "--data-dir", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1


async def test_chain_continues_across_restarts_and_verify_command_passes(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    await _log_with(path, 3)
    await _log_with(path, 2)
    result = verify(path)
    assert result.ok and result.entries == 5
    run = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "audit", "verify", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0 and result.head in run.stdout


async def test_every_received_message_is_audited_once_even_across_restarts(
    tmp_path: Path, start_gateway: GatewayFactory, client_for: Any
) -> None:
    cfg = ops_config(tmp_path)
    gw = await start_gateway(cfg)
    client = client_for(gw)
    for i in range(30):
        await client.send(adt(f"BULK{i}", patient=str(200000 + i)))
    await client.send(b"MSH|^~\\&|broken")  # rejected (AR) and journaled: audited as a failure
    await gw.stop()
    gw2 = await start_gateway(cfg)
    await gw2.audit.flush()
    rows = await gw2.audit.search(count=1000)
    received = [r for _, r in rows if r["type"]["code"] == "110107"]
    assert len(received) == 31
    assert len({r["entity"][0]["what"]["identifier"]["value"] for r in received}) == 31
    assert sum(1 for r in received if r["outcome"] == "4") == 1
    assert verify(gw2.data_dir / "audit.db").ok


async def test_with_a_worker_process_the_worker_follows_the_journal(
    tmp_path: Path, start_gateway: GatewayFactory, client_for: Any, http: aiohttp.ClientSession
) -> None:
    cfg = ops_config(tmp_path, workers=1)
    # the worker runs the channel: a destination it can build (the in-process fake is not one)
    channel = cfg.data["channels"][0]
    channel["destinations"] = [{"name": "files", "type": "file", "directory": str(tmp_path / "out")}]
    gw = await start_gateway(cfg)
    assert gw.audit.follow is False  # the main process only writes API accesses
    client = client_for(gw)
    base = base_url(gw)
    for i in range(12):
        await client.send(adt(f"WF{i}", patient=str(300000 + i)))
        # API accesses are written by the main process meanwhile, into the same chain
        async with http.get(f"{base}/fhir/Patient?_id=p{i}", headers=bearer(ADMIN_TOKEN)) as resp:
            assert resp.status == 200

    async def receipts() -> list[dict[str, Any]]:
        rows = await gw.audit.search(count=1000)
        return [r for _, r in rows if r["type"]["code"] == "110107"]

    found: list[dict[str, Any]] = []
    for _ in range(200):  # no flush: only the worker's own rounds can bring them in
        found = await receipts()
        if len(found) >= 12:
            break
        await asyncio.sleep(0.05)
    assert sorted(r["entity"][0]["name"] for r in found) == sorted(f"WF{i}" for i in range(12))
    await gw.stop()
    result = verify(gw.data_dir / "audit.db")
    assert result.ok
    searches = [r for _, r in await _all(gw.data_dir / "audit.db") if r["type"]["code"] == "rest"]
    assert len(searches) >= 12


async def _all(path: Path) -> list[tuple[int, dict[str, Any]]]:
    log = AuditLog(path)
    await log.open()
    try:
        return await log.search(count=1000)
    finally:
        await log.close()


async def test_two_writers_on_one_log_keep_one_chain_and_audit_each_message_once(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "passerelle.db")
    await store.open()
    for b in range(4):
        await store.append([journal_envelope(f"TW{b}-{i}") for i in range(50)])
    await store.close()
    logs = [
        AuditLog(tmp_path / "audit.db", journal=tmp_path / "passerelle.db", max_batch=30) for _ in range(2)
    ]
    for log in logs:
        await log.open()

    async def busy(log: AuditLog, who: str) -> None:
        for i in range(10):
            await asyncio.gather(
                log.flush(),
                log.write(event(type_={"code": "rest"}, action="R", outcome="0", who=f"{who}-{i}")),
            )

    await asyncio.gather(busy(logs[0], "a"), busy(logs[1], "b"))
    for log in logs:
        await log.flush()
        await log.close()
    rows = [r for _, r in await _all(tmp_path / "audit.db")]
    received = [r["entity"][0]["what"]["identifier"]["value"] for r in rows if r["type"]["code"] == "110107"]
    assert len(received) == 200 and len(set(received)) == 200
    agents = {r["agent"][0]["who"]["identifier"]["value"] for r in rows if r["type"]["code"] == "rest"}
    assert agents == {f"{w}-{i}" for w in "ab" for i in range(10)}
    result = verify(tmp_path / "audit.db")
    assert result.ok and result.entries == 220
