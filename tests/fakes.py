"""Far ends for tests: fakes of the same Protocols (or the same wire) as the real destinations."""

from __future__ import annotations

import asyncio
import time

from connectors.mllp.framing import FrameDecoder, frame
from gateway.hl7.er7 import Message


class Receiver:
    """A far-end HL7 system: records what arrives and answers per ``plan`` (the last entry repeats)."""

    def __init__(self, plan: list[str], *, delay_s: float = 0.0) -> None:
        self.plan = plan
        self.delay_s = delay_s  # before each answer: a slow far end
        self.received: list[bytes] = []
        # Per received frame: when (time.monotonic()) and from which port of the sender's host.
        self.arrived: list[tuple[float, int]] = []
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            await self._serve(reader, writer)
        finally:
            writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dec = FrameDecoder()
        peer = writer.get_extra_info("peername")
        port = int(peer[1]) if peer else 0
        while data := await reader.read(65536):
            for item in dec.feed(data):
                assert isinstance(item, bytes)
                self.received.append(item)
                self.arrived.append((time.monotonic(), port))
                step = self.plan.pop(0) if len(self.plan) > 1 else self.plan[0]
                cid = Message.decode(item, default_charset="UNICODE UTF-8").control_id
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                if step == "silent":
                    continue
                if step == "close":
                    return
                if step == "wrong-id":
                    cid = "SOMETHING-ELSE"
                writer.write(
                    frame(f"MSH|^~\\&|SIH|X|||20261123||ACK|A{cid}|P|2.5\rMSA|{step}|{cid}\r".encode())
                )
                await writer.drain()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])
