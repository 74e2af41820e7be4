"""A channel at run time: its Pipeline (gateway.engine.pipeline), fed by ordered lanes.

Ordering: every message has a partition key (the patient). A key always maps to
the same lane, and a lane handles one message at a time, so one patient's
messages reach each destination in the order they were received. A message that
waits for a retry steps aside: the lane goes on with the other patients it
serves and holds that patient's later messages until the waiting one is done.

Memory stays bounded: past ``max_in_memory`` waiting messages the channel
"spills": new messages stay in the journal only, and a reloader feeds them back
in journal order as the lanes drain. Start-up recovery is the same path, from 0.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import contextvars
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from structlog.contextvars import bound_contextvars

from gateway.core.envelope import Envelope
from gateway.core.errors import MessageError, ProcessingError
from gateway.core.logging import get_logger
from gateway.core.protocols import WorkItem
from gateway.core.status import Status
from gateway.engine.pipeline import Outcome, Pipeline
from gateway.hl7.er7 import Message

log = get_logger("passerelle.channel")


class ChannelRuntime(abc.ABC):
    """A channel as the gateway sees it: a pipeline, and what schedules messages into it (local
    lanes: LaneChannel; the stream shared by the nodes: gateway.engine.nats_channel)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        # What the intake, the gateway and the console read of a channel (see IntakeChannel).
        self.name = pipeline.name
        self.source = pipeline.source
        self.store = pipeline.store
        self.filter = pipeline.filter
        self.steps = pipeline.steps
        self.destinations = pipeline.destinations
        self.queued = pipeline.queued
        self.ack_timing = pipeline.ack_timing
        self.dedupe = pipeline.dedupe
        self.sending_application = pipeline.sending_application
        self.counters = pipeline.counters

    def accepts(self, msg: Message) -> bool:
        return self.pipeline.accepts(msg)

    def screen(self, msg: Message) -> MessageError | None:
        return self.pipeline.screen(msg)

    def expect_outcome(self, message_id: str, partition: str = "") -> asyncio.Future[Outcome]:
        return self.pipeline.expect_outcome(message_id, partition)

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    async def recovered(self) -> None: ...

    @abc.abstractmethod
    async def stop(self, drain_timeout: float) -> None: ...

    @abc.abstractmethod
    def offer(self, item: WorkItem) -> None: ...

    @abc.abstractmethod
    def replay(self, item: WorkItem) -> None: ...

    @abc.abstractmethod
    def snapshot(self) -> dict[str, Any]: ...


@dataclass(slots=True)
class _Lane:
    queue: deque[WorkItem] = field(default_factory=deque)
    waiter: asyncio.Future[None] | None = None
    task: asyncio.Task[None] | None = None  # the runner taking the next message
    busy: bool = False
    # A patient whose message waits for a retry → its later messages, held in order meanwhile.
    held: dict[str, deque[WorkItem]] = field(default_factory=dict)
    waiting: set[asyncio.Task[None]] = field(default_factory=set)  # runners on a retry wait


class LaneChannel(ChannelRuntime):
    """This process's lanes, fed by the intake and, while spilled or recovering, by the journal."""

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        partitions: int = 64,
        max_in_memory: int = 10_000,
        shard: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(pipeline)
        self.max_in_memory = max_in_memory
        self.shard = shard  # (index, count): this worker's share of the patients
        self._lanes = [_Lane() for _ in range(partitions)]
        self._in_memory = 0
        # Start spilled: recovery reads what the journal holds before new work is taken directly.
        self._spilled = True
        self._recovering = True
        self._watermark = 0  # highest journal seq handed to a lane
        self._max_spilled_seq = 0
        self._reloader: asyncio.Task[None] | None = None
        self._reload_wake = asyncio.Event()
        self._recovered = asyncio.Event()
        self._stopping = False
        self._lane_context = contextvars.copy_context()

    # -- life cycle ------------------------------------------------------------

    def start(self) -> None:
        # Tasks copy the context they are created in: every line they log names the channel.
        with bound_contextvars(channel=self.name):
            for i, lane in enumerate(self._lanes):
                lane.task = asyncio.create_task(self._lane_loop(lane), name=f"lane-{self.name}-{i}")
            self._reloader = asyncio.create_task(self._reload_loop(), name=f"reloader-{self.name}")
            self._lane_context = contextvars.copy_context()  # for the runners started later

    async def recovered(self) -> None:
        """Wait until start-up recovery has handed every pending message to a lane."""
        await self._recovered.wait()

    async def stop(self, drain_timeout: float) -> None:
        """Let lanes finish the message in hand (up to the timeout); what waits stays in the journal."""
        self._stopping = True
        if self._reloader is not None:
            self._reloader.cancel()
        for lane in self._lanes:
            lane.queue.clear()  # still journaled: picked up again at the next start
            self._wake(lane)
        tasks = [lane.task for lane in self._lanes if lane.task is not None]
        tasks += [task for lane in self._lanes for task in lane.waiting]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=drain_timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        if self._reloader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reloader
        self.pipeline.release_waiters()

    # -- intake side -------------------------------------------------------------

    def offer(self, item: WorkItem) -> None:
        """A newly committed message: into its lane, or left in the journal while spilled."""
        if self._stopping:
            return
        if self._spilled or self._in_memory >= self.max_in_memory:
            if not self._spilled:
                log.warning("channel_spilling", channel=self.name, in_memory=self._in_memory)
            self._spilled = True
            self._max_spilled_seq = max(self._max_spilled_seq, item.seq)
            self._reload_wake.set()
            return
        self._dispatch(item)

    def replay(self, item: WorkItem) -> None:
        """An operator replay: straight to its lane whatever the spill state (it is behind the watermark)."""
        self._lanes[self._lane_of(item.envelope)].queue.append(item)
        self._in_memory += 1
        self._wake(self._lanes[self._lane_of(item.envelope)])

    def _lane_of(self, env: Envelope) -> int:
        return zlib.crc32(env.partition_key.encode()) % len(self._lanes)

    def _dispatch(self, item: WorkItem) -> None:
        lane = self._lanes[self._lane_of(item.envelope)]
        lane.queue.append(item)
        self._in_memory += 1
        self._watermark = max(self._watermark, item.seq)
        self._wake(lane)

    @staticmethod
    def _wake(lane: _Lane) -> None:
        if lane.waiter is not None and not lane.waiter.done():
            lane.waiter.set_result(None)

    async def _reload_loop(self) -> None:
        batch = 500
        while not self._stopping:
            if not self._spilled:
                self._reload_wake.clear()
                await self._reload_wake.wait()
                continue
            room = self.max_in_memory - self._in_memory
            if room <= 0:
                self._reload_wake.clear()
                await self._reload_wake.wait()
                continue
            limit = min(room, batch)
            try:
                items = await self.store.pending(
                    self.name, self._watermark, limit, recovering=self._recovering, shard=self.shard
                )
            except Exception as exc:  # noqa: BLE001 - keep trying; the journal still has everything
                log.error("channel_reload_failed", error=type(exc).__name__)
                await asyncio.sleep(1.0)
                continue
            for item in items:
                self._dispatch(item)
            if len(items) < limit:
                if self._recovering:
                    self._recovering = False
                    self._recovered.set()
                    log.info("channel_recovered", watermark=self._watermark)
                if self._watermark >= self._max_spilled_seq:
                    self._spilled = False

    # -- lanes -------------------------------------------------------------------

    async def _lane_loop(self, lane: _Lane) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            if not lane.queue:
                lane.waiter = loop.create_future()
                await lane.waiter
                lane.waiter = None
                continue
            item = lane.queue.popleft()
            key = item.envelope.partition_key
            held = lane.held.get(key)
            if held is not None:  # behind this patient's message waiting for a retry
                held.append(item)
                continue
            if await self._handle(lane, item, key):
                return  # this runner waited for a retry; another took the lane over meanwhile

    async def _handle(self, lane: _Lane, item: WorkItem, key: str) -> bool:
        """Handle one message; True when it waited for a retry, leaving the lane to a new runner."""
        stepped_aside = False

        def waiting() -> None:
            nonlocal stepped_aside
            if stepped_aside or self._stopping:
                return
            stepped_aside = True
            lane.held[key] = deque()
            lane.busy = False
            runner = asyncio.current_task()
            if runner is not None:
                lane.waiting.add(runner)
            lane.task = asyncio.create_task(
                self._lane_loop(lane), name=f"lane-{self.name}", context=self._lane_context.copy()
            )

        lane.busy = True
        try:
            with bound_contextvars(message_id=item.envelope.id):
                try:
                    await self.pipeline.handle(item, waiting=waiting)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.exception("lane_unexpected_error", error=type(exc).__name__)
                    self.pipeline.finish(
                        item.envelope.id, Outcome(Status.ERROR, ProcessingError("internal error"))
                    )
        finally:
            self._in_memory -= 1
            if stepped_aside:
                # The patient's held messages go first, in order, before anything of theirs behind.
                lane.queue.extendleft(reversed(lane.held.pop(key)))
                runner = asyncio.current_task()
                if runner is not None:
                    lane.waiting.discard(runner)
                self._wake(lane)
            else:
                lane.busy = False
            if self._spilled and self._in_memory <= self.max_in_memory // 2:
                self._reload_wake.set()
        return stepped_aside

    def snapshot(self) -> dict[str, Any]:
        return self.pipeline.snapshot(
            {
                "in_memory": self._in_memory,
                "spilled": self._spilled,
                "recovering": self._recovering,
                "busy_lanes": sum(1 for lane in self._lanes if lane.busy),
            }
        )
