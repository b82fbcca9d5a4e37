"""A fixed-bucket latency histogram (milliseconds in, Prometheus seconds out)."""

from __future__ import annotations

import bisect
from collections.abc import Iterable

__all__ = ["Histogram"]

BUCKETS_MS = (0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0,
              5000.0, 10000.0, 30000.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = BUCKETS_MS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value_ms: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value_ms)] += 1
        self.total += value_ms
        self.count += 1

    def lines(self, name: str, labels: str) -> Iterable[str]:
        """The Prometheus sample lines of this histogram, in seconds."""
        cumulative = 0
        sep = "," if labels else ""
        for bound, count in zip(self.buckets, self.counts, strict=False):
            cumulative += count
            yield f'{name}_bucket{{{labels}{sep}le="{bound / 1000:g}"}} {cumulative}'
        yield f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}'
        suffix = f"{{{labels}}}" if labels else ""
        yield f"{name}_sum{suffix} {self.total / 1000:.6f}"
        yield f"{name}_count{suffix} {self.count}"
