"""The promotion guard: labels that mostly contradict what every head is sure of are held, not learned into service.

Anyone who can publish labels could otherwise retrain the device: a stream of wrong labels
trains the challenger, which then beats the champion *on those same labels*, so the
champion/challenger test itself cannot tell. What can tell is how the labels relate to
the heads' confident predictions. For each label the guard notes whether it contradicts
a prediction that the serving head **and** the fleet's global head both make with at
least ``confidence`` (the same class): an honest drift costs some of those (on the
simulator's shifts 1-26 % of labels, against 1 % nominal), a poisoning stream nearly all.

The challenger is **held** (not promoted, ``label_anomaly`` reported) while the share of
contradicting labels among the last ``window`` is above ``share`` *and* above ``ratio``
times the stream's own history (an EWMA over many labels, which stops learning while the
guard is tripped, so that a long attack cannot make itself normal). An operator who
really relabels a stream sees the event and can turn the guard off (``[adapt] guard``).

>>> g = LabelGuard(window=20, warmup=0)
>>> for _ in range(20): _ = g.observe(True)
>>> g.tripped, round(g.recent_share, 2)
(True, 1.0)
"""
from __future__ import annotations

from collections import deque

import numpy as np

from edge.adapt import kernels


class LabelGuard:
    """Tracks labels that contradict confident predictions; ``tripped`` holds promotions."""

    def __init__(self, *, confidence: float = 0.9, share: float = 0.5, ratio: float = 10.0, window: int = 100,
                 history_weight: float = 1e-3, prior: float = 0.02, warmup: int = 50):
        self.confidence, self.share, self.ratio = confidence, share, ratio
        self.window, self.history_weight, self.warmup = int(window), history_weight, int(warmup)
        self.history = prior
        self._recent: deque[bool] = deque(maxlen=self.window)
        self._hits = 0
        self.seen = 0
        self.tripped = False

    def contradicts(self, served, global_scores, label: int) -> bool:
        """True when both heads predict one class with ``confidence`` and the label is another.
        The scores are lists of floats (``learn_one``'s) or 1-D arrays."""
        k = _argmax(served)
        if k == label or served[k] < self.confidence:
            return False
        return _argmax(global_scores) == k and global_scores[k] >= self.confidence

    def contradicts_many(self, served, global_scores, labels) -> np.ndarray:
        """``contradicts`` for each row of ``served`` / ``global_scores`` ``[n, K]`` and ``labels`` ``[n]``.

        >>> g = LabelGuard()
        >>> g.contradicts_many(np.array([[0.95, 0.05], [0.5, 0.5]]), np.array([[0.99, 0.01], [0.9, 0.1]]), [1, 1]).tolist()
        [True, False]
        """
        s, gs = np.asarray(served), np.asarray(global_scores)
        k, labels = s.argmax(1), np.asarray(labels).reshape(-1)
        rows = np.arange(len(s))
        return (k == gs.argmax(1)) & (k != labels) & (s[rows, k] >= self.confidence) & (gs[rows, k] >= self.confidence)

    def observe_many(self, contradicting) -> bool:
        """``observe`` each flag in order (the rule is sequential); whether the guard is tripped now.
        Compiled where numba is and the batch has 4 flags or more (``kernels.guard_many``: the
        same float64 operations in the same order; a Python ``observe`` costs ~0.6 us a flag)."""
        flags = np.asarray(contradicting, bool).reshape(-1)
        if kernels.guard_many is None or len(flags) < 4:
            for c in flags.tolist():  # Python bools: numpy scalars cost more per row
                self.observe(c)
            return self.tripped
        buf = np.zeros(self.window, np.bool_)
        length = len(self._recent)
        buf[:length] = np.fromiter(self._recent, np.bool_, length)
        st = np.array([self._hits, self.seen, self.history, float(self.tripped)], np.float64)
        start, length = kernels.guard_many(buf, 0, length, flags, st, self.window, self.warmup, float(self.share),
                                           float(self.ratio), float(self.history_weight))
        self._recent = deque(np.roll(buf, -start)[:length].tolist(), maxlen=self.window)
        self._hits, self.seen, self.history, self.tripped = int(st[0]), int(st[1]), float(st[2]), bool(st[3])
        return self.tripped

    def observe(self, contradicting: bool) -> bool:
        """Note one label; returns whether the guard is tripped now.

        The history learns only from labels that have left the recent window, and not while
        the guard is tripped, so the labels being judged never count as their own history.
        """
        q = self._recent
        evicted = None
        if len(q) == q.maxlen:
            evicted = q[0]
            self._hits -= evicted
        q.append(bool(contradicting))
        self._hits += bool(contradicting)
        self.seen += 1
        self.tripped = self._holds()
        if evicted is not None and not self.tripped:
            self.history += self.history_weight * (float(evicted) - self.history)
        return self.tripped

    @property
    def recent_share(self) -> float:
        return self._hits / len(self._recent) if self._recent else 0.0

    def state_dict(self) -> dict:
        return {"history": self.history, "recent": [int(x) for x in self._recent], "seen": self.seen}

    def load_state_dict(self, s: dict) -> None:
        self.history = float(s["history"])
        self._recent = deque((bool(x) for x in s["recent"]), maxlen=self.window)
        self._hits = sum(self._recent)
        self.seen = int(s["seen"])
        self.tripped = self._holds()  # a hold outlives a restart: the restored window decides, as before it

    def _holds(self) -> bool:
        """The rule: enough labels seen, and the recent share above ``share`` and ``ratio`` times the history."""
        r = self.recent_share
        return (self.seen >= self.warmup and len(self._recent) >= min(self.window, 20) and r > self.share
                and r > self.ratio * self.history)


def _argmax(p) -> int:
    """The first index of the largest score (numpy's ``argmax``), of a list or a 1-D array."""
    if isinstance(p, np.ndarray):
        return int(p.argmax())
    best = 0
    for i in range(1, len(p)):
        if p[i] > p[best]:
            best = i
    return best
