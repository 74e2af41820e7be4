"""/metrics: the Prometheus exposition, read back with the client library's own parser."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from gateway.core.latency import Histogram
from tests.conftest import FakeDestination, GatewayFactory, wait_for
from tests.messages import adt
from tests.ops.conftest import OPERATOR, base_url, bearer, ops_config


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_count_per_channel_type_and_status(
    tmp_path: Path, start_gateway: GatewayFactory, client_for: Any, http: aiohttp.ClientSession
) -> None:
    cfg = ops_config(tmp_path)
    cfg.data["channels"][0]["destinations"][0]["plan"] = ["ok", "ok", "permanent", "ok"]
    gw = await start_gateway(cfg)
    client = client_for(gw)
    for i, trigger in enumerate(["A01", "A01", "A02", "A03"]):
        await client.send(adt(f"MET{i}", trigger=trigger, patient="300001"))
    await client.send(b"MSH|^~\\&|nothing")
    await wait_for(lambda: FakeDestination.instances["far"].attempts >= 4)
    async with http.get(base_url(gw) + "/metrics", headers=bearer(OPERATOR)) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    s = _samples(text)
    assert s[("passerelle_messages_received_total", (("channel", "adt"), ("type", "ADT^A01")))] == 2
    assert s[("passerelle_messages_received_total", (("channel", "adt"), ("type", "ADT^A02")))] == 1
    assert s[("passerelle_messages_acked_total", (("source", "hospital"),))] == 4
    assert s[("passerelle_messages_rejected_total", (("source", "hospital"),))] == 1
    assert s[("passerelle_messages", (("channel", "adt"), ("status", "DEAD"), ("type", "ADT^A02")))] == 1
    assert s[("passerelle_messages", (("channel", "adt"), ("status", "SENT"), ("type", "ADT^A01")))] == 2
    assert s[("passerelle_ack_latency_seconds_count", (("source", "hospital"),))] == 5
    assert s[("passerelle_ack_latency_seconds_bucket", (("le", "+Inf"), ("source", "hospital")))] == 5
    assert s[("passerelle_queue_depth", (("channel", "adt"),))] == 0
    assert s[("passerelle_ready", (("check", "store"),))] == 1
    assert ("passerelle_unmapped_messages_total", (("channel", "adt"),)) in s
    assert s[("passerelle_destination_errors_total", (("channel", "adt"), ("destination", "far")))] >= 1


def test_histogram_buckets_are_cumulative() -> None:
    h = Histogram((0.01, 0.1))
    for v in (0.001, 0.05, 0.05, 3.0):
        h.observe(v)
    assert h.cumulative() == [("0.01", 1), ("0.1", 3), ("+Inf", 4)]
    assert h.count == 4 and abs(h.sum - 3.101) < 1e-9
