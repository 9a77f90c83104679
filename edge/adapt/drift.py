"""Drift detectors on the prequential loss: Page-Hinkley and ADWIN, pure and dependency-free.

Both follow the published algorithms (and river's parameterisation, so settings carry
over); they live here rather than being imported from river because the runtime must
not depend on a research library, and because their state must checkpoint as plain
values. ``update(x) -> bool`` returns True on the update that detects a change; the
detector then restarts on the new regime.
"""
from __future__ import annotations

import math


class PageHinkley:
    """Two-sided Page-Hinkley test (CUSUM on deviations from a fading mean).

    Cheap and quick on abrupt shifts of the mean; ``threshold`` trades delay for false
    alarms, ``delta`` is the tolerated magnitude of change.

    >>> import random
    >>> rng = random.Random(12345)
    >>> ph = PageHinkley()
    >>> stream = rng.choices([0, 1], k=1000) + rng.choices(range(4, 8), k=1000)
    >>> [i for i, x in enumerate(stream) if ph.update(x)]
    [1006]
    """

    def __init__(self, *, min_instances: int = 30, delta: float = 0.005, threshold: float = 50.0,
                 alpha: float = 1 - 0.0001, mode: str = "both"):
        if mode not in ("up", "down", "both"):
            raise ValueError(f"PageHinkley mode {mode!r} is not one of up, down, both")
        self.min_instances, self.delta, self.threshold, self.alpha, self.mode = min_instances, delta, threshold, alpha, mode
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.sum_inc = 0.0
        self.sum_dec = 0.0
        self.min_inc = math.inf
        self.max_dec = -1.0

    def update(self, x: float) -> bool:
        self.n += 1
        self.mean += (x - self.mean) / self.n
        dev = x - self.mean
        self.sum_inc = self.alpha * self.sum_inc + dev - self.delta
        self.sum_dec = self.alpha * self.sum_dec + dev + self.delta
        self.min_inc = min(self.min_inc, self.sum_inc)
        self.max_dec = max(self.max_dec, self.sum_dec)
        if self.n < self.min_instances:
            return False
        mode = self.mode
        up = mode != "down" and self.sum_inc - self.min_inc > self.threshold
        down = mode != "up" and self.max_dec - self.sum_dec > self.threshold
        hit = up or down
        if hit:
            self.reset()
        return hit

    def update_many(self, mean: float, count: int) -> bool:
        """``count`` values whose mean is ``mean`` in one update (``learn_many``): the sums
        grow by ``count`` deviations, as they would row by row for a constant run."""
        if count <= 0:
            return False
        self.n += count
        self.mean += (mean - self.mean) * count / self.n
        dev = mean - self.mean
        fade = self.alpha**count
        self.sum_inc = fade * self.sum_inc + count * (dev - self.delta)
        self.sum_dec = fade * self.sum_dec + count * (dev + self.delta)
        self.min_inc = min(self.min_inc, self.sum_inc)
        self.max_dec = max(self.max_dec, self.sum_dec)
        if self.n < self.min_instances:
            return False
        up = self.mode != "down" and self.sum_inc - self.min_inc > self.threshold
        down = self.mode != "up" and self.max_dec - self.sum_dec > self.threshold
        if up or down:
            self.reset()
            return True
        return False

    _STATE = ("n", "mean", "sum_inc", "sum_dec", "min_inc", "max_dec")

    def state_dict(self) -> dict:
        return {k: (None if math.isinf(getattr(self, k)) else getattr(self, k)) for k in self._STATE}

    def load_state_dict(self, s: dict) -> None:
        for k in self._STATE:
            setattr(self, k, math.inf if s[k] is None else type(getattr(self, k))(s[k]))


class ADWIN:
    """ADaptive WINdowing (Bifet & Gavalda 2007, ADWIN2 with exponential histograms).

    Keeps the longest recent window in which no two sub-windows have significantly
    different means (Hoeffding-style bound with confidence ``delta``); a cut signals
    drift and, as in river, the detector restarts on the new regime. Memory is O(max_buckets * log(width)).

    >>> import random
    >>> rng = random.Random(12345)
    >>> adwin = ADWIN()
    >>> stream = rng.choices([0, 1], k=1000) + rng.choices(range(4, 8), k=1000)
    >>> hits = [i for i, x in enumerate(stream) if adwin.update(x)]
    >>> 1000 <= hits[0] < 1100
    True
    """

    def __init__(self, *, delta: float = 0.002, clock: int = 32, max_buckets: int = 5,
                 min_window_length: int = 5, grace_period: int = 10):
        self.delta, self.clock, self.max_buckets = delta, clock, max_buckets
        self.min_window_length, self.grace_period = min_window_length, grace_period
        self.reset()

    def reset(self) -> None:
        # rows[i] holds buckets of 2**i items, newest first: [total, variance] pairs
        self.rows: list[list[list[float]]] = []
        self.width = 0
        self.total = 0.0
        self.variance = 0.0
        self.ticks = 0
        self.change = 0.0

    @property
    def estimation(self) -> float:
        return self.total / self.width if self.width else 0.0

    def update(self, x: float) -> bool:
        x = float(x)
        if self.width:
            self.variance += self.width * (x - self.total / self.width) ** 2 / (self.width + 1)
        self.width += 1
        self.total += x
        if not self.rows:
            self.rows.append([])
        self.rows[0].insert(0, [x, 0.0])
        self._compress()
        self.ticks += 1
        if self.ticks % self.clock or self.width <= self.grace_period:
            return False
        if self._detect():
            change = self.change
            self.reset()  # as river does: the detector restarts on the new regime
            self.change = change
            return True
        return False

    def _compress(self) -> None:
        i = 0
        while i < len(self.rows) and len(self.rows[i]) > self.max_buckets:
            (t1, v1), (t2, v2) = self.rows[i].pop(), self.rows[i].pop()  # the two oldest
            n = 2**i
            merged = [t1 + t2, v1 + v2 + n * n * (t1 / n - t2 / n) ** 2 / (2 * n)]
            if i + 1 == len(self.rows):
                self.rows.append([])
            self.rows[i + 1].insert(0, merged)
            i += 1

    def _drop_oldest(self) -> None:
        i = len(self.rows) - 1
        t, v = self.rows[i].pop()
        n = 2**i
        self.width -= n
        self.total -= t
        if self.width:
            u1, u2 = t / n, self.total / self.width
            self.variance -= v + n * self.width * (u1 - u2) ** 2 / (n + self.width)
        else:
            self.variance = 0.0
        self.variance = max(self.variance, 0.0)
        while self.rows and not self.rows[-1]:
            self.rows.pop()

    def _detect(self) -> bool:
        # At each split: cut when |mean0 - mean1| > eps_cut (Bifet & Gavalda's bound).
        # The terms that do not depend on the split are hoisted out of the scan: it
        # visits every bucket every ``clock`` updates, the learner's costliest update.
        detected = False
        mwl = self.min_window_length
        while self.width > self.grace_period:
            width = self.width
            dd = math.log(2.0 * math.log(width) / self.delta)
            v = self.variance / width
            n0, s0, n1, s1 = 0, 0.0, width, self.total
            cut = False
            for i in range(len(self.rows) - 1, -1, -1):  # oldest row first
                n = 2**i
                for t, _ in reversed(self.rows[i]):  # oldest bucket first
                    n0, s0, n1, s1 = n0 + n, s0 + t, n1 - n, s1 - t
                    if n1 < mwl:
                        break
                    if n0 >= mwl:
                        m = 1.0 / (n0 - mwl + 1) + 1.0 / (n1 - mwl + 1)
                        if abs(s0 / n0 - s1 / n1) > math.sqrt(2.0 * m * v * dd) + 2.0 / 3.0 * dd * m:
                            cut = True
                            self.change = s1 / n1 - s0 / n0  # > 0: the recent part is higher
                            break
                if cut or n1 < mwl:
                    break
            if not cut:
                break
            detected = True
            self._drop_oldest()
        return detected

    def state_dict(self) -> dict:
        return {"rows": [[list(b) for b in r] for r in self.rows], "width": self.width, "total": self.total,
                "variance": self.variance, "ticks": self.ticks}

    def load_state_dict(self, s: dict) -> None:
        self.rows = [[[float(t), float(v)] for t, v in r] for r in s["rows"]]
        self.width, self.total = int(s["width"]), float(s["total"])
        self.variance, self.ticks = float(s["variance"]), int(s["ticks"])


class Exceedance:
    """A regression error stream -> a unit-free 0/1 stream for the drift detectors.

    Page-Hinkley's threshold and tolerance are absolute, so on raw regression errors its
    behaviour depends on the target's unit (a target in Pa alarms constantly, in MPa never).
    ``update(e)`` returns 1.0 when ``e`` exceeds the running ``level`` quantile of the errors
    before it, else 0.0: about ``1 - level`` of the labels on a stationary stream whatever
    the unit or the error's distribution, and more after a change that makes the errors
    larger, so the detectors see what they see on a classifier's 0/1 error. The quantile
    starts as the empirical quantile of the first ``warmup`` errors (during which the
    neutral ``1 - level`` is returned) and then moves by stochastic approximation, with a
    step of ``rate`` times the running mean error (so it is unit-free too).

    >>> import random
    >>> rng = random.Random(1)
    >>> for scale in (1e-3, 1e3):
    ...     ex = Exceedance()
    ...     hits = [ex.update(abs(rng.gauss(0, scale))) for _ in range(4000)]
    ...     print(round(sum(hits[1000:]) / 3000, 2))
    0.15
    0.15
    """

    def __init__(self, *, level: float = 0.85, rate: float = 0.02, warmup: int = 50):
        self.level, self.rate, self.warmup = level, rate, warmup
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.q = 0.0
        self.scale = 0.0
        self._first: list[float] = []  # the warm-up errors (at most ``warmup``)

    def update(self, e: float) -> float:
        e = float(e)
        if not math.isfinite(e):
            return 1.0
        self.n += 1
        self.scale += (e - self.scale) / min(self.n, 100)  # the mean error, over about 100 labels
        if self.n <= self.warmup:
            self._first.append(e)
            if self.n == self.warmup:  # the quantile starts where the warm-up errors put it
                ranked = sorted(self._first)
                self.q = ranked[min(len(ranked) - 1, int(self.level * len(ranked)))]
                self._first = []
            return 1.0 - self.level
        hit = 1.0 if e > self.q else 0.0
        self.q += self.rate * self.scale * (hit - (1.0 - self.level))
        return hit

    def state_dict(self) -> dict:
        return {"n": self.n, "q": self.q, "scale": self.scale, "first": list(self._first)}

    def load_state_dict(self, s: dict) -> None:
        self.n, self.q, self.scale = int(s["n"]), float(s["q"]), float(s["scale"])
        self._first = [float(x) for x in s.get("first", [])][: self.warmup]
