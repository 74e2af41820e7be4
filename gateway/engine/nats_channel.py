"""A channel fed by JetStream consumers shared by every node (see gateway.store.nats_journal).

Each node pulls from every partition's durable consumer; JetStream gives each partition's next
message to one puller at a time. Per message: journal it in PostgreSQL (a redelivery finds its row
and resumes where it stopped; a resend of another message is a duplicate), run the steps, try the
destinations still pending, commit the trace, and only then ack. A failed delivery that is worth
retrying is NAKed with the destination's backoff as delay; once a destination's attempts (counted
in PostgreSQL) are spent it is DEAD, a reference goes to the dead-letter stream and the message is
acked. While PostgreSQL cannot be reached the message is kept in hand (marked in progress) and
retried here with backoff: an outage spends none of JetStream's deliveries, so a message is never
dropped by the stream before it has a row that /api/dlq can reach.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from nats.aio.msg import Msg
from structlog.contextvars import bound_contextvars

from gateway.core.envelope import Envelope
from gateway.core.errors import StoreError
from gateway.core.logging import get_logger
from gateway.core.protocols import WorkItem
from gateway.core.status import Status
from gateway.engine.channel import ChannelRuntime
from gateway.engine.pipeline import Attempt
from gateway.engine.retry import Action
from gateway.store.nats_journal import NATS_ERRORS, JetStreamStore, decode, in_progress_while

log = get_logger("passerelle.channel")

_DONE = -1.0
_TERMINAL = frozenset({Status.SENT.value, Status.FILTERED.value, Status.DEAD.value})


class JetStreamChannel(ChannelRuntime):
    """The channel's steps and destinations, driven by the shared stream instead of local lanes."""

    def __init__(self, base: ChannelRuntime, store: JetStreamStore, *, fetch_timeout: float = 2.0) -> None:
        if base.pipeline.store is not store:
            raise ValueError("a JetStream channel's pipeline writes to the JetStream store")
        super().__init__(base.pipeline)  # the same steps, destinations and counters: no copy
        self.pg = store
        self.journal = store.journal
        self.fetch_timeout = fetch_timeout
        # Room for redeliveries after a node failure on top of the destinations' own attempts;
        # past it JetStream gives up by itself and says so in the dead-letter stream.
        self.max_deliver = max((d.retry.max_attempts for d in self.destinations), default=1) + 5
        self.store_backoff = (0.2, 5.0)  # first and longest wait while PostgreSQL is unreachable
        self.store_retries = 0
        self._consumers: list[asyncio.Task[None]] = []
        self._busy: set[int] = set()
        self._idle = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False

    def start(self) -> None:
        with bound_contextvars(channel=self.name):  # copied into each consumer task's context
            for p in range(self.journal.partitions):
                self._consumers.append(
                    asyncio.create_task(self._consume(p), name=f"consumer-{self.name}-{p}")
                )

    async def recovered(self) -> None:
        """Nothing to recover here: the stream holds the pending work."""

    async def stop(self, drain_timeout: float) -> None:
        """Stop pulling; let messages in hand finish (up to the timeout); the rest stays in the stream."""
        self._stopping = True
        if self._busy:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain_timeout):
                    await self._idle.wait()
        for task in self._consumers:
            task.cancel()
        if self._consumers:
            await asyncio.wait(self._consumers)
        self._consumers.clear()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=drain_timeout)

    def offer(self, item: WorkItem) -> None:
        """Nothing to do: the intake published the envelope and some node's consumer will take it."""

    def replay(self, item: WorkItem) -> None:
        """Back into the stream, at the end of its partition (the store already reset it)."""
        with bound_contextvars(channel=self.name, message_id=item.envelope.id):  # the task's context
            task = asyncio.get_running_loop().create_task(self._republish(item))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _republish(self, item: WorkItem) -> None:
        # The store has reset the message: until the stream has it again nothing would process it,
        # so an unreachable NATS is waited out (with backoff) rather than dropping the replay.
        delay, longest = self.store_backoff
        while True:
            try:
                await self.journal.publish(item.envelope, None)
            except StoreError as exc:
                log.warning("replay_publish_failed", error=exc.message)
                if self._stopping:
                    log.error("replay_not_published")
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, longest)
            else:
                return

    async def _consume(self, partition: int) -> None:
        sub: Any = None
        while not self._stopping:
            try:
                if sub is None:
                    sub = await self.journal.subscribe(self.name, partition, max_deliver=self.max_deliver)
                msgs = await sub.fetch(1, timeout=self.fetch_timeout)
            except TimeoutError:
                continue  # nothing for this partition just now
            except (*NATS_ERRORS, StoreError) as exc:
                log.warning("consumer_fetch_failed", partition=partition, error=type(exc).__name__)
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                self._busy.add(partition)
                self._idle.clear()
                try:
                    await in_progress_while(msg, self.journal.beat_s, self._take(msg))
                except asyncio.CancelledError:
                    raise
                except NATS_ERRORS as exc:
                    # NATS lost before the ack: JetStream redelivers after ack_wait and the store
                    # says where it stopped (a message already SENT is only acked).
                    log.warning(
                        "consumer_ack_failed",
                        partition=partition,
                        seq=msg.metadata.sequence.stream,
                        error=type(exc).__name__,
                    )
                except Exception as exc:
                    log.exception("consumer_unexpected_error", error=type(exc).__name__)
                    with contextlib.suppress(*NATS_ERRORS):
                        await msg.nak(delay=1.0)
                finally:
                    self._busy.discard(partition)
                    if not self._busy:
                        self._idle.set()

    async def _take(self, msg: Msg) -> None:
        env, ack = decode(msg.data)
        with bound_contextvars(message_id=env.id):  # what is logged for this message names it
            delivered = msg.metadata.num_delivered
            wait, longest = self.store_backoff
            while True:
                try:
                    delay = await self._take_once(msg, env, ack, delivered)
                    break
                except StoreError as exc:
                    log.error("consumer_store_failed", error=exc.message)
                    if self._stopping:  # another node (or this one, restarted) takes it over
                        with contextlib.suppress(*NATS_ERRORS):
                            await msg.nak(delay=1.0)
                        return
                    # Kept in hand: in_progress_while keeps JetStream from redelivering meanwhile.
                    self.store_retries += 1
                    await asyncio.sleep(wait)
                    wait = min(wait * 2, longest)
            if delay is None:
                return
            if delay == _DONE:
                await msg.ack_sync()
            else:
                await msg.nak(delay=delay)

    async def _take_once(
        self, msg: Msg, env: Envelope, ack: tuple[bytes, str] | None, delivered: int
    ) -> float | None:
        """One try at the message; None when it was acked here already."""
        result, existing = await self.pg.admit(env, ack)
        if result.duplicate:
            self.counters["duplicates"] += 1
            log.info("message_duplicate", message_id=result.message_id)  # the first one's id
            await msg.ack_sync()
            return None
        if existing in _TERMINAL:  # done by a node that stopped before its ack: nothing left
            await msg.ack_sync()
            return None
        if existing is None or existing == Status.RECEIVED.value:
            item: WorkItem | None = WorkItem(result.seq, env, Status.RECEIVED, None, (), {})
        else:
            item = await self.pg.work_item(env.id)
            if item is None and existing == Status.QUEUED.value:
                # Every delivery recorded done, the node stopped before the message's own status:
                # nothing is sent again, the status is set here.
                self.pg.finish(env.id)
        # ``last``: JetStream's final delivery (node failures only spend them) — DEAD rather than
        # dropped by the stream without a row; otherwise the attempts in PostgreSQL decide.
        delay = _DONE if item is None else await self._work(item, last=delivered >= self.max_deliver)
        await self.pg.flush()  # the trace is committed before JetStream forgets the message
        return delay

    async def _work(self, item: WorkItem, *, last: bool) -> float:
        """Process and deliver what is pending; returns _DONE or the delay before the next try."""
        env = item.envelope
        first: dict[str, Attempt] = {}
        attempts: dict[str, int] = {}
        if item.status is Status.RECEIVED:
            self.counters["received"] += 1
            result = self.pipeline.process(env)
            if result is None:
                return _DONE
            payload, transformed = result
            todo = list(self.destinations)
            tried = await self.pipeline.first_round(env, payload, todo, transformed)
            if tried is None:
                return _DONE
            first = tried
        else:
            payload = item.payload if item.payload is not None else env.raw
            names = set(item.pending_destinations)
            todo = [d for d in self.destinations if d.name in names]
            attempts = dict(item.attempts)
        delays: list[float] = []
        for dest in todo:
            attempt = attempts.get(dest.name, 0) + 1
            got = first.get(dest.name) or await self.pipeline.attempt(env, payload, dest, attempt)
            verdict = self.pipeline.settle(env, dest, attempt, got, last_delivery=last)
            if verdict is None or verdict.action is Action.GIVE_UP:
                continue
            if verdict.action is Action.RETRY:
                delays.append(verdict.delay)
                continue
            await self.journal.dead_letter(env, dest.name, got.detail)
        if delays:
            return max(min(delays), 0.001)
        if self.queued:
            self.pg.finish(env.id)
            self.counters["sent"] += 1
        return _DONE

    def snapshot(self) -> dict[str, Any]:
        # No local queue: the stream holds what waits.
        snap = self.pipeline.snapshot(
            {"in_memory": 0, "spilled": False, "recovering": False, "busy_lanes": 0}
        )
        snap["in_hand"] = len(self._busy)
        snap["partitions"] = self.journal.partitions
        snap["journal"] = "nats"
        return snap
