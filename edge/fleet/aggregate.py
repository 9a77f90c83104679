"""Aggregation math for fleet sync: pure functions, arrays in, arrays out.

FedBuff-style buffered asynchronous aggregation (Nguyen et al., 2022): the server
buffers deltas and applies them when ``k`` are buffered or ``t`` seconds have passed
(``should_apply``). Each delta is weighted by its sample count and down-weighted by
its staleness, the number of versions its base is behind (``staleness_weight``).

Bounded influence (docs/TRUST.md "Bounded influence in aggregation"). Whatever a
validly signed device sends, under every rule:

1. its deltas in one batch are first summed into one contribution (``merge_by_device``),
   so sending many deltas buys no more than sending one (BASGD's per-worker buffers,
   Yang & Li 2023, are the same idea);
2. its weight is ``staleness_weight * min(samples, max_samples, samples_ratio * m)``
   (``capped_weight``), where ``m`` is the typical device's sample count: the
   fleet's reference (carried from version to version) or, for the first version,
   the median over the batch's distinct devices;
3. under ``clip`` (default) its contribution is clipped to ``tau``, which no member of
   the batch sets: ``clip_norm`` when fixed, else the fleet's reference norm carried
   from the previous version, else (first version only) the median norm over distinct
   devices. The reference for the next version is the median over distinct devices,
   moved at most a factor ``growth`` per version (``next_reference``).

So device ``i``'s share of a version's step has L2 norm at most
``server_lr * tau * a_i / sum_j a_j`` (``a`` the capped weights), and removing it
changes the step by at most twice that; ``a_i <= samples_ratio * m``. Centered
clipping (Karimireddy et al., 2021) takes the same history-based radius; its centre
(the previous step) is left out because buffered, stale, sparse top-k deltas are far
from the previous step, so centring drags honest steps toward it.

Rules (``aggregate(rule=...)``), each after the per-device merge:

- ``clip`` (default): the weighted mean of the clipped contributions;
- ``trimmed_mean``: coordinate-wise, the ``trim`` share of largest and smallest values
  is dropped before the (unweighted) mean;
- ``median``: coordinate-wise median.

>>> import numpy as np
>>> c = [Contribution(arrays={"w": np.array([1.0, 0.0])}, samples=10, staleness=0),
...      Contribution(arrays={"w": np.array([0.0, 1.0])}, samples=30, staleness=0)]
>>> aggregate_deltas(c, rule="clip", clip_norm=10.0, samples_ratio=2.0)["w"].tolist()
[0.25, 0.75]
>>> aggregate_deltas(c, rule="clip", clip_norm=10.0)["w"].tolist()  # default: none weighs more than the typical device
[0.3333333432674408, 0.6666666865348816]
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RULES = ("clip", "trimmed_mean", "median")


@dataclass(frozen=True)
class Contribution:
    """One accepted delta as the aggregator sees it; ``node`` None: a device of its own."""

    arrays: dict
    samples: int
    staleness: int
    node: str | None = None


@dataclass(frozen=True)
class Reference:
    """What the fleet's accepted history says a typical device sends (0: no history yet).

    Carried from version to version in the signed global head's header metrics."""

    norm: float = 0.0
    samples: float = 0.0


@dataclass(frozen=True)
class Bounds:
    """The server's influence bounds ([server] max_samples, samples_ratio, reference_growth, clip_norm)."""

    max_samples: int = 10_000
    samples_ratio: float = 1.0
    growth: float = 1.25
    clip_norm: float = 0.0


@dataclass(frozen=True)
class Aggregate:
    """A batch's aggregated delta and what bounded it.

    ``shares``: per device (merged), its part of ``delta`` before ``server_lr`` (clip
    rule only: they sum to ``delta``); ``weights``: its capped, normalised weight."""

    delta: dict
    shares: dict
    weights: dict
    tau: float
    weight_cap: float
    reference: Reference
    devices: int


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


def merge_by_device(contributions: list[Contribution]) -> list[Contribution]:
    """One contribution per device: its deltas summed (they are successive steps), their
    samples summed, the largest staleness (the least weight); order of first appearance.

    >>> m = merge_by_device([Contribution({"w": np.array([1.0])}, 5, 0, "a"), Contribution({"w": np.array([2.0])}, 7, 2, "a"),
    ...                      Contribution({"w": np.array([4.0])}, 1, 0, "b")])
    >>> [(c.node, c.arrays["w"].tolist(), c.samples, c.staleness) for c in m]
    [('a', [3.0], 12, 2), ('b', [4.0], 1, 0)]
    """
    out: dict = {}
    for i, c in enumerate(contributions):
        key = ("node", c.node) if c.node is not None else ("anon", i)
        prev = out.get(key)
        if prev is None:
            out[key] = Contribution({k: np.array(v, np.float64) for k, v in c.arrays.items()}, int(c.samples),
                                    int(c.staleness), c.node)
        else:
            for k, v in c.arrays.items():  # in place: the arrays are this function's own float64 copies
                prev.arrays[k] += v
            out[key] = Contribution(prev.arrays, prev.samples + int(c.samples), max(prev.staleness, int(c.staleness)), c.node)
    return list(out.values())


def _claims(merged: list[Contribution], max_samples: int) -> np.ndarray:
    return np.array([min(max(int(c.samples), 1), max_samples) for c in merged], np.float64)


def weight_cap(typical: float, bounds: Bounds) -> float:
    """The most samples any device is weighted by: ``min(max_samples, samples_ratio * typical)``.

    >>> weight_cap(20, Bounds()), weight_cap(20, Bounds(samples_ratio=2.0)), weight_cap(1e12, Bounds())
    (20.0, 40.0, 10000.0)
    """
    return min(float(bounds.max_samples), bounds.samples_ratio * max(float(typical), 1.0))


def capped_weight(samples: int, staleness: int, *, typical: float, bounds: Bounds, exponent: float = 0.5) -> float:
    """``staleness_weight * min(samples, weight_cap)`` (samples at least 1).

    >>> capped_weight(2**62, 0, typical=20, bounds=Bounds()), capped_weight(10, 3, typical=20, bounds=Bounds())
    (20.0, 5.0)
    """
    return staleness_weight(staleness, exponent=exponent) * min(float(max(int(samples), 1)), weight_cap(typical, bounds))


def next_reference(prev: Reference, norms: list[float], samples: list[float], *, growth: float) -> Reference:
    """The reference for the next version: the median over distinct devices, moved at most
    a factor ``growth`` from ``prev`` (where ``prev`` has a value), so no batch sets it.

    >>> next_reference(Reference(1.0, 10.0), [100.0, 100.0, 100.0], [1e9], growth=1.25)
    Reference(norm=1.25, samples=12.5)
    >>> next_reference(Reference(), [1.0, 2.0, 3.0], [10.0, 20.0], growth=1.25)
    Reference(norm=2.0, samples=15.0)
    """
    def step(p: float, values: list[float]) -> float:
        if not values:
            return p
        m = float(np.median(values))
        return m if p <= 0 else float(np.clip(m, p / growth, p * growth))

    return Reference(norm=step(prev.norm, norms), samples=step(prev.samples, samples))


def aggregate(contributions: list[Contribution], *, rule: str = "clip", reference: Reference = Reference(),
              bounds: Bounds = Bounds(), trim: float = 0.2, staleness_exponent: float = 0.5) -> Aggregate:
    """The aggregated delta (float32 arrays) of a non-empty batch, with what bounded it."""
    if not contributions:
        raise ValueError("aggregate needs at least one contribution")
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; use one of {', '.join(RULES)}")
    merged = merge_by_device(contributions)
    names = list(merged[0].arrays)
    norms = [_norm(c.arrays) for c in merged]
    claims = _claims(merged, bounds.max_samples)
    # first version (no history): the median over distinct devices, which a minority of them cannot move
    typical = reference.samples if reference.samples > 0 else float(np.median(claims))
    tau = bounds.clip_norm if bounds.clip_norm > 0 else reference.norm if reference.norm > 0 else float(np.median(norms))
    a = np.array([capped_weight(c.samples, c.staleness, typical=typical, bounds=bounds, exponent=staleness_exponent)
                  for c in merged])
    w = a / a.sum()
    keys = [c.node if c.node is not None else f"#{i}" for i, c in enumerate(merged)]
    nxt = next_reference(reference, norms, list(claims), growth=bounds.growth)
    shares: dict = {}
    if rule == "clip":
        out = {k: np.zeros(np.shape(merged[0].arrays[k]), np.float64) for k in names}
        for key, wi, c, n in zip(keys, w, merged, norms):
            f = wi * (1.0 if n <= tau or n == 0 else tau / n)  # clip_by_norm's factor, the norm already known
            share = {k: np.multiply(v, f, out=v) for k, v in c.arrays.items()}  # in place: merge's own copies
            shares[key] = share
            for k in names:
                out[k] += share[k]
        delta = {k: v.astype(np.float32) for k, v in out.items()}
    else:
        delta = {}
        n = len(merged)
        for k in names:
            stack = np.stack([c.arrays[k] for c in merged])
            if rule == "median":
                delta[k] = np.median(stack, axis=0).astype(np.float32)
            else:
                cut = min(int(np.floor(trim * n)), (n - 1) // 2)
                delta[k] = np.sort(stack, axis=0)[cut: n - cut].mean(axis=0).astype(np.float32)
    return Aggregate(delta=delta, shares=shares, weights=dict(zip(keys, w.tolist())), tau=tau, weight_cap=weight_cap(typical, bounds),
                     reference=nxt, devices=len(merged))


def aggregate_deltas(contributions: list[Contribution], *, rule: str = "clip", clip_norm: float = 0.0,
                     trim: float = 0.2, staleness_exponent: float = 0.5, reference: Reference = Reference(),
                     max_samples: int = 10_000, samples_ratio: float = 1.0) -> dict:
    """``aggregate(...).delta``: just the aggregated delta."""
    b = Bounds(max_samples=max_samples, samples_ratio=samples_ratio, clip_norm=clip_norm)
    return aggregate(contributions, rule=rule, reference=reference, bounds=b, trim=trim,
                     staleness_exponent=staleness_exponent).delta


def apply_delta(global_arrays: dict, delta: dict, *, server_lr: float = 1.0) -> dict:
    """``global + server_lr * delta``, array by array (float32).

    >>> apply_delta({"w": np.array([1.0])}, {"w": np.array([0.5])}, server_lr=2.0)["w"].tolist()
    [2.0]
    """
    return {k: (np.asarray(v, np.float32) + np.float32(server_lr) * np.asarray(delta[k], np.float32)).astype(np.float32)
            for k, v in global_arrays.items()}
