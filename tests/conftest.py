"""Shared fixtures: a real gateway on 127.0.0.1 port 0, fake destinations of the same Protocol."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from connectors.mllp.client import MllpClient
from gateway import config as config_mod
from gateway.app import Gateway
from gateway.core.envelope import Envelope
from gateway.core.errors import PermanentDeliveryError, RetryLater
from gateway.core.protocols import DeliveryResult
from gateway.core.status import Status
from gateway.engine import registry
from tests.fakes import Receiver
from tests.phi_scan import PhiScan


class FakeDestination:
    """The far end of a destination, in memory; behaviour scripted per test through ``plan``."""

    instances: ClassVar[dict[str, FakeDestination]] = {}

    def __init__(self, name: str, settings: dict[str, Any]) -> None:
        self.name = name
        self.received: list[tuple[Envelope, bytes]] = []
        self.attempts = 0
        # each entry: "ok", "retry", "error", "permanent" or "hang"; the last one repeats
        self.plan: list[str] = list(settings.get("plan", ["ok"]))
        self.delay = float(settings.get("delay_s", 0))
        FakeDestination.instances[name] = self

    async def send(self, envelope: Envelope, payload: bytes) -> DeliveryResult:
        self.attempts += 1
        step = self.plan.pop(0) if len(self.plan) > 1 else self.plan[0]
        if self.delay:
            await asyncio.sleep(self.delay)
        if step == "hang":
            await asyncio.sleep(3600)
        if step == "retry":
            raise RetryLater("far end busy", defer=0.01)
        if step == "permanent":
            raise PermanentDeliveryError("far end refuses")
        if step == "error":
            return DeliveryResult(Status.ERROR, "AE 207", b"MSA|AE|x\r")
        self.received.append((envelope, payload))
        return DeliveryResult(Status.SENT, "AA")

    async def aclose(self) -> None:
        return None


FakeDestination.CONFIG_SCHEMA = {  # type: ignore[attr-defined]
    "type": "object",
    "properties": {"plan": {"type": "array"}, "delay_s": {"type": "number"}},
}


def pytest_configure(config: pytest.Config) -> None:
    # The whole suite's log output is scanned for the patient data the tests use (tests/phi_scan.py):
    # captured output, child processes' log files, and every stdlib log record (aiohttp's included).
    if not config.pluginmanager.has_plugin("passerelle-phi-scan"):
        scan = PhiScan()
        config.pluginmanager.register(scan, "passerelle-phi-scan")
        scan.install()


@pytest.fixture(autouse=True)
def _fake_destination() -> Any:
    registry.register("passerelle.destinations", "fake", FakeDestination)
    FakeDestination.instances.clear()
    yield
    registry.unregister("passerelle.destinations", "fake")


# Access control is always on: every test gateway knows this admin token, and clients send it.
ADMIN_TOKEN = "test-admin-token-7f3c9a1e5b2d4c68"  # noqa: S105 - a test credential
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ADMIN_ENTRY = {"token": ADMIN_TOKEN, "subject": "test-admin", "role": "admin"}


def make_config(tmp_path: Path, **channel: Any) -> config_mod.Config:
    """A one-source, one-channel config; ``channel`` keys override the channel's."""
    ch: dict[str, Any] = {
        "name": "adt",
        "source": "hospital",
        "destinations": [
            {"name": "far", "type": "fake", "retry": {"max_attempts": 3, "initial_backoff_s": 0.01}}
        ],
    }
    ch.update(channel)
    data = {
        "data_dir": str(tmp_path / "var"),
        "log_level": "warning",
        "drain_timeout_s": 5,
        "workers": 0,  # in-process channels: the fakes live in this process
        "http": {"host": "127.0.0.1", "port": 0},
        "auth": {"tokens": [ADMIN_ENTRY]},
        "sources": [
            {
                "name": "hospital",
                "type": "mllp",
                "host": "127.0.0.1",
                "port": 0,
                "default_charset": "8859/15",
                "max_frame_bytes": 65536,
            }
        ],
        "channels": [ch],
    }
    return config_mod.parse(yaml.safe_dump(data, allow_unicode=True), str(tmp_path / "config.yaml"))


def with_settings(cfg: config_mod.Config, **top: Any) -> config_mod.Config:
    """``cfg`` with top-level keys (workers, auth, console...) replaced, checked and built again:
    the gateway's settings are built once, when a configuration loads."""
    return config_mod.from_data({**cfg.data, **top}, cfg.file)


GatewayFactory = Callable[..., Any]


@pytest.fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    started: list[Gateway] = []

    async def factory(cfg: config_mod.Config | None = None, **channel: Any) -> Gateway:
        gw = Gateway(cfg or make_config(tmp_path, **channel))
        await gw.start()
        for ch in gw.channels.values():
            await ch.recovered()
        started.append(gw)
        return gw

    yield factory
    for gw in started:
        if gw.store.is_open:
            await gw.stop()


def mllp_port(gw: Gateway) -> int:
    return int(gw.sources["hospital"].bound_port)  # type: ignore[attr-defined]


@pytest.fixture
async def client_for() -> AsyncIterator[Callable[[Gateway], MllpClient]]:
    clients: list[MllpClient] = []

    def make(gw: Gateway) -> MllpClient:
        c = MllpClient("127.0.0.1", mllp_port(gw))
        clients.append(c)
        return c

    yield make
    for c in clients:
        await c.close()


async def wait_for(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver(["AA"])
    r.server = await asyncio.start_server(r.handle, "127.0.0.1", 0)
    yield r
    await r.close()
