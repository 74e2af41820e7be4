"""What a channel logs while it handles a message names the channel and the message, bound once."""

from __future__ import annotations

from typing import Any

from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from tests.conftest import FakeDestination, wait_for
from tests.messages import adt


async def test_a_lane_logs_the_channel_and_the_message(start_gateway: Any, client_for: Any) -> None:
    far = {"name": "far", "type": "fake", "plan": ["retry", "permanent"], "retry": {"max_attempts": 3}}
    gw = await start_gateway(destinations=[far])
    with capture_logs(processors=[merge_contextvars]) as logs:
        await client_for(gw).send(adt("CTX1"))
        fake = FakeDestination.instances["far"]
        await wait_for(lambda: sum(e["event"] == "delivery_failed" for e in logs) == 2)
    await gw.store.flush()
    rows = await gw.store.list_messages(
        status=None, control_id="CTX1", channel="adt", limit=5, before_seq=None
    )
    assert fake.attempts == 2 and [r["status"] for r in rows] == ["DEAD"]
    failed = [e for e in logs if e["event"] == "delivery_failed"]
    assert [(e["channel"], e["message_id"], e["attempt"]) for e in failed] == [
        ("adt", rows[0]["id"], 1),
        ("adt", rows[0]["id"], 2),
    ]
