"""MLLP client: one connection, one message at a time, each answered by one frame."""

from __future__ import annotations

import asyncio
import contextlib
import ssl as _ssl

from connectors.mllp.framing import FrameDecoder, Oversize, frame
from gateway.core.errors import FrameError, FrameTooLarge


class MllpClient:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        connect_timeout: float = 10.0,
        max_frame_bytes: int = 16 * 1024 * 1024,
        ssl: _ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.max_frame_bytes = max_frame_bytes
        self.ssl = ssl
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._decoder = FrameDecoder(max_frame_bytes)
        self._ready: list[bytes] = []

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def connect(self) -> None:
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=self.ssl), self.connect_timeout
        )
        self._decoder = FrameDecoder(self.max_frame_bytes)
        self._ready = []

    async def send(self, payload: bytes, timeout: float = 30.0) -> bytes:
        """Send one message and return the answering frame.

        Raises TimeoutError, ConnectionError or FrameError.
        """
        if not self.connected:
            await self.connect()
        assert self._writer is not None
        self._writer.write(frame(payload))
        await self._writer.drain()
        return await asyncio.wait_for(self.receive(), timeout)

    async def receive(self) -> bytes:
        assert self._reader is not None
        while not self._ready:
            data = await self._reader.read(65536)
            if not data:
                await self.close()
                raise ConnectionError("connection closed by the peer before an answer")
            for item in self._decoder.feed(data):
                if isinstance(item, Oversize):
                    await self.close()
                    raise FrameTooLarge(f"answer larger than {item.limit} bytes")
                self._ready.append(item)
        return self._ready.pop(0)

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()


__all__ = ["FrameError", "MllpClient"]
