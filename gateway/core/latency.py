"""A fixed-bucket latency histogram cheap enough for the hot path (one bisect, two adds).

Kept free of any metrics library so that connectors can record into it; the HTTP layer
exports it in the Prometheus format at scrape time.
"""

from __future__ import annotations

from bisect import bisect_left

# Seconds: ACKs are expected in the low milliseconds, retries and stalls in seconds.
DEFAULT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = DEFAULT_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, cumulative count) pairs, "+Inf" last, as Prometheus exposes them."""
        out = []
        running = 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out
