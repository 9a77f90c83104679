"""Aggregation math for fleet sync: pure functions, arrays in, arrays out.

FedBuff-style buffered asynchronous aggregation (Nguyen et al., 2022): the server
buffers deltas and applies them when ``k`` are buffered or ``t`` seconds have passed
(``should_apply``). Each delta is weighted by its sample count and down-weighted by
its staleness, the number of versions its base is behind (``staleness_weight``).
Robust rules (``aggregate_deltas(rule=...)``):

- ``clip`` (default): each delta is clipped to an L2 norm bound (a fixed one, or the
  median norm of the batch when ``clip_norm`` is 0), then the weighted mean is taken;
  a scaled malicious delta then weighs no more than an honest one;
- ``trimmed_mean``: coordinate-wise, the ``trim`` share of largest and smallest values
  is dropped before the (unweighted) mean;
- ``median``: coordinate-wise median.

>>> import numpy as np
>>> c = [Contribution(arrays={"w": np.array([1.0, 0.0])}, samples=10, staleness=0),
...      Contribution(arrays={"w": np.array([0.0, 1.0])}, samples=30, staleness=0)]
>>> aggregate_deltas(c, rule="clip", clip_norm=10.0)["w"].tolist()
[0.25, 0.75]
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RULES = ("clip", "trimmed_mean", "median")


@dataclass(frozen=True)
class Contribution:
    """One accepted delta as the aggregator sees it."""

    arrays: dict
    samples: int
    staleness: int


def staleness_weight(staleness: int, *, exponent: float = 0.5) -> float:
    """``(1 + staleness) ** -exponent``: FedBuff's polynomial staleness discount.

    >>> staleness_weight(0), staleness_weight(3)
    (1.0, 0.5)
    """
    return float((1.0 + max(0, int(staleness))) ** -exponent)


def should_apply(buffered: int, oldest_age_s: float, *, k: int, t_s: float) -> bool:
    """Apply the buffer when it holds ``k`` deltas, or when its oldest waited ``t_s`` seconds.

    >>> should_apply(3, 1.0, k=10, t_s=30.0), should_apply(3, 31.0, k=10, t_s=30.0), should_apply(0, 99.0, k=1, t_s=1.0)
    (False, True, False)
    """
    return buffered > 0 and (buffered >= k or oldest_age_s >= t_s)


def _norm(arrays: dict) -> float:
    return float(np.sqrt(sum(float(np.square(np.asarray(v, np.float64)).sum()) for v in arrays.values())))


def clip_by_norm(arrays: dict, max_norm: float) -> dict:
    """The arrays scaled down together so that their joint L2 norm is at most ``max_norm``.

    >>> clip_by_norm({"w": np.array([3.0, 4.0])}, 1.0)["w"].round(2).tolist()
    [0.6, 0.8]
    """
    n = _norm(arrays)
    f = 1.0 if n <= max_norm or n == 0 else max_norm / n
    return {k: np.asarray(v, np.float64) * f for k, v in arrays.items()}


def aggregate_deltas(contributions: list[Contribution], *, rule: str = "clip", clip_norm: float = 0.0,
                     trim: float = 0.2, staleness_exponent: float = 0.5) -> dict:
    """The aggregated delta (float32 arrays) of a non-empty batch of contributions."""
    if not contributions:
        raise ValueError("aggregate_deltas needs at least one contribution")
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; use one of {', '.join(RULES)}")
    names = list(contributions[0].arrays)
    if rule == "clip":
        bound = clip_norm if clip_norm > 0 else float(np.median([_norm(c.arrays) for c in contributions]))
        w = np.array([max(c.samples, 1) * staleness_weight(c.staleness, exponent=staleness_exponent) for c in contributions])
        w = w / w.sum()
        out = {k: np.zeros(np.shape(contributions[0].arrays[k]), np.float64) for k in names}
        for wi, c in zip(w, contributions):
            for k, v in clip_by_norm(c.arrays, bound).items():
                out[k] += wi * v
        return {k: v.astype(np.float32) for k, v in out.items()}
    out = {}
    for k in names:
        stack = np.stack([np.asarray(c.arrays[k], np.float64) for c in contributions])
        if rule == "median":
            out[k] = np.median(stack, axis=0).astype(np.float32)
        else:
            n = len(contributions)
            cut = min(int(np.floor(trim * n)), (n - 1) // 2)
            s = np.sort(stack, axis=0)
            out[k] = s[cut: n - cut].mean(axis=0).astype(np.float32)
    return out


def apply_delta(global_arrays: dict, delta: dict, *, server_lr: float = 1.0) -> dict:
    """``global + server_lr * delta``, array by array (float32).

    >>> apply_delta({"w": np.array([1.0])}, {"w": np.array([0.5])}, server_lr=2.0)["w"].tolist()
    [2.0]
    """
    return {k: (np.asarray(v, np.float32) + np.float32(server_lr) * np.asarray(delta[k], np.float32)).astype(np.float32)
            for k, v in global_arrays.items()}
