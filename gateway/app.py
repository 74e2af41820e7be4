"""Wiring: configuration → store, channels, sources, HTTP; start, drain, stop."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from aiohttp import web

from gateway.config import Config
from gateway.core import heap
from gateway.core.errors import ConfigError, PasserelleError
from gateway.core.logging import get_logger
from gateway.core.protocols import Destination, Source
from gateway.core.tls import server_context
from gateway.engine.build import Builder
from gateway.engine.channel import ChannelRuntime
from gateway.engine.fhir_intake import FhirIntake, FhirRoute, attach_repository
from gateway.engine.intake import Hl7Intake
from gateway.engine.link import Link
from gateway.engine.nats_channel import JetStreamChannel
from gateway.engine.remote import ChannelPort, WorkerHandle
from gateway.http.app import build_app
from gateway.http.auth import build_authenticator
from gateway.http.console_api import console_settings, listener_states
from gateway.http.fhir_routing import FHIR_INTAKE
from gateway.http.server import GatewayRunner
from gateway.store import backends
from gateway.store.audit import AuditLog
from gateway.store.messages.sqlite import SqliteStore

log = get_logger("passerelle.app")


class Gateway:
    """One gateway: the main process, and its worker when ``workers: 1``.

    Implements ``gateway.http.app.Runtime``.
    """

    def __init__(
        self,
        config: Config,
        *,
        data_dir: Path | None = None,
        mllp_port: int | None = None,
        http_port: int | None = None,
        workers: int | None = None,
        journal_url: str | None = None,
        store_dsn: str | None = None,
    ) -> None:
        # The command line's settings over the file's, checked again (a --journal needs a store...).
        config = config.overridden(
            data_dir=data_dir,
            http_port=http_port,
            workers=workers,
            journal_url=journal_url,
            store_dsn=store_dsn,
        )
        self.config = config
        self.settings = settings = config.settings
        self.data_dir = settings.data_dir
        self.mllp_port = mllp_port
        self.http_port_overridden = http_port is not None
        self.workers = settings.workers
        self.backends = backends.select(settings, self.data_dir)
        self.store = self.backends.store
        if not self.backends.backend.worker_processes:
            self.workers = 0
        self.fhir = self.backends.fhir_repository(self.data_dir)
        # Receipts are audited by following the SQLite journal (no cost on the intake path); with
        # workers, the first one follows it, off this process's GIL (see gateway.worker).
        self.audit = AuditLog(
            self.data_dir / "audit.db",
            journal=self.data_dir / "passerelle.db" if self.backends.backend.audit_follows_journal else None,
            follow=self.workers == 0,
        )
        self.drain_timeout = settings.drain_timeout_s
        self.channels: dict[str, ChannelRuntime | ChannelPort] = {}
        self.sources: dict[str, Source] = {}
        self.intakes: dict[str, Hl7Intake] = {}
        self.fhir_intake = FhirIntake(self.store)  # channels fed by 'type: fhir' sources (the /fhir routes)
        self.destinations: list[Destination] = []
        # Only used with workers, which only the SQLite store has.
        self.worker = WorkerHandle(cast(SqliteStore, self.store), self.workers)
        self._worker_procs: dict[int, asyncio.subprocess.Process] = {}
        self._stopping = False
        self._draining = False  # stop() drains; a start that failed closes without waiting
        self._parts = contextlib.AsyncExitStack()  # what start() opened, closed by stop()
        self._runner: web.AppRunner | None = None
        self.http_port_bound: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.started_at = 0.0
        self._build()

    # -- construction (all configuration errors surface here, before anything listens) --

    def _build(self) -> None:
        data = self.config.data
        builder = Builder(
            self.config, self.data_dir, defaults={"fhir_repository": self.backends.repository_settings}
        )
        by_source: dict[str, list[ChannelRuntime | ChannelPort]] = {}
        charsets: dict[str, str] = {}  # each opened source's, as its channels' specs read it
        for spec in builder.channel_specs():
            # Built in every mode, so that connector settings are checked before anything listens.
            runtime = builder.channel(spec, self.store)
            attach_repository(runtime.steps, self.fhir)  # read-only: Patients named by id only
            if self.backends.jetstream is not None:
                runtime = JetStreamChannel(runtime, self.backends.jetstream)
            channel: ChannelRuntime | ChannelPort = runtime
            if self.workers:
                channel = ChannelPort(
                    spec.name,
                    spec.source,
                    spec.filter,
                    spec.ack_timing,
                    spec.sending_application,
                    self.worker,
                    dedupe=runtime.dedupe,
                    screen=runtime.screen,
                )
                self.worker.ports[spec.name] = channel
            else:
                self.destinations.extend(d.connector for d in runtime.destinations)
            self.channels[spec.name] = channel
            by_source.setdefault(spec.source, []).append(channel)
            charsets[spec.source] = spec.default_charset
        port_overridden = False
        for si, src in enumerate(data["sources"]):
            channels = by_source.get(src["name"])
            if not channels:
                continue  # a source no enabled channel listens to is not opened
            item = dict(src)
            if self.mllp_port is not None and src["type"] == "mllp" and not port_overridden:
                item["port"] = self.mllp_port
                port_overridden = True
            if src["type"] == "fhir":
                rules = {c["name"]: c.get("fhir") for c in data["channels"]}
                for ch in channels:
                    self.fhir_intake.add(src["name"], ch, FhirRoute.from_config(rules.get(ch.name)))
                self.sources[src["name"]] = builder.connector(
                    "passerelle.sources", item, ("sources", si), self.fhir_intake
                )
                continue
            for ci, ch_data in enumerate(data["channels"]):
                if ch_data["source"] == src["name"] and "fhir" in ch_data:
                    raise self.config.error(("channels", ci, "fhir"), "needs a source of type fhir")
            intake = Hl7Intake(
                src["name"],
                channels,
                self.store,
                default_charset=charsets[src["name"]],
                sending_application=channels[0].sending_application,
            )
            self.intakes[src["name"]] = intake
            self.sources[src["name"]] = builder.connector("passerelle.sources", item, ("sources", si), intake)

    # -- the worker process ----------------------------------------------------------

    async def _start_worker(self, index: int) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.worker", "--fd", str(child.fileno()), pass_fds=[child.fileno()]
            )
        finally:
            child.close()
        self._worker_procs[index] = proc
        reader, writer = await asyncio.open_unix_connection(sock=parent)
        link = Link(reader, writer)
        link.send(("config", self.config, index, self.workers))
        self._tasks.append(asyncio.create_task(self._supervise(index, link, proc), name=f"worker-{index}"))

    async def _supervise(self, index: int, link: Link, proc: asyncio.subprocess.Process) -> None:
        await self.worker.serve(index, link)
        code = await proc.wait()
        link.close()
        if self._stopping:
            return
        log.error("worker_exited", worker=index, code=code)
        self.worker.lost(index, "a worker process stopped; send the message again")
        await asyncio.sleep(1.0)
        if not self._stopping:
            await self._start_worker(index)

    async def start(self) -> None:
        self.started_at = time.time()
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        dbs = (
            self.data_dir / "audit.db",
            getattr(self.store, "path", None),
            getattr(self.fhir, "path", None),
        )
        for db in dbs:
            if isinstance(db, Path) and db.parent == self.data_dir:
                _private_file(db)  # SQLite gives its -wal and -shm files the same mode
        secret = _installation_secret(self.data_dir / "partition.key")
        parts = contextlib.AsyncExitStack()
        try:
            await self._open_parts(parts, secret)
        except BaseException:
            # What opened before the failure closes again, last opened first.
            self._stopping = True
            await parts.aclose()
            raise
        self._parts = parts
        log.info(
            "gateway_started",
            data_dir=str(self.data_dir),
            pid=os.getpid(),
            channels=len(self.channels),
            sources=len(self.sources),
            http_port=self.http_port_bound,
        )

    async def _open_parts(self, parts: contextlib.AsyncExitStack, secret: bytes) -> None:
        """Open each part and push how it closes; stop() unwinds them in reverse: sources, then
        channels, workers, tasks, destinations, HTTP, and the stores last."""
        for intake in self.intakes.values():
            intake.partition_secret = secret
        await self.store.open()
        parts.push_async_callback(self.store.close)
        if (postgres := self.backends.postgres) is not None:
            # Every node must digest a patient to the same partition key: the key is shared.
            secret = await postgres.shared_secret("partition.key")
            for intake in self.intakes.values():
                intake.partition_secret = secret
        self.fhir_intake.partition_secret = secret
        await self.fhir.open()
        parts.push_async_callback(self.fhir.close)
        await self.audit.open()
        parts.push_async_callback(self.audit.close)
        parts.push_async_callback(self._stop_http)
        parts.push_async_callback(self._close_destinations)
        parts.push_async_callback(self._cancel_tasks)
        if self.workers:
            parts.push_async_callback(self._stop_workers)
        for index in range(self.workers):
            await self._start_worker(index)
        for channel in self.channels.values():
            if isinstance(channel, ChannelRuntime):
                channel.start()
                parts.push_async_callback(self._stop_part, channel)
        where: tuple[tuple[str | int, ...], Any, str | None] = ((), None, None)
        try:
            for name, source in self.sources.items():
                where = self._listen_key(name)
                await source.start()
                parts.push_async_callback(self._stop_part, source)
            if self.settings.http.enabled:
                override = "--http-port" if self.http_port_overridden else None
                where = (("http", "port"), self.settings.http.port, override)
                await self._start_http()
        except OSError as exc:
            key, port, override = where
            reason = f"cannot listen on port {port}: {exc.strerror or exc}"
            if override is not None:
                reason += f" (the port given by {override})"
            error = self.config.error(key, reason) if key else ConfigError(reason, file=self.config.file)
            raise error from exc
        self._tasks.append(asyncio.create_task(self._retention_loop(), name="retention"))

    async def _stop_part(self, part: Source | ChannelRuntime) -> None:
        # A drain on stop(); none when start() failed: nothing was taken yet.
        await part.stop(self.drain_timeout if self._draining else 0)

    def _listen_key(self, source: str) -> tuple[tuple[str | int, ...], Any, str | None]:
        """The config key of a source's port, the port, and the option that overrode it (if any)."""
        for si, src in enumerate(self.config.data["sources"]):
            if src["name"] == source:
                port = getattr(self.sources[source], "port", src.get("port"))
                override = "--mllp-port" if self.mllp_port is not None and port == self.mllp_port else None
                return ("sources", si, "port"), port, override
        return (), None, None

    async def _start_http(self) -> None:
        http = self.settings.http
        authenticator, token_file = build_authenticator(
            self.settings.auth, base_dir=Path(self.config.file).parent
        )
        if token_file is not None:
            # The path only: the token itself never reaches a log line.
            log.info("admin_token_file", path=str(token_file))
        app = build_app(
            self,
            max_body_bytes=http.max_body_bytes,
            authenticator=authenticator,
            audit=self.audit,
            metrics=self.metrics_data,
            rate_limit=http.rate_limit,
            documents=dataclasses.asdict(self.settings.documents),
            console=console_settings(self.config.data, locale=self.settings.console.locale),
            bulk=dataclasses.asdict(self.settings.export),
        )
        app[FHIR_INTAKE] = self.fhir_intake
        max_header = http.max_header_bytes
        # parser-level errors (a line over max_header) answered as OperationOutcomes, quoting nothing
        self._runner = GatewayRunner(
            app, access_log=None, handle_signals=False, max_line_size=max_header, max_field_size=max_header
        )
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            http.host,
            http.port,
            reuse_address=True,
            ssl_context=server_context(http.tls, base_dir=Path(self.config.file).parent, where="http.tls")
            if http.tls
            else None,
        )
        await site.start()
        server = cast(asyncio.Server | None, site._server)  # aiohttp keeps the bound sockets there
        if server is not None and server.sockets:
            self.http_port_bound = int(server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Drain: stop taking messages, answer those received, let lanes finish, flush, close."""
        log.info("gateway_draining", timeout_s=self.drain_timeout)
        self._stopping = True
        self._draining = True
        await self._parts.aclose()
        log.info("gateway_stopped")

    async def _stop_workers(self) -> None:
        self.worker.broadcast(("drain", self.drain_timeout))
        live = [self.worker.drained[i].wait() for i in self.worker.links]
        if live:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.drain_timeout + 5):
                    await asyncio.gather(*live)
        for link in list(self.worker.links.values()):
            link.close()  # tells each worker it may exit
        for proc in self._worker_procs.values():
            try:
                async with asyncio.timeout(5):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()

    async def _cancel_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def _close_destinations(self) -> None:
        for dest in self.destinations:
            with contextlib.suppress(Exception):
                await dest.aclose()

    async def _stop_http(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        heap.settle()
        await stop.wait()
        await self.stop()

    async def _retention_loop(self) -> None:
        retention = self.settings.retention
        payload_days, message_days = retention.payload_days, retention.message_days
        while True:
            await asyncio.sleep(retention.sweep_interval_s)
            now = time.time()
            try:
                payloads, messages = await self.store.prune(
                    payload_before=now - payload_days * 86400, message_before=now - message_days * 86400
                )
                log.info("retention_swept", payloads=payloads, messages=messages)
            except PasserelleError as exc:
                log.error("retention_failed", error=exc.message)

    # -- Runtime (for the HTTP layer) ----------------------------------------------

    async def replay(self, message_id: str) -> bool:
        msg = await self.store.get_message(message_id, with_payloads=False)
        if msg is None or msg["channel"] not in self.channels:
            return False
        item = await self.store.reset_for_replay(message_id)
        if item is None:
            return False
        log.info("message_replayed", channel=msg["channel"], message_id=message_id)
        self.channels[msg["channel"]].replay(item)
        return True

    async def readiness(self) -> Mapping[str, Any]:
        checks: dict[str, dict[str, Any]] = {}
        try:
            await asyncio.wait_for(self.store.ping(), 2.0)
            checks["store"] = {"ok": True}
        except (PasserelleError, TimeoutError) as exc:
            checks["store"] = {"ok": False, "error": type(exc).__name__}
        # Reads may work while commits fail (a full disk): every message would be answered AE
        # and trace writes wait, so the node is not ready until the journal commits again.
        checks["journal_writes"] = self.store.write_health()
        if (jetstream := self.backends.jetstream) is not None:
            try:
                await asyncio.wait_for(jetstream.journal.ping(), 2.0)
                checks["journal"] = {"ok": True}
            except (PasserelleError, TimeoutError) as exc:
                checks["journal"] = {"ok": False, "error": type(exc).__name__}
        try:
            await asyncio.wait_for(self.fhir.ping(), 2.0)
            checks["fhir"] = {"ok": True}
        except (PasserelleError, TimeoutError) as exc:
            checks["fhir"] = {"ok": False, "error": type(exc).__name__}
        recovering = [c.name for c in self.channels.values() if c.snapshot().get("recovering")]
        checks["channels"] = {"ok": not recovering, "recovering": recovering}
        if self.workers:
            checks["worker"] = {"ok": self.worker.connected}
        checks["sources"] = {"ok": bool(self.sources) or not self.channels, "count": len(self.sources)}
        return checks

    async def metrics_data(self) -> Mapping[str, Any]:
        """What /metrics exposes, gathered in this (main) process: see gateway.http.metrics."""
        stats = await self.store.stats()
        received: dict[tuple[str, str], int] = {}
        for intake in self.intakes.values():
            for key, n in intake.received_by_type.items():
                received[key] = received.get(key, 0) + n
        return {
            "received": received,
            "sources": {name: {"acked": i.acked, "rejected": i.rejected} for name, i in self.intakes.items()},
            "by_type": stats.get("by_type", {}),
            "destinations": stats.get("destinations", {}),
            "journal": stats.get("journal", {}),
            "channels": [c.snapshot() for c in self.channels.values()],
            "ack_latency": {
                name: src.ack_latency for name, src in self.sources.items() if hasattr(src, "ack_latency")
            },
            "ready": await self.readiness(),
        }

    def snapshot(self) -> Mapping[str, Any]:
        return {
            "started_at": self.started_at,
            "channels": [c.snapshot() for c in self.channels.values()],
            "sources": {name: {"acked": i.acked, "rejected": i.rejected} for name, i in self.intakes.items()},
            "listeners": listener_states(self.sources),
        }


def _private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 when it does not exist (an empty file is a valid
    SQLite database); an existing file keeps its mode, which is the operator's choice."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


PARTITION_KEY_BYTES = 32


def _installation_secret(path: Path) -> bytes:
    """A random key made on first start (mode 0600), kept with the data it protects.

    The key decides which partition a patient's messages go to. A key file of the wrong length
    (a crash between its creation and its write) is remade, but only while the journal in the
    same directory holds no message; otherwise starting would reorder patients silently, so
    it is a ConfigError the operator resolves (restore the key from backup).
    """
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        key = None
    if key is not None and len(key) == PARTITION_KEY_BYTES:
        return key
    if key is not None and _journal_has_messages(path.parent / "passerelle.db"):
        raise ConfigError(
            f"{path} holds {len(key)} bytes, not {PARTITION_KEY_BYTES}, and the journal already holds "
            "messages: restore the key from a backup (a new key would change partition assignment)",
            key="data_dir",
        )
    key = os.urandom(PARTITION_KEY_BYTES)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(key)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)  # the key appears whole or not at all
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return key


def _journal_has_messages(db: Path) -> bool:
    if not db.exists() or db.stat().st_size == 0:
        return False
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT EXISTS (SELECT 1 FROM messages)").fetchone()
    except sqlite3.OperationalError:  # no messages table yet: nothing was ever journaled
        return False
    finally:
        conn.close()
    return bool(row[0])
