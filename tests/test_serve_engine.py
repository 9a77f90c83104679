"""The engine: chunked batches, bounded micro-batching wait, warm-up, latency metrics."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edge.serve.backends.base import Backend
from edge.serve.engine import Engine
from edge.serve.latency import LatencyHistogram


class RecordingBackend(Backend):
    """In-memory backend: features are channel means; remembers every batch size."""

    key = "fake"
    precisions = ("fp32",)

    def __init__(self):
        super().__init__(precision="fp32", channels=2, window=4, feature_size=2)
        self.calls: list[int] = []

    def _run(self, x):
        self.calls.append(len(x))
        return x.mean(axis=2)


def _windows(n):
    return np.arange(n * 8, dtype=np.float32).reshape(n, 2, 4)


def test_features_are_served_in_chunks_of_at_most_max_batch():
    b = RecordingBackend()
    engine = Engine(b, max_batch=4)

    z = engine.features(_windows(10))

    assert b.calls == [4, 4, 2]
    np.testing.assert_array_equal(z, _windows(10).mean(axis=2))


def test_latency_snapshot_counts_calls_and_windows_per_backend():
    engine = Engine(RecordingBackend(), max_batch=4)
    engine.features(_windows(10))

    snap = engine.latency_snapshot()

    assert list(snap) == ["fake-fp32"]
    s = snap["fake-fp32"]
    assert s["count"] == 3 and s["windows"] == 10 and s["buckets"][-1] == ["+Inf", 3]
    assert 0 <= s["p50_ms"] <= s["p99_ms"]


def test_bad_windows_are_rejected_before_any_chunk_runs():
    b = RecordingBackend()
    with pytest.raises(ValueError, match=r"\[B, 2, 4\]"):
        Engine(b).features(np.zeros((3, 2, 5), np.float32))
    assert b.calls == []


def test_warm_up_runs_untimed_batches_and_marks_ready():
    b = RecordingBackend()
    engine = Engine(b, max_batch=8)

    engine.warm_up(rounds=2)

    assert engine.ready and b.calls == [1, 1, 8, 8]
    assert engine.latency_snapshot()["fake-fp32"]["count"] == 0


def test_histogram_buckets_are_cumulative():
    h = LatencyHistogram(buckets=(0.001, 0.01))
    for s in (0.0005, 0.005, 0.005, 1.0):
        h.observe(s)

    assert h.snapshot()["buckets"] == [[0.001, 1], [0.01, 3], ["+Inf", 4]]


def test_engine_rejects_nonsense_settings():
    with pytest.raises(ValueError):
        Engine(RecordingBackend(), max_batch=0)


@pytest.mark.parametrize("module", ["edge.serve.latency", "edge.serve.choice", "edge.serve.testing"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    failed, _ = doctest.testmod(importlib.import_module(module))

    assert failed == 0
