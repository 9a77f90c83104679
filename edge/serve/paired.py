"""Timing candidates against each other on a noisy device: alternating blocks, paired
ratios and a confidence bound on the speedup. Pure (the clock is handed in).

Two medians timed one after the other are not a comparison on a busy machine: a burst
of load from elsewhere, or a library's spinning worker threads after its own block
(OpenMP keeps them busy for a while), slows whichever candidate runs then. So every
round times one block of calls of each candidate back to back, in an order that rotates
from round to round (no candidate always follows the same one), and the comparison is
made per round: the ratio of two blocks timed moments apart, under the same load. The
median of those ratios is the speedup; a distribution-free confidence interval for that
median (binomial order statistics, no assumption about the noise) says how sure it is.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import comb

CONFIDENCE = 0.95


def paired_blocks(fns: dict, *, clock, rounds: int, block: int = 10, warmup: int = 10,
                  lead: int | None = None) -> dict:
    """Seconds per call of each ``fns[key]()``, one value per round, timed in alternating blocks.

    Round ``r`` times ``block`` consecutive calls of every function, starting at the
    ``r``-th (mod n) key, so that the blocks of one round run under the same load. Each
    timed block follows ``lead`` (default ``block``) untimed calls of the same function:
    what the previous block left behind (its data in the caches, its library's worker
    threads still spinning) is spent there, and the block is timed with its own model
    warm, as serving does.

    >>> t, order = [0.0], []
    >>> def cost(name, s):
    ...     def f(): t[0] += s; order.append(name)
    ...     return f
    >>> paired_blocks({"a": cost("a", 1.0), "b": cost("b", 3.0)}, clock=lambda: t[0], rounds=3, block=2,
    ...               warmup=0, lead=0)
    {'a': [1.0, 1.0, 1.0], 'b': [3.0, 3.0, 3.0]}
    >>> "".join(order[::2])  # the order rotates: a b, b a, a b
    'abbaab'
    """
    keys = list(fns)
    lead = block if lead is None else lead
    for k in keys:
        for _ in range(warmup):
            fns[k]()
    samples: dict = {k: [] for k in keys}
    for r in range(max(1, rounds)):
        i = r % len(keys) if keys else 0
        for k in keys[i:] + keys[:i]:
            fn = fns[k]
            for _ in range(lead):
                fn()
            t0 = clock()
            for _ in range(block):
                fn()
            samples[k].append((clock() - t0) / block)
    return samples


def median(values) -> float:
    """The median.

    >>> median([3, 1, 2]), median([4, 1, 2, 3])
    (2.0, 2.5)
    """
    v = sorted(values)
    n = len(v)
    return float(v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2)


def median_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """A distribution-free ``confidence`` interval for the median of ``values``: the order
    statistics ``k`` and ``n + 1 - k`` with ``P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2``.
    With too few values for that (5 or fewer at 95 %) it is the whole range.

    >>> median_interval(range(1, 41))   # the 14th and 27th of 40
    (14.0, 27.0)
    >>> median_interval([2.0, 1.0, 3.0])
    (1.0, 3.0)
    """
    v = sorted(float(x) for x in values)
    n = len(v)
    if n == 0:
        raise ValueError("no values")
    tail, k, cum = (1.0 - confidence) / 2, 0, 0.0
    for j in range(n):
        cum += comb(n, j) / 2 ** n  # P(B <= j)
        if cum > tail:
            break
        k = j + 1
    return (v[k - 1], v[n - k]) if k >= 1 else (v[0], v[-1])


@dataclass(frozen=True)
class Speedup:
    """How many times faster a candidate is than a baseline: the median of per-round ratios
    (baseline block / candidate block) and its confidence interval."""

    median: float
    low: float
    high: float
    rounds: int
    confidence: float = CONFIDENCE

    def verdict(self, min_gain: float) -> tuple[bool, bool]:
        """(faster by ``min_gain``?, sure?): sure when the whole interval is on one side.

        >>> Speedup(2.1, 1.9, 2.3, 40).verdict(1.05), Speedup(1.04, 0.9, 1.3, 40).verdict(1.05)
        ((True, True), (False, False))
        """
        if self.low >= min_gain:
            return True, True
        if self.high < min_gain:
            return False, True
        return self.median >= min_gain, False

    def describe(self) -> str:
        """For reasons and logs.

        >>> Speedup(2.1, 1.9, 2.3, 40).describe()
        '2.10x (95% interval 1.90-2.30x, 40 paired rounds)'
        """
        return (f"{self.median:.2f}x ({100 * self.confidence:g}% interval {self.low:.2f}-{self.high:.2f}x, "
                f"{self.rounds} paired rounds)")


def paired_speedup(candidate_s, baseline_s, confidence: float = CONFIDENCE) -> Speedup:
    """The speedup of a candidate over a baseline from their per-round times (same rounds).

    >>> paired_speedup([1.0, 2.0, 1.0], [2.0, 4.0, 2.0])   # load doubled both in round 2
    Speedup(median=2.0, low=2.0, high=2.0, rounds=3, confidence=0.95)
    """
    if len(candidate_s) != len(baseline_s) or not candidate_s:
        raise ValueError("paired times need the same, non-zero number of rounds")
    ratios = [b / c for c, b in zip(candidate_s, baseline_s)]
    low, high = median_interval(ratios, confidence)
    return Speedup(median(ratios), low, high, len(ratios), confidence)
