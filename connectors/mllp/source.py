"""MLLP source: an asyncio server that hands each frame to the engine's Intake and writes back its ACK.

Per connection, frames are answered strictly in arrival order. Reading pauses when
a sender pipelines too far ahead. A frame that can be framed is always answered;
an oversize frame is answered AR (from its readable header) and the connection is
then closed, while the server keeps serving the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, cast

from connectors.mllp.framing import FrameDecoder, Oversize, frame
from gateway.core.errors import FrameTooLarge
from gateway.core.logging import get_logger
from gateway.core.protocols import Intake, Peer

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
            "idle_timeout_s": {"type": "number", "minimum": 0},
            "max_connections": {"type": "integer", "minimum": 1},
            "default_charset": {"type": "string"},
        },
    }

    def __init__(self, name: str, settings: Mapping[str, Any], intake: Intake) -> None:
        self.name = name
        self.host: str = settings.get("host", "127.0.0.1")
        self.port: int = int(settings.get("port", 2575))
        self.max_frame_bytes = int(settings.get("max_frame_bytes", 16 * 1024 * 1024))
        self.idle_timeout_s = float(settings.get("idle_timeout_s", 600))
        self.max_connections = int(settings.get("max_connections", 256))
        self.intake = intake
        self.connections: set[_Connection] = set()
        self.refused_connections = 0
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
            lambda: _Connection(self), self.host, self.port, reuse_address=True, backlog=512
        )
        if self.idle_timeout_s > 0:
            self._sweeper = asyncio.create_task(self._sweep_idle(), name=f"mllp-idle-{self.name}")
        log.info("mllp_listening", source=self.name, host=self.host, port=self.bound_port)

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


class _Connection(asyncio.Protocol):
    """One sender. Each frame takes a slot; answers leave strictly in slot order."""

    def __init__(self, source: MllpSource) -> None:
        self.source = source
        self.decoder = FrameDecoder(source.max_frame_bytes)
        self.slots: deque[list[bytes | None]] = deque()
        self.transport: asyncio.Transport | None = None
        self.peer = Peer("?", source.name)
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
        self.peer = Peer(f"{addr[0]}:{addr[1]}" if addr else "?", self.source.name)
        if len(self.source.connections) >= self.source.max_connections:
            # Nothing has been received yet, so nothing is left unanswered.
            self.source.refused_connections += 1
            log.warning(
                "mllp_connection_refused",
                source=self.source.name,
                peer=self.peer.address,
                reason="max_connections",
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
        for item in self.decoder.feed(data):
            slot: list[bytes | None] = [None]
            self.slots.append(slot)
            if isinstance(item, Oversize):
                err = FrameTooLarge(f"frame larger than {item.limit} bytes")
                log.warning(
                    "mllp_oversize_frame", source=self.source.name, peer=self.peer.address, limit=item.limit
                )
                self.close_after_answers = True
                self._fill(slot, intake.reject(item.prefix, err, self.peer))
                break
            intake.submit(item, self.peer, self._reply_into(slot))
        if len(self.slots) >= _MAX_QUEUED_FRAMES and not self.paused and not self.closed:
            assert self.transport is not None
            self.transport.pause_reading()
            self.paused = True

    def _reply_into(self, slot: list[bytes | None]) -> Callable[[bytes], None]:
        def reply(ack: bytes) -> None:
            self._fill(slot, ack)

        return reply

    def _fill(self, slot: list[bytes | None], ack: bytes) -> None:
        slot[0] = ack
        transport = self.transport
        while self.slots and self.slots[0][0] is not None:
            answer = self.slots.popleft()[0]
            if answer and transport is not None and not self.closed:
                transport.write(frame(answer))
        self.last_activity = time.monotonic()
        if self.paused and len(self.slots) < _MAX_QUEUED_FRAMES // 2 and not self.closed:
            assert transport is not None
            transport.resume_reading()
            self.paused = False
        if not self.slots and (self.draining or self.close_after_answers):
            self.close()

    def eof_received(self) -> bool:
        self.draining = True
        if not self.slots:
            self.close()
        return True  # keep the write side open until every frame is answered

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.source.connections.discard(self)
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
