"""Self-supervised delayed labels for forecasting: the stream's own future is the target.

A forecasting head predicts, from a window's features, the next ``horizon`` samples of
the stream. Nobody has to label anything: ``horizon`` samples after the window ends,
the truth has arrived. ``ForecastTargets`` holds each window's features until then and
pairs them with the realised values, which the learner trains on like any label
(test-then-train: the serving head's forecast is scored first).

Pure: the pipeline hands it windows and samples; it returns ``(key, z, target)``
triples. Per stream, windows and samples must arrive in time order (the windower's
order); memory is bounded by ``max_windows`` per stream and by the horizon.
"""
from __future__ import annotations

import collections

import numpy as np


class ForecastTargets:
    """Pairs cached window features with the ``horizon`` samples that follow each window.

    The target is ``v[t > t_end][:horizon]`` flattened time-major: ``[horizon * C]``.

    >>> ft = ForecastTargets(horizon=2)
    >>> ft.add_window("s", t_end=1.0, z=np.zeros(3, np.float32))
    >>> ft.add_samples("s", np.array([1.0, 2.0]), np.array([[10.0], [20.0]], np.float32))
    []
    >>> [(k, y.tolist()) for k, z, y in ft.add_samples("s", np.array([3.0]), np.array([[30.0]], np.float32))]
    [('s', [20.0, 30.0])]
    """

    def __init__(self, *, horizon: int, max_windows: int = 256):
        if horizon < 1:
            raise ValueError(f"forecast horizon must be at least 1, got {horizon}")
        self.horizon = int(horizon)
        self.max_windows = int(max_windows)
        self._open: dict[object, collections.deque] = {}
        self.dropped = 0  # windows evicted before their future arrived

    def add_window(self, key, *, t_end: float, z, served=None) -> None:
        """A window has been served; its target is the ``horizon`` samples after ``t_end``."""
        q = self._open.setdefault(key, collections.deque())
        if len(q) >= self.max_windows:
            q.popleft()
            self.dropped += 1
        q.append([float(t_end), np.asarray(z, np.float32), served, []])

    def add_samples(self, key, t, v) -> list[tuple[object, np.ndarray, np.ndarray]]:
        """New samples of ``key`` (``t [n]``, ``v [n, C]``); returns the targets they complete."""
        q = self._open.get(key)
        if not q:
            return []
        t = np.asarray(t, np.float64).reshape(-1)
        v = np.asarray(v, np.float32).reshape(len(t), -1)
        done = []
        for item in q:
            need = self.horizon - sum(len(c) for c in item[3])
            if need <= 0:
                continue
            after = v[t > item[0]][:need]
            if len(after):
                item[3].append(after)
        while q and sum(len(c) for c in q[0][3]) >= self.horizon:
            t_end, z, served, chunks = q.popleft()
            done.append((key, z, np.concatenate(chunks)[: self.horizon].reshape(-1)))
        return done

    def pending(self) -> int:
        return sum(len(q) for q in self._open.values())
