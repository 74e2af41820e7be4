"""The link between the main process and its worker: ordered messages over a Unix socket.

Messages are plain tuples of our own types, pickled (both ends are this program).
Everything sent during one loop turn leaves as one frame: a length, then the pickle
of the list. Order is kept end to end, which per-patient ordering relies on.

The records that cross on every message (Envelope, WorkItem, StageRecord) are pickled as
their class and field tuple: the dataclasses' own slot pickling goes through Python-level
``__getstate__``/``__setstate__``, several times slower at both ends.
"""

from __future__ import annotations

import asyncio
import copyreg
import dataclasses
import io
import operator
import pickle
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

from gateway.core.envelope import Envelope
from gateway.core.protocols import StageRecord, WorkItem

_LEN = struct.Struct("!I")
Msg = tuple[Any, ...]


def _by_fields(cls: type[Any]) -> Callable[[Any], tuple[Any, ...]]:
    fields = dataclasses.fields(cls)
    assert all(f.init for f in fields), cls  # rebuilt by calling the class with every field
    get = operator.attrgetter(*(f.name for f in fields))
    return lambda obj: (cls, get(obj))


_REDUCERS: dict[type[Any], Callable[[Any], Any]] = dict(copyreg.dispatch_table)
_REDUCERS.update({c: _by_fields(c) for c in (Envelope, WorkItem, StageRecord)})


def dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = _REDUCERS
    pickler.dump(obj)
    return buf.getvalue()


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
        data = dumps(self._out)
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
