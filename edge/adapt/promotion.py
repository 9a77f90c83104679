"""When a challenger may replace the champion: an anytime-valid sequential test by betting.

Both heads are scored on the same labels before either trains on them, so their
per-label losses are paired: ``d_t = champion loss - challenger loss``. The learner
looks at the evidence after every label and may stop at any of them, so a
fixed-sample test (the paired t-test of issue 10, ``PairedBlocks`` below) would
promote on noise: it is valid at one sample size only. ``BettingTest`` is valid at
every stopping time. It tests

    H0: E[clip(d_t / s_t, -B, B) | the past] <= m_t / s_t   for every t

(``m_t`` the practical margin the challenger must beat the champion by, ``s_t`` a loss
scale, both fixed before label ``t`` is scored) with the wealth of a bettor who stakes
a predictable fraction ``lambda_t`` of it on ``x_t = clip(d_t / s_t, -B, B) - m_t / s_t``:

    K_t = prod (1 + lambda_i x_i),   0 <= lambda_i <= c / (B + m_i / s_i)

Under H0, ``K_t`` is a non-negative supermartingale, so by Ville's inequality
``P(K_t >= 1 / alpha for some t) <= alpha``: the test ``K_t >= 1 / alpha`` rejects a
challenger that is not better by the margin with probability at most ``alpha``,
however long it runs and whenever it is read (Waudby-Smith & Ramdas, "Estimating means
of bounded random variables by betting", JRSS-B 2023; Shafer, "Testing by betting", 2021).
The stake is the plug-in Kelly fraction ``mu / (sigma^2 + mu^2)`` of an exponentially
weighted estimate of ``x``'s recent mean and variance (a challenger that is being
trained changes, so old rows say little), clipped to ``[0, c / (B + m / s)]``: a bettor
who expects to lose stakes nothing, so a challenger that is worse for a while costs
little evidence, and ``c = 0.7 < 1`` keeps ``1 + lambda x >= 0.3 > 0``.

Pure: values in, decisions out; plain floats on the per-label path.
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from edge.adapt import kernels


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
    """The fixed-sample paired t-test of issue 10 (no longer the learner's rule: ``BettingTest``).

    Block means of paired loss differences since the last reset, the last ``max_blocks`` kept.

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


class BettingTest:
    """Anytime-valid test that the challenger beats the champion by a margin (module docstring).

    ``update(champion_loss, challenger_loss, margin, scale)`` per paired label;
    ``passes(alpha)`` whenever the caller likes; ``reset()`` at every swap (each restart
    is a new test, and spends its own ``alpha``). The evidence an event names is
    ``evidence()``: the labels, both mean losses, the e-value.

    A challenger better by 0.3 nats a label (sd 0.3) passes ``alpha = 0.01`` within tens of
    labels; identical heads never gain wealth:

    >>> import random
    >>> rng = random.Random(0)
    >>> t = BettingTest()
    >>> n = next(i for i in range(1, 500) if t.update(1.0, 0.7 + rng.gauss(0, 0.3), 0.02, 1.0) and t.passes(0.01))
    >>> 10 < n < 60
    True
    >>> same = BettingTest()
    >>> for _ in range(1000):
    ...     _ = same.update(0.5, 0.5, 0.0, 1.0)
    >>> same.e_value
    1.0
    """

    __slots__ = ("bound", "half_life", "cap", "n", "log_wealth", "_mu", "_var", "_sum_a", "_sum_b", "_sum_c")

    def __init__(self, *, bound: float = 1.0, half_life: int = 20, cap: float = 0.7):
        if not bound > 0 or not 0 < cap < 1 or half_life < 1:
            raise ValueError(f"BettingTest needs bound > 0 (got {bound}), 0 < cap < 1 (got {cap}) and half_life >= 1 "
                             f"(got {half_life})")
        self.bound, self.half_life, self.cap = float(bound), int(half_life), float(cap)
        self.reset()

    def reset(self) -> None:
        """A new test: no labels, wealth 1 (the caller's alpha is spent again from here)."""
        self.n = 0
        self.log_wealth = 0.0
        self._mu = 0.0
        self._var = self.bound * self.bound / 4.0  # a bounded variable's variance is at most B^2 / 4 on [-B, B]
        self._sum_a = self._sum_b = self._sum_c = 0.0

    def update(self, champion_loss: float, challenger_loss: float, margin: float, scale: float) -> float:
        """Bet on one paired label; returns the log-wealth. ``margin`` and ``scale`` (> 0) must
        be fixed before this label was scored (the learner takes them from the labels before)."""
        b = self.bound
        d = (champion_loss - challenger_loss) / scale
        c = b if d > b else -b if d < -b else d
        x = c - margin / scale
        mu, var = self._mu, self._var
        lam = mu / (var + mu * mu) if mu > 0.0 else 0.0
        top = self.cap / (b + margin / scale)
        if lam > top:
            lam = top
        if lam:
            self.log_wealth += math.log1p(lam * x)
        n = self.n = self.n + 1
        a = 1.0 / (n + 1) if n + 1 < self.half_life else 1.0 / self.half_life
        dev = x - mu
        self._mu = mu + a * dev
        self._var = (1.0 - a) * (var + a * dev * dev)
        self._sum_a += champion_loss
        self._sum_b += challenger_loss
        self._sum_c += c
        return self.log_wealth

    def update_many(self, champion_losses, challenger_losses, margin: float, scale: float) -> float:
        """``update`` for each pair in turn (``learn_many``: one margin and scale for the batch,
        both fixed before it); compiled where numba is (``kernels.betting_many``: the same
        float64 operations in the same order, a third of the cost per pair at 32)."""
        if kernels.betting_many is None or len(champion_losses) < 4:
            if isinstance(champion_losses, np.ndarray):  # Python floats: numpy scalars cost more per pair
                champion_losses, challenger_losses = champion_losses.tolist(), np.asarray(challenger_losses).tolist()
            up = self.update
            for a, b in zip(champion_losses, challenger_losses):
                up(a, b, margin, scale)
            return self.log_wealth
        st = np.array([self.n, self.log_wealth, self._mu, self._var, self._sum_a, self._sum_b, self._sum_c], np.float64)
        kernels.betting_many(st, np.asarray(champion_losses, np.float64), np.asarray(challenger_losses, np.float64),
                             float(margin), float(scale), self.bound, self.cap, float(self.half_life))
        self.n = int(st[0])
        self.log_wealth, self._mu, self._var, self._sum_a, self._sum_b, self._sum_c = st[1:].tolist()
        return self.log_wealth

    def raw_gain(self) -> bool:
        """The challenger's raw mean loss over this test's labels is below the champion's (the
        clipped gain can pass while a few large losses put its raw mean above: a swap that
        throws learning away also needs this)."""
        return self.n > 0 and self._sum_b < self._sum_a

    @property
    def e_value(self) -> float:
        return math.exp(min(self.log_wealth, 700.0))

    def passes(self, alpha: float) -> bool:
        """The wealth reached ``1 / alpha``: H0 (no gain by the margin) is rejected at level ``alpha``."""
        return self.n > 0 and self.log_wealth >= -math.log(alpha)

    def evidence(self, alpha: float) -> dict:
        """What a swap names as its reason: labels, the mean losses over them, the mean clipped
        gain the test is about (in units of the loss scale: a challenger may win on most
        labels and still have the higher raw mean through a few clipped outliers), the
        e-value and its threshold."""
        n = self.n
        return {"labels": n, "champion_mean_loss": self._sum_a / n if n else math.nan,
                "challenger_mean_loss": self._sum_b / n if n else math.nan,
                "mean_gain": self._sum_c / n if n else math.nan,
                "e_value": self.e_value, "threshold": 1.0 / alpha}

    def state_dict(self) -> dict:
        return {"kind": "betting", "n": self.n, "log_wealth": self.log_wealth, "mu": self._mu, "var": self._var,
                "sum_a": self._sum_a, "sum_b": self._sum_b, "sum_c": self._sum_c}

    def load_state_dict(self, s: dict) -> None:
        """Restore; a state of another kind (``PairedBlocks``' block means, from before issue 18)
        raises ``ValueError`` (the caller resets the evidence instead: ``is_betting_state``)."""
        if not is_betting_state(s):
            raise ValueError(f"not a BettingTest state: keys {sorted(s)[:8] if isinstance(s, dict) else type(s).__name__}")
        vals = {k: float(s[k]) for k in ("log_wealth", "mu", "var", "sum_a", "sum_b", "sum_c")}
        n = s["n"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 0 or not all(map(math.isfinite, vals.values())) \
                or vals["var"] < 0:
            raise ValueError(f"BettingTest state out of range: n={n!r}, {vals}")
        self.n = n
        self.log_wealth, self._mu, self._var = vals["log_wealth"], vals["mu"], vals["var"]
        self._sum_a, self._sum_b, self._sum_c = vals["sum_a"], vals["sum_b"], vals["sum_c"]


def is_betting_state(s) -> bool:
    """A ``BettingTest.state_dict``, not an older test's (``PairedBlocks``: ``means``, ``acc``, ``k``)."""
    return isinstance(s, dict) and s.get("kind") == "betting"
