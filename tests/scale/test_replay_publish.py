"""A replay on the NATS journal is published once NATS answers again, never dropped."""

from __future__ import annotations

import asyncio
from typing import Any

from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from gateway.core.envelope import HL7_V2, Envelope
from gateway.core.errors import StoreError
from gateway.core.protocols import WorkItem
from gateway.core.status import Status
from gateway.engine.nats_channel import JetStreamChannel


class FlakyJournal:
    """Refuses the first ``failures`` publishes, as a journal whose NATS link is down."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.published: list[str] = []

    async def publish(self, env: Envelope, ack: Any) -> tuple[int, bool]:
        if self.failures:
            self.failures -= 1
            raise StoreError("journal publish failed: TimeoutError")
        self.published.append(env.id)
        return len(self.published), False


def _channel(journal: FlakyJournal) -> JetStreamChannel:
    # Only what replay touches: the channel's name, journal, backoff, and task set.
    channel = object.__new__(JetStreamChannel)
    channel.name = "adt"
    channel.journal = journal  # type: ignore[assignment]
    channel.store_backoff = (0.01, 0.02)
    channel._tasks = set()
    channel._stopping = False
    return channel


def _item() -> WorkItem:
    env = Envelope(
        id="01REPLAY",
        channel="adt",
        source="hospital",
        raw=b"MSH|^~\\&|A|B|C|D|20261123||ADT^A01|1|P|2.5\r",
        content_type=HL7_V2,
        sender="A^B",
        control_id="1",
        message_type="ADT^A01",
        partition_key="k",
        received_at=0.0,
        trace_id="t",
    )
    return WorkItem(1, env, Status.RECEIVED, None, ("out",), {})


async def test_a_replay_waits_out_an_unreachable_journal() -> None:
    journal = FlakyJournal(failures=3)
    channel = _channel(journal)
    with capture_logs(processors=[merge_contextvars]) as logs:
        channel.replay(_item())
        await asyncio.wait_for(asyncio.gather(*channel._tasks), 5)
    assert journal.published == ["01REPLAY"]
    assert [(e["event"], e["channel"], e["message_id"]) for e in logs] == [
        ("replay_publish_failed", "adt", "01REPLAY")
    ] * 3


async def test_a_replay_still_unpublished_at_stop_is_logged() -> None:
    journal = FlakyJournal(failures=10**6)
    channel = _channel(journal)
    with capture_logs(processors=[merge_contextvars]) as logs:
        channel.replay(_item())
        await asyncio.sleep(0.05)
        channel._stopping = True
        await asyncio.wait_for(asyncio.gather(*channel._tasks), 5)
    assert journal.published == []
    assert logs[-1]["event"] == "replay_not_published" and logs[-1]["message_id"] == "01REPLAY"
