"""Helpers for the hostile-sender tests: a gateway with chosen MLLP source settings, raw senders."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connectors.mllp.source import MllpSource
from gateway import config as config_mod
from gateway.app import Gateway
from tests.conftest import make_config, mllp_port

SB, EB = b"\x0b", b"\x1c\r"


def source_config(tmp_path: Path, **source: Any) -> config_mod.Config:
    """The shared test config, with these MLLP source settings."""
    cfg = make_config(tmp_path)
    cfg.data["sources"][0].update(source)
    return cfg


def mllp_source(gw: Gateway) -> MllpSource:
    src = gw.sources["hospital"]
    assert isinstance(src, MllpSource)
    return src


def held_by_connections(src: MllpSource) -> int:
    """Bytes of incomplete frames held, counted connection by connection (the source's own sum apart)."""
    return sum(c.decoder.buffered for c in src.connections)


@dataclass
class RawSender:
    """One connection that writes what it is told and collects whatever comes back, until EOF."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    received: bytearray = field(default_factory=bytearray)
    eof: bool = False
    error: BaseException | None = None
    task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return int(self.writer.get_extra_info("sockname")[1])

    @property
    def answered(self) -> bool:
        return b"\x1c" in self.received

    def answer(self) -> bytes:
        """The first answering frame's payload."""
        start = self.received.index(SB) + 1
        return bytes(self.received[start : self.received.index(b"\x1c", start)])

    async def _collect(self) -> None:
        try:
            while data := await self.reader.read(65536):
                self.received += data
        except (ConnectionError, OSError) as exc:
            self.error = exc
        self.eof = True

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


async def raw_sender(gw: Gateway, first: bytes = b"") -> RawSender:
    reader, writer = await asyncio.open_connection("127.0.0.1", mllp_port(gw))
    sender = RawSender(reader, writer)
    sender.task = asyncio.get_running_loop().create_task(sender._collect())
    if first:
        sender.send(first)
        await writer.drain()
    return sender


def server_side(src: MllpSource, sender: RawSender) -> Any:
    """The source's connection for this sender (by its port), or None once it is gone."""
    suffix = f":{sender.port}"
    return next((c for c in src.connections if c.peer.address.endswith(suffix)), None)


async def close_all(senders: list[RawSender]) -> None:
    for s in senders:
        await s.close()


def all_of(items: list[RawSender], predicate: Callable[[RawSender], bool]) -> Callable[[], bool]:
    return lambda: all(predicate(s) for s in items)
