"""The small Protocols every connector and store implements.

Connectors are found by their config ``type:`` (entry-point groups
``passerelle.sources`` and ``passerelle.destinations``); tests plug in fakes
of these same Protocols.
"""

from __future__ import annotations

import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from gateway.core.envelope import HL7_V2, Envelope
from gateway.core.errors import MessageError
from gateway.core.status import Status


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end of a source connection (never patient data)."""

    address: str
    source: str
    tls_subject: str | None = None
    # The channels this sender may feed (mTLS sender identity); None: every channel of the source.
    channels: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """One attempt's result; raising RetryLater or PermanentDeliveryError is the other way to say it."""

    status: Status  # SENT or ERROR
    detail: str = ""  # a code or short reason, PHI-free
    response: bytes | None = None  # e.g. the remote ACK, kept as a stage payload
    response_type: str = HL7_V2
    retry: bool = True  # for ERROR: is another attempt worth it?


Reply = Callable[[bytes], None]


class Intake(Protocol):
    """What a source hands its frames to. The engine implements it."""

    def submit(self, raw: bytes, peer: Peer, reply: Reply) -> None:
        """Journal ``raw``; later call ``reply`` once with the ACK (b"" when none is due). Never raises."""
        ...

    async def receive(self, raw: bytes, peer: Peer) -> bytes:
        """``submit`` as a coroutine: the ACK to send back."""
        ...

    def reject(self, raw_prefix: bytes, error: MessageError, peer: Peer, reply: Reply) -> None:
        """Journal what was read of a frame that cannot be accepted; then call ``reply`` once with the
        AR/AE built from it. Never raises."""
        ...


@runtime_checkable
class Source(Protocol):
    name: str

    async def start(self) -> None: ...

    async def stop(self, drain_timeout: float) -> None: ...


@runtime_checkable
class Destination(Protocol):
    name: str

    async def send(self, envelope: Envelope, payload: bytes) -> DeliveryResult: ...

    async def aclose(self) -> None: ...


def shard_of(partition_key: str, count: int) -> int:
    """Which of ``count`` workers handles a partition: fixed for a given count, so one patient's
    messages, old and new, always reach the same worker and keep their order."""
    return zlib.crc32(partition_key.encode()) % count if count > 1 else 0


@dataclass(frozen=True, slots=True)
class AppendResult:
    """The journal's answer for one envelope: its id, and whether it was already known.

    ``conflict``: the dedupe key (channel, sender, MSH-10) was already used by a *different*
    message. It is then also ``duplicate`` (nothing to process), but ``message_id`` is the
    envelope's own row, kept with status ERROR, and the sender must be answered AE (ERR-3 205).
    """

    message_id: str
    duplicate: bool
    seq: int
    conflict: bool = False


@dataclass(slots=True)
class StageRecord:
    stage: str
    status: Status
    payload: bytes | None = None
    content_type: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One pending unit for a channel lane, as recovered from the journal."""

    seq: int
    envelope: Envelope
    status: Status
    payload: bytes | None  # transformed payload, when processing already ran
    pending_destinations: tuple[str, ...]
    attempts: Mapping[str, int]
    checked: bool = False  # the channel filter was applied at intake, just now


class Journal(Protocol):
    """Durable intake: ``append`` returns once the envelopes are committed."""

    async def append(
        self, envelopes: Sequence[Envelope], *, ack: tuple[bytes, str] | None = None
    ) -> list[AppendResult]: ...

    def append_then(
        self,
        envelopes: Sequence[Envelope],
        then: Callable[[list[AppendResult] | BaseException], None],
        *,
        ack: tuple[bytes, str] | None = None,
    ) -> None: ...


class TraceWriter(Protocol):
    """The per-stage trace and delivery state of journaled messages. Writes are not awaited by
    their callers; ``flush`` waits until all written so far is committed."""

    def record(
        self, message_id: str, stage: StageRecord, *, status: Status | None = None
    ) -> Awaitable[None]: ...

    def queue_deliveries(
        self, message_id: str, stage: StageRecord, destinations: Sequence[str], *, sent: bool = False
    ) -> Awaitable[None]: ...

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
    ) -> Awaitable[None]: ...

    def release_dedupe(self, message_id: str) -> Awaitable[None]: ...

    async def flush(self) -> None: ...


class WorkQueue(Protocol):
    """The journaled messages a channel still has work on, in journal order."""

    async def pending(
        self,
        channel: str,
        after_seq: int,
        limit: int,
        *,
        recovering: bool,
        shard: tuple[int, int] | None = None,
    ) -> list[WorkItem]: ...


class ChannelStore(TraceWriter, WorkQueue, Protocol):
    """What a channel needs of the store: a worker process has this much and no more."""


class MessageQueries(Protocol):
    """What the console and the API read."""

    async def get_message(self, message_id: str, *, with_payloads: bool) -> dict[str, Any] | None: ...

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
        ...

    async def stats(self) -> dict[str, Any]: ...

    async def dead_letters(self, channel: str | None, limit: int) -> list[dict[str, Any]]: ...


class Operator(Protocol):
    """Operator actions and retention, run by the main process only."""

    async def reset_for_replay(self, message_id: str) -> WorkItem | None: ...

    async def discard(self, message_id: str) -> bool: ...

    async def prune(self, *, payload_before: float, message_before: float) -> tuple[int, int]: ...


class MessageStore(Journal, ChannelStore, MessageQueries, Operator, Protocol):
    """The whole message store: journal, trace, work queue, queries, operator actions, retention."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None: ...
