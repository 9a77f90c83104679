"""The shadow test: is the candidate model worse than the current one on live labels? Pure.

Each labelled shadow window gives a paired loss difference ``d = loss(candidate) -
loss(reference)`` (cross-entropy of the label's class, both scored on the same window
before any decision). The reference is the current backbone with the head a fresh device
would start from: the current model folder's own (shipped) head, not the head the
device has adapted on its labels (``edge.deploy.shadowrun`` computes it from the served
features). The candidate brings its bundle's head, the adapted head is set aside at the
switch and learning goes on from the bundle's head on the new backbone, so the fair
question is "backbone and shipped head against backbone and shipped head": an adapted
head has learnt from the very labels the test scores on, and would refuse every good
release a learning device sees (README, "Model releases on a device"). The served
(adapted) head's loss is kept beside it as evidence only (``mean_diff_served``).
Two anytime-valid sequential tests run on the clipped,
scaled differences ``x = clip(d / scale, -1, 1)``, each an e-process: a mixture, over a
grid of bets ``lam``, of the test martingales ``prod(1 + lam * x_i)`` (Waudby-Smith and
Ramdas' betting construction, with a fixed grid instead of a predictable bet):

- **switch** tests H0 "the candidate is worse by more than ``margin``" (``E[d] >= margin``)
  with ``x = (margin - d) / scale``; its wealth passing ``1/alpha`` rejects H0: no worse.
- **worse** tests H0 "the candidate is no worse" (``E[d] <= 0``) with ``x = d / scale``;
  passing ``1/alpha`` rejects it: worse, the release is refused.

Either may be read after every label without inflating its error (Ville's inequality),
which is why it is sequential like the learner's promotion rule without a fixed horizon.
Neither decides before ``min_labels`` labels. Without labels (``shadow_max_windows`` shadow
windows and still fewer than ``min_labels``), the fallback rule decides: switch when both
models agree on at least ``min_agreement`` of the windows and the candidate's mean top
confidence is within ``0.05`` of the current one's; otherwise refuse as worse.

>>> t = ShadowTest(min_labels=20, margin=0.05, alpha=0.05)
>>> for _ in range(200):
...     t.add_pair(current_loss=0.9, candidate_loss=0.3)
>>> t.decision()
'switch'
>>> w = ShadowTest(min_labels=20, margin=0.05, alpha=0.05)
>>> for _ in range(200):
...     w.add_pair(current_loss=0.2, candidate_loss=1.5)
>>> w.decision()
'worse'
"""
from __future__ import annotations

import math

import numpy as np

BETS = (0.05, 0.1, 0.2, 0.4, 0.6, 0.8)
SCALE = 4.0  # a loss difference of 4 nats counts as the largest possible; beyond is clipped
CONFIDENCE_TOLERANCE = 0.05


class Mixture:
    """An e-process for H0: E[x] <= 0 with x in [-1, 1]: the mean of ``prod(1 + lam x)`` over ``BETS``."""

    def __init__(self):
        self.log_wealth = np.zeros(len(BETS))
        self._lams = np.asarray(BETS)

    def add(self, x: float) -> None:
        self.log_wealth += np.log1p(self._lams * max(-1.0, min(1.0, x)))

    @property
    def wealth(self) -> float:
        return float(np.mean(np.exp(self.log_wealth)))


class ShadowTest:
    """The paired comparison of one shadow run, and its decision (None until it has one)."""

    def __init__(self, *, min_labels: int, margin: float, alpha: float, max_windows: int = 2000,
                 min_agreement: float = 0.9):
        self.min_labels, self.margin, self.alpha = int(min_labels), float(margin), float(alpha)
        self.max_windows, self.min_agreement = int(max_windows), float(min_agreement)
        self.switch, self.worse = Mixture(), Mixture()
        self.labels, self.sum_d, self.windows, self.agree = 0, 0.0, 0, 0
        self.served_labels, self.sum_d_served = 0, 0.0  # evidence only: against the head the device serves
        self.conf_current, self.conf_candidate = 0.0, 0.0

    def add_window(self, current_scores, candidate_scores) -> None:
        """One shadow window, labelled or not: agreement and confidence (the fallback's evidence)."""
        c, n = np.asarray(current_scores), np.asarray(candidate_scores)
        self.windows += 1
        self.agree += int(np.argmax(c) == np.argmax(n))
        self.conf_current += float(np.max(c))
        self.conf_candidate += float(np.max(n))

    def add_pair(self, *, current_loss: float, candidate_loss: float, served_loss: float | None = None) -> None:
        """One labelled window's paired losses: ``current_loss`` is the reference's (the current
        backbone with its shipped head), the one the decision rests on; ``served_loss``, of the
        head the device serves now, is recorded as evidence and never decides."""
        d = float(candidate_loss) - float(current_loss)
        if not math.isfinite(d):
            return
        if served_loss is not None and math.isfinite(float(candidate_loss) - float(served_loss)):
            self.served_labels += 1
            self.sum_d_served += float(candidate_loss) - float(served_loss)
        self.labels += 1
        self.sum_d += d
        self.switch.add((self.margin - d) / SCALE)
        self.worse.add(d / SCALE)

    def decision(self) -> str | None:
        """``switch``, ``worse`` or None (keep testing)."""
        if self.labels >= self.min_labels:
            if self.worse.wealth >= 1.0 / self.alpha:
                return "worse"
            if self.switch.wealth >= 1.0 / self.alpha:
                return "switch"
            return None
        if self.windows >= self.max_windows:  # too few labels: the documented fallback
            agree = self.agree / self.windows
            conf_gap = (self.conf_current - self.conf_candidate) / self.windows
            return "switch" if agree >= self.min_agreement and conf_gap <= CONFIDENCE_TOLERANCE else "worse"
        return None

    def evidence(self) -> dict:
        """What a ``shadowing`` report carries (RELEASE_FORMAT.md, "Report body")."""
        return {"labels": self.labels, "windows": self.windows,
                "mean_diff": round(self.sum_d / self.labels, 5) if self.labels else None,
                "reference": "shipped",
                "mean_diff_served": round(self.sum_d_served / self.served_labels, 5) if self.served_labels else None,
                "e_switch": round(self.switch.wealth, 4), "e_worse": round(self.worse.wealth, 4),
                "agreement": round(self.agree / self.windows, 4) if self.windows else None}


def class_loss(scores, label: int) -> float:
    """Cross-entropy of ``label`` under softmax ``scores`` (clipped at 1e-7, so it stays finite).

    >>> round(class_loss([0.25, 0.75], 1), 4)
    0.2877
    """
    return -math.log(max(1e-7, float(np.asarray(scores)[label])))
