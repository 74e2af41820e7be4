"""PostgreSQL lost while a gateway runs: not ready, logged, nothing acknowledged is lost, it recovers.

A small TCP proxy (tests.scale.proxy) sits between the gateway and PostgreSQL. Cutting it resets
every open connection and refuses new ones, as a database restart or a network failure would.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import structlog
import yaml

from connectors.mllp.client import MllpClient
from gateway import config as config_mod
from gateway.hl7.er7 import Message
from tests.conftest import FakeDestination, make_config, mllp_port, wait_for
from tests.messages import adt
from tests.scale.conftest import PG_DSN, LiveNames
from tests.scale.proxy import Proxy

pytestmark = pytest.mark.live


@pytest.fixture
async def proxy() -> Any:
    target = urlsplit(PG_DSN)
    p = Proxy(target.hostname or "127.0.0.1", target.port or 5432)
    await p.start()
    yield p
    await p.close()


def proxied_config(tmp_path: Path, live: LiveNames, port: int) -> config_mod.Config:
    cfg = make_config(
        tmp_path,
        destinations=[
            {"name": "far", "type": "fake", "retry": {"max_attempts": 50, "initial_backoff_s": 0.05}}
        ],
    )
    data = dict(cfg.data)
    dsn = urlsplit(PG_DSN)._replace(netloc=f"{urlsplit(PG_DSN).username or 'postgres'}@127.0.0.1:{port}")
    data["store"] = {"backend": "postgresql", "dsn": dsn.geturl(), "schema": live.schema, "pool_size": 2}
    return config_mod.parse(yaml.safe_dump(data, allow_unicode=True), cfg.file)


async def send(gw: Any, control_id: str) -> str:
    client = MllpClient("127.0.0.1", mllp_port(gw))
    try:
        raw = await asyncio.wait_for(client.send(adt(control_id, patient=f"9{control_id[-4:]}")), 20)
    finally:
        await client.close()
    return str(Message.decode(raw, default_charset="UNICODE UTF-8").get("MSA-1"))


async def ready(gw: Any) -> bool:
    checks = await gw.readiness()
    return bool(checks["store"]["ok"] and checks["fhir"]["ok"])


async def test_postgresql_lost_and_back(
    tmp_path: Path, live: LiveNames, proxy: Proxy, start_gateway: Any
) -> None:
    gw = await start_gateway(proxied_config(tmp_path, live, _port(proxy)))
    assert await ready(gw)
    acked: list[str] = []
    assert await send(gw, "LOSS-0000") == "AA"
    acked.append("LOSS-0000")

    with structlog.testing.capture_logs() as logs:
        proxy.cut()
        # Not ready once the database is gone (the readiness checks go to the database).
        for _ in range(200):
            if not await ready(gw):
                break
            await asyncio.sleep(0.05)
        assert not await ready(gw)
        answers = {}
        for n in range(1, 6):
            cid = f"LOSS-{n:04d}"
            answers[cid] = await send(gw, cid)
        # Nothing can be journalled: every sender is told to send again, none is told "stored".
        assert set(answers.values()) <= {"AE", "AR"}
        assert all(code != "AA" for code in answers.values())
    events = [e for e in logs if e["log_level"] in ("error", "warning")]
    assert any(e["event"] in ("store_connection_lost", "journal_write_failed") for e in events)
    for event in logs:  # ids and codes only: no patient data in what the failure logged
        text = repr(event)
        assert "LEFÈVRE" not in text and "Françoise" not in text and "19750412" not in text

    proxy.restore()
    for _ in range(400):
        if await ready(gw):
            break
        await asyncio.sleep(0.05)
    assert await ready(gw)
    # The senders send again (as they do after AE), and new messages flow.
    for cid in [*answers, "LOSS-0100"]:
        for _ in range(50):
            if await send(gw, cid) == "AA":
                acked.append(cid)
                break
            await asyncio.sleep(0.1)
    assert sorted(acked) == sorted(["LOSS-0000", *answers, "LOSS-0100"])
    far = FakeDestination.instances["far"]
    await wait_for(lambda: {e.control_id for e, _ in far.received} >= set(acked), timeout=30)
    delivered = [e.control_id for e, _ in far.received]
    assert sorted(set(delivered)) == sorted(acked)
    for cid in acked:
        rows = await gw.store.list_messages(
            status=None, control_id=cid, channel="adt", limit=5, before_seq=None
        )
        assert [r["status"] for r in rows] == ["SENT"]  # stored once, delivered


def _port(proxy: Proxy) -> int:
    return proxy.port
