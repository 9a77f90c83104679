"""When a challenger may replace the champion: a paired test on per-block losses.

Both heads are scored on the same labels before either trains on them, so their
per-label losses are paired. A relative margin alone promotes on noise: two heads that
are equally good differ by a few percent over any window of 100 labels, and a
learner that tests after every label takes the lucky ones. So the differences
``champion loss - challenger loss`` are averaged in blocks of ``block`` labels (which
also soaks up short-range correlation), and the challenger wins only when

- at least ``min_blocks`` complete blocks were seen since the last swap,
- the one-sided paired t-test of the block means rejects "no gain" at level ``alpha``,
- and the mean gain passes the caller's practical margin.

Pure: values in, decisions out. The Student-t quantile is the Cornish-Fisher
expansion of the normal one (within 1% for 5+ degrees of freedom), to need no SciPy.
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np


def t_quantile(p: float, df: int) -> float:
    """Approximate Student-t quantile.

    >>> round(t_quantile(0.99, 5), 2), round(t_quantile(0.975, 1000), 2)
    (3.35, 1.96)
    """
    z = NormalDist().inv_cdf(p)
    v = float(df)
    return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3))


class PairedBlocks:
    """Block means of paired loss differences since the last reset, the last ``max_blocks`` kept.

    >>> t = PairedBlocks(block=2, max_blocks=10)
    >>> for a, b in [(1.0, 0.5), (1.0, 0.4), (1.0, 0.6), (1.0, 0.5), (1.0, 0.45), (1.0, 0.55)]:
    ...     _ = t.add(a, b)
    >>> t.blocks, round(t.statistic(), 1)
    (3, 17.3)
    """

    def __init__(self, *, block: int, max_blocks: int):
        self.block = int(block)
        self.max_blocks = max(2, int(max_blocks))
        self.means: list[float] = []
        self._acc = 0.0
        self._k = 0

    @property
    def blocks(self) -> int:
        return len(self.means)

    def reset(self) -> None:
        self.means.clear()
        self._acc, self._k = 0.0, 0

    def add(self, champion_loss: float, challenger_loss: float) -> bool:
        """Add one label's pair; True when it completed a block."""
        self._acc += champion_loss - challenger_loss
        self._k += 1
        if self._k < self.block:
            return False
        self.means.append(self._acc / self._k)
        if len(self.means) > self.max_blocks:
            del self.means[0]
        self._acc, self._k = 0.0, 0
        return True

    def add_many(self, champion_losses, challenger_losses) -> int:
        """``add`` for each pair in turn, with the same arithmetic (``learn_many``); the
        number of blocks completed."""
        d = np.asarray(champion_losses, np.float64).reshape(-1) - np.asarray(challenger_losses, np.float64).reshape(-1)
        acc, k, block, means, done = self._acc, self._k, self.block, self.means, 0
        for x in d.tolist():
            acc += x
            k += 1
            if k == block:
                means.append(acc / k)
                acc, k, done = 0.0, 0, done + 1
        if len(means) > self.max_blocks:
            del means[: len(means) - self.max_blocks]
        self._acc, self._k = acc, k
        return done

    def mean_gain(self) -> float:
        return sum(self.means) / len(self.means) if self.means else 0.0

    def statistic(self) -> float:
        """The paired t statistic of the block means (``nan`` below two blocks)."""
        m = len(self.means)
        if m < 2:
            return math.nan
        mu = self.mean_gain()
        var = sum((x - mu) ** 2 for x in self.means) / (m - 1)
        if var <= 0.0:
            return math.inf if mu > 0 else -math.inf if mu < 0 else 0.0
        return mu / math.sqrt(var / m)

    def significant(self, *, alpha: float, min_blocks: int) -> bool:
        m = len(self.means)
        if m < max(2, min_blocks):
            return False
        return self.statistic() > t_quantile(1.0 - alpha, m - 1)

    def state_dict(self) -> dict:
        return {"means": list(self.means), "acc": self._acc, "k": self._k}

    def load_state_dict(self, s: dict) -> None:
        self.means = [float(x) for x in s["means"]][-self.max_blocks:]
        self._acc, self._k = float(s["acc"]), int(s["k"])
