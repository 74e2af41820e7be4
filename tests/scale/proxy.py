"""A TCP proxy for connection-loss tests: a running gateway talks to a live service through it.

``cut()`` resets every open connection and stops listening, so new ones are refused, as when the
service is down or unreachable; ``restore()`` listens again on the same port. (Accepting and then
resetting would also do, but nats-py leaks a socket for every such failed reconnection.)
"""

from __future__ import annotations

import asyncio
import contextlib


class Proxy:
    """Forwards 127.0.0.1:<port> to a target; ``cut()`` drops every connection until ``restore()``."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.up = True
        self.server: asyncio.Server | None = None
        self._port = 0
        self._listening: asyncio.Task[None] | None = None
        self.pairs: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        await self._listen()
        return self.port

    async def _listen(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", self._port)
        self._port = int(self.server.sockets[0].getsockname()[1])

    @property
    def port(self) -> int:
        assert self._port, "the proxy is not started"
        return self._port

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.pairs |= {writer, up_writer}
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.transport.abort()
        self.pairs.discard(dst)

    def cut(self) -> None:
        self.up = False
        if self.server is not None:
            self.server.close()  # the port is closed: connecting is refused
            self.server = None
        for writer in list(self.pairs):
            writer.transport.abort()  # a reset, not a polite close
        self.pairs.clear()

    def restore(self) -> None:
        """Listen again (in a moment: a connection tried before that is refused, as during the cut)."""
        self.up = True
        if self.server is None and (self._listening is None or self._listening.done()):
            self._listening = asyncio.get_running_loop().create_task(self._listen())

    async def close(self) -> None:
        if self._listening is not None:
            await self._listening
        server = self.server
        self.cut()
        if server is not None:
            await server.wait_closed()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
