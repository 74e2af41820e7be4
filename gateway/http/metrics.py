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

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
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


_QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
CHART_KINDS = ("throughput", "latency", "depth", "errors")


def _quantile(bounds: tuple[float, ...], counts: list[int], q: float) -> float | None:
    """The ``q`` quantile of a bucketed sample, interpolated inside its bucket (None when empty)."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    running = 0
    low = 0.0
    for i, n in enumerate(counts):
        high = bounds[i] if i < len(bounds) else bounds[-1]
        if n and running + n >= rank:
            return low + (high - low) * (rank - running) / n
        running += n
        low = high
    return bounds[-1]


def _sample(data: Mapping[str, Any], at: float) -> dict[str, Any]:
    """The figures the console plots, cut from one metrics gathering."""
    received: dict[str, int] = {}
    for (channel, _type), n in data.get("received", {}).items():
        received[channel] = received.get(channel, 0) + int(n)
    statuses: dict[str, dict[str, int]] = {}
    for channel, types in data.get("by_type", {}).items():
        counts = statuses.setdefault(channel, {})
        for per_status in types.values():
            for status, n in per_status.items():
                counts[status] = counts.get(status, 0) + int(n)
    latency: dict[str, tuple[tuple[float, ...], list[int]]] = {}
    for source, hist in data.get("ack_latency", {}).items():
        if isinstance(hist, Histogram):
            latency[source] = (hist.bounds, list(hist.counts))
    return {
        "at": at,
        "received": received,
        "statuses": statuses,
        "destinations": {d: dict(s) for d, s in data.get("destinations", {}).items()},
        "rejected": {s: int(c.get("rejected", 0)) for s, c in data.get("sources", {}).items()},
        "latency": latency,
    }


class History:
    """Recent samples of the metrics source, for the console's plots.

    A sample is taken when a plot is asked for, at most once per ``interval`` seconds: nothing
    runs while no one watches, and every watcher shares the same samples.
    """

    def __init__(self, source: MetricsSource, *, size: int = 180, interval: float = 1.0) -> None:
        self.source = source
        self.size = size
        self.interval = interval
        self.samples: list[dict[str, Any]] = []
        self._lock = asyncio.Lock()

    async def sample(self, now: float | None = None) -> None:
        async with self._lock:
            at = time.time() if now is None else now
            if self.samples and at - self.samples[-1]["at"] < self.interval:
                return
            self.samples.append(_sample(await self.source(), at))
            del self.samples[: -self.size]

    def series(self, kind: str, channel: str | None = None, destinations: Sequence[str] = ()) -> Series:
        """Labels (clock times) and named value lists for one kind of plot; ``channel`` keeps that
        channel's lines and those of ``destinations`` (its own)."""
        pairs = list(zip(self.samples, self.samples[1:], strict=False))
        labels = [time.strftime("%H:%M:%S", time.localtime(b["at"])) for _, b in pairs]
        out: dict[str, list[float | None]] = {}

        def keep(name: str) -> bool:
            return channel is None or name == channel

        def keep_dest(name: str) -> bool:
            return channel is None or name in destinations

        def rate(values: Callable[[dict[str, Any]], Mapping[str, int]], suffix: str, wanted: Any) -> None:
            names = sorted({n for s in self.samples for n in values(s)})
            for name in filter(wanted, names):
                out[f"{name} {suffix}"] = [
                    max(values(b).get(name, 0) - values(a).get(name, 0), 0) / max(b["at"] - a["at"], 1e-6)
                    for a, b in pairs
                ]

        def gauge(values: Callable[[dict[str, Any]], Mapping[str, int]], suffix: str, wanted: Any) -> None:
            names = sorted({n for s in self.samples for n in values(s)})
            for name in filter(wanted, names):
                out[f"{name} {suffix}"] = [float(values(b).get(name, 0)) for _, b in pairs]

        def status_sum(*statuses: str) -> Callable[[dict[str, Any]], Mapping[str, int]]:
            def pick(sample: dict[str, Any]) -> Mapping[str, int]:
                return {
                    ch: sum(counts.get(s, 0) for s in statuses)
                    for ch, counts in sample["statuses"].items()
                    if not ch.startswith("source:")
                }

            return pick

        def dest_sum(*statuses: str) -> Callable[[dict[str, Any]], Mapping[str, int]]:
            def pick(sample: dict[str, Any]) -> Mapping[str, int]:
                return {d: sum(c.get(s, 0) for s in statuses) for d, c in sample["destinations"].items()}

            return pick

        if kind == "throughput":
            rate(lambda s: s["received"], "in/s", keep)
            rate(status_sum("SENT"), "out/s", keep)
            rate(dest_sum("SENT"), "→ sent/s", keep_dest)
        elif kind == "depth":
            gauge(status_sum("RECEIVED", "TRANSFORMED", "QUEUED"), "queue", keep)
            gauge(dest_sum("QUEUED", "ERROR"), "→ waiting", keep_dest)
        elif kind == "errors":
            gauge(status_sum("ERROR"), "failed", keep)
            gauge(status_sum("DEAD"), "dead", keep)
            gauge(dest_sum("ERROR", "DEAD"), "→ failing", keep_dest)
            if channel is None:
                gauge(lambda s: s["rejected"], "rejected at intake", lambda _n: True)
        elif kind == "latency":
            sources = sorted({n for s in self.samples for n in s["latency"]})
            for source in sources:
                for label, q in _QUANTILES:
                    values: list[float | None] = []
                    for a, b in pairs:
                        if source not in b["latency"]:
                            values.append(None)
                            continue
                        bounds, after = b["latency"][source]
                        before = a["latency"].get(source, (bounds, [0] * len(after)))[1]
                        found = _quantile(bounds, [y - x for x, y in zip(before, after, strict=True)], q)
                        values.append(None if found is None else round(found * 1000, 3))
                    out[f"{source} {label} ms"] = values
        else:
            raise ValueError(f"unknown chart {kind!r}; one of {', '.join(CHART_KINDS)}")
        return labels, out


Series = tuple[list[str], dict[str, list[float | None]]]
