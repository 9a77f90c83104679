"""The serving engine the pipeline thread calls: micro-batching, warm-up, latency metrics.

Windows of several streams often become ready together; running them as one batch is
far cheaper than one call each. The pipeline thread gathers them (waiting at most
``[model] max_wait_ms`` after the first); ``features`` splits what it is given into
``max_batch`` chunks and times every call into a histogram per backend.
"""
from __future__ import annotations

import time

import numpy as np

from edge.serve.latency import LatencyHistogram


class Engine:
    """Runs a ``Backend`` for the pipeline thread. Not itself thread-safe; metrics are."""

    def __init__(self, backend, *, max_batch: int = 32):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.backend = backend
        self.max_batch = int(max_batch)
        self.label = f"{backend.key}-{backend.precision}"
        self._hist = {self.label: LatencyHistogram()}
        self.ready = False

    def features(self, windows: np.ndarray) -> np.ndarray:
        """Features ``[B, D]`` of windows ``[B, C, L]`` float32, in chunks of at most ``max_batch``."""
        self.backend.check_input(windows)
        out = []
        hist = self._hist[self.label]
        for i in range(0, len(windows), self.max_batch):
            chunk = windows[i:i + self.max_batch]
            t = time.perf_counter()
            out.append(self.backend.features(chunk))
            hist.observe(time.perf_counter() - t, windows=len(chunk))
        return out[0] if len(out) == 1 else np.concatenate(out)

    def warm_up(self, rounds: int = 3) -> float:
        """Run a few untimed batches (1 and ``max_batch`` windows) so the first real one is fast.

        ONNX Runtime and TensorRT allocate and pick kernels on first use per shape; doing
        that before the daemon reports ready keeps it out of the first window's latency.
        Returns the seconds it took.
        """
        b = self.backend
        t = time.perf_counter()
        rng = np.random.default_rng(0)
        for n in (1, self.max_batch):
            x = rng.standard_normal((n, b.channels, b.window)).astype(np.float32)
            for _ in range(rounds):
                b.features(x)
        self.ready = True
        return time.perf_counter() - t

    def latency_snapshot(self) -> dict[str, dict]:
        """``{"<backend>-<precision>": {count, sum_s, windows, buckets, p50_ms, p99_ms}}``."""
        return {label: h.snapshot() for label, h in self._hist.items()}

    def describe(self) -> dict:
        return {**self.backend.describe(), "max_batch": self.max_batch,
                "ready": self.ready}
