"""Prequential (test-then-train) metrics over a sliding window, plus a fading mean.

Each labelled window is scored by a head *before* that head trains on it, so the score
is an honest estimate of how the head does on data it has not seen (Dawid's
prequential principle). A sliding window forgets the past exactly, which is what a
champion/challenger comparison needs; the fading mean is a cheap long memory for
dashboards. Pure: values in, values out.
"""
from __future__ import annotations

import functools
import math

import numpy as np

EPS = 1e-7
# the plasticity rule's faded errors (edge.adapt.learner, edge.adapt.batch): about the
# last 50 labels, and the new labels' long-run level, about the last 500
FADE_FAST = 0.98
FADE_SLOW = 0.998


@functools.lru_cache(maxsize=64)
def fade_weights(decay: float, m: int) -> tuple[np.ndarray, float, float]:
    """``(w, w.sum(), decay**m)`` with ``w[i] = decay**(m - 1 - i)``: what folding ``m``
    values into a faded mean one by one gives each of them (``learn_many``)."""
    w = decay ** np.arange(m - 1, -1, -1)
    w.flags.writeable = False
    return w, float(w.sum()), decay**m


class RollingMean:
    """Mean of the last ``window`` values, O(1) per update.

    >>> r = RollingMean(3)
    >>> for x in (1.0, 2.0, 3.0, 10.0):
    ...     r.update(x)
    >>> r.get(), r.n
    (5.0, 3)
    """

    def __init__(self, window: int):
        self.window = int(window)
        # a list of Python floats: reading one numpy element costs more than the update
        self.buf = [0.0] * self.window
        self.i = 0
        self.n = 0
        self.total = 0.0

    def update(self, x: float) -> None:
        i = self.i
        if self.n == self.window:
            self.total -= self.buf[i]
        else:
            self.n += 1
        x = float(x)
        self.buf[i] = x
        self.total += x
        self.i = i + 1 if i + 1 < self.window else 0

    def update_many(self, values) -> None:
        """``update`` with each value in turn, in a few list operations (``learn_many``)."""
        xs = values if isinstance(values, list) else [float(x) for x in values]
        m, w = len(xs), self.window
        if not m:
            return
        if m > w:  # only the last window values stay; they land where single updates put them
            skip = m - w
            self.i = (self.i + skip) % w
            self.n = w  # every slot is overwritten below, so what they held does not matter
            self.total = sum(self.buf)
            xs = xs[skip:]
            m = w
        i, buf, end = self.i, self.buf, self.i + m
        full = self.n == w
        # slots overwritten that held values: [i, end) when full, plus the wrapped-around part
        # (while filling, the filled slots are [0, n) and i == n)
        evicted = (sum(buf[i:min(end, w)]) if full else 0.0) + (sum(buf[:end - w]) if end > w else 0.0)
        if end <= w:
            buf[i:end] = xs
        else:
            buf[i:] = xs[:w - i]
            buf[:end - w] = xs[w - i:]
        self.total += sum(xs) - evicted
        self.n = min(w, self.n + m)
        self.i = end % w

    def get(self) -> float:
        return float(self.total / self.n) if self.n else math.nan

    def reset(self) -> None:
        self.n, self.i, self.total = 0, 0, 0.0

    def copy_from(self, other: "RollingMean") -> None:
        self.buf[:] = other.buf
        self.i, self.n, self.total = other.i, other.n, other.total

    def state_dict(self) -> dict:
        return {"buf": np.array(self.buf, np.float64), "i": self.i, "n": self.n, "total": self.total}

    def load_state_dict(self, s: dict) -> None:
        buf = np.asarray(s["buf"], np.float64)
        if buf.shape != (self.window,):  # eval window changed by config: start afresh
            self.reset()
            return
        self.buf[:] = buf.tolist()
        self.i, self.n = int(s["i"]), int(s["n"])
        # the running total, not a fresh sum: a rounding difference could flip a promotion
        self.total = float(s["total"]) if "total" in s else float(buf[: self.n].sum())

def sample_loss(scores, y, task: str) -> tuple[float, float]:
    """``(loss, error)`` of one prediction: log-loss and 0/1 error, or squared and absolute error.

    >>> sample_loss(np.array([0.25, 0.75]), 1, "classification")
    (0.2876820724517809, 0.0)
    >>> sample_loss(np.array([1.0, 2.0]), np.array([1.0, 4.0]), "regression")
    (2.0, 1.0)
    """
    if task == "classification":
        if not (isinstance(scores, np.ndarray) and scores.ndim == 1):
            # float32 scores need no float64 copy: the conversion is exact and keeps the order
            scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        c = int(y)
        loss = -math.log(max(float(scores[c]), EPS))
        return loss, float(int(scores.argmax()) != c)
    if np.size(scores) == 1 and np.size(y) == 1:  # one output: plain floats, a third of the cost
        d = float(np.asarray(scores).reshape(-1)[0]) - float(np.asarray(y).reshape(-1)[0])
        return d * d, abs(d)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    d = scores - np.asarray(y, dtype=np.float64).reshape(-1)
    return float(np.mean(d * d)), float(np.mean(np.abs(d)))


def sample_losses(scores: np.ndarray, y, task: str) -> tuple[np.ndarray, np.ndarray]:
    """``sample_loss`` for a batch: ``(losses [B], errors [B])`` from scores ``[B, K]``.

    >>> l, e = sample_losses(np.array([[0.25, 0.75], [0.9, 0.1]]), np.array([1, 1]), "classification")
    >>> [round(float(x), 3) for x in l], e.tolist()
    ([0.288, 2.303], [0.0, 1.0])
    """
    scores = np.asarray(scores, np.float64)
    if task == "classification":
        c = np.asarray(y, np.int64).reshape(-1)
        p = scores[np.arange(len(c)), c]
        return -np.log(np.maximum(p, EPS)), (scores.argmax(1) != c).astype(np.float64)
    d = scores - np.asarray(y, np.float64).reshape(scores.shape)
    return (d * d).mean(1), np.abs(d).mean(1)


class Prequential:
    """Sliding-window and fading prequential metrics of one head.

    Classification reports ``accuracy`` and ``log_loss``; regression and forecasting
    report ``mse`` and ``mae``. ``fading`` is the decay of the long-memory mean.

    >>> p = Prequential("classification", window=2)
    >>> _ = p.update(np.array([0.9, 0.1]), 0), p.update(np.array([0.9, 0.1]), 1)
    >>> round(p.get()["accuracy"], 3), p.get()["n"]
    (0.5, 2)
    """

    def __init__(self, task: str, *, window: int = 200, fading: float = 0.999):
        self.task = task
        self.loss = RollingMean(window)
        self.err = RollingMean(window)
        self.fading = fading
        self._faded_loss = 0.0
        self._faded_w = 0.0
        self.n = 0

    def update(self, scores, y) -> tuple[float, float]:
        loss, err = sample_loss(scores, y, self.task)
        self.update_values(loss, err)
        return loss, err

    def update_values(self, loss: float, err: float) -> None:
        """``RollingMean.update`` of both windows, inlined (it runs four times a label)."""
        loss, err = float(loss), float(err)
        for r, x in ((self.loss, loss), (self.err, err)):
            i = r.i
            if r.n == r.window:
                r.total -= r.buf[i]
            else:
                r.n += 1
            r.buf[i] = x
            r.total += x
            r.i = i + 1 if i + 1 < r.window else 0
        f = self.fading
        self._faded_loss = f * self._faded_loss + loss
        self._faded_w = f * self._faded_w + 1.0
        self.n += 1

    def update_many(self, losses, errs) -> None:
        """``update_values`` for each pair in turn (the same sums, faded as row by row)."""
        ls = np.asarray(losses, np.float64).reshape(-1)
        m = len(ls)
        if not m:
            return
        self.loss.update_many(ls.tolist())
        self.err.update_many(np.asarray(errs, np.float64).reshape(-1).tolist())
        w, total, last = fade_weights(self.fading, m)
        self._faded_loss = last * self._faded_loss + float(w @ ls)
        self._faded_w = last * self._faded_w + total
        self.n += m

    def get(self) -> dict:
        faded = self._faded_loss / self._faded_w if self._faded_w else math.nan
        if self.task == "classification":
            return {"accuracy": 1.0 - self.err.get(), "log_loss": self.loss.get(), "faded_loss": faded, "n": self.n}
        return {"mse": self.loss.get(), "mae": self.err.get(), "faded_loss": faded, "n": self.n}

    def state_dict(self) -> dict:
        return {"loss": self.loss.state_dict(), "err": self.err.state_dict(), "faded": [self._faded_loss, self._faded_w], "n": self.n}

    def load_state_dict(self, s: dict) -> None:
        self.loss.load_state_dict(s["loss"])
        self.err.load_state_dict(s["err"])
        self._faded_loss, self._faded_w = (float(v) for v in s["faded"])
        self.n = int(s["n"])
