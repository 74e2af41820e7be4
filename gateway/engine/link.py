"""The link between the main process and its worker: ordered messages over a Unix socket.

Messages are plain tuples of our own types, pickled (both ends are this program).
Everything sent during one loop turn leaves as one frame: a length, then the pickle
of the list. Order is kept end to end, which per-patient ordering relies on.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from collections.abc import AsyncIterator
from typing import Any

_LEN = struct.Struct("!I")
Msg = tuple[Any, ...]


class Link:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._out: list[Msg] = []
        self._scheduled = False
        self.closed = False

    def send(self, msg: Msg) -> None:
        if self.closed:
            return
        self._out.append(msg)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if not self._out or self.closed or self.writer.is_closing():
            self._out.clear()
            return
        data = pickle.dumps(self._out, protocol=pickle.HIGHEST_PROTOCOL)
        self._out = []
        self.writer.write(_LEN.pack(len(data)) + data)

    async def drain(self) -> None:
        self._flush()
        if not self.writer.is_closing():
            await self.writer.drain()

    async def messages(self) -> AsyncIterator[Msg]:
        """Every message received, in order, until the other end goes away."""
        while True:
            try:
                head = await self.reader.readexactly(_LEN.size)
                body = await self.reader.readexactly(_LEN.unpack(head)[0])
            except (asyncio.IncompleteReadError, ConnectionError):
                self.closed = True
                return
            for msg in pickle.loads(body):  # noqa: S301 - written by our own other process only
                yield msg

    def close(self) -> None:
        self.closed = True
        self.writer.close()
