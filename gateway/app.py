"""Wiring: configuration → store, channels, sources, HTTP; start, drain, stop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from aiohttp import web

from gateway.core.config import Config, Path_
from gateway.core.errors import ConfigError, PasserelleError
from gateway.core.logging import get_logger
from gateway.core.protocols import Destination, Source
from gateway.engine import registry
from gateway.engine.channel import ChannelRuntime, DestinationRuntime, Filter
from gateway.engine.intake import Hl7Intake
from gateway.engine.retry import RetryPolicy
from gateway.engine.steps import Step
from gateway.hl7.charsets import codec_for
from gateway.http.app import build_app
from gateway.store.sqlite import SqliteStore

log = get_logger("passerelle.app")

_COMMON_KEYS = frozenset({"name", "type", "retry"})


class Gateway:
    """One gateway process. Implements ``gateway.http.app.Runtime``."""

    def __init__(
        self,
        config: Config,
        *,
        data_dir: Path | None = None,
        mllp_port: int | None = None,
        http_port: int | None = None,
    ) -> None:
        self.config = config
        data = config.data
        self.data_dir = Path(data_dir or data.get("data_dir", "./var"))
        self.mllp_port = mllp_port
        self.http_settings = dict(data.get("http", {}))
        if http_port is not None:
            self.http_settings["port"] = http_port
        journal = data.get("journal", {})
        self.store = SqliteStore(
            self.data_dir / "passerelle.db",
            synchronous=journal.get("synchronous", "FULL"),
            max_batch=journal.get("max_batch", 4096),
        )
        self.drain_timeout = float(data.get("drain_timeout_s", 10))
        self.channels: dict[str, ChannelRuntime] = {}
        self.sources: dict[str, Source] = {}
        self.intakes: dict[str, Hl7Intake] = {}
        self.destinations: list[Destination] = []
        self._runner: web.AppRunner | None = None
        self.http_port_bound: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()
        self.started_at = 0.0
        self._build()

    # -- construction (all configuration errors surface here, before anything listens) --

    def _expand(self, value: Any) -> Any:
        if isinstance(value, str):
            return value.replace("{data_dir}", str(self.data_dir))
        if isinstance(value, list):
            return [self._expand(v) for v in value]
        if isinstance(value, dict):
            return {k: self._expand(v) for k, v in value.items()}
        return value

    def _connector(self, group: str, item: Mapping[str, Any], at: Path_, *extra: Any) -> Any:
        kind = item["type"]
        factory = registry.lookup(group, kind)
        if factory is None:
            raise self.config.error(
                (*at, "type"), f"unknown type {kind!r}; available: {', '.join(registry.available(group))}"
            )
        settings = {k: v for k, v in item.items() if k not in _COMMON_KEYS}
        schema = dict(getattr(factory, "CONFIG_SCHEMA", {"type": "object"}))
        schema.setdefault("additionalProperties", False)
        schema.setdefault("properties", {})
        schema = {**schema, "properties": {**schema["properties"], **{k: {} for k in _COMMON_KEYS}}}
        self.config.validate(schema, item, at)
        try:
            return factory(item.get("name", kind), self._expand(settings), *extra)
        except (ValueError, TypeError, KeyError) as exc:
            raise self.config.error(at, f"invalid settings: {exc}") from exc

    def _build(self) -> None:
        data = self.config.data
        source_cfg = {s["name"]: (i, s) for i, s in enumerate(data["sources"])}
        by_source: dict[str, list[ChannelRuntime]] = {}
        for ci, ch in enumerate(data["channels"]):
            if not ch.get("enabled", True):
                continue
            at: Path_ = ("channels", ci)
            dests = []
            for di, d in enumerate(ch["destinations"]):
                conn = self._connector("passerelle.destinations", d, (*at, "destinations", di))
                self.destinations.append(conn)
                dests.append(DestinationRuntime(d["name"], conn, RetryPolicy.from_config(d.get("retry"))))
            steps: list[Step] = []
            for si, s in enumerate(ch.get("steps", [])):
                step_item = {"name": f"{si + 1}-{s['type']}", **s}
                steps.append(self._connector("passerelle.steps", step_item, (*at, "steps", si)))
            src_index, src = source_cfg[ch["source"]]
            charset = src.get("default_charset", "ASCII")
            try:
                codec_for(charset)
            except PasserelleError as exc:
                raise self.config.error(("sources", src_index, "default_charset"), exc.message) from exc
            ack = ch.get("ack", {})
            runtime = ChannelRuntime(
                name=ch["name"],
                source=ch["source"],
                store=self.store,
                filter=Filter.from_config(ch.get("filter")),
                steps=steps,
                destinations=dests,
                queued=ch.get("queue", True),
                ack_timing=ack.get("timing", "before_processing"),
                partitions=ch.get("partitions", 64),
                max_in_memory=ch.get("max_in_memory", 10_000),
                dedupe=ch.get("dedupe", True),
                default_charset=charset,
                sending_application=ack.get("sending_application", "PASSERELLE"),
            )
            self.channels[ch["name"]] = runtime
            by_source.setdefault(ch["source"], []).append(runtime)
        port_overridden = False
        for name, (si, src) in source_cfg.items():
            channels = by_source.get(name)
            if not channels:
                continue  # a source no enabled channel listens to is not opened
            item = dict(src)
            if self.mllp_port is not None and src["type"] == "mllp" and not port_overridden:
                item["port"] = self.mllp_port
                port_overridden = True
            intake = Hl7Intake(
                name,
                channels,
                self.store,
                default_charset=src.get("default_charset", "ASCII"),
                sending_application=channels[0].sending_application,
            )
            self.intakes[name] = intake
            self.sources[name] = self._connector("passerelle.sources", item, ("sources", si), intake)

    # -- life cycle --------------------------------------------------------------

    async def start(self) -> None:
        self.started_at = time.time()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        await self.store.open()
        for channel in self.channels.values():
            channel.start()
        started: list[Source] = []
        try:
            for source in self.sources.values():
                await source.start()
                started.append(source)
            if self.http_settings.get("enabled", True):
                await self._start_http()
        except OSError as exc:
            for source in started:
                await source.stop(0)
            await self._close_rest()
            raise ConfigError(f"cannot listen: {exc.strerror or exc}", file=self.config.file) from exc
        self._tasks.append(asyncio.create_task(self._retention_loop(), name="retention"))
        log.info(
            "gateway_started",
            data_dir=str(self.data_dir),
            pid=os.getpid(),
            channels=len(self.channels),
            sources=len(self.sources),
            http_port=self.http_port_bound,
        )

    async def _start_http(self) -> None:
        app = build_app(self, max_body_bytes=int(self.http_settings.get("max_body_bytes", 32 * 1024 * 1024)))
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            self.http_settings.get("host", "127.0.0.1"),
            int(self.http_settings.get("port", 8080)),
            reuse_address=True,
        )
        await site.start()
        server = cast(asyncio.Server | None, site._server)  # aiohttp keeps the bound sockets there
        if server is not None and server.sockets:
            self.http_port_bound = int(server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Drain: stop taking messages, answer those received, let lanes finish, flush, close."""
        log.info("gateway_draining", timeout_s=self.drain_timeout)
        for source in self.sources.values():
            await source.stop(self.drain_timeout)
        for channel in self.channels.values():
            await channel.stop(self.drain_timeout)
        await self._close_rest()
        self._stopped.set()
        log.info("gateway_stopped")

    async def _close_rest(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for dest in self.destinations:
            with contextlib.suppress(Exception):
                await dest.aclose()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.store.close()

    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        await stop.wait()
        await self.stop()

    async def _retention_loop(self) -> None:
        retention = self.config.data.get("retention", {})
        payload_days = float(retention.get("payload_days", 30))
        message_days = float(retention.get("message_days", 90))
        interval = float(retention.get("sweep_interval_s", 3600))
        while True:
            await asyncio.sleep(interval)
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
        recovering = [c.name for c in self.channels.values() if c.snapshot()["recovering"]]
        checks["channels"] = {"ok": not recovering, "recovering": recovering}
        checks["sources"] = {"ok": bool(self.sources) or not self.channels, "count": len(self.sources)}
        return checks

    def snapshot(self) -> Mapping[str, Any]:
        return {
            "started_at": self.started_at,
            "channels": [c.snapshot() for c in self.channels.values()],
            "sources": {name: {"acked": i.acked, "rejected": i.rejected} for name, i in self.intakes.items()},
        }
