"""File destination: one file per message, written atomically, named so that a redelivery overwrites.

The default name is the message id, so delivering the same message twice (after a
crash between the write and the SENT record) leaves exactly one file: exactly-once
in effect. Writes are grouped once per event-loop iteration: the batch is written,
then made durable at once (``syncfs`` on Linux: one flush for the batch; elsewhere
an fsync per file and one per directory). Only then is each message reported SENT.
Small files are written on the loop's thread: a worker thread measured slower here
(GIL hand-offs cost more than the writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

from gateway.core.envelope import Envelope
from gateway.core.errors import PermanentDeliveryError, RetryLater
from gateway.core.protocols import DeliveryResult
from gateway.core.status import Status

_FIELDS = ("id", "channel", "control_id", "message_type", "date", "ext")


def _find_syncfs() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return cast(Callable[[int], int], ctypes.CDLL(None, use_errno=True).syncfs)
    except (OSError, AttributeError):
        return None


_SYNCFS = _find_syncfs()
_Item = tuple[str, bytes, "asyncio.Future[None]"]


class FileDestination:
    """Implements ``gateway.core.protocols.Destination``."""

    CONFIG_SCHEMA: Mapping[str, Any] = {
        "type": "object",
        "required": ["directory"],
        "properties": {
            "directory": {"type": "string", "minLength": 1},
            "filename": {"type": "string", "minLength": 1},
            "fsync": {"type": "boolean"},
        },
    }

    def __init__(self, name: str, settings: Mapping[str, Any]) -> None:
        self.name = name
        self.directory = Path(settings["directory"])
        self.pattern: str = settings.get("filename", "{id}.{ext}")
        self.fsync: bool = bool(settings.get("fsync", True))
        _check_pattern(self.pattern)
        self._dir = str(self.directory)
        self._by_id = self.pattern == "{id}.{ext}"
        self._pending: list[_Item] = []
        self._flush_scheduled = False
        self._syncing = False
        self._executor: ThreadPoolExecutor | None = None  # made on first use: building must stay free
        self._made_dirs: set[str] = set()

    def path_for(self, envelope: Envelope) -> str:
        ext = "json" if "json" in envelope.content_type else "hl7"
        if self._by_id:
            name = f"{envelope.id}.{ext}"
        else:
            name = self.pattern.format(
                id=envelope.id,
                channel=envelope.channel,
                control_id=_safe(envelope.control_id),
                message_type=_safe(envelope.message_type),
                ext=ext,
                date=time.strftime("%Y%m%d", time.gmtime(envelope.received_at)),
            )
        # Plain strings: pathlib costs more than the write itself on this path.
        return os.path.join(self._dir, name)

    async def send(self, envelope: Envelope, payload: bytes) -> DeliveryResult:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        path = self.path_for(envelope)
        self._pending.append((path, payload, fut))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        await fut
        return DeliveryResult(Status.SENT, os.path.basename(path), None)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._syncing or not self._pending:
            return  # the flush in flight reschedules when it lands
        batch, self._pending = self._pending, []
        errors = self._write_batch([(p, d) for p, d, _ in batch])
        written = {os.path.dirname(p) for (p, _, _), err in zip(batch, errors, strict=True) if err is None}
        if not (self.fsync and written):
            self._settle(batch, errors)
            return
        # The flush to disk runs on a thread (GIL released): the loop keeps serving meanwhile.
        self._syncing = True
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"file-sync-{self.name}")
        sync = asyncio.get_running_loop().run_in_executor(self._executor, self._make_durable, written)
        sync.add_done_callback(lambda f: self._synced(f, batch, errors))

    def _synced(self, fut: asyncio.Future[None], batch: list[_Item], errors: list[Exception | None]) -> None:
        self._syncing = False
        exc = fut.exception()
        if exc is not None:  # whatever broke the flush, nothing in the batch is known to be on disk
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            failed = RetryLater(f"cannot flush to disk: {reason}")
            errors = [err or failed for err in errors]
        self._settle(batch, errors)
        if self._pending and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    @staticmethod
    def _settle(batch: list[_Item], errors: list[Exception | None]) -> None:
        for (_, _, fut), err in zip(batch, errors, strict=True):
            if fut.done():
                continue
            if err is None:
                fut.set_result(None)
            else:
                fut.set_exception(err)

    def _write_batch(self, items: list[tuple[str, bytes]]) -> list[Exception | None]:
        errors: list[Exception | None] = []
        for path, data in items:
            try:
                parent = os.path.dirname(path)
                if parent not in self._made_dirs:
                    os.makedirs(parent, exist_ok=True)
                    self._made_dirs.add(parent)
                tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
                try:
                    _write_all(fd, data)
                    if self.fsync and _SYNCFS is None:
                        os.fsync(fd)
                except BaseException:
                    os.close(fd)
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)  # never leave a partial file behind
                    raise
                os.close(fd)
                os.replace(tmp, path)
                errors.append(None)
            except PermissionError as exc:
                errors.append(PermanentDeliveryError(f"cannot write: {exc.strerror}"))
            except OSError as exc:
                errors.append(RetryLater(f"cannot write: {exc.strerror}"))
        return errors

    @staticmethod
    def _make_durable(dirs: set[str]) -> None:
        # The renames are durable only once the directory entries are; syncfs covers data and entries.
        for d in dirs:
            dfd = os.open(d, os.O_RDONLY)
            try:
                if _SYNCFS is not None:
                    if _SYNCFS(dfd) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, os.strerror(err))
                    return  # one flush covers the whole file system
                os.fsync(dfd)
            finally:
                os.close(dfd)

    async def aclose(self) -> None:
        # Writes already handed over finish first: their senders are waiting on them.
        while self._pending or self._syncing:
            if not self._syncing:
                self._flush()
            await asyncio.sleep(0.001)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)[:64]


def _check_pattern(pattern: str) -> None:
    import string

    for _, field, _, _ in string.Formatter().parse(pattern):
        if field is not None and field not in _FIELDS:
            raise ValueError(f"unknown placeholder {{{field}}}; allowed: {', '.join(_FIELDS)}")
    if "/" in pattern or "\\" in pattern or ".." in pattern:
        raise ValueError("the file name may not contain a path")


def _write_all(fd: int, data: bytes) -> None:
    """os.write may write only part (a full disk, a signal): loop until every byte is written."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]
