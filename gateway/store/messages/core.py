"""The message store's methods, once: a backend supplies its writer and its reader.

``TraceWrites`` turns the trace calls (record, queue_deliveries, delivery_update,
release_dedupe) into ``Trace`` data handed to ``write_trace``: the stores apply it, the
worker's linked store sends it to the main process. ``SqlMessageStore`` adds the journal,
reads and operator actions over ``sql``'s operations, run by the backend's ``_read`` and
``_write``.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar, TypeVar

from gateway.core.envelope import Envelope
from gateway.core.protocols import AppendResult, StageRecord, WorkItem
from gateway.core.status import Status
from gateway.store.messages import sql
from gateway.store.messages.sql import Dialect, Ops, Trace
from gateway.store.messages.views import message_filters

T = TypeVar("T")
Then = Callable[[list[AppendResult] | BaseException], None]  # called once with the results
Ack = tuple[bytes, str] | None  # the ACK (payload, code) journaled with the message


class TraceWrites(ABC):
    """The trace calls of ``TraceWriter``, as data for ``write_trace``."""

    @abstractmethod
    def write_trace(self, trace: Trace) -> Awaitable[None]:
        """Apply (or hand on) one message's trace writes; nobody has to await the result."""

    def record(self, message_id: str, stage: StageRecord, *, status: Status | None = None) -> Awaitable[None]:
        now = time.time()
        trace = Trace.of_stage(message_id, stage, now)
        if status is not None:
            trace.status = (status.value, now, sql.error_of(stage))
        return self.write_trace(trace)

    def queue_deliveries(
        self, message_id: str, stage: StageRecord, destinations: Sequence[str], *, sent: bool = False
    ) -> Awaitable[None]:
        """Record the transform and one delivery row per destination: QUEUED, or SENT when ``sent``
        (every destination already took the message on its first attempt)."""
        return self.write_trace(
            sql.delivery_trace(message_id, stage, destinations, sent=sent, now=time.time())
        )

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
        now = time.time()
        trace = Trace.of_stage(message_id, stage, now)
        trace.deliveries[destination] = (status.value, attempts, now, error, False)
        if message_status is not None:
            trace.status = (message_status.value, now, error)
        return self.write_trace(trace)

    def release_dedupe(self, message_id: str) -> Awaitable[None]:
        """The sender was told AE/AR: let a resend of the same MSH-10 be processed afresh."""
        trace = Trace(message_id)
        trace.release = True
        return self.write_trace(trace)


class WorkReads(ABC):
    """The work queue (``WorkQueue``) read through ``read``."""

    dialect: ClassVar[Dialect]

    @abstractmethod
    async def read(self, ops: Callable[[], Ops[T]]) -> T:
        """Run a read operation on a reader connection."""

    async def work_item(self, message_id: str) -> WorkItem | None:
        """The pending work of one message (None when nothing is left to do)."""
        return await self.read(lambda: sql.work_item(self.dialect, message_id))

    async def pending(
        self,
        channel: str,
        after_seq: int,
        limit: int,
        *,
        recovering: bool,
        shard: tuple[int, int] | None = None,
    ) -> list[WorkItem]:
        return await self.read(
            lambda: sql.pending(self.dialect, channel, after_seq, limit, recovering=recovering, shard=shard)
        )


class SqlMessageStore(TraceWrites, WorkReads, ABC):
    """Journal + message store over ``sql``. Implements ``gateway.core.protocols.MessageStore``."""

    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def ping(self) -> None: ...

    @abstractmethod
    async def flush(self) -> None:
        """Wait until every write queued so far is committed."""

    @abstractmethod
    async def write(self, ops: Callable[[], Ops[T]]) -> T:
        """Run a write operation in the writer's next commit; its result once committed."""

    @abstractmethod
    def append_then(self, envelopes: Sequence[Envelope], then: Then, *, ack: Ack = None) -> None:
        """Journal the envelopes in the writer's next commit, then call ``then`` with the results
        right after it (dedupe: ``sql.insert``); ``ack`` (payload, code) is traced in the same write."""

    def _journal_stats(self) -> dict[str, Any]:
        return {}

    def _settled(self, message_id: str) -> None:
        """Raise StoreError while this message's trace still waits to be written."""

    async def append(
        self, envelopes: Sequence[Envelope], *, ack: tuple[bytes, str] | None = None
    ) -> list[AppendResult]:
        """Commit the envelopes; ``ack`` (payload, code), known in advance, is traced in the same write."""
        fut: asyncio.Future[list[AppendResult]] = asyncio.get_running_loop().create_future()

        def done(result: list[AppendResult] | BaseException) -> None:
            if fut.done():
                return
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)

        self.append_then(envelopes, done, ack=ack)
        return await fut

    # -- reads -----------------------------------------------------------------

    async def get_message(self, message_id: str, *, with_payloads: bool) -> dict[str, Any] | None:
        return await self.read(lambda: sql.get_message(self.dialect, message_id, with_payloads=with_payloads))

    async def list_messages(
        self,
        *,
        status: str | None,
        control_id: str | None,
        channel: str | None,
        limit: int,
        before_seq: int | None,
        since: float | None = None,
        until: float | None = None,
    ) -> list[dict[str, Any]]:
        """Newest first; ``since`` / ``until`` bound ``received_at`` (epoch seconds, inclusive)."""
        filters = message_filters(
            status=status,
            control_id=control_id,
            channel=channel,
            before_seq=before_seq,
            since=since,
            until=until,
        )
        return await self.read(lambda: sql.list_messages(filters, limit))

    async def dead_letters(self, channel: str | None, limit: int) -> list[dict[str, Any]]:
        return await self.read(lambda: sql.dead_letters(channel, limit))

    async def stats(self) -> dict[str, Any]:
        result = await self.read(lambda: sql.stats(self.dialect))
        result["journal"] = self._journal_stats()
        return result

    # -- operator actions --------------------------------------------------------

    async def reset_for_replay(self, message_id: str) -> WorkItem | None:
        self._settled(message_id)
        return await self.write(lambda: sql.reset_for_replay(self.dialect, message_id))

    async def discard(self, message_id: str) -> bool:
        self._settled(message_id)
        return await self.write(lambda: sql.discard(message_id))

    async def prune(self, *, payload_before: float, message_before: float) -> tuple[int, int]:
        """Retention: drop payloads, then whole messages, of terminal messages older than the limits."""
        return await self.write(
            lambda: sql.prune(self.dialect, payload_before=payload_before, message_before=message_before)
        )
