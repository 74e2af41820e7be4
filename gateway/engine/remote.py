"""Both ends of the main↔worker split.

The main process keeps the MLLP intake, the one SQLite writer and the ACKs; the
worker process runs the channels (steps, destinations, retries). Over the link:

    main → worker   ("offer" | "replay", channel, WorkItem)   ("expect", channel, message id)
                    ("flushed", token)                        ("drain", timeout)
    worker → main   ("op", store method, args, kwargs)        ("flush", token)
                    ("outcome", message id, status, error)    ("recovered", channel)
                    ("snapshot", {channel: snapshot})         ("drained",)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gateway.core.envelope import Envelope
from gateway.core.errors import AckCode, MessageError, StoreError
from gateway.core.protocols import AppendResult, StageRecord, WorkItem
from gateway.core.status import Status
from gateway.engine.channel import Filter, Outcome
from gateway.engine.link import Link
from gateway.hl7.er7 import Message
from gateway.store.sqlite import SqliteStore

# The store writes a worker may ask for; nothing else is executed on its behalf.
FORWARDED_WRITES = frozenset({"record", "queue_deliveries", "delivery_update", "release_dedupe"})


def error_to_wire(err: MessageError | None) -> tuple[str, str, str | None, str] | None:
    if err is None:
        return None
    return (err.message, err.hl7_error_code, err.location, err.ack_code.value)


def error_from_wire(data: tuple[str, str, str | None, str] | None) -> MessageError | None:
    if data is None:
        return None
    message, code, location, ack = data
    err = MessageError(message, location=location)
    err.hl7_error_code = code
    err.ack_code = AckCode(ack)
    return err


class ChannelPort:
    """Main-process stand-in for a channel that runs in the worker (what the intake needs of it)."""

    def __init__(
        self,
        name: str,
        source: str,
        filter: Filter,
        ack_timing: str,
        sending_application: str,
        worker: WorkerHandle,
        *,
        dedupe: bool = True,
    ) -> None:
        self.name = name
        self.source = source
        self.filter = filter
        self.ack_timing = ack_timing
        self.sending_application = sending_application
        self.worker = worker
        self.dedupe = dedupe
        self.counters: dict[str, int] = {"received": 0, "filtered": 0, "duplicates": 0}
        self.remote: dict[str, Any] = {}
        self.recovered_event = asyncio.Event()

    def accepts(self, msg: Message) -> bool:
        return self.filter.accepts(msg)

    def offer(self, item: WorkItem) -> None:
        self.worker.send(("offer", self.name, item))

    def replay(self, item: WorkItem) -> None:
        self.worker.send(("replay", self.name, item))

    def expect_outcome(self, message_id: str) -> asyncio.Future[Outcome]:
        return self.worker.expect(self.name, message_id)

    async def recovered(self) -> None:
        await self.recovered_event.wait()

    def snapshot(self) -> dict[str, Any]:
        snap = dict(self.remote) or {"name": self.name, "source": self.source, "recovering": True}
        counters = dict(snap.get("counters", {}))
        counters.update(self.counters)  # intake-side counts are kept here, the rest in the worker
        snap["counters"] = counters
        return snap


class WorkerHandle:
    """The main process's side of the link: routes what the worker says, relays what the intake says."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        self.link: Link | None = None
        self.ports: dict[str, ChannelPort] = {}
        self._outcomes: dict[str, asyncio.Future[Outcome]] = {}
        self.drained = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def connected(self) -> bool:
        return self.link is not None and not self.link.closed

    def send(self, msg: tuple[Any, ...]) -> None:
        if self.link is not None:
            self.link.send(msg)

    def expect(self, channel: str, message_id: str) -> asyncio.Future[Outcome]:
        fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._outcomes[message_id] = fut
        self.send(("expect", channel, message_id))
        return fut

    def lost(self, reason: str) -> None:
        """The worker went away: whoever waits for an outcome hears of it (its sender gets AE)."""
        for fut in self._outcomes.values():
            if not fut.done():
                fut.set_result(Outcome(Status.ERROR, MessageError(reason)))
        self._outcomes.clear()
        for port in self.ports.values():
            port.recovered_event.clear()
            port.remote = {}

    async def serve(self, link: Link) -> None:
        self.link = link
        async for msg in link.messages():
            kind = msg[0]
            if kind == "op":
                _, name, args, kwargs = msg
                if name in FORWARDED_WRITES:
                    getattr(self.store, name)(*args, **kwargs)
            elif kind == "flush":
                task = asyncio.create_task(self._flushed(msg[1]))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif kind == "outcome":
                _, mid, status, err = msg
                fut = self._outcomes.pop(mid, None)
                if fut is not None and not fut.done():
                    fut.set_result(Outcome(Status(status), error_from_wire(err)))
            elif kind == "recovered":
                port = self.ports.get(msg[1])
                if port is not None:
                    port.recovered_event.set()
            elif kind == "snapshot":
                for name, snap in msg[1].items():
                    if name in self.ports:
                        self.ports[name].remote = snap
            elif kind == "drained":
                self.drained.set()

    async def _flushed(self, token: int) -> None:
        # On failure the worker's flush ends with its own timeout; the store logs the cause.
        with contextlib.suppress(StoreError):
            await self.store.flush()
        self.send(("flushed", token))


class LinkedStore:
    """The worker's store: reads from the database directly, writes through the main process.

    Writes are fire-and-forget, like the in-process store's trace writes: they are applied
    in the order sent, and ``flush`` waits until the main process has committed them.
    """

    def __init__(self, path: Path, link: Link) -> None:
        self._reader = SqliteStore(path, writer=False)
        self._link = link
        self._tokens = itertools.count(1)
        self._flushes: dict[int, asyncio.Future[None]] = {}

    async def open(self) -> None:
        await self._reader.open()

    async def close(self) -> None:
        await self._reader.close()

    def flushed(self, token: int) -> None:
        fut = self._flushes.pop(token, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def flush(self) -> None:
        token = next(self._tokens)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flushes[token] = fut
        self._link.send(("flush", token))
        await fut

    def _forward(self, name: str, *args: Any, **kwargs: Any) -> Awaitable[None]:
        self._link.send(("op", name, args, kwargs))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def record(self, message_id: str, stage: StageRecord, *, status: Status | None = None) -> Awaitable[None]:
        return self._forward("record", message_id, stage, status=status)

    def queue_deliveries(
        self, message_id: str, stage: StageRecord, destinations: Sequence[str], *, sent: bool = False
    ) -> Awaitable[None]:
        return self._forward("queue_deliveries", message_id, stage, list(destinations), sent=sent)

    def delivery_update(
        self,
        message_id: str,
        destination: str,
        status: Status,
        attempts: int,
        *,
        message_status: Status | None,
        stage: StageRecord | None,
        error: str | None = None,
    ) -> Awaitable[None]:
        return self._forward(
            "delivery_update",
            message_id,
            destination,
            status,
            attempts,
            message_status=message_status,
            stage=stage,
            error=error,
        )

    def release_dedupe(self, message_id: str) -> Awaitable[None]:
        return self._forward("release_dedupe", message_id)

    async def pending(self, channel: str, after_seq: int, limit: int, *, recovering: bool) -> list[WorkItem]:
        return await self._reader.pending(channel, after_seq, limit, recovering=recovering)

    async def ping(self) -> None:
        await self._reader.ping()

    # The worker never journals nor runs operator actions: those belong to the main process.

    async def append(
        self, envelopes: Sequence[Envelope], *, ack: tuple[bytes, str] | None = None
    ) -> list[AppendResult]:
        raise StoreError("the worker does not journal")

    def append_then(
        self,
        envelopes: Sequence[Envelope],
        then: Callable[[list[AppendResult] | BaseException], None],
        *,
        ack: tuple[bytes, str] | None = None,
    ) -> None:
        raise StoreError("the worker does not journal")

    async def get_message(self, message_id: str, *, with_payloads: bool) -> dict[str, Any] | None:
        return await self._reader.get_message(message_id, with_payloads=with_payloads)

    async def list_messages(
        self,
        *,
        status: str | None,
        control_id: str | None,
        channel: str | None,
        limit: int,
        before_seq: int | None,
    ) -> list[dict[str, Any]]:
        return await self._reader.list_messages(
            status=status, control_id=control_id, channel=channel, limit=limit, before_seq=before_seq
        )

    async def stats(self) -> dict[str, Any]:
        return await self._reader.stats()

    async def reset_for_replay(self, message_id: str) -> WorkItem | None:
        raise StoreError("replays go through the main process")

    async def dead_letters(self, channel: str | None, limit: int) -> list[dict[str, Any]]:
        return await self._reader.dead_letters(channel, limit)

    async def discard(self, message_id: str) -> bool:
        raise StoreError("discards go through the main process")

    async def prune(self, *, payload_before: float, message_before: float) -> tuple[int, int]:
        raise StoreError("retention runs in the main process")


def outcome_sender(link: Link, message_id: str) -> Callable[[asyncio.Future[Outcome]], None]:
    def send(fut: asyncio.Future[Outcome]) -> None:
        outcome = fut.result() if not fut.cancelled() else Outcome(Status.RECEIVED)
        link.send(("outcome", message_id, outcome.status.value, error_to_wire(outcome.error)))

    return send


def snapshots(channels: Mapping[str, Any]) -> dict[str, Any]:
    return {name: ch.snapshot() for name, ch in channels.items()}
