"""Two nodes with a mapping channel write to one shared PostgreSQL FHIR repository: no duplicates."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from connectors.mllp.client import MllpClient
from gateway import config as config_mod
from gateway.app import Gateway
from gateway.hl7.er7 import Message
from gateway.store.pg_fhir import PgFhirRepository
from tests.conftest import AUTH, make_config, mllp_port
from tests.mapping.test_adt import MAPPINGS
from tests.messages import adt
from tests.scale.conftest import LiveNames

pytestmark = pytest.mark.live

PATIENTS = 12
IPP_SYSTEM = "urn:oid:1.2.250.1.71.4.2.2.1234"


def node_config(tmp_path: Path, live: LiveNames, name: str) -> config_mod.Config:
    cfg = make_config(
        tmp_path / name,
        steps=[{"type": "fhir_mapping", "directory": str(MAPPINGS)}],
        # The node's PostgreSQL store gives the destination its dsn: path is the SQLite fallback.
        destinations=[
            {
                "name": "repository",
                "type": "fhir_repository",
                "path": "{data_dir}/fhir.db",
                "retry": {"max_attempts": 20, "initial_backoff_s": 0.05, "max_backoff_s": 0.5},
            }
        ],
    )
    data = dict(cfg.data)
    data["journal"] = live.journal()
    data["store"] = live.store()
    return config_mod.parse(yaml.safe_dump(data, allow_unicode=True), cfg.file)


async def send(gw: Gateway, message: bytes) -> str:
    client = MllpClient("127.0.0.1", mllp_port(gw))
    try:
        ack = Message.decode(await client.send(message), default_charset="UNICODE UTF-8")
    finally:
        await client.close()
    return str(ack.get("MSA-1"))


async def all_sent(gw: Gateway, expected: int) -> list[dict[str, Any]]:
    for _ in range(1500):
        await gw.store.flush()
        rows = await gw.store.list_messages(
            status=None, control_id=None, channel="adt", limit=500, before_seq=None
        )
        if len(rows) == expected and all(r["status"] == "SENT" for r in rows):
            return rows
        await asyncio.sleep(0.02)
    raise AssertionError("not every message was delivered to the repository")


async def test_two_nodes_map_into_one_repository_without_duplicates(
    tmp_path: Path, live: LiveNames, start_gateway: Any
) -> None:
    nodes = [await start_gateway(node_config(tmp_path, live, f"node{i}")) for i in range(2)]
    assert all(isinstance(gw.fhir, PgFhirRepository) for gw in nodes)
    patients = [f"8{p:05d}" for p in range(PATIENTS)]
    # Each patient: admitted, then transferred; every message sent to both nodes at once, as a sender
    # that fails over and sends again would. Dedupe keeps one copy; the rest is the repository's.
    messages = [
        adt(f"{trigger}-{p}", patient=p, trigger=trigger, family=f"NOM{p}")
        for trigger in ("A01", "A02")
        for p in patients
    ]
    for batch in (messages[:PATIENTS], messages[PATIENTS:]):
        acks = await asyncio.gather(*(send(gw, m) for m in batch for gw in nodes))
        assert set(acks) == {"AA"}
    rows = await all_sent(nodes[0], len(messages))
    assert sorted(r["control_id"] for r in rows) == sorted(
        f"{t}-{p}" for t in ("A01", "A02") for p in patients
    )

    repo = nodes[1].fhir
    found = await repo.search("Patient", [], count=500)
    ipps = Counter(
        i["value"] for r in found.matches for i in r.get("identifier", []) if i.get("system") == IPP_SYSTEM
    )
    assert ipps == Counter(patients)  # one Patient per IPP, whichever node mapped which message
    encounters = await repo.search("Encounter", [], count=500)
    idents = Counter(
        (i.get("system"), i["value"]) for r in encounters.matches for i in r.get("identifier", [])
    )
    assert idents and max(idents.values()) == 1  # no Encounter identifier twice
    # /fhir on the other node reads the same shared repository.
    async with aiohttp.ClientSession(headers=AUTH) as http:
        url = f"http://127.0.0.1:{nodes[0].http_port_bound}/fhir/Patient"
        async with http.get(url, params={"identifier": f"{IPP_SYSTEM}|{patients[3]}"}) as resp:
            assert resp.status == 200
            body = await resp.json()
    assert body["total"] == 1 and body["entry"][0]["resource"]["name"][0]["family"] == f"NOM{patients[3]}"
