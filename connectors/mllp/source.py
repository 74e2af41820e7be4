"""MLLP source: an asyncio server that hands each frame to the engine's Intake and writes back its ACK.

Per connection, frames are answered strictly in arrival order. Reading pauses when
a sender pipelines too far ahead. A frame that can be framed is always answered;
an oversize frame is answered AR (from its readable header), the rest of it is read
and dropped up to its end block (so that a sender still writing it reads the AR
instead of a reset), and the connection is then closed, while the server keeps
serving the others.

Memory and connection slots are bounded whatever senders do:
- bytes of frames still arriving count toward ``max_partial_bytes`` (all connections
  together); past it the connection holding the most is refused (AE, "send again"),
  so what is held stays within the budget plus one read;
- a frame must arrive whole within ``frame_timeout_s`` of its first byte, else it is
  answered AR (when its header can be read) and the connection is closed;
- a connection that has completed no frame is closed after ``first_frame_timeout_s``;
  bytes outside frames do not count as activity;
- when ``max_connections`` are open, a new connection takes the place of the one
  that has gone longest without completing a frame (one that never completed any
  first; its unfinished frame is answered AE when its header can be read): slow or
  silent connections cannot lock normal senders out.

Who may connect is checked before a byte is read: TLS (mTLS with ``require_client_cert``),
``allow.networks`` (IP ranges), ``allow.subjects`` (certificate subjects), a per-address
connection limit, and ``senders`` (certificate subject → the channels that sender may feed).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, cast

from connectors.mllp.framing import FrameDecoder, Oversize, frame
from gateway.core.errors import AckCode, ConfigError, FrameError, FrameTooLarge, MessageError
from gateway.core.latency import Histogram
from gateway.core.logging import get_logger
from gateway.core.protocols import Intake, Peer
from gateway.core.tls import peer_subject, server_context

log = get_logger("passerelle.mllp")

_MAX_QUEUED_FRAMES = 64
_LINGER_S = 5.0  # after a refusal: how long the peer's leftover bytes are still read before closing
_TURN_BYTES = 64 * 1024  # a read this large: the sender streams, and waits a loop turn before the next read
_QUIET_S = 30.0  # with frame_timeout_s 0: how quiet a connection with completed frames must be to be evicted


class FrameIncomplete(FrameError):
    """A frame whose end block did not arrive within ``frame_timeout_s`` (AR, ERR-3 100); the
    connection is then closed."""


class FrameDeferred(FrameError):
    """An incomplete frame refused for the gateway's own limits (too many bytes of incomplete frames
    held, or its connection's slot given to another sender): not the frame's fault, so AE (ERR-3
    207) and the sender may send it again."""

    ack_code = AckCode.AE
    hl7_error_code = "207"


def readable_header(prefix: bytes) -> bool:
    """Whether anything of an MSH segment can be read from the beginning of a frame."""
    head = prefix.lstrip(b"\xef\xbb\xbf\r\n\t ")
    return head.startswith(b"MSH") and len(head) >= 4  # MSH and its field separator


class MllpSource:
    """Implements ``gateway.core.protocols.Source``."""

    CONFIG_SCHEMA: Mapping[str, Any] = {
        "type": "object",
        "properties": {
            "host": {"type": "string"},
            "port": {"type": "integer", "minimum": 0, "maximum": 65535},
            "max_frame_bytes": {"type": "integer", "minimum": 1024},
            "max_buffered_bytes": {"type": "integer", "minimum": 1024},
            "max_partial_bytes": {
                "type": "integer",
                "minimum": 1024,
                "description": "Bytes of frames still arriving, all connections together; past it the "
                "connection holding the most is refused (AE). Default: max(32 MiB, 2 x max_frame_bytes).",
            },
            "idle_timeout_s": {"type": "number", "minimum": 0},
            "frame_timeout_s": {
                "type": "number",
                "minimum": 0,
                "description": "A frame must arrive whole within this many seconds of its first byte, "
                "else AR (when its header can be read) and close; 0: no deadline.",
            },
            "first_frame_timeout_s": {
                "type": "number",
                "minimum": 0,
                "description": "A connection that has completed no frame is closed after this many "
                "seconds (bytes outside frames do not count); 0: only idle_timeout_s applies.",
            },
            "max_connections": {"type": "integer", "minimum": 1},
            "default_charset": {"type": "string"},
            "max_connections_per_address": {"type": "integer", "minimum": 1},
            "tls": {
                "type": "object",
                "additionalProperties": False,
                "required": ["cert", "key"],
                "properties": {
                    "cert": {"type": "string"},
                    "key": {"type": "string"},
                    "ca": {"type": "string"},
                    "require_client_cert": {"type": "boolean"},
                },
            },
            "allow": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "networks": {"type": "array", "items": {"type": "string"}},
                    "subjects": {"type": "array", "items": {"type": "string"}},
                },
            },
            "senders": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["subject", "channels"],
                    "properties": {
                        "subject": {"type": "string"},
                        "name": {"type": "string"},
                        "channels": {"type": "array", "items": {"type": "string"}},
                    },
                },
            },
        },
    }

    def __init__(self, name: str, settings: Mapping[str, Any], intake: Intake) -> None:
        self.name = name
        self.host: str = settings.get("host", "127.0.0.1")
        self.port: int = int(settings.get("port", 2575))
        self.max_frame_bytes = int(settings.get("max_frame_bytes", 16 * 1024 * 1024))
        # Frames read but not yet answered, all connections together: past this, reading pauses
        # (TCP backpressure reaches the senders) until answers free half of it.
        self.max_buffered_bytes = int(settings.get("max_buffered_bytes", 256 * 1024 * 1024))
        self.buffered_bytes = 0
        self.over_budget: set[_Connection] = set()
        # Frames still arriving (no end block yet), all connections together: past this, the connection
        # holding the most is refused, so memory stays bounded whatever the number of connections.
        self.max_partial_bytes = int(
            settings.get("max_partial_bytes", max(32 * 1024 * 1024, 2 * self.max_frame_bytes))
        )
        if self.max_partial_bytes < self.max_frame_bytes:
            raise ConfigError(
                f"must be at least max_frame_bytes ({self.max_frame_bytes}): a frame the size limit "
                "allows could never be read",
                key=f"sources.{name}.max_partial_bytes",
            )
        self.partial_bytes = 0
        self.partial_peak = 0  # the most ever held for incomplete frames (before a refusal freed some)
        self.idle_timeout_s = float(settings.get("idle_timeout_s", 600))
        self.frame_timeout_s = float(settings.get("frame_timeout_s", 30))
        self.first_frame_timeout_s = float(settings.get("first_frame_timeout_s", 60))
        self.max_connections = int(settings.get("max_connections", 256))
        self.max_per_address = int(settings.get("max_connections_per_address", 64))
        self.ssl = server_context(settings["tls"], where=f"sources.{name}.tls") if "tls" in settings else None
        allow = settings.get("allow", {})
        try:
            self.networks = tuple(ipaddress.ip_network(n, strict=False) for n in allow.get("networks", ()))
        except ValueError as exc:
            raise ConfigError(str(exc), key=f"sources.{name}.allow.networks") from exc
        self.subjects = tuple(parse_subject(s) for s in allow.get("subjects", ()))
        self.senders = tuple(
            (parse_subject(s["subject"]), frozenset(s["channels"])) for s in settings.get("senders", ())
        )
        if (self.subjects or self.senders) and self.ssl is None:
            raise ConfigError("certificate subjects need tls", key=f"sources.{name}.allow")
        self.intake = intake
        self.connections: set[_Connection] = set()
        self.refused_connections = 0
        self.evicted_connections = 0  # closed to admit another sender at max_connections
        self.timed_out_frames = 0  # frames given up at frame_timeout_s
        self.deferred_frames = 0  # incomplete frames refused at max_partial_bytes
        self.ack_latency = Histogram()  # frame read → answer written, seconds
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def bound_port(self) -> int:
        """The port actually bound (useful with port 0)."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), self.host, self.port, reuse_address=True, backlog=512, ssl=self.ssl
        )
        timeouts = [
            t for t in (self.idle_timeout_s, self.frame_timeout_s, self.first_frame_timeout_s) if t > 0
        ]
        if timeouts:
            self._sweeper = asyncio.create_task(self._sweep(min(timeouts)), name=f"mllp-idle-{self.name}")
        log.info(
            "mllp_listening", source=self.name, host=self.host, port=self.bound_port, tls=self.ssl is not None
        )

    def admit(self, address: str, subject: str | None) -> tuple[str | None, frozenset[str] | None]:
        """Why a new connection is refused (or None), and the channels its sender may feed."""
        if self.networks:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                return "address", None
            if not any(ip in net for net in self.networks):
                return "address", None
        if sum(1 for c in self.connections if c.address == address and not c.leaving) >= self.max_per_address:
            return "max_connections_per_address", None
        rdns = parse_subject(subject) if subject else frozenset()
        if self.subjects and not any(want <= rdns for want in self.subjects):
            return "subject", None
        if self.senders:
            for want, channels in self.senders:
                if want <= rdns:
                    return None, channels
            return "sender", None
        return None, None

    async def _sweep(self, shortest: float) -> None:
        # One periodic sweep instead of a timer per message keeps the hot path lean.
        period = min(1.0, shortest / 2)
        while True:
            await asyncio.sleep(period)
            self.sweep(time.monotonic())

    def sweep(self, now: float) -> None:
        """Close what has outstayed its deadlines: a frame not complete within ``frame_timeout_s``, a
        connection idle for ``idle_timeout_s`` or without a complete frame for ``first_frame_timeout_s``."""
        for conn in list(self.connections):
            if conn.closed:
                continue
            started = conn.frame_started_at
            if self.frame_timeout_s > 0 and started is not None and now - started > self.frame_timeout_s:
                if not conn.paused:  # while reading is paused, the gateway is the one holding the frame back
                    self.timed_out_frames += 1
                    log.warning(
                        "mllp_frame_timeout",
                        source=self.name,
                        peer=conn.peer.address,
                        timeout_s=self.frame_timeout_s,
                    )
                    conn.give_up(FrameIncomplete(f"frame not complete within {self.frame_timeout_s:g} s"))
                continue
            if not conn.idle or conn.leaving:
                continue
            if self.idle_timeout_s > 0 and conn.last_activity < now - self.idle_timeout_s:
                log.info("mllp_idle_close", source=self.name, peer=conn.peer.address)
                conn.close()
            elif (
                self.first_frame_timeout_s > 0
                and conn.frames == 0
                and conn.connected_at < now - self.first_frame_timeout_s
            ):
                log.info("mllp_first_frame_timeout", source=self.name, peer=conn.peer.address)
                conn.close()

    def live_connections(self) -> int:
        """Connections still read from (those answering their last frames before closing are not counted)."""
        return sum(1 for c in self.connections if not c.leaving)

    def eviction_candidate(self, now: float) -> _Connection | None:
        """At max_connections, whose place a new connection takes: the connection that has gone longest
        without completing a frame, counted from when it connected (one that never completed a frame),
        else from its last answer (one quiet for ``frame_timeout_s`` at least, with no frame begun);
        never one with frames unanswered. Oldest first, rather than slowest, so that a newcomer whose
        frame has not been read yet is not the first to go: a normal sender completes its frame long
        before slow connections opened after it have pushed it to the front."""
        quiet = self.frame_timeout_s or _QUIET_S
        best: _Connection | None = None
        best_key = (2, now)
        for conn in self.connections:
            if conn.leaving or conn.closed or conn.slots:
                continue
            if conn.frames == 0:
                key = (0, conn.connected_at)
            elif conn.frame_started_at is None and conn.last_activity <= now - quiet:
                key = (1, conn.last_activity)
            else:
                continue
            if key < best_key:
                best, best_key = conn, key
        return best

    def hold_partial(self, delta: int) -> None:
        """Account bytes of incomplete frames; past the budget, refuse the largest holders."""
        self.partial_bytes += delta
        if delta <= 0:
            return
        self.partial_peak = max(self.partial_peak, self.partial_bytes)
        while self.partial_bytes > self.max_partial_bytes:
            victim = max(self.connections, key=lambda c: c.decoder.buffered, default=None)
            if victim is None or victim.decoder.buffered == 0:
                return
            self.deferred_frames += 1
            log.warning(
                "mllp_partial_budget",
                source=self.name,
                peer=victim.peer.address,
                held=victim.decoder.buffered,
                budget=self.max_partial_bytes,
            )
            victim.refuse_partial(
                FrameDeferred("the gateway holds too many incomplete frames; send this message again")
            )

    async def stop(self, drain_timeout: float = 10.0) -> None:
        """Stop accepting, answer every frame already received, then close."""
        if self._server is None:
            return
        self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        waits = []
        for conn in list(self.connections):
            conn.drain()
            waits.append(conn.done)
        if waits:
            _, late = await asyncio.wait(waits, timeout=drain_timeout)
            if late:
                log.warning("mllp_drain_timeout", source=self.name, connections=len(late))
                for conn in list(self.connections):
                    if conn.transport is not None:
                        conn.transport.abort()
        await self._server.wait_closed()
        self._server = None
        log.info("mllp_stopped", source=self.name)


def parse_subject(text: str) -> frozenset[tuple[str, str]]:
    """Subject text → its attribute set: "CN=lab,O=Hopital" → {("CN", "lab"), ("O", "Hopital")}.

    A configured subject matches a certificate whose subject holds all of its attributes.
    """
    out = set()
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if sep:
            out.add((key.strip().upper(), value.strip()))
    return frozenset(out)


class _Connection(asyncio.Protocol):
    """One sender. Each frame takes a slot; answers leave strictly in slot order.

    After a refusal (``close_after_answers``) no new frame is read: the refused frame's rest is
    dropped up to its end block when ``until_frame_end``, then the connection closes once every slot
    is answered, shutting its write side first and reading the peer's leftovers when ``linger``.
    """

    def __init__(self, source: MllpSource) -> None:
        self.source = source
        self.decoder = FrameDecoder(source.max_frame_bytes)
        self.slots: deque[list[Any]] = deque()  # [answer or None, time the frame was read, size]
        self.buffered_bytes = 0  # of the frames in slots
        self.transport: asyncio.Transport | None = None
        self.peer = Peer("?", source.name)
        self.address = "?"
        self.draining = False
        self.closed = False
        self.paused = False
        self.close_after_answers = False
        self.until_frame_end = False
        self.linger = False
        self.lingering = False
        self.waiting_turn = False
        self._linger_timer: asyncio.TimerHandle | None = None
        self.frames = 0  # complete frames read
        self.frame_started_at: float | None = None  # first byte of the frame being read
        self.connected_at = self.last_activity = time.monotonic()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def idle(self) -> bool:
        """Nothing unanswered and no frame being read."""
        return not self.slots and self.frame_started_at is None

    @property
    def leaving(self) -> bool:
        """No new frame will be read from this connection."""
        return self.close_after_answers or self.draining

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        addr = self.transport.get_extra_info("peername")
        self.address = str(addr[0]) if addr else "?"
        subject = peer_subject(self.transport.get_extra_info("ssl_object"))
        source = self.source
        refused, channels = source.admit(self.address, subject)
        self.peer = Peer(
            f"{addr[0]}:{addr[1]}" if addr else "?", source.name, tls_subject=subject, channels=channels
        )
        if refused is None and source.live_connections() >= source.max_connections:
            victim = source.eviction_candidate(time.monotonic())
            if victim is None:
                refused = "max_connections"
            else:
                source.evicted_connections += 1
                log.warning(
                    "mllp_connection_evicted",
                    source=source.name,
                    peer=victim.peer.address,
                    frames=victim.frames,
                    reason="max_connections",
                )
                victim.give_up(
                    FrameDeferred("connection closed to serve other senders; send this message again")
                )
        if refused is not None:
            # Nothing has been received yet, so nothing is left unanswered.
            source.refused_connections += 1
            log.warning("mllp_connection_refused", source=source.name, peer=self.peer.address, reason=refused)
            self.transport.abort()
            self.closed = True
            self.done.set_result(None)
            return
        source.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if len(data) >= _TURN_BYTES:
            self._take_turns()
        if self.closed or (self.close_after_answers and not self.until_frame_end):
            return  # refused: nothing more is read from this sender (lingering: its leftovers are dropped)
        source = self.source
        decoder = self.decoder
        held = decoder.buffered
        items = decoder.feed(data)
        if self.until_frame_end:
            source.partial_bytes += decoder.buffered - held
            if not decoder.discarding:
                self._refused_frame_over()
            return
        now = time.monotonic()
        intake = source.intake
        completed = False
        for item in items:
            if isinstance(item, Oversize):
                log.warning(
                    "mllp_oversize_frame", source=source.name, peer=self.peer.address, limit=item.limit
                )
                self._refuse(item.prefix, FrameTooLarge(f"frame larger than {item.limit} bytes"), linger=True)
                break
            completed = True
            self.frames += 1
            slot: list[Any] = [None, now, len(item)]
            self.slots.append(slot)
            self.buffered_bytes += len(item)
            source.buffered_bytes += len(item)
            intake.submit(item, self.peer, self._reply_into(slot))
        if completed:
            self.last_activity = now
            self.frame_started_at = None
        if self.close_after_answers:
            source.partial_bytes += decoder.buffered - held
            if not decoder.discarding:
                self._refused_frame_over()  # the oversize frame ended within this read
            elif self.frame_started_at is None:
                self.frame_started_at = now  # dropping its rest is bounded by the frame deadline too
            return
        if decoder.in_frame and self.frame_started_at is None:
            self.frame_started_at = now
        source.hold_partial(decoder.buffered - held)  # may refuse this very connection
        if self.paused or self.closed or self.close_after_answers:
            return
        if source.buffered_bytes >= source.max_buffered_bytes:
            source.over_budget.add(self)
        elif len(self.slots) < _MAX_QUEUED_FRAMES and self.buffered_bytes < 2 * source.max_frame_bytes:
            return
        assert self.transport is not None
        self.transport.pause_reading()
        self.paused = True

    def _take_turns(self) -> None:
        """One large read per loop turn for a sender that streams: uvloop (libuv) reads up to 32
        chunks from a socket before running anything else, so hundreds of senders streaming at
        once would make one turn last seconds, holding back every answer and journal commit."""
        if self.waiting_turn or self.paused or self.closed or self.draining or self.transport is None:
            return
        self.waiting_turn = True
        self.transport.pause_reading()
        asyncio.get_running_loop().call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self.waiting_turn = False
        if not (self.paused or self.closed or self.draining or self.transport is None):
            self.transport.resume_reading()

    def _refuse(self, prefix: bytes, error: MessageError, *, linger: bool) -> None:
        """Answer the frame being read with a refusal built from its beginning (journaled first by the
        intake), in its turn; no new frame is read from this connection, which closes once answered."""
        source = self.source
        slot: list[Any] = [None, time.monotonic(), len(prefix)]
        self.slots.append(slot)
        self.buffered_bytes += len(prefix)
        source.buffered_bytes += len(prefix)
        self.close_after_answers = True
        self.linger = linger
        # Its rest is read and dropped, so that a sender still writing it gets to read the answer.
        self.until_frame_end = self.decoder.discarding
        source.intake.reject(prefix, error, self.peer, self._reply_into(slot))

    def refuse_partial(self, error: MessageError) -> None:
        """Refuse the frame being read now, before its end block (over the budget for incomplete frames)."""
        held = self.decoder.buffered
        prefix = self.decoder.abandon()
        self.source.partial_bytes -= held
        self._refuse(prefix, error, linger=True)
        if self.paused and self not in self.source.over_budget:
            self.resume()  # dropping the rest of the frame holds nothing

    def give_up(self, error: MessageError) -> None:
        """Stop reading this sender (frame deadline passed, or evicted): what it already sent is answered,
        plus ``error`` for a frame it left unfinished whose header can be read; then the connection closes."""
        decoder = self.decoder
        held = decoder.buffered
        prefix = b"" if self.close_after_answers else decoder.abandon()
        decoder.reset()
        self.source.partial_bytes -= held
        self.frame_started_at = None
        self.until_frame_end = self.linger = False
        if self.transport is not None and not self.closed and not self.paused:
            self.transport.pause_reading()
            self.paused = True
        if readable_header(prefix):
            self._refuse(prefix, error, linger=False)
            self.until_frame_end = False
        else:
            self.close_after_answers = True
            if not self.slots:
                self.close()

    def _refused_frame_over(self) -> None:
        """The refused frame's end block arrived: read nothing more, and close once answered."""
        held = self.decoder.buffered
        self.decoder.reset()
        self.source.partial_bytes -= held
        self.until_frame_end = False
        self.frame_started_at = None
        if not self.slots:
            self._finish()

    def _finish(self) -> None:
        """Close after a refusal: shut the write side, then drop what the peer still sends until it closes
        (or for a few seconds), so that the answer is read instead of a reset."""
        transport = self.transport
        if transport is None or self.closed:
            return
        if not self.linger or self.lingering or not transport.can_write_eof():
            self.close()
            return
        self.lingering = True
        transport.write_eof()
        if self.paused:
            transport.resume_reading()
            self.paused = False
        self._linger_timer = asyncio.get_running_loop().call_later(_LINGER_S, self.close)

    def _reply_into(self, slot: list[Any]) -> Callable[[bytes], None]:
        def reply(ack: bytes) -> None:
            self._fill(slot, ack)

        return reply

    def _fill(self, slot: list[Any], ack: bytes) -> None:
        slot[0] = ack
        transport = self.transport
        now = time.monotonic()
        source = self.source
        while self.slots and self.slots[0][0] is not None:
            answer, read_at, size = self.slots.popleft()
            self.buffered_bytes -= size
            source.buffered_bytes -= size
            if answer and transport is not None and not self.closed:
                transport.write(frame(answer))
                source.ack_latency.observe(now - read_at)
        self.last_activity = now
        if self.paused and self not in source.over_budget:
            self.resume()
        if source.over_budget and source.buffered_bytes < source.max_buffered_bytes // 2:
            waiting, source.over_budget = source.over_budget, set()
            for conn in waiting:
                conn.resume()  # one still holding too much of its own waits for its own answers
        if not self.slots:
            if self.draining:
                self.close()
            elif self.close_after_answers and not self.until_frame_end:
                self._finish()

    def resume(self) -> None:
        """Read again once this connection's own backlog is down to half its limits."""
        if not self.paused or self.closed or self.draining or self.transport is None:
            return
        if self.close_after_answers and not self.until_frame_end:
            return  # refused and nothing more to drop: it closes once answered
        if len(self.slots) < _MAX_QUEUED_FRAMES // 2 and self.buffered_bytes < self.source.max_frame_bytes:
            self.transport.resume_reading()
            self.paused = False
            if self.frame_started_at is not None:  # the pause was the gateway's doing, not the sender's
                self.frame_started_at = time.monotonic()

    def eof_received(self) -> bool:
        if self.lingering:
            self.close()
            return False
        self.draining = True
        if not self.slots:
            self.close()
        return True  # keep the write side open until every frame is answered

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        source = self.source
        source.connections.discard(self)
        source.over_budget.discard(self)
        source.partial_bytes -= self.decoder.buffered
        self.decoder.reset()
        self.frame_started_at = None
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        if not self.done.done():
            self.done.set_result(None)

    def drain(self) -> None:
        """Stop reading; close once every frame already read has been answered."""
        self.draining = True
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()
        if not self.slots:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
