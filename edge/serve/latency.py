"""Latency histograms as plain data, for ``edge.observe`` to export in Prometheus format.

Cumulative buckets (Prometheus ``le`` semantics) for the exporter, plus a bounded
window of recent samples for p50/p99, which buckets alone cannot give precisely.
Thread-safe: the pipeline thread observes, the metrics thread snapshots.
"""
from __future__ import annotations

import threading
from collections import deque

# seconds; sensor windows are served in tens of microseconds (int8) to tens of milliseconds
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class LatencyHistogram:
    """Observe durations in seconds; ``snapshot()`` returns counts, buckets, p50 and p99.

    >>> h = LatencyHistogram()
    >>> for s in (0.001, 0.002, 0.003): h.observe(s, windows=2)
    >>> snap = h.snapshot()
    >>> snap["count"], snap["windows"], round(snap["p50_ms"], 3)
    (3, 6, 2.0)
    """

    def __init__(self, buckets=BUCKETS, recent: int = 2048):
        self.bounds = tuple(buckets)
        self._counts = [0] * (len(self.bounds) + 1)
        self._recent: deque[float] = deque(maxlen=recent)
        self._sum = 0.0
        self._count = 0
        self._windows = 0
        self._lock = threading.Lock()

    def observe(self, seconds: float, *, windows: int = 1) -> None:
        i = next((k for k, b in enumerate(self.bounds) if seconds <= b), len(self.bounds))
        with self._lock:
            self._counts[i] += 1
            self._sum += seconds
            self._count += 1
            self._windows += windows
            self._recent.append(seconds)

    def snapshot(self) -> dict:
        with self._lock:
            counts, recent = list(self._counts), sorted(self._recent)
            total, count, windows = self._sum, self._count, self._windows
        cum, buckets = 0, []
        for bound, c in zip(self.bounds + (float("inf"),), counts):
            cum += c
            buckets.append(["+Inf" if bound == float("inf") else bound, cum])
        return {"count": count, "sum_s": total, "windows": windows, "buckets": buckets,
                "p50_ms": _quantile(recent, 0.50) * 1e3, "p99_ms": _quantile(recent, 0.99) * 1e3}


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[k]
