"""Histograms of durations, cheap enough for a hot path: an observation is a bisect and two
additions, no lock (one gevent hub). :mod:`kvgevent.server.metrics` exports them in the
Prometheus format at scrape time; nothing here knows Prometheus. Pure: no I/O."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
"""Upper bounds, in seconds, from 100 µs (a batch of a few requests) to 2.5 s (a stuck disk)."""

SLOW_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)
"""Upper bounds, in seconds, for things that take long (a compaction)."""


class Timings:
    """Counts of durations per bucket (``le`` bounds), their sum and count, per label value."""

    __slots__ = ("bounds", "series")

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        # label value -> [count per bucket (the last one: above every bound)..., sum]
        self.series: dict[str, list[float]] = {}

    def observe(self, seconds: float, label: str = "") -> None:
        series = self.series.get(label)
        if series is None:
            series = self.series[label] = [0] * (len(self.bounds) + 2)
        series[bisect_left(self.bounds, seconds)] += 1
        series[-1] += seconds

    def cumulative(self, label: str) -> tuple[list[tuple[str, float]], float]:
        """The Prometheus view of one series: (``le``, cumulative count) pairs, ``+Inf`` last,
        and the sum of the durations."""
        series = self.series[label]
        buckets, total = [], 0.0
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), series[:-1], strict=True):
            total += count
            buckets.append((bound, total))
        return buckets, series[-1]
