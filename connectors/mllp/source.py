"""MLLP source: an asyncio server that hands each frame to the engine's Intake and writes back its ACK.

Per connection, frames are answered strictly in arrival order. Reading pauses when
a sender pipelines too far ahead. A frame that can be framed is always answered;
an oversize frame is answered AR (from its readable header) and the connection is
then closed, while the server keeps serving the others.

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
from gateway.core.errors import ConfigError, FrameTooLarge
from gateway.core.latency import Histogram
from gateway.core.logging import get_logger
from gateway.core.protocols import Intake, Peer
from gateway.core.tls import peer_subject, server_context

log = get_logger("passerelle.mllp")

_MAX_QUEUED_FRAMES = 64


class MllpSource:
    """Implements ``gateway.core.protocols.Source``."""

    CONFIG_SCHEMA: Mapping[str, Any] = {
        "type": "object",
        "properties": {
            "host": {"type": "string"},
            "port": {"type": "integer", "minimum": 0, "maximum": 65535},
            "max_frame_bytes": {"type": "integer", "minimum": 1024},
            "max_buffered_bytes": {"type": "integer", "minimum": 1024},
            "idle_timeout_s": {"type": "number", "minimum": 0},
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
        self.idle_timeout_s = float(settings.get("idle_timeout_s", 600))
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
        if self.idle_timeout_s > 0:
            self._sweeper = asyncio.create_task(self._sweep_idle(), name=f"mllp-idle-{self.name}")
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
        if sum(1 for c in self.connections if c.address == address) >= self.max_per_address:
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

    async def _sweep_idle(self) -> None:
        # One periodic sweep instead of a timer per message keeps the hot path lean.
        period = min(1.0, self.idle_timeout_s / 2)
        while True:
            await asyncio.sleep(period)
            cutoff = time.monotonic() - self.idle_timeout_s
            for conn in list(self.connections):
                if conn.last_activity < cutoff and conn.idle:
                    log.info("mllp_idle_close", source=self.name, peer=conn.peer.address)
                    conn.close()

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
    """One sender. Each frame takes a slot; answers leave strictly in slot order."""

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
        self.last_activity = time.monotonic()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def idle(self) -> bool:
        return not self.slots

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        addr = self.transport.get_extra_info("peername")
        self.address = str(addr[0]) if addr else "?"
        subject = peer_subject(self.transport.get_extra_info("ssl_object"))
        refused, channels = self.source.admit(self.address, subject)
        self.peer = Peer(
            f"{addr[0]}:{addr[1]}" if addr else "?", self.source.name, tls_subject=subject, channels=channels
        )
        if refused is None and len(self.source.connections) >= self.source.max_connections:
            refused = "max_connections"
        if refused is not None:
            # Nothing has been received yet, so nothing is left unanswered.
            self.source.refused_connections += 1
            log.warning(
                "mllp_connection_refused", source=self.source.name, peer=self.peer.address, reason=refused
            )
            self.transport.abort()
            self.closed = True
            self.done.set_result(None)
            return
        self.source.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        if self.close_after_answers:
            return  # after an oversize frame nothing more is read from this sender
        intake = self.source.intake
        now = self.last_activity
        source = self.source
        for item in self.decoder.feed(data):
            size = len(item.prefix) if isinstance(item, Oversize) else len(item)
            slot: list[Any] = [None, now, size]
            self.slots.append(slot)
            self.buffered_bytes += size
            source.buffered_bytes += size
            if isinstance(item, Oversize):
                err = FrameTooLarge(f"frame larger than {item.limit} bytes")
                log.warning(
                    "mllp_oversize_frame", source=self.source.name, peer=self.peer.address, limit=item.limit
                )
                self.close_after_answers = True
                intake.reject(item.prefix, err, self.peer, self._reply_into(slot))
                break
            intake.submit(item, self.peer, self._reply_into(slot))
        if self.paused or self.closed:
            return
        if source.buffered_bytes >= source.max_buffered_bytes:
            source.over_budget.add(self)
        elif len(self.slots) < _MAX_QUEUED_FRAMES and self.buffered_bytes < 2 * source.max_frame_bytes:
            return
        assert self.transport is not None
        self.transport.pause_reading()
        self.paused = True

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
        if not self.slots and (self.draining or self.close_after_answers):
            self.close()

    def resume(self) -> None:
        """Read again once this connection's own backlog is down to half its limits."""
        if not self.paused or self.closed or self.draining or self.transport is None:
            return
        if len(self.slots) < _MAX_QUEUED_FRAMES // 2 and self.buffered_bytes < self.source.max_frame_bytes:
            self.transport.resume_reading()
            self.paused = False

    def eof_received(self) -> bool:
        self.draining = True
        if not self.slots:
            self.close()
        return True  # keep the write side open until every frame is answered

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.source.connections.discard(self)
        self.source.over_budget.discard(self)
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
