"""/metrics: the Prometheus exposition, built at scrape time from what the main process knows.

Workers run in other processes, so nothing here counts in a process-global registry. Each
figure comes from the one place that sees every process:
- the intake (main process only): messages received per channel and type, ACKs, rejections,
  and the ACK latency histogram measured by the sources;
- the message store, whose single writer is the main process (workers send their trace writes
  to it): messages per channel, type and status (ERROR = failed, DEAD = dead), the backlog
  (queue depth), and deliveries per destination and status;
- the channel snapshots the workers report over their links (summed per channel): unmapped
  content and destination errors.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from gateway.core.latency import Histogram

MetricsSource = Callable[[], Awaitable[Mapping[str, Any]]]
METRICS: web.AppKey[MetricsSource] = web.AppKey("metrics", MetricsSource)  # type: ignore[arg-type]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_BACKLOG = ("RECEIVED", "TRANSFORMED", "QUEUED")


class _Snapshot(Collector):
    def __init__(self, data: Mapping[str, Any]) -> None:
        self.data = data

    def collect(self) -> Iterator[Metric]:
        data = self.data
        received = CounterMetricFamily(
            "passerelle_messages_received",
            "Messages received, per channel and type",
            labels=["channel", "type"],
        )
        for (channel, type_), n in sorted(data.get("received", {}).items()):
            received.add_metric([channel, type_], n)
        yield received

        acked = CounterMetricFamily(
            "passerelle_messages_acked", "Positive ACKs sent, per source", labels=["source"]
        )
        rejected = CounterMetricFamily(
            "passerelle_messages_rejected", "Frames answered AR/AE at intake, per source", labels=["source"]
        )
        for source, counts in sorted(data.get("sources", {}).items()):
            acked.add_metric([source], counts.get("acked", 0))
            rejected.add_metric([source], counts.get("rejected", 0))
        yield acked
        yield rejected

        stored = GaugeMetricFamily(
            "passerelle_messages",
            "Stored messages per channel, type and status (ERROR: failed, DEAD: dead letters)",
            labels=["channel", "type", "status"],
        )
        depth = GaugeMetricFamily(
            "passerelle_queue_depth",
            "Messages received but not yet finished, per channel",
            labels=["channel"],
        )
        for channel, types in sorted(data.get("by_type", {}).items()):
            backlog = 0
            for type_, statuses in sorted(types.items()):
                for status, n in sorted(statuses.items()):
                    stored.add_metric([channel, type_, status], n)
                    if status in _BACKLOG:
                        backlog += n
            depth.add_metric([channel], backlog)
        yield stored
        yield depth

        deliveries = GaugeMetricFamily(
            "passerelle_deliveries", "Deliveries per destination and status", labels=["destination", "status"]
        )
        for dest, statuses in sorted(data.get("destinations", {}).items()):
            for status, n in sorted(statuses.items()):
                deliveries.add_metric([dest, status], n)
        yield deliveries

        unmapped = CounterMetricFamily(
            "passerelle_unmapped_messages",
            "Messages that carried content no mapping read, per channel",
            labels=["channel"],
        )
        dest_errors = CounterMetricFamily(
            "passerelle_destination_errors",
            "Failed delivery attempts, per channel and destination",
            labels=["channel", "destination"],
        )
        in_memory = GaugeMetricFamily(
            "passerelle_in_memory", "Messages held in memory by a channel's lanes", labels=["channel"]
        )
        for snap in data.get("channels", ()):
            name = str(snap.get("name"))
            unmapped.add_metric([name], int(snap.get("counters", {}).get("unmapped", 0)))
            in_memory.add_metric([name], int(snap.get("in_memory", 0)))
            for dest in snap.get("destinations", ()):
                dest_errors.add_metric([name, str(dest["name"])], int(dest.get("errors", 0)))
        yield unmapped
        yield dest_errors
        yield in_memory

        latency = HistogramMetricFamily(
            "passerelle_ack_latency_seconds", "Frame read to ACK written, per source", labels=["source"]
        )
        for source, hist in sorted(data.get("ack_latency", {}).items()):
            assert isinstance(hist, Histogram)
            latency.add_metric([source], hist.cumulative(), hist.sum)
        yield latency

        ready = GaugeMetricFamily("passerelle_ready", "1 when a readiness check passes", labels=["check"])
        for check, result in sorted(data.get("ready", {}).items()):
            ready.add_metric([check], 1 if result.get("ok") else 0)
        yield ready

        queued = GaugeMetricFamily("passerelle_journal_queued_writes", "Writes waiting for the next commit")
        queued.add_metric([], int(data.get("journal", {}).get("queued_writes", 0)))
        yield queued


def exposition(data: Mapping[str, Any]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(data))
    return generate_latest(registry)


async def metrics_handler(request: web.Request) -> web.Response:
    source = request.app.get(METRICS)
    data = await source() if source is not None else {}
    return web.Response(body=exposition(data), headers={"Content-Type": CONTENT_TYPE})


def add_metrics_route(app: web.Application, source: MetricsSource | None) -> None:
    if source is not None:
        app[METRICS] = source
    app.router.add_get("/metrics", metrics_handler)
