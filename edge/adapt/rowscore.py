"""One labelled row's scores and losses in plain Python floats: ``learn_one``'s scoring path.

Why a path of its own: at 2-64 features a numpy call costs more than its arithmetic (0.3-1
microseconds each), and scoring one row the batch way (``HeadSnapshot.predict`` then
``sample_loss``) took about a dozen of them per head. Here the champion's and the global
head's linear maps are stacked once per pair of snapshots (``Stack``; snapshots are
immutable, so a pair's stack never goes stale), one product scores both, and the
activation, the loss and the error are Python floats. The rule is the batch path's: the
one sigmoid and softmax of ``edge.adapt.activations`` (clipped at +-``CLIP``), log-loss
floored at ``metrics.EPS``, squared and absolute error averaged over outputs
(``tests/test_adapt_rowscore.py`` holds them equal).

>>> from edge.adapt.heads import HeadSnapshot
>>> snap = HeadSnapshot.from_arrays({"weight": np.eye(2, dtype=np.float32), "bias": np.zeros(2, np.float32)},
...                                 kind="linear", task="classification", version="v1")
>>> st = Stack.of(snap, snap)
>>> p, g = st.scores(np.array([2.0, 0.0], np.float32), SOFTMAX)
>>> [round(x, 3) for x in p], g is p
([0.881, 0.119], True)
>>> [round(x, 3) for x in loss_err(p, 1, SOFTMAX)]
[2.127, 1.0]
"""
from __future__ import annotations

import math

import numpy as np

from edge.adapt.activations import CLIP, binary_scores, softmax
from edge.adapt.metrics import EPS

VALUES, BINARY, SOFTMAX = 0, 1, 2


def mode_of(task: str, outputs: int) -> int:
    """``VALUES`` (regression, forecasting), ``BINARY`` (one logit) or ``SOFTMAX``."""
    if task != "classification":
        return VALUES
    return BINARY if outputs == 1 else SOFTMAX


def activate(vals: list, mode: int) -> list:
    """Scores from one row's logits: ``[1 - p, p]``, the softmax, or the values themselves."""
    if mode == BINARY:
        x = vals[0]
        p = 1.0 / (1.0 + math.exp(-(CLIP if x > CLIP else -CLIP if x < -CLIP else x)))
        return [1.0 - p, p]
    if mode == SOFTMAX:
        m = max(vals)
        e = [math.exp(v - m) for v in vals]
        s = sum(e)
        return [x / s for x in e]
    return vals


def loss_err(p: list, t, mode: int) -> tuple[float, float]:
    """``metrics.sample_loss`` of one row's scores ``p`` (a list): log-loss and 0/1 error of class
    ``t``, or squared and absolute error against the targets ``t`` (a list of floats)."""
    if mode == VALUES:
        if len(p) == 1:
            d = p[0] - t[0]
            return d * d, abs(d)
        k = len(p)
        ds = [a - b for a, b in zip(p, t)]
        return sum(d * d for d in ds) / k, sum(abs(d) for d in ds) / k
    pc = p[t]
    best = 0
    for i in range(1, len(p)):  # the first of equal maxima, as numpy's argmax
        if p[i] > p[best]:
            best = i
    return -math.log(pc if pc > EPS else EPS), 0.0 if best == t else 1.0


class Stack:
    """The champion's and the global head's linear maps as one ``[D, K]`` or ``[D, 2K]`` matrix."""

    __slots__ = ("champion", "glob", "wt", "b", "k", "same")

    def __init__(self, champion, glob, wt: np.ndarray, b: np.ndarray, k: int):
        self.champion, self.glob, self.wt, self.b, self.k = champion, glob, wt, b, k
        self.same = champion is glob

    @classmethod
    def of(cls, champion, glob) -> "Stack | None":
        """The stack of two linear snapshots (a ``HeadSnapshot`` with ``weight`` and ``bias`` only),
        else None (an MLP's or a torch module's: they score the batch way)."""
        heads = (champion,) if champion is glob else (champion, glob)
        arrays = [getattr(h, "arrays", None) for h in heads]
        if any(a is None or set(a) != {"weight", "bias"} for a in arrays):
            return None
        wt = np.ascontiguousarray(np.concatenate([a["weight"] for a in arrays]).T, np.float32)
        b = np.concatenate([a["bias"] for a in arrays]).astype(np.float32)
        return cls(champion, glob, wt, b, int(arrays[0]["weight"].shape[0]))

    def fits(self, champion, glob) -> bool:
        return self.champion is champion and self.glob is glob

    def scores(self, z: np.ndarray, mode: int) -> tuple[list, list]:
        """Both heads' scores of one row ``z [D]`` (float32): one product; the global head's are
        the champion's (the same list) when they are one snapshot."""
        v = (z @ self.wt + self.b).tolist()
        if self.same:
            p = activate(v, mode)
            return p, p
        k = self.k
        return activate(v[:k], mode), activate(v[k:], mode)

    def scores_many(self, Z: np.ndarray, classification: bool) -> tuple[np.ndarray, np.ndarray]:
        """Both heads' scores ``[n, K']`` of the rows of ``Z [n, D]``: one product (``learn_many``),
        through the batch path's activations (``edge.adapt.activations``)."""
        v = Z @ self.wt + self.b
        if self.same:
            p = _activate_many(v, classification)
            return p, p
        k = self.k
        return _activate_many(v[:, :k], classification), _activate_many(v[:, k:], classification)


def _activate_many(v: np.ndarray, classification: bool) -> np.ndarray:
    if not classification:
        return np.ascontiguousarray(v)
    return binary_scores(v) if v.shape[1] == 1 else softmax(v)
