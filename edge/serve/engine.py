"""The serving engine the pipeline thread calls: micro-batching, warm-up, latency metrics.

Windows of several streams often become ready together; running them as one batch is
far cheaper than one call each. The pipeline thread gathers them (waiting at most
``[model] max_wait_ms`` after the first); ``features`` splits what it is given into
``max_batch`` chunks and times every call into a histogram per backend.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from edge.serve.latency import LatencyHistogram

log = logging.getLogger("edge.serve")


class Engine:
    """Runs a ``Backend`` for the pipeline thread. Not itself thread-safe; metrics are.

    ``swap`` replaces the backend (a re-checked serving choice, ``edge.serve.recheck``)
    from another thread: backend, label and histogram are one tuple, assigned at once and
    read once per ``features`` call, so a batch is served wholly by one backend.
    """

    def __init__(self, backend, *, max_batch: int = 32):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = int(max_batch)
        self._hist: dict[str, LatencyHistogram] = {}
        self._serving = self._entry(backend)
        self.ready = False
        self.last_call = time.monotonic()  # when a batch was last served: the re-check waits for idle
        self.rechecker = None

    def _entry(self, backend) -> tuple:
        label = f"{backend.key}-{backend.precision}"
        hist = self._hist.setdefault(label, LatencyHistogram())
        return backend, label, hist

    @property
    def backend(self):
        return self._serving[0]

    @property
    def label(self) -> str:
        return self._serving[1]

    def swap(self, backend) -> None:
        """Serve ``backend`` from the next ``features`` call on (any thread may call this)."""
        old = self._serving[0]
        self._serving = self._entry(backend)  # one assignment: atomic for the pipeline thread
        log.info("backbone switched: %s %s -> %s %s", old.key, old.precision, backend.key, backend.precision)

    def features(self, windows: np.ndarray) -> np.ndarray:
        """Features ``[B, D]`` of windows ``[B, C, L]`` float32, in chunks of at most ``max_batch``."""
        backend, _, hist = self._serving
        backend.check_input(windows)
        out = []
        for i in range(0, len(windows), self.max_batch):
            chunk = windows[i:i + self.max_batch]
            t = time.perf_counter()
            out.append(backend.features(chunk))
            hist.observe(time.perf_counter() - t, windows=len(chunk))
        self.last_call = time.monotonic()
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
        plan = getattr(b, "recheck_plan", None)  # served from an uncertain choice: re-check it when idle
        if plan is not None and self.rechecker is None:
            from edge.serve.recheck import Rechecker

            self.rechecker = Rechecker(self, plan)
            self.rechecker.start()
        return time.perf_counter() - t

    def latency_snapshot(self) -> dict[str, dict]:
        """``{"<backend>-<precision>": {count, sum_s, windows, buckets, p50_ms, p99_ms}}``."""
        return {label: h.snapshot() for label, h in self._hist.items()}

    def describe(self) -> dict:
        out = {**self.backend.describe(), "max_batch": self.max_batch, "ready": self.ready}
        if self.rechecker is not None:  # an uncertain choice: "waiting for an idle device" or what the re-check did
            out["choice_recheck"] = self.rechecker.outcome or "waiting for an idle device"
        return out
