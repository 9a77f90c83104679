"""The trivial reference: the running mean (regression) or the class prior (classification).

Do no harm: a learned head must beat *something that learns nothing about the
inputs*. The reference predicts the running mean of the targets, or the running class
frequencies (with one pseudo-count per class, so no class gets probability zero). It
is a linear head with zero weights, so it can be served as a ``HeadSnapshot`` like any
other head. Pure: values in, values out.

Where the targets are standardised online before the learner sees them (the library's
``scale`` on a regression, ``edge.learning``), ``pin_zero()`` makes the reference predict 0
in those units, served and scored: served, that is the raw running mean of the targets
read back (the scaler's mean is the exact running mean), where a running mean of the
standardised targets, read back by moving statistics, is not, and lost 0.5-3% to it on
no-signal streams (issue 18). Scored at 0 in units whose statistics already include the
label (a batch's labels, for ``learn_many``), it is credited with a little of the label:
on ChickWeights' trending target learn_many(32) serves it much longer (BENCHMARKS.md,
"Serving on evidence"). Scoring only the served value at 0 but the running mean
otherwise, or the raw mean read in the label's units, measured worse (same section).
"""
from __future__ import annotations

import math

import numpy as np

from edge.adapt.heads import HeadSnapshot


class Reference:
    """Running mean of the targets, or class prior; ``scores()`` is its prediction.

    >>> r = Reference(task="classification", outputs=2)
    >>> for c in (0, 1, 1, 1):
    ...     r.learn_one(c)
    >>> [round(float(p), 3) for p in r.scores()]
    [0.333, 0.667]
    """

    def __init__(self, *, task: str, outputs: int, in_features: int = 0):
        self.task = task
        self.outputs = int(outputs)
        self.in_features = int(in_features)
        self.classification = task == "classification"
        size = 2 if self.classification and self.outputs == 1 else self.outputs
        self.counts = np.ones(size, np.float64) if self.classification else None
        self.mean = None if self.classification else np.zeros(self.outputs, np.float64)
        self.n = 0
        self.pinned = False  # a regression reference that stays at 0 (pin_zero)

    def pin_zero(self) -> None:
        """Predict 0 from now on, learning nothing but the count (a regression in online-standardised
        units: module docstring)."""
        if self.classification:
            raise ValueError("pin_zero is for a regression reference; a class prior has no standard units")
        self.pinned = True
        self.mean[:] = 0.0

    def served(self) -> np.ndarray:
        """What the reference serves: its scores (0 when pinned)."""
        return self.scores()

    def learn_one(self, y) -> None:
        self.n += 1
        if self.classification:
            self.counts[int(y)] += 1.0
        else:
            if not self.pinned:
                self.mean += (np.asarray(y, np.float64).reshape(-1) - self.mean) / self.n

    def test_then_learn(self, y) -> tuple[float, float]:
        """``(loss, error)`` of the current prediction for ``y`` (as ``sample_loss``), then learn
        ``y``: the per-label path, in plain floats where it can (it runs on every label)."""
        if self.classification:
            c, counts = int(y), self.counts
            cs = counts.tolist()  # whole-number counts: the sum is exact in any order
            best = 0
            for i in range(1, len(cs)):  # the first of equal maxima, as argmax
                if cs[i] > cs[best]:
                    best = i
            p = cs[c] / sum(cs)
            counts[c] += 1.0
            self.n += 1
            return -math.log(max(p, 1e-7)), 0.0 if best == c else 1.0
        if self.outputs == 1:
            t = float(np.asarray(y).reshape(-1)[0])
            m = float(self.mean[0])
            d = m - t
            self.n += 1
            if not self.pinned:
                self.mean[0] = m + (t - m) / self.n
            return d * d, abs(d)
        t = np.asarray(y, np.float64).reshape(-1)
        d = self.mean - t
        self.learn_one(t)
        return float(np.mean(d * d)), float(np.mean(np.abs(d)))

    def learn_many(self, Y) -> np.ndarray:
        """Learn a batch row by row (vectorised); returns each row's scores *before* it was learned."""
        if self.classification:
            onehot = np.zeros((len(Y), len(self.counts)))
            onehot[np.arange(len(Y)), np.asarray(Y, np.int64)] = 1.0
            before = self.counts + np.cumsum(onehot, 0) - onehot
            self.counts += onehot.sum(0)
            self.n += len(Y)
            return before / before.sum(1, keepdims=True)
        Y = np.asarray(Y, np.float64).reshape(len(Y), -1)
        if self.pinned:
            self.n += len(Y)
            return np.zeros_like(Y)
        k = np.arange(len(Y))[:, None]
        sums = self.mean * self.n + np.cumsum(Y, 0) - Y
        before = np.where(self.n + k > 0, sums / np.maximum(self.n + k, 1), 0.0)
        self.n += len(Y)
        self.mean[:] = (sums[-1] + Y[-1]) / self.n
        return before

    def scores(self) -> np.ndarray:
        if self.classification:
            return self.counts / self.counts.sum()
        return self.mean.copy()

    def snapshot(self, version: str = "reference") -> HeadSnapshot:
        """The reference as a servable head (zero weights, the mean or log-prior as bias)."""
        if self.classification:
            p = self.scores()
            bias = np.log(p[1:2] / p[0:1]) if self.outputs == 1 else np.log(p)
        else:
            bias = self.served()
        w = np.zeros((self.outputs, self.in_features), np.float32)
        return HeadSnapshot.from_arrays({"weight": w, "bias": bias}, kind="linear", task=self.task, version=version)

    def state_dict(self) -> dict:
        return {"n": self.n, "stat": (self.counts if self.classification else self.mean).copy()}

    def load_state_dict(self, s: dict) -> None:
        stat = np.asarray(s["stat"], np.float64)
        dst = self.counts if self.classification else self.mean
        if stat.shape != dst.shape:
            raise ValueError(f"reference state has shape {stat.shape}, expected {dst.shape}")
        dst[...] = 0.0 if self.pinned else stat  # pinned: 0, whatever an older state held
        self.n = int(s["n"])
