"""The worker process: runs the channels (steps, destinations, retries) beside the main process.

Started by the main process with one end of a socket pair; it never listens on the
network and never writes the database itself (see gateway.engine.remote). When the
main process disappears (even by SIGKILL) the link closes and the worker exits at
once: what it had in hand is still in the journal and is resumed at the next start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Sequence

from gateway.core import heap
from gateway.core.errors import ConfigError
from gateway.core.logging import configure as configure_logging
from gateway.core.logging import get_logger
from gateway.engine.build import Builder
from gateway.engine.channel import ChannelRuntime
from gateway.engine.fhir_intake import attach_repository
from gateway.engine.link import Link
from gateway.engine.remote import LinkedStore, outcome_sender, snapshots
from gateway.store.audit import AuditLog
from gateway.store.fhir import SqliteFhirRepository

log = get_logger("passerelle.worker")


async def serve(fd: int) -> int:
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    link = Link(reader, writer)
    messages = link.messages()
    first = await anext(messages, None)
    if first is None or first[0] != "config":
        return 2
    _, config, index, count = first  # the main process's Config, command-line settings applied
    data_dir = config.settings.data_dir
    os.nice(config.settings.worker_nice)  # the main process's intake and ACKs come first
    configure_logging(config.settings.log_level)
    builder = Builder(config, data_dir)
    store = LinkedStore(data_dir / "passerelle.db", link)
    await store.open()
    try:
        channels = {
            spec.name: builder.channel(spec, store, shard=(index, count)) for spec in builder.channel_specs()
        }
    except ConfigError as exc:  # the main process validated the same config: this is unexpected
        log.error("worker_config_error", error=str(exc))
        return 2
    # The repository's file, read-only here: the reverse mapping looks up Patients named by id only.
    repository = SqliteFhirRepository(data_dir / "fhir.db", readers=1)
    wanted = [attach_repository(ch.steps, repository) for ch in channels.values()]
    if any(wanted):
        await repository.open()
    # The first worker follows the journal into the audit trail (the main process's GIL stays
    # for intake and ACKs); the log takes writers from several processes.
    follower = AuditLog(data_dir / "audit.db", journal=data_dir / "passerelle.db") if index == 0 else None
    if follower is not None:
        await follower.open()
    heap.settle()  # as the main process does, once what this worker needs is built
    for channel in channels.values():
        channel.start()
    tasks = [asyncio.create_task(_announce_recovery(link, ch)) for ch in channels.values()]
    tasks.append(asyncio.create_task(_report(link, channels)))
    log.info("worker_started", pid=os.getpid(), channels=len(channels), worker=index, workers=count)
    drain: asyncio.Task[None] | None = None
    async for msg in messages:
        kind = msg[0]
        if kind == "offer":
            channels[msg[1]].offer(msg[2])
        elif kind == "replay":
            channels[msg[1]].replay(msg[2])
        elif kind == "expect":
            channels[msg[1]].expect_outcome(msg[2]).add_done_callback(outcome_sender(link, msg[2]))
        elif kind == "flushed":
            store.flushed(msg[1])
        elif kind == "drain" and drain is None:
            # As a task: the loop must go on reading, the drain's last flush waits for an answer.
            drain = asyncio.create_task(_drain(channels, store, link, float(msg[1])))
    # The link is closed: after a drain, by the main process; otherwise the main process is gone
    # and nothing can be recorded any more, so stop now.
    code = 0 if drain is not None and drain.done() else 1
    if code:
        log.warning("worker_orphaned")
    for task in tasks:
        task.cancel()
    await store.close()
    if follower is not None:
        await follower.close()
    if any(wanted):
        await repository.close()
    return code


async def _announce_recovery(link: Link, channel: ChannelRuntime) -> None:
    await channel.recovered()
    link.send(("recovered", channel.name))


async def _report(link: Link, channels: dict[str, ChannelRuntime], every: float = 0.5) -> None:
    while True:
        link.send(("snapshot", snapshots(channels)))
        await asyncio.sleep(every)


async def _drain(channels: dict[str, ChannelRuntime], store: LinkedStore, link: Link, timeout: float) -> None:
    for channel in channels.values():
        await channel.stop(timeout)
    for channel in channels.values():
        for dest in channel.destinations:
            with contextlib.suppress(Exception):
                await dest.connector.aclose()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await store.flush()
    link.send(("snapshot", snapshots(channels)))
    link.send(("drained",))
    await link.drain()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="passerelle-worker")
    parser.add_argument("--fd", type=int, required=True)
    args = parser.parse_args(argv)
    # Signals are the main process's business: it tells the worker to drain over the link.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        pass
    return asyncio.run(serve(args.fd))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
