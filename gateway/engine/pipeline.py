"""What a channel does with one message, whatever schedules it: filter → steps → destinations.

``Pipeline`` processes (the filter, the steps) and delivers (each destination, its retries, the
verdict of gateway.engine.retry); the local lanes (gateway.engine.channel) and the JetStream
consumers (gateway.engine.nats_channel) each schedule messages through one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from gateway.core.ack import AckTiming
from gateway.core.envelope import HL7_V2, Envelope
from gateway.core.errors import MessageError, PermanentDeliveryError, ProcessingError, RetryLater, StoreError
from gateway.core.logging import get_logger
from gateway.core.protocols import ChannelStore, Destination, StageRecord, WorkItem
from gateway.core.status import Status
from gateway.engine.retry import Action, Failure, RetryPolicy, Verdict, decide, jitter
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
class Attempt:
    """One try at one destination, before anything about it is written."""

    failure: Failure | None  # None: the destination took the message
    detail: str
    defer: float | None
    stage: StageRecord | None

    @property
    def ok(self) -> bool:
        return self.failure is None


class Pipeline:
    """One channel's processing and delivery, its counters, and who waits for an outcome."""

    def __init__(
        self,
        *,
        name: str,
        source: str,
        store: ChannelStore,
        filter: Filter,
        steps: Sequence[Step],
        destinations: Sequence[DestinationRuntime],
        queued: bool = True,
        ack_timing: AckTiming = AckTiming.DEFAULT,
        dedupe: bool = True,
        default_charset: str = "ASCII",
        sending_application: str = "PASSERELLE",
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
        self.ack_timing = AckTiming(ack_timing)
        self.dedupe = dedupe
        self.default_charset = default_charset
        self.sending_application = sending_application
        self._waiters: dict[str, asyncio.Future[Outcome]] = {}
        self.counters: dict[str, int] = {
            "received": 0,
            "filtered": 0,
            "duplicates": 0,
            "transformed": 0,
            "errors": 0,
            "sent": 0,
            "dead": 0,
        }

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

    def release_waiters(self) -> None:
        """At stop: whoever still waits is told the message is only received (it stays journaled)."""
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_result(Outcome(Status.RECEIVED))
        self._waiters.clear()

    # -- one message -------------------------------------------------------------

    async def handle(self, item: WorkItem, *, waiting: Callable[[], None] | None = None) -> None:
        """Process and deliver one message; ``waiting`` is called when it starts waiting for a retry."""
        env = item.envelope
        payload: bytes
        transformed: StageRecord | None = None
        if item.status is Status.RECEIVED:
            resolved = await self._prepare(env) if self._preparers else {}
            if resolved is None:
                return
            result = self.process(env, checked=item.checked, resolved=resolved)
            if result is None:
                return
            (payload, transformed), pending = result, tuple(d.name for d in self.destinations)
            attempts: Mapping[str, int] = {}
        else:
            payload = item.payload if item.payload is not None else env.raw
            pending, attempts = item.pending_destinations, item.attempts
        if self.queued and self.ack_timing is not AckTiming.AFTER_DELIVERY:
            self.finish(env.id, Outcome(Status.QUEUED))
        await self._deliver(env, payload, pending, attempts, transformed, waiting)

    async def _prepare(self, env: Envelope) -> dict[str, Any] | None:
        """What steps read before they run (the repository's Patients for a FHIR request); None: failed."""
        resolved: dict[str, Any] = {}
        for step in self._preparers:
            try:
                resolved.update(await step.prepare(env))
            except StoreError as exc:  # kept in ERROR: a replay reads again
                self.fail(env, ProcessingError(f"step {step.name}: {exc.message}"), f"step:{step.name}")
                return None
        return resolved

    def process(
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
            self.fail(env, exc, "parse")
            return None
        if not self.filter.accepts(msg):  # a replay after the filter changed
            self.counters["filtered"] += 1
            store.record(
                env.id,
                StageRecord("filter", Status.FILTERED, detail={"reason": "channel filter"}),
                status=Status.FILTERED,
            )
            self.finish(env.id, Outcome(Status.FILTERED))
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
                self.fail(env, exc, f"step:{step.name}")
                return None
            except Exception as exc:  # noqa: BLE001 - a step's own failure, translated once here
                self.fail(
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
                self.finish(env.id, Outcome(Status.FILTERED))
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
            self.finish(env.id, Outcome(Status.SENT))
            return None
        if self.ack_timing is AckTiming.AFTER_TRANSFORM:
            self.finish(env.id, Outcome(Status.TRANSFORMED))
        return payload, transformed

    def fail(self, env: Envelope, error: MessageError, stage: str) -> None:
        self.counters["errors"] += 1
        log.warning("message_error", stage=stage, code=error.hl7_error_code, error=type(error).__name__)
        self.store.record(
            env.id,
            StageRecord(
                stage,
                Status.ERROR,
                detail={"error": error.hl7_error_code, "text": error.message, "location": error.location},
            ),
            status=Status.ERROR,
        )
        self.finish(env.id, Outcome(Status.ERROR, error))

    def finish(self, message_id: str, outcome: Outcome) -> None:
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
        waiting: Callable[[], None] | None = None,
    ) -> None:
        by_name = {d.name: d for d in self.destinations}
        todo = [by_name[name] for name in pending if name in by_name]
        first: dict[str, Attempt] = {}
        if transformed is not None:
            tried = await self.first_round(env, payload, todo, transformed)
            if tried is None:
                self.finish(env.id, Outcome(Status.SENT))
                return
            first = tried
        final = Status.SENT
        failure: MessageError | None = None
        for n, dest in enumerate(todo):
            last = n == len(todo) - 1
            status = await self._deliver_one(
                env, payload, dest, attempts.get(dest.name, 0), last, final, first.get(dest.name), waiting
            )
            if status is Status.DEAD:
                final = Status.DEAD
            elif status is Status.ERROR:  # a non-queued channel's single attempt failed
                final = Status.ERROR
                failure = ProcessingError(f"destination {dest.name} did not accept the message")
        if final is Status.SENT:
            self.counters["sent"] += 1
        self.finish(env.id, Outcome(final, failure))

    async def first_round(
        self, env: Envelope, payload: bytes, todo: Sequence[DestinationRuntime], transformed: StageRecord
    ) -> dict[str, Attempt] | None:
        """A fresh message: every destination tried once before anything is written.

        When all take it (the usual case) one write records the transform and the deliveries
        together, and None is returned. A crash before that write leaves the message RECEIVED: it
        is processed and delivered again, which the destinations' idempotence (or the receiver's
        MSH-10 check) absorbs. Otherwise the deliveries are queued and the attempts returned.
        """
        first = {dest.name: await self.attempt(env, payload, dest, 1) for dest in todo}
        if all(a.ok and a.stage is None for a in first.values()):
            for dest in todo:
                dest.sent += 1
            self.store.queue_deliveries(env.id, transformed, [d.name for d in todo], sent=True)
            self.counters["sent"] += 1
            return None
        self.store.queue_deliveries(env.id, transformed, [d.name for d in todo])
        return first

    async def attempt(self, env: Envelope, payload: bytes, dest: DestinationRuntime, attempt: int) -> Attempt:
        defer: float | None = None
        response: bytes | None = None
        response_type = HL7_V2
        failure: Failure | None = Failure.TRANSIENT
        try:
            # asyncio.timeout, not wait_for: no extra task (and loop turn) per delivery.
            async with asyncio.timeout(dest.retry.timeout_s):
                result = await dest.connector.send(env, payload)
        except asyncio.CancelledError:
            # Shutdown: the delivery stays QUEUED/ERROR in the journal and resumes at the next start.
            raise
        except RetryLater as exc:
            detail, defer = exc.message, exc.defer
        except PermanentDeliveryError as exc:
            failure, detail = Failure.PERMANENT, exc.message
        except TimeoutError:
            detail = "timeout"
        except Exception as exc:  # noqa: BLE001 - an unknown failure is treated as transient
            detail = f"unexpected {type(exc).__name__}"
        else:
            if result.status is Status.SENT:
                failure = None
            elif not result.retry:
                failure = Failure.PERMANENT
            detail, response = result.detail, result.response
            response_type = result.response_type
        # A plain success is fully described by the deliveries row; keep a stage when there is more.
        stage = (
            StageRecord(
                f"delivery:{dest.name}",
                Status.SENT if failure is None else Status.ERROR,
                response,
                response_type if response else None,
                {"attempt": attempt, "detail": detail},
            )
            if response is not None or failure is not None or attempt > 1
            else None
        )
        return Attempt(failure, detail, defer, stage)

    def settle(
        self,
        env: Envelope,
        dest: DestinationRuntime,
        attempt: int,
        result: Attempt,
        *,
        sent_status: Status | None = None,
        last_delivery: bool = False,
    ) -> Verdict | None:
        """Counts and records attempt number ``attempt``; what follows a failure (None: sent).

        ``sent_status``: the message's status once this destination took it (None: unchanged).
        """
        if result.failure is None:
            dest.sent += 1
            self.store.delivery_update(
                env.id, dest.name, Status.SENT, attempt, message_status=sent_status, stage=result.stage
            )
            return None
        dest.errors += 1
        log.warning("delivery_failed", destination=dest.name, attempt=attempt, detail=result.detail)
        verdict = decide(
            result.failure,
            attempt,
            dest.retry,
            queued=self.queued,
            last_delivery=last_delivery,
            defer=result.defer,
            jitter=jitter(),
        )
        status = Status.DEAD if verdict.action is Action.DEAD_LETTER else Status.ERROR
        if status is Status.DEAD:
            dest.dead += 1
            self.counters["dead"] += 1
        self.store.delivery_update(
            env.id,
            dest.name,
            status,
            attempt,
            message_status=status,
            stage=result.stage,
            error=result.detail,
        )
        return verdict

    async def _deliver_one(
        self,
        env: Envelope,
        payload: bytes,
        dest: DestinationRuntime,
        done: int,
        last: bool,
        so_far: Status,
        first: Attempt | None,
        waiting: Callable[[], None] | None,
    ) -> Status:
        attempt = done
        while True:
            attempt += 1
            if first is not None:
                result, first = first, None
            else:
                result = await self.attempt(env, payload, dest, attempt)
            verdict = self.settle(env, dest, attempt, result, sent_status=so_far if last else None)
            if verdict is None:
                return Status.SENT
            if verdict.action is Action.DEAD_LETTER:
                return Status.DEAD
            if verdict.action is Action.GIVE_UP:
                return Status.ERROR
            if waiting is not None:
                waiting()
            await asyncio.sleep(verdict.delay)

    def snapshot(self, queue: Mapping[str, Any]) -> dict[str, Any]:
        """The counters, with ``queue``: what the scheduler holds (in memory, spilled, busy)."""
        return {
            "name": self.name,
            "source": self.source,
            "queued": self.queued,
            "ack_timing": self.ack_timing.value,
            **queue,
            "counters": dict(self.counters),
            "destinations": [
                {"name": d.name, "sent": d.sent, "errors": d.errors, "dead": d.dead}
                for d in self.destinations
            ],
            "at": time.time(),
        }
