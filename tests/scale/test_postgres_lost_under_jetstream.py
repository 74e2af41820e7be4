"""PostgreSQL lost under a JetStream channel: the message is kept in hand and retried locally,
spending none of JetStream's deliveries, and is delivered once the database is back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nats
import pytest
import yaml

from gateway import config as config_mod
from gateway.core.errors import StoreError
from gateway.engine.nats_channel import JetStreamChannel
from tests.conftest import FakeDestination
from tests.scale.conftest import NATS_URL, LiveNames
from tests.scale.test_connection_loss import Proxy, _port, proxied_config, proxy, send  # noqa: F401
from tests.waiting import until

pytestmark = pytest.mark.live


def _config(tmp_path: Path, live: LiveNames, port: int) -> config_mod.Config:
    data = dict(proxied_config(tmp_path, live, port).data)
    data["journal"] = live.journal()
    data["channels"][0]["destinations"][0]["retry"] = {"max_attempts": 1}
    return config_mod.parse(yaml.safe_dump(data, allow_unicode=True), str(tmp_path / "config.yaml"))


async def _redelivered(live: LiveNames) -> int:
    nc = await nats.connect(NATS_URL)
    try:
        js = nc.jetstream()
        return sum(c.num_redelivered for c in await js.consumers_info(f"{live.prefix}_IN"))
    finally:
        await nc.close()


async def test_a_database_outage_spends_no_jetstream_delivery(
    tmp_path: Path,
    live: LiveNames,
    proxy: Proxy,  # noqa: F811
    start_gateway: Any,
) -> None:
    gw = await start_gateway(_config(tmp_path, live, _port(proxy)))
    channel = gw.channels["adt"]
    assert isinstance(channel, JetStreamChannel)
    assert await send(gw, "NOPG-0001") == "AA"  # the stream has it: the sender is answered
    await until(lambda: bool(FakeDestination.instances["far"].received), 30, "first message delivered")
    await until(lambda: channel.snapshot()["in_hand"] == 0, 30, "first message acked")

    store = gw.store.pg  # the PostgreSQL store the JetStream journal holds
    store.retry_backoff = (0.05, 0.2)
    lost_before = store.lost_batches
    proxy.cut()
    assert await send(gw, "NOPG-0002") == "AA"  # journaled in JetStream, no row in PostgreSQL yet
    # The consumer holds it while the store keeps failing to reach the database, for far more
    # tries than JetStream would redeliver it if each failure were a NAK.
    await until(lambda: channel.snapshot()["in_hand"] == 1, 30, "message in hand")
    await until(
        lambda: store.lost_batches - lost_before > channel.max_deliver + 4,
        60,
        "writes failing on the cut link",
    )
    assert channel.snapshot()["in_hand"] == 1
    assert await _redelivered(live) == 0
    proxy.restore()

    far = FakeDestination.instances["far"]
    await until(
        lambda: "NOPG-0002" in {e.control_id for e, _ in far.received}, 60, "delivered after the outage"
    )

    async def sent() -> bool:
        await gw.store.flush()
        rows = await gw.store.list_messages(
            status=None, control_id="NOPG-0002", channel="adt", limit=5, before_seq=None
        )
        return [r["status"] for r in rows] == ["SENT"]

    await until(sent, 30, "stored as SENT")


async def test_store_errors_are_retried_in_hand_without_a_nak(
    tmp_path: Path,
    live: LiveNames,
    proxy: Proxy,  # noqa: F811
    start_gateway: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gw = await start_gateway(_config(tmp_path, live, _port(proxy)))
    channel = gw.channels["adt"]
    assert isinstance(channel, JetStreamChannel)
    channel.store_backoff = (0.01, 0.05)
    real_admit = channel.pg.admit
    failures = channel.max_deliver + 3

    async def flaky_admit(*args: Any, **kwargs: Any) -> Any:
        nonlocal failures
        if failures:
            failures -= 1
            raise StoreError("the store is unreachable")
        return await real_admit(*args, **kwargs)

    monkeypatch.setattr(channel.pg, "admit", flaky_admit)
    assert await send(gw, "FLAKY-0001") == "AA"
    far = FakeDestination.instances["far"]
    await until(lambda: "FLAKY-0001" in {e.control_id for e, _ in far.received}, 60, "delivered")
    assert channel.store_retries == channel.max_deliver + 3
    assert await _redelivered(live) == 0
