"""MLLP → mapping → built-in FHIR repository; replaying a message leaves the repository unchanged."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from connectors.mllp.client import MllpClient
from gateway.hl7.er7 import Message
from gateway.store.fhir import SqliteFhirRepository
from tests.conftest import AUTH, make_config, mllp_port, with_settings
from tests.mapping.test_adt import A01, MAPPINGS
from tests.waiting import until


def config(tmp_path: Path, workers: int) -> Any:
    cfg = make_config(
        tmp_path,
        steps=[{"type": "fhir_mapping", "directory": str(MAPPINGS)}],
        destinations=[{"name": "fhir", "type": "fhir_repository", "path": "{data_dir}/fhir.db"}],
    )
    return with_settings(cfg, workers=workers)


async def snapshot(repo: SqliteFhirRepository) -> dict[str, list[tuple[str, str, str]]]:
    """Every resource's id, version and last update, by type."""
    out = {}
    for kind in ("Patient", "Encounter"):
        result = await repo.search(kind, [], count=100)
        out[kind] = sorted(
            (r["id"], r["meta"]["versionId"], r["meta"]["lastUpdated"]) for r in result.matches
        )
    return out


async def wait_sent(gw: Any, n: int) -> list[dict[str, Any]]:
    for _ in range(200):
        rows = await gw.store.list_messages(
            status="SENT", control_id=None, channel="adt", limit=50, before_seq=None
        )
        if len(rows) >= n:
            return rows
        await asyncio.sleep(0.05)
    raise AssertionError("messages not delivered in time")


async def run_flow(start_gateway: Any, tmp_path: Path, workers: int) -> None:
    gw = await start_gateway(config(tmp_path, workers))
    client = MllpClient("127.0.0.1", mllp_port(gw))
    try:
        assert Message.decode(await client.send(A01.encode())).get("MSA-1") == "AA"
    finally:
        await client.close()
    (row,) = await wait_sent(gw, 1)
    repo = SqliteFhirRepository(gw.data_dir / "fhir.db")
    await repo.open()
    try:
        before = await snapshot(repo)
        assert len(before["Patient"]) == 1
        assert len(before["Encounter"]) == 2  # the visit and its movement
        patients = await repo.search("Patient", [("identifier", "urn:oid:1.2.250.1.71.4.2.2.4455|552233")])
        assert patients.matches[0]["name"][0]["family"] == "GÉRARD"
        movement = await repo.search(
            "Encounter", [("identifier", "urn:oid:1.2.250.1.71.4.2.2.4455|MVT-7788")]
        )
        visit_ref = movement.matches[0]["partOf"]["reference"]
        assert visit_ref.startswith("Encounter/")
        # replay: the same transaction again, and the repository does not change
        async with aiohttp.ClientSession(headers=AUTH) as http:
            url = f"http://127.0.0.1:{gw.http_port_bound}/api/messages/{row['id']}/replay"
            async with http.post(url) as resp:
                assert resp.status == 202

        async def replayed_and_sent() -> bool:
            await gw.store.flush()
            msg = await gw.store.get_message(row["id"], with_payloads=False)
            return (
                msg is not None
                and msg["status"] == "SENT"
                and any(s["stage"] == "replay" for s in msg["stages"])
            )

        # SENT after the replay means the repository destination has written the transaction again
        await until(replayed_and_sent, 10, "the replay delivered")
        assert await snapshot(repo) == before
    finally:
        await repo.close()


async def test_hl7_reaches_the_repository_and_replay_is_idempotent(start_gateway, tmp_path: Path) -> None:
    await run_flow(start_gateway, tmp_path, workers=0)


async def test_same_with_the_worker_process(start_gateway, tmp_path: Path) -> None:
    await run_flow(start_gateway, tmp_path, workers=1)
