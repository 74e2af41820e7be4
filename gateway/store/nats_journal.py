"""The journal on NATS JetStream, shared by several gateway nodes; message state in PostgreSQL.

Streams (``P`` is the configured prefix, one set per installation):

- ``P_IN``, subjects ``P.in.<channel>.<partition>``, work-queue retention: every envelope a node
  receives. Published with ``Nats-Msg-Id`` = a digest of channel + sender + MSH-10 + content, so a
  resend inside the duplicate window is dropped by JetStream itself; the PostgreSQL unique key
  catches those that come later. Another message under an MSH-10 the store already holds is not
  published: it is kept in PostgreSQL as ERROR and its sender answered AE (a conflict). The
  sender's ACK leaves only after the PubAck (the envelope is stored).
- ``P_DLQ``: a reference (ids and codes, no payload) to every message given up, and JetStream's
  own MAX_DELIVERIES advisories for the consumers of ``P_IN``.

Ordering. The partition is ``shard_of(patient key, partitions)``; each (channel, partition) has
one durable pull consumer that every node pulls from, with ``max_ack_pending=1``: JetStream hands
out the next message of a partition only once the previous one is acknowledged (or terminated),
whichever node holds it. So one patient's messages are processed one at a time, in order, across
all nodes, and partitions spread over the nodes by themselves, without leases of our own. A NAK
with delay (the backoff of a failed delivery) keeps the message pending, so the partition waits,
as a lane does in the embedded engine. When a node dies, its message in hand is redelivered to
another node after ``ack_wait`` (5 s by default). A live node keeps its message however long the
work takes: it tells JetStream ``in_progress`` several times per ``ack_wait``, so only a node that
stopped beating (dead, or cut from NATS) loses it; the store then says what is left to do.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from gateway.core.envelope import Envelope
from gateway.core.errors import StoreError
from gateway.core.logging import get_logger
from gateway.core.protocols import AppendResult, shard_of
from gateway.core.status import Status
from gateway.store.messages.core import Ack, SqlMessageStore, Then
from gateway.store.messages.postgres import PostgresStore
from gateway.store.messages.sql import POSTGRES, Kind, Ops, Trace, envelope_of
from gateway.store.messages.views import content_digest, same_content

log = get_logger("passerelle.journal")
T = TypeVar("T")

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")
BEATS_PER_ACK_WAIT = 5
NATS_ERRORS = (nats.errors.Error, OSError, TimeoutError)


def token_of(name: str) -> str:
    """A subject/consumer-safe token for a channel name (stable, so every node computes the same)."""
    if _TOKEN.fullmatch(name):
        return name
    return "c" + hashlib.blake2b(name.encode(), digest_size=8).hexdigest()


def msg_id_of(env: Envelope) -> str | None:
    """The Nats-Msg-Id: the dedupe key *and* the content, so that JetStream drops a resend of the
    same bytes but never another message that reuses an MSH-10 (the store answers that one)."""
    if not (env.control_id and env.dedupe):
        return None
    return hashlib.blake2b(
        f"{env.dedupe_key}\x1f{content_digest(env.raw)}".encode(), digest_size=16
    ).hexdigest()


def encode(env: Envelope, ack: tuple[bytes, str] | None) -> bytes:
    return orjson.dumps(
        {
            "id": env.id,
            "channel": env.channel,
            "source": env.source,
            "raw": base64.b64encode(env.raw).decode(),
            "content_type": env.content_type,
            "sender": env.sender,
            "control_id": env.control_id,
            "message_type": env.message_type,
            "partition_key": env.partition_key,
            "received_at": env.received_at,
            "trace_id": env.trace_id,
            "charset": env.charset,
            "peer": env.peer,
            "dedupe": env.dedupe,
            "ack": base64.b64encode(ack[0]).decode() if ack else None,
            "ack_code": ack[1] if ack else None,
        }
    )


def decode(data: bytes) -> tuple[Envelope, tuple[bytes, str] | None]:
    d = orjson.loads(data)
    env = envelope_of({**d, "raw": base64.b64decode(d["raw"])}, Status.RECEIVED, dedupe=d["dedupe"])
    ack = (base64.b64decode(d["ack"]), str(d["ack_code"])) if d.get("ack") is not None else None
    return env, ack


class NatsJournal:
    """The JetStream side: connection, streams, per-partition consumers, publishing."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "PASSERELLE",
        partitions: int = 32,
        dedupe_window_s: float = 120.0,
        ack_wait_s: float = 5.0,
        publish_timeout_s: float = 5.0,
    ) -> None:
        if not _TOKEN.fullmatch(prefix):
            raise StoreError(f"invalid stream prefix {prefix!r}: letters, digits, _ and - only")
        self.url = url
        self.prefix = prefix
        self.partitions = partitions
        self.dedupe_window_s = dedupe_window_s
        self.ack_wait_s = ack_wait_s
        self._held_for = ack_wait_s  # the shortest ack_wait among the consumers in use
        self.publish_timeout_s = publish_timeout_s
        self.in_stream = f"{prefix}_IN"
        self.dlq_stream = f"{prefix}_DLQ"
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self.connected = False

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise StoreError("the journal is not open")
        return self._js

    async def open(self) -> None:
        failures = 0  # failed reconnections in the current outage

        async def disconnected() -> None:
            if self.connected:
                log.error("journal_connection_lost", url=self.url)
            self.connected = False

        async def reconnected() -> None:
            nonlocal failures
            log.info("journal_connection_restored", url=self.url, failed_attempts=failures)
            failures = 0
            self.connected = True

        async def error(exc: Exception) -> None:
            nonlocal failures
            failures += 1
            if failures % 60 == 1:  # one line a minute or so while NATS stays away, not one a second
                log.warning("journal_connection_error", error=type(exc).__name__, failed_attempts=failures)

        try:
            # At start-up a few tries, then a clear error; once running, reconnect for ever, a try
            # a second. Pings every 10 s notice a silent link loss (no reset) within about 40 s.
            # A publish made while reconnecting waits in the client's bounded buffer (2 MiB) for at
            # most publish_timeout_s: no PubAck, so the sender is answered AE and sends again; if
            # the buffered copy lands after all, Nats-Msg-Id (and the store's unique key) make the
            # resend a duplicate, so it is processed once.
            self._nc = await nats.connect(
                self.url,
                connect_timeout=3,
                max_reconnect_attempts=2,
                reconnect_time_wait=1.0,
                ping_interval=10,
                max_outstanding_pings=3,
                pending_size=2 * 1024 * 1024,
                allow_reconnect=True,
                disconnected_cb=disconnected,
                reconnected_cb=reconnected,
                error_cb=error,
            )
        except (nats.errors.Error, OSError, TimeoutError, ValueError) as exc:
            raise StoreError(f"cannot connect to NATS at {self.url}: {exc or type(exc).__name__}") from exc
        self._nc.options["max_reconnect_attempts"] = -1  # read at each reconnection by the client
        self._js = self._nc.jetstream(timeout=self.publish_timeout_s)
        self.connected = True
        try:
            await self._ensure_streams()
        except NATS_ERRORS as exc:
            await self.close()
            raise StoreError(f"cannot set up JetStream at {self.url} (is JetStream enabled?): {exc}") from exc

    async def _ensure_streams(self) -> None:
        await self._ensure_stream(
            StreamConfig(
                name=self.in_stream,
                subjects=[f"{self.prefix}.in.>"],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                duplicate_window=self.dedupe_window_s,
                discard=DiscardPolicy.NEW,  # full: refuse (the sender is answered AE), never drop
            )
        )
        await self._ensure_stream(
            StreamConfig(
                name=self.dlq_stream,
                subjects=[
                    f"{self.prefix}.dlq.>",
                    f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.in_stream}.>",
                ],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
            )
        )

    async def _ensure_stream(self, config: StreamConfig) -> None:
        try:
            await self.js.stream_info(str(config.name))
        except nats.js.errors.NotFoundError:
            with contextlib.suppress(nats.js.errors.BadRequestError):  # another node made it just now
                await self.js.add_stream(config)
            return
        await self.js.update_stream(config)

    async def close(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        self.connected = False
        if nc is not None and not nc.is_closed:
            # Not drain(): the consumers have stopped and acked what they held; nothing is buffered.
            await nc.close()

    async def ping(self) -> None:
        if self._nc is None or not self._nc.is_connected:
            raise StoreError(f"not connected to NATS at {self.url}")

    def subject_of(self, env: Envelope) -> str:
        part = shard_of(env.partition_key, self.partitions)
        return f"{self.prefix}.in.{token_of(env.channel)}.{part}"

    async def publish(
        self, env: Envelope, ack: tuple[bytes, str] | None, *, msg_id: str | None = None
    ) -> tuple[int, bool]:
        """Store an envelope in the inbound stream; returns (stream sequence, was a duplicate)."""
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        try:
            pub = await self.js.publish(
                self.subject_of(env), encode(env, ack), stream=self.in_stream, headers=headers
            )
        except NATS_ERRORS as exc:
            raise StoreError(f"journal publish failed: {type(exc).__name__}") from exc
        return pub.seq, bool(pub.duplicate)

    async def envelope_at(self, seq: int) -> Envelope | None:
        """The envelope still in the inbound stream at ``seq`` (None once consumed)."""
        try:
            raw = await self.js.get_msg(self.in_stream, seq)
        except (nats.errors.Error, OSError, TimeoutError):
            return None
        return decode(raw.data or b"")[0] if raw.data else None

    async def dead_letter(self, env: Envelope, destination: str, detail: str) -> None:
        """A reference to a message given up, for the operators' tools (ids and codes only)."""
        body = orjson.dumps(
            {
                "message_id": env.id,
                "channel": env.channel,
                "destination": destination,
                "control_id": env.control_id,
                "detail": detail,
                "at": time.time(),
            }
        )
        try:
            await self.js.publish(f"{self.prefix}.dlq.{token_of(env.channel)}", body, stream=self.dlq_stream)
        except NATS_ERRORS as exc:  # the message store keeps the DEAD status and its trace anyway
            log.error("dead_letter_publish_failed", message_id=env.id, error=type(exc).__name__)

    def consumer_name(self, channel: str, partition: int) -> str:
        return f"{token_of(channel)}_p{partition}"

    @property
    def beat_s(self) -> float:
        """How often a node tells JetStream it still works on a message: several beats per ack_wait,
        so that a late beat or two (a busy event loop) does not hand live work to another node."""
        return self._held_for / BEATS_PER_ACK_WAIT

    async def subscribe(self, channel: str, partition: int, *, max_deliver: int) -> Any:
        """Bind to the partition's durable consumer, creating it on first use."""
        durable = self.consumer_name(channel, partition)
        config = ConsumerConfig(
            durable_name=durable,
            filter_subject=f"{self.prefix}.in.{token_of(channel)}.{partition}",
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait_s,
            max_ack_pending=1,  # one message of a partition in flight, across all nodes
            max_deliver=max_deliver,
            max_waiting=512,
        )
        # An existing one is updated to these settings; if JetStream refuses, it is used as is, and
        # the beats follow its ack_wait when that is shorter than ours.
        try:
            info = await self.js.add_consumer(self.in_stream, config)
        except nats.js.errors.BadRequestError:
            info = await self.js.consumer_info(self.in_stream, durable)
        if info.config.ack_wait:
            self._held_for = min(self._held_for, info.config.ack_wait)
        return await self.js.pull_subscribe_bind(durable=durable, stream=self.in_stream)

    async def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """The references kept in the dead-letter stream (oldest first)."""
        out: list[dict[str, Any]] = []
        info = await self.js.stream_info(self.dlq_stream)
        first, last = info.state.first_seq, info.state.last_seq
        for seq in range(first, min(last, first + limit - 1) + 1):
            try:
                raw = await self.js.get_msg(self.dlq_stream, seq)
            except nats.js.errors.NotFoundError:
                continue
            out.append({"subject": raw.subject, **orjson.loads(raw.data or b"{}")})
        return out


class JetStreamStore(SqlMessageStore):
    """Journal appends go to JetStream; the trace, reads and operator actions are those of the
    PostgreSQL message store it holds (``pg``)."""

    dialect = POSTGRES

    def __init__(self, dsn: str, journal: NatsJournal, **kwargs: Any) -> None:
        self.pg = PostgresStore(dsn, **kwargs)
        self.journal = journal
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def is_open(self) -> bool:
        return self.pg.is_open

    async def open(self) -> None:
        await self.pg.open()
        try:
            await self.journal.open()
        except StoreError:
            await self.pg.close()
            raise

    async def close(self) -> None:
        for task in list(self._tasks):
            await asyncio.wait([task], timeout=5)
        await self.journal.close()
        await self.pg.close()

    async def ping(self) -> None:
        # PostgreSQL only: /ready checks the journal on its own, so it says which one is gone.
        await self.pg.ping()

    def write_health(self) -> dict[str, Any]:
        return self.pg.write_health()

    async def flush(self) -> None:
        await self.pg.flush()

    async def read(self, ops: Callable[[], Ops[T]]) -> T:
        return await self.pg.read(ops)

    async def write(self, ops: Callable[[], Ops[T]]) -> T:
        return await self.pg.write(ops)

    def write_trace(self, trace: Trace) -> Awaitable[None]:
        return self.pg.write_trace(trace)

    def _journal_stats(self) -> dict[str, Any]:
        return self.pg._journal_stats()

    async def admit(
        self, envelope: Envelope, ack: tuple[bytes, str] | None
    ) -> tuple[AppendResult, str | None]:
        """See ``PostgresStore.admit``: the consumer journals what it takes from the stream."""
        return await self.pg.admit(envelope, ack)

    def finish(self, message_id: str) -> Awaitable[None]:
        return self.pg.finish(message_id)

    async def shared_secret(self, name: str) -> bytes:
        return await self.pg.shared_secret(name)

    def append_then(self, envelopes: Sequence[Envelope], then: Then, *, ack: Ack = None) -> None:
        if not self.is_open:
            raise StoreError("the journal is not open")
        task = asyncio.get_running_loop().create_task(self._append(list(envelopes), ack))
        self._tasks.add(task)

        def done(t: asyncio.Task[list[AppendResult]]) -> None:
            self._tasks.discard(t)
            if t.cancelled():
                then(StoreError("the journal closed"))
            elif (exc := t.exception()) is not None:
                then(
                    exc
                    if isinstance(exc, StoreError)
                    else StoreError(f"journal failed: {type(exc).__name__}")
                )
            else:
                then(t.result())

        task.add_done_callback(done)

    async def _append(self, envelopes: list[Envelope], ack: tuple[bytes, str] | None) -> list[AppendResult]:
        """Work goes to the stream; what is not work (filtered, rejected) straight to the store."""
        results: list[AppendResult | None] = [None] * len(envelopes)
        # Another message under a key the store holds: the store keeps it as a conflict.
        reused = await self._reused_keys(envelopes)
        local = [
            i for i, e in enumerate(envelopes) if e.status is not Status.RECEIVED or e.dedupe_key in reused
        ]

        async def publish(i: int) -> None:
            env = envelopes[i]
            seq, duplicate = await self.journal.publish(env, ack, msg_id=msg_id_of(env))
            if duplicate and await self._released(env):
                # The first one's sender was answered AE/AR and its key released: the stream's
                # window still holds the id, so this resend goes in under none.
                seq, duplicate = await self.journal.publish(env, ack, msg_id=None)
            results[i] = AppendResult(env.id, duplicate, seq)
            if duplicate:
                self._spawn(self._note_duplicate(env, seq))

        async def store_locally() -> None:
            got = await self.pg.append([envelopes[i] for i in local], ack=ack)
            for i, res in zip(local, got, strict=True):
                results[i] = res

        waits: list[Awaitable[Any]] = [publish(i) for i in range(len(envelopes)) if i not in local]
        if local:
            waits.append(store_locally())
        await asyncio.gather(*waits)
        return [r for r in results if r is not None]

    async def _reused_keys(self, envelopes: Sequence[Envelope]) -> set[str]:
        """The dedupe keys among these that the store holds for *other* content. A message still
        in the stream, not yet in the store, is not seen here: the consumer's admit keeps it as a
        conflict then (its sender was answered already)."""
        keyed = {
            e.dedupe_key: content_digest(e.raw)
            for e in envelopes
            if e.control_id and e.dedupe and e.status is Status.RECEIVED
        }
        if not keyed or not self.pg.connected:
            return set()  # PostgreSQL away: the intake does not wait for it (the consumer checks)
        try:
            async with asyncio.timeout(1.0):
                rows = await self.pg.read(lambda: _held_keys(list(keyed)))
        except (StoreError, TimeoutError):
            return set()
        return {
            r["dedupe_key"]
            for r in rows
            if not same_content(r["digest"], r["old_raw"], keyed[r["dedupe_key"]])
        }

    async def _released(self, env: Envelope) -> bool:
        """Whether the store holds these bytes under this channel, sender and MSH-10 with the
        dedupe key released, and no message holds the key now."""
        try:
            held, released = await self.pg.read(lambda: _release_of(env, content_digest(env.raw)))
        except StoreError:
            return False  # PostgreSQL away: a duplicate, as the stream says
        return bool(released) and not held

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _note_duplicate(self, env: Envelope, seq: int) -> None:
        """Trace a resend caught by the duplicate window against the first message, as the store does."""
        first = await self.journal.envelope_at(seq)
        first_id = first.id if first is not None else await self._id_by_dedupe(env.dedupe_key)
        if first_id is None:
            return
        await self.admit_duplicate_note(first_id, env)

    async def _id_by_dedupe(self, key: str) -> str | None:
        try:
            value = await self.pg.read(lambda: _id_by_key(key))
        except StoreError:
            return None
        return None if value is None else str(value)

    async def admit_duplicate_note(self, first_id: str, env: Envelope) -> None:
        await self.pg.write(lambda: _duplicate_note(first_id, env))


def _held_keys(keys: list[str]) -> Ops[list[Any]]:
    rows: list[Any] = yield (
        Kind.ALL,
        "SELECT dedupe_key, digest, CASE WHEN digest IS NULL THEN raw END AS old_raw"
        " FROM messages WHERE dedupe_key = ANY(?::text[])",
        (keys,),
    )
    return rows


def _release_of(env: Envelope, digest: str) -> Ops[Any]:
    return (
        yield (
            Kind.ONE,
            "SELECT (SELECT count(*) FROM messages WHERE dedupe_key=?),"
            " (SELECT count(*) FROM messages WHERE dedupe_key IS NULL AND digest=? AND channel=?"
            " AND sender=? AND control_id=?)",
            (env.dedupe_key, digest, env.channel, env.sender, env.control_id),
        )
    )


def _id_by_key(key: str) -> Ops[Any]:
    return (yield Kind.VALUE, "SELECT id FROM messages WHERE dedupe_key=?", (key,))


def _duplicate_note(first_id: str, env: Envelope) -> Ops[None]:
    detail = orjson.dumps({"duplicate_of_envelope": env.id, "peer": env.peer}).decode()
    yield (
        Kind.EXECUTE,
        "INSERT INTO stages (message_id, stage, status, at, detail)"
        " SELECT ?, 'duplicate', COALESCE((SELECT status FROM messages WHERE id=?), ?), ?, ?::jsonb",
        (first_id, first_id, Status.RECEIVED.value, env.received_at, detail),
    )


async def in_progress_while(msg: Msg, every: float, work: Awaitable[Any]) -> Any:
    """Run ``work``, telling JetStream every ``every`` seconds that the message is still in hand."""

    async def beat() -> None:
        while True:
            await asyncio.sleep(every)
            # While reconnecting a redelivery elsewhere is possible; the store absorbs it.
            with contextlib.suppress(*NATS_ERRORS):
                await msg.in_progress()

    beater = asyncio.create_task(beat())
    try:
        return await work
    finally:
        beater.cancel()
