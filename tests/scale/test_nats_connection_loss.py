"""NATS lost while a gateway runs on JetStream: not ready, logged, nothing acknowledged is lost,
it recovers by itself.

The gateway reaches NATS through a TCP proxy (tests.scale.proxy) and PostgreSQL directly. The link
is cut while a sender keeps sending: a sender is answered AA only for what JetStream confirmed,
and every message answered AA is delivered once and stored SENT once NATS is back.
"""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import structlog
import yaml

from connectors.mllp.client import MllpClient
from gateway import config as config_mod
from gateway.hl7.er7 import Message
from tests.conftest import FakeDestination, make_config, mllp_port
from tests.messages import adt
from tests.scale.conftest import NATS_URL, LiveNames
from tests.scale.proxy import Proxy
from tests.waiting import until

pytestmark = pytest.mark.live

PHI = ("LEFÈVRE", "Françoise", "19750412", "Écoles")


@pytest.fixture
async def nats_proxy() -> Any:
    target = urlsplit(NATS_URL)
    p = Proxy(target.hostname or "127.0.0.1", target.port or 4222)
    await p.start()
    yield p
    await p.close()


def _config(tmp_path: Path, live: LiveNames, port: int) -> config_mod.Config:
    cfg = make_config(
        tmp_path,
        destinations=[
            {
                "name": "far",
                "type": "fake",
                "delay_s": 0.3,  # slower than the sender: messages are in hand when the link goes
                "retry": {"max_attempts": 50, "initial_backoff_s": 0.05},
            }
        ],
    )
    data = dict(cfg.data)
    data["journal"] = live.journal(url=f"nats://127.0.0.1:{port}")
    data["store"] = live.store()
    return config_mod.parse(yaml.safe_dump(data, allow_unicode=True), cfg.file)


async def _send(gw: Any, control_id: str) -> str | None:
    """MSA-1 of the answer; None when no answer came (the sender would send again)."""
    client = MllpClient("127.0.0.1", mllp_port(gw))
    try:
        raw = await asyncio.wait_for(client.send(adt(control_id, patient=f"9{control_id[-4:]}")), 15)
    except (TimeoutError, OSError, ConnectionError):
        return None
    finally:
        await client.close()
    return str(Message.decode(raw, default_charset="UNICODE UTF-8").get("MSA-1"))


async def _journal_ready(gw: Any) -> bool:
    checks = await gw.readiness()
    return bool(checks["journal"]["ok"])


async def test_nats_lost_and_back(
    tmp_path: Path, live: LiveNames, nats_proxy: Proxy, start_gateway: Any
) -> None:
    gw = await start_gateway(_config(tmp_path, live, nats_proxy.port))
    checks = await gw.readiness()
    assert checks["journal"]["ok"] and checks["store"]["ok"]
    answers: dict[str, str | None] = {}
    during: dict[str, str | None] = {}  # sent once /ready said the journal was gone
    outage = asyncio.Event()
    stop = asyncio.Event()

    async def sender() -> None:
        n = 0
        while not stop.is_set():
            cid = f"NLOSS-{n:04d}"
            n += 1
            cut = outage.is_set()
            answers[cid] = await _send(gw, cid)
            if cut and outage.is_set():
                during[cid] = answers[cid]
            await asyncio.sleep(0.01)

    flow = asyncio.create_task(sender())
    try:
        await until(lambda: sum(a == "AA" for a in answers.values()) >= 5, 30, "messages flowing")
        with structlog.testing.capture_logs() as logs:
            nats_proxy.cut()
            await until(lambda: _not(_journal_ready(gw)), 30, "/ready reports the journal down")
            assert (await gw.readiness())["journal"]["ok"] is False
            outage.set()
            await until(lambda: len(during) >= 3, 90, "messages sent during the outage")
            outage.clear()
            nats_proxy.restore()
            await until(lambda: _journal_ready(gw), 60, "/ready reports the journal back")
            before = set(answers)
            await until(
                lambda: sum(code == "AA" for cid, code in answers.items() if cid not in before) >= 5,
                60,
                "messages flowing again",
            )
            assert all(check["ok"] for check in (await gw.readiness()).values())
    finally:
        stop.set()
        await flow

    # Nothing was confirmed by JetStream while the link was down: nobody was told "stored".
    assert during and all(code != "AA" for code in during.values())
    assert set(during.values()) <= {"AE", "AR", None}
    lost = [e for e in logs if e["event"] == "journal_connection_lost"]
    assert lost and lost[0]["log_level"] == "error"
    assert any(e["event"] == "journal_connection_restored" for e in logs)
    # A lost link is an expected failure: named as such, not an unexpected error with a traceback.
    assert not [e for e in logs if e["event"] == "consumer_unexpected_error"]
    # Reconnection failures are logged, but not once per try.
    assert len([e for e in logs if e["event"] == "journal_connection_error"]) <= 3
    for event in logs:  # ids and codes only
        text = repr(event)
        assert not any(p in text for p in PHI), event

    # The senders send again what was not answered AA, as they do after AE or silence.
    acked = {cid for cid, code in answers.items() if code == "AA"}
    for cid in sorted(set(answers) - acked):
        for _ in range(50):
            if await _send(gw, cid) == "AA":
                acked.add(cid)
                break
            await asyncio.sleep(0.1)
    assert acked == set(answers)

    far = FakeDestination.instances["far"]
    await until(lambda: {e.control_id for e, _ in far.received} >= acked, 60, "all delivered")
    counts = collections.Counter(e.control_id for e, _ in far.received)
    assert set(counts) == acked
    assert [cid for cid, n in counts.items() if n != 1] == []  # exactly once in effect

    async def all_sent() -> bool:
        await gw.store.flush()
        for cid in acked:
            rows = await gw.store.list_messages(
                status=None, control_id=cid, channel="adt", limit=5, before_seq=None
            )
            if [r["status"] for r in rows] != ["SENT"]:
                return False
        return True

    await until(all_sent, 60, "every acknowledged message stored once, SENT")


async def _not(check: Any) -> bool:
    return not await check
