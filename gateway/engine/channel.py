"""A channel at run time: filter → steps → destinations, in ordered lanes.

Ordering: every message has a partition key (the patient). A key always maps to
the same lane, and a lane handles one message at a time, retries included, so
one patient's messages reach each destination in the order they were received.

Memory stays bounded: past ``max_in_memory`` waiting messages the channel
"spills": new messages stay in the journal only, and a reloader feeds them back
in journal order as the lanes drain. Start-up recovery is the same path, from 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import zlib
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from gateway.core.envelope import HL7_V2, Envelope
from gateway.core.errors import MessageError, PermanentDeliveryError, ProcessingError, RetryLater, StoreError
from gateway.core.logging import get_logger
from gateway.core.protocols import Destination, MessageStore, StageRecord, WorkItem
from gateway.core.status import Status
from gateway.engine.retry import RetryPolicy
from gateway.engine.steps import EditingStep, PreparingStep, ScreeningStep, Step, StepContext
from gateway.hl7.er7 import Message

log = get_logger("passerelle.channel")


@dataclass(frozen=True, slots=True)
class Filter:
    message_types: frozenset[str] = frozenset()
    triggers: frozenset[str] = frozenset()
    events: frozenset[str] = frozenset()  # "ADT^A01"
    sending_facilities: frozenset[str] = frozenset()
    sending_applications: frozenset[str] = frozenset()

    @classmethod
    def from_config(cls, data: Mapping[str, Any] | None) -> Filter:
        data = data or {}
        return cls(**{k: frozenset(v) for k, v in data.items()})

    def accepts(self, msg: Message) -> bool:
        if self.message_types and msg.message_type not in self.message_types:
            return False
        if self.triggers and msg.trigger not in self.triggers:
            return False
        if self.events and f"{msg.message_type}^{msg.trigger}" not in self.events:
            return False
        if self.sending_facilities and msg.sending_facility not in self.sending_facilities:
            return False
        return not (self.sending_applications and msg.sending_application not in self.sending_applications)


@dataclass(slots=True)
class DestinationRuntime:
    name: str
    connector: Destination
    retry: RetryPolicy
    sent: int = 0
    errors: int = 0
    dead: int = 0


@dataclass(slots=True)
class Outcome:
    """What processing did with a message, for ACK timings after processing."""

    status: Status
    error: MessageError | None = None


@dataclass(frozen=True, slots=True)
class _Attempt:
    ok: bool
    retry: bool
    detail: str
    defer: float | None
    stage: StageRecord | None


@dataclass(slots=True)
class _Lane:
    queue: deque[WorkItem] = field(default_factory=deque)
    waiter: asyncio.Future[None] | None = None
    task: asyncio.Task[None] | None = None
    busy: bool = False


class ChannelRuntime:
    def __init__(
        self,
        *,
        name: str,
        source: str,
        store: MessageStore,
        filter: Filter,
        steps: Sequence[Step],
        destinations: Sequence[DestinationRuntime],
        queued: bool = True,
        ack_timing: str = "before_processing",
        partitions: int = 64,
        max_in_memory: int = 10_000,
        dedupe: bool = True,
        default_charset: str = "ASCII",
        sending_application: str = "PASSERELLE",
        shard: tuple[int, int] | None = None,
    ) -> None:
        self.name = name
        self.source = source
        self.store = store
        self.filter = filter
        self.steps = list(steps)
        # Steps that read something before they run (a step's async ``prepare``), in step order.
        self._preparers = [
            cast(PreparingStep, s) for s in self.steps if callable(getattr(s, "prepare", None))
        ]
        # The steps intake runs before the ACK: up to the last that screens, those that screen
        # and those that edit the message the screening ones see.
        screening = [n for n, s in enumerate(self.steps) if callable(getattr(s, "screen", None))]
        self._screens: list[ScreeningStep | EditingStep] = [
            cast(ScreeningStep | EditingStep, s)
            for s in self.steps[: screening[-1] + 1 if screening else 0]
            if callable(getattr(s, "screen", None)) or callable(getattr(s, "edit", None))
        ]
        self.destinations = list(destinations)
        self.queued = queued
        self.ack_timing = ack_timing
        self.dedupe = dedupe
        self.default_charset = default_charset
        self.sending_application = sending_application
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
        self._waiters: dict[str, asyncio.Future[Outcome]] = {}
        self._stopping = False
        self.counters: dict[str, int] = {
            "received": 0,
            "filtered": 0,
            "duplicates": 0,
            "transformed": 0,
            "errors": 0,
            "sent": 0,
            "dead": 0,
        }

    # -- life cycle ------------------------------------------------------------

    def start(self) -> None:
        for i, lane in enumerate(self._lanes):
            lane.task = asyncio.create_task(self._lane_loop(lane), name=f"lane-{self.name}-{i}")
        self._reloader = asyncio.create_task(self._reload_loop(), name=f"reloader-{self.name}")

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
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=drain_timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        if self._reloader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reloader
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_result(Outcome(Status.RECEIVED))
        self._waiters.clear()

    # -- intake side -------------------------------------------------------------

    def accepts(self, msg: Message) -> bool:
        return self.filter.accepts(msg)

    def screen(self, msg: Message) -> MessageError | None:
        """What a step refuses before the message is acknowledged (see FhirMapping.screen), on
        the message as the steps before it made it (edited on a copy: intake stores it as sent)."""
        current, copied = msg, False
        for step in self._screens:
            if callable(getattr(step, "screen", None)):
                error = cast(ScreeningStep, step).screen(current)
                if error is not None:
                    return error
                continue
            if not copied:
                current, copied = current.without(), True
            current = cast(EditingStep, step).edit(current) or current
        return None

    def expect_outcome(self, message_id: str, partition: str = "") -> asyncio.Future[Outcome]:
        fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiters[message_id] = fut
        return fut

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
                log.error("channel_reload_failed", channel=self.name, error=type(exc).__name__)
                await asyncio.sleep(1.0)
                continue
            for item in items:
                self._dispatch(item)
            if len(items) < limit:
                if self._recovering:
                    self._recovering = False
                    self._recovered.set()
                    log.info("channel_recovered", channel=self.name, watermark=self._watermark)
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
            lane.busy = True
            try:
                await self._handle(item)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception(
                    "lane_unexpected_error",
                    channel=self.name,
                    message_id=item.envelope.id,
                    error=type(exc).__name__,
                )
                self._finish(item.envelope.id, Outcome(Status.ERROR, ProcessingError("internal error")))
            finally:
                lane.busy = False
                self._in_memory -= 1
                if self._spilled and self._in_memory <= self.max_in_memory // 2:
                    self._reload_wake.set()

    async def _handle(self, item: WorkItem) -> None:
        env = item.envelope
        payload: bytes
        transformed: StageRecord | None = None
        if item.status is Status.RECEIVED:
            resolved = await self._prepare(env) if self._preparers else {}
            if resolved is None:
                return
            result = self._process(env, checked=item.checked, resolved=resolved)
            if result is None:
                return
            (payload, transformed), pending = result, tuple(d.name for d in self.destinations)
            attempts: Mapping[str, int] = {}
        else:
            payload = item.payload if item.payload is not None else env.raw
            pending, attempts = item.pending_destinations, item.attempts
        if self.queued and self.ack_timing != "after_delivery":
            self._finish(env.id, Outcome(Status.QUEUED))
        await self._deliver(env, payload, pending, attempts, transformed)

    async def _prepare(self, env: Envelope) -> dict[str, Any] | None:
        """What steps read before they run (the repository's Patients for a FHIR request); None: failed."""
        resolved: dict[str, Any] = {}
        for step in self._preparers:
            try:
                resolved.update(await step.prepare(env))
            except StoreError as exc:  # kept in ERROR: a replay reads again
                self._fail(env, ProcessingError(f"step {step.name}: {exc.message}"), f"step:{step.name}")
                return None
        return resolved

    def _process(
        self, env: Envelope, *, checked: bool = False, resolved: dict[str, Any] | None = None
    ) -> tuple[bytes, StageRecord] | None:
        """Filter and steps. Returns the payload and its TRANSFORMED record, or None when done.

        ``checked``: the intake applied this filter a moment ago; with no steps there is then
        nothing to read in the message, and the bytes received are delivered as they are.
        """
        store = self.store
        destinations = [d.name for d in self.destinations]
        if checked and not self.steps:
            return self._transformed(env, env.raw, destinations, [])
        if env.content_type != HL7_V2:
            # A FHIR request: its routing rules were applied at intake; the steps read the body.
            ctx = StepContext(env, None, env.content_type, body=env.raw, resolved=resolved or {})
            return self._run_steps(env, ctx, destinations)
        try:
            msg = Message.decode(env.raw, default_charset=env.charset or self.default_charset)
        except MessageError as exc:
            self._fail(env, exc, "parse")
            return None
        if not self.filter.accepts(msg):  # a replay after the filter changed
            self.counters["filtered"] += 1
            store.record(
                env.id,
                StageRecord("filter", Status.FILTERED, detail={"reason": "channel filter"}),
                status=Status.FILTERED,
            )
            self._finish(env.id, Outcome(Status.FILTERED))
            return None
        return self._run_steps(env, StepContext(env, msg, env.content_type), destinations)

    def _run_steps(
        self, env: Envelope, ctx: StepContext, destinations: list[str]
    ) -> tuple[bytes, StageRecord] | None:
        store = self.store
        for step in self.steps:
            ctx.changed = False
            try:
                step(ctx)
            except MessageError as exc:
                self._fail(env, exc, f"step:{step.name}")
                return None
            except Exception as exc:  # noqa: BLE001 - a step's own failure, translated once here
                self._fail(
                    env,
                    ProcessingError(f"step {step.name} failed: {type(exc).__name__}"),
                    f"step:{step.name}",
                )
                return None
            if ctx.filtered:
                self.counters["filtered"] += 1
                store.record(
                    env.id,
                    StageRecord(f"step:{step.name}", Status.FILTERED, detail={"reason": ctx.filtered}),
                    status=Status.FILTERED,
                )
                self._finish(env.id, Outcome(Status.FILTERED))
                return None
            if ctx.changed:  # each step's output is kept, so recovery resumes from the last one
                store.record(
                    env.id,
                    StageRecord(f"step:{step.name}", Status.TRANSFORMED, ctx.payload(), ctx.content_type),
                )
        return self._transformed(env, ctx.payload(), destinations, ctx.warnings, ctx.unmapped)

    def _transformed(
        self,
        env: Envelope,
        payload: bytes,
        destinations: list[str],
        warnings: list[str],
        unmapped: list[str] | None = None,
    ) -> tuple[bytes, StageRecord] | None:
        detail: dict[str, Any] = {"destinations": destinations}
        if warnings:
            detail["warnings"] = warnings
        if unmapped:
            # Nothing is dropped silently: what no rule read is kept on the message and counted.
            detail["unmapped"] = unmapped
            self.counters["unmapped"] = self.counters.get("unmapped", 0) + 1
        self.counters["transformed"] += 1
        transformed = StageRecord("transformed", Status.TRANSFORMED, detail=detail)
        if not self.destinations:
            self.store.queue_deliveries(env.id, transformed, [])
            self._finish(env.id, Outcome(Status.SENT))
            return None
        if self.ack_timing == "after_transform":
            self._finish(env.id, Outcome(Status.TRANSFORMED))
        return payload, transformed

    def _fail(self, env: Envelope, error: MessageError, stage: str) -> None:
        self.counters["errors"] += 1
        log.warning(
            "message_error",
            channel=self.name,
            message_id=env.id,
            stage=stage,
            code=error.hl7_error_code,
            error=type(error).__name__,
        )
        self.store.record(
            env.id,
            StageRecord(
                stage,
                Status.ERROR,
                detail={"error": error.hl7_error_code, "text": error.message, "location": error.location},
            ),
            status=Status.ERROR,
        )
        self._finish(env.id, Outcome(Status.ERROR, error))

    def _finish(self, message_id: str, outcome: Outcome) -> None:
        fut = self._waiters.pop(message_id, None)
        if fut is not None and not fut.done():
            fut.set_result(outcome)

    async def _deliver(
        self,
        env: Envelope,
        payload: bytes,
        pending: Sequence[str],
        attempts: Mapping[str, int],
        transformed: StageRecord | None = None,
    ) -> None:
        by_name = {d.name: d for d in self.destinations}
        todo = [by_name[name] for name in pending if name in by_name]
        first: dict[str, _Attempt] = {}
        if transformed is not None:
            # Fresh message: try every destination once before writing anything. When all take it
            # (the usual case) one write records the transform and the deliveries together. A crash
            # before that write leaves the message RECEIVED: it is processed and delivered again,
            # which the destinations' idempotence (or the receiver's MSH-10 check) absorbs.
            for dest in todo:
                first[dest.name] = await self._attempt(env, payload, dest, 1)
            if all(a.ok and a.stage is None for a in first.values()):
                for dest in todo:
                    dest.sent += 1
                self.store.queue_deliveries(env.id, transformed, [d.name for d in todo], sent=True)
                self.counters["sent"] += 1
                self._finish(env.id, Outcome(Status.SENT))
                return
            self.store.queue_deliveries(env.id, transformed, [d.name for d in todo])
        final = Status.SENT
        failure: MessageError | None = None
        for n, dest in enumerate(todo):
            last = n == len(todo) - 1
            status = await self._deliver_one(
                env, payload, dest, attempts.get(dest.name, 0), last, final, first.get(dest.name)
            )
            if status is Status.DEAD:
                final = Status.DEAD
            elif status is Status.ERROR:  # a non-queued channel's single attempt failed
                final = Status.ERROR
                failure = ProcessingError(f"destination {dest.name} did not accept the message")
        if final is Status.SENT:
            self.counters["sent"] += 1
        self._finish(env.id, Outcome(final, failure))

    async def _attempt(
        self, env: Envelope, payload: bytes, dest: DestinationRuntime, attempt: int
    ) -> _Attempt:
        defer: float | None = None
        response: bytes | None = None
        response_type = HL7_V2
        try:
            # asyncio.timeout, not wait_for: no extra task (and loop turn) per delivery.
            async with asyncio.timeout(dest.retry.timeout_s):
                result = await dest.connector.send(env, payload)
        except asyncio.CancelledError:
            # Shutdown: the delivery stays QUEUED/ERROR in the journal and resumes at the next start.
            raise
        except RetryLater as exc:
            ok, retry, detail, defer = False, True, exc.message, exc.defer
        except PermanentDeliveryError as exc:
            ok, retry, detail = False, False, exc.message
        except TimeoutError:
            ok, retry, detail = False, True, "timeout"
        except Exception as exc:  # noqa: BLE001 - an unknown failure is treated as transient
            ok, retry, detail = False, True, f"unexpected {type(exc).__name__}"
        else:
            ok = result.status is Status.SENT
            retry, detail, response = result.retry, result.detail, result.response
            response_type = result.response_type
        # A plain success is fully described by the deliveries row; keep a stage when there is more.
        stage = (
            StageRecord(
                f"delivery:{dest.name}",
                Status.SENT if ok else Status.ERROR,
                response,
                response_type if response else None,
                {"attempt": attempt, "detail": detail},
            )
            if response is not None or not ok or attempt > 1
            else None
        )
        return _Attempt(ok, retry, detail, defer, stage)

    async def _deliver_one(
        self,
        env: Envelope,
        payload: bytes,
        dest: DestinationRuntime,
        done: int,
        last: bool,
        so_far: Status,
        first: _Attempt | None,
    ) -> Status:
        policy = dest.retry
        max_attempts = policy.max_attempts if self.queued else 1
        attempt = done
        store = self.store
        while True:
            attempt += 1
            if first is not None:
                result, first = first, None
            else:
                result = await self._attempt(env, payload, dest, attempt)
            if result.ok:
                dest.sent += 1
                store.delivery_update(
                    env.id,
                    dest.name,
                    Status.SENT,
                    attempt,
                    message_status=so_far if last else None,
                    stage=result.stage,
                )
                return Status.SENT
            dest.errors += 1
            log.warning(
                "delivery_failed",
                channel=self.name,
                destination=dest.name,
                message_id=env.id,
                attempt=attempt,
                detail=result.detail,
            )
            if not result.retry or attempt >= max_attempts:
                status = Status.DEAD if self.queued else Status.ERROR
                if status is Status.DEAD:
                    dest.dead += 1
                    self.counters["dead"] += 1
                store.delivery_update(
                    env.id,
                    dest.name,
                    status,
                    attempt,
                    message_status=status,
                    stage=result.stage,
                    error=result.detail,
                )
                return status
            store.delivery_update(
                env.id,
                dest.name,
                Status.ERROR,
                attempt,
                message_status=Status.ERROR,
                stage=result.stage,
                error=result.detail,
            )
            await asyncio.sleep(policy.delay(attempt, result.defer))

    def snapshot(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "queued": self.queued,
            "ack_timing": self.ack_timing,
            "in_memory": self._in_memory,
            "spilled": self._spilled,
            "recovering": self._recovering,
            "busy_lanes": sum(1 for lane in self._lanes if lane.busy),
            "counters": dict(self.counters),
            "destinations": [
                {"name": d.name, "sent": d.sent, "errors": d.errors, "dead": d.dead}
                for d in self.destinations
            ],
            "at": time.time(),
        }
