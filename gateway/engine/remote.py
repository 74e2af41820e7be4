"""Both ends of the main↔worker split.

The main process keeps the MLLP intake, the one SQLite writer and the ACKs; the
worker process runs the channels (steps, destinations, retries). Over the link:

    main → worker   ("offer" | "replay", channel, WorkItem)   ("expect", channel, message id)
                    ("flushed", token)                        ("drain", timeout)
    worker → main   ("trace", Trace)                          ("flush", token)
                    ("outcome", message id, status, error)    ("recovered", channel)
                    ("snapshot", {channel: snapshot})         ("drained",)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from gateway.core.ack import AckTiming
from gateway.core.errors import AckCode, MessageError, StoreError
from gateway.core.protocols import WorkItem, shard_of
from gateway.core.status import Status
from gateway.engine.link import Link
from gateway.engine.pipeline import Filter, Outcome
from gateway.hl7.er7 import Message
from gateway.store.messages.core import TraceWrites, WorkReads
from gateway.store.messages.sql import SQLITE, Ops, Trace
from gateway.store.messages.sqlite import SqliteStore

T = TypeVar("T")


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
    """Main-process stand-in for a channel that runs in the workers (what the intake needs of it)."""

    def __init__(
        self,
        name: str,
        source: str,
        filter: Filter,
        ack_timing: AckTiming,
        sending_application: str,
        worker: WorkerHandle,
        *,
        dedupe: bool = True,
        screen: Callable[[Message], MessageError | None] | None = None,
    ) -> None:
        self.name = name
        self.source = source
        self.filter = filter
        self.ack_timing = AckTiming(ack_timing)
        self.sending_application = sending_application
        self.worker = worker
        self.dedupe = dedupe
        self._screen = screen  # the channel's intake checks, run here, before the ACK
        self.counters: dict[str, int] = {"received": 0, "filtered": 0, "duplicates": 0}
        self.remote: dict[int, dict[str, Any]] = {}  # worker index → its latest snapshot
        self.recovered_by: set[int] = set()
        self.recovered_event = asyncio.Event()

    def accepts(self, msg: Message) -> bool:
        return self.filter.accepts(msg)

    def screen(self, msg: Message) -> MessageError | None:
        return self._screen(msg) if self._screen is not None else None

    def offer(self, item: WorkItem) -> None:
        self.worker.send_for(item.envelope.partition_key, ("offer", self.name, item))

    def replay(self, item: WorkItem) -> None:
        self.worker.send_for(item.envelope.partition_key, ("replay", self.name, item))

    def expect_outcome(self, message_id: str, partition: str = "") -> asyncio.Future[Outcome]:
        return self.worker.expect(self.name, message_id, partition)

    async def recovered(self) -> None:
        await self.recovered_event.wait()

    def mark_recovered(self, index: int) -> None:
        self.recovered_by.add(index)
        if len(self.recovered_by) >= self.worker.count:
            self.recovered_event.set()

    def snapshot(self) -> dict[str, Any]:
        """The workers' snapshots summed; intake-side counts are kept here."""
        snap: dict[str, Any] = {"name": self.name, "source": self.source, "workers": len(self.remote)}
        counters: dict[str, int] = {}
        in_memory = 0
        for part in self.remote.values():
            for key, value in part.get("counters", {}).items():
                counters[key] = counters.get(key, 0) + int(value)
            in_memory += int(part.get("in_memory", 0))
        counters.update(self.counters)
        snap["counters"] = counters
        snap["in_memory"] = in_memory
        snap["recovering"] = not self.recovered_event.is_set()
        return snap


class WorkerHandle:
    """The main process's side of the links: routes what workers say, sends each patient to its worker."""

    def __init__(self, store: SqliteStore, count: int = 1) -> None:
        self.store = store
        self.count = max(count, 1)
        self.links: dict[int, Link] = {}
        self.ports: dict[str, ChannelPort] = {}
        self._outcomes: dict[str, asyncio.Future[Outcome]] = {}
        self.drained: dict[int, asyncio.Event] = {i: asyncio.Event() for i in range(self.count)}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def connected(self) -> bool:
        return len(self.links) == self.count and not any(link.closed for link in self.links.values())

    def send_for(self, partition: str, msg: tuple[Any, ...]) -> None:
        link = self.links.get(shard_of(partition, self.count))
        if link is not None:
            link.send(msg)  # with no worker up, the journal keeps the message for the next one

    def broadcast(self, msg: tuple[Any, ...]) -> None:
        for link in self.links.values():
            link.send(msg)

    def expect(self, channel: str, message_id: str, partition: str) -> asyncio.Future[Outcome]:
        fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._outcomes[message_id] = fut
        self.send_for(partition, ("expect", channel, message_id))
        return fut

    def lost(self, index: int, reason: str) -> None:
        """A worker went away: whoever waits for an outcome hears of it (its sender gets AE)."""
        self.links.pop(index, None)
        for fut in self._outcomes.values():
            if not fut.done():
                fut.set_result(Outcome(Status.ERROR, MessageError(reason)))
        self._outcomes.clear()
        for port in self.ports.values():
            port.recovered_by.discard(index)
            port.recovered_event.clear()
            port.remote.pop(index, None)

    async def serve(self, index: int, link: Link) -> None:
        self.links[index] = link
        async for msg in link.messages():
            kind = msg[0]
            if kind == "trace":
                # Data only: the worker can ask for trace writes and nothing else.
                if isinstance(msg[1], Trace):
                    self.store.write_trace(msg[1])
            elif kind == "flush":
                task = asyncio.create_task(self._flushed(link, msg[1]))
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
                    port.mark_recovered(index)
            elif kind == "snapshot":
                for name, snap in msg[1].items():
                    if name in self.ports:
                        self.ports[name].remote[index] = snap
            elif kind == "drained":
                self.drained[index].set()

    async def _flushed(self, link: Link, token: int) -> None:
        # On failure the worker's flush ends with its own timeout; the store logs the cause.
        with contextlib.suppress(StoreError):
            await self.store.flush()
        link.send(("flushed", token))


class LinkedStore(TraceWrites, WorkReads):
    """The worker's store (a ``ChannelStore``): reads from the database directly, writes the
    trace through the main process.

    Trace writes are fire-and-forget, like the in-process store's: they are applied in the
    order sent, and ``flush`` waits until the main process has committed them.
    """

    dialect = SQLITE

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

    def write_trace(self, trace: Trace) -> Awaitable[None]:
        self._link.send(("trace", trace))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def read(self, ops: Callable[[], Ops[T]]) -> T:
        return await self._reader.read(ops)

    async def ping(self) -> None:
        await self._reader.ping()


def outcome_sender(link: Link, message_id: str) -> Callable[[asyncio.Future[Outcome]], None]:
    def send(fut: asyncio.Future[Outcome]) -> None:
        outcome = fut.result() if not fut.cancelled() else Outcome(Status.RECEIVED)
        link.send(("outcome", message_id, outcome.status.value, error_to_wire(outcome.error)))

    return send


def snapshots(channels: Mapping[str, Any]) -> dict[str, Any]:
    return {name: ch.snapshot() for name, ch in channels.items()}
