"""Where the shadow test taps the serving path, without a change to the pipeline.

The pipeline's server calls ``features(x)`` once per batch and then ``on_window`` once per
window of that batch, in order, on the pipeline thread (``edge.pipeline.server`` and
``loop._serve``). ``ShadowTap`` wraps both: ``features`` keeps a reference to the batch
and ``on_window`` pairs the ``i``-th call with ``x[i]``, so the shadow gets each window's
samples beside the current backbone's features of it and the scores the current model
published. ``on_label`` is passed through
the same way. With no shadow running (``sink`` None) the tap costs one attribute read
per window; the sink is swapped by one reference assignment (atomic).
"""
from __future__ import annotations

from typing import Callable


class ShadowTap:
    """``features`` / ``on_window`` / ``on_label`` for ``build_pipeline``, each calling the wrapped one."""

    def __init__(self, features: Callable, on_window: Callable | None, on_label: Callable | None):
        self._features, self._on_window, self._on_label = features, on_window, on_label
        self._x = None
        self._i = 0
        self.sink = None  # a ``Shadow`` while one runs

    def features(self, x):
        z = self._features(x)
        self._x, self._i = (x if self.sink is not None else None), 0
        return z

    def on_window(self, key, t0: float, t1: float, z, scores) -> None:
        i, x, sink = self._i, self._x, self.sink
        self._i = i + 1
        if sink is not None and x is not None and i < len(x):
            sink.offer_window(key, t0, t1, x[i], z, scores)
        if self._on_window is not None:
            self._on_window(key, t0, t1, z, scores)

    def on_label(self, key, t: float, value) -> None:
        sink = self.sink
        if sink is not None:
            sink.offer_label(key, t, value)
        if self._on_label is not None:
            self._on_label(key, t, value)
