"""Plasticity: when the learner should learn faster for a while (docs/LEARNING.md, "Plasticity").

Two alarms start a *boost* of ``boost_labels`` labels (a higher learning rate, more steps,
fewer reservoir rows, a weaker anchor, and less evidence needed to promote):

- a drift detector (Page-Hinkley, ADWIN) sees the champion's error rise; on regression
  and forecasting they watch exceedances of the error's running quantile
  (``edge.adapt.drift.Exceedance``), whose rate is unit-free;
- the loss ratio: the challenger's faded error on new labels stays above
  ``plastic_ratio`` times its faded error on replayed rows, and above 1.5 times its own
  long-run level, on ``plastic_min`` labels in a row (a change of the labels for the same
  inputs, which an error detector may see late).

Values in, alarms out: the learner starts the boost's batch mix and emits the event.
"""
from __future__ import annotations

import numpy as np

from edge.adapt.drift import ADWIN, Exceedance, PageHinkley
from edge.adapt.metrics import FADE_FAST, FADE_SLOW, fade_weights

_FADE_KEYS = ("new", "replay", "slow", "w_new", "w_replay", "w_slow")


class Plasticity:
    """The drift detectors, the faded errors of the loss-ratio rule, and the boost countdown."""

    def __init__(self, *, task: str, config):
        cfg = self.cfg = config
        self.detectors = {}
        if cfg.drift_detector in ("page_hinkley", "both"):
            self.detectors["page_hinkley"] = PageHinkley(threshold=cfg.ph_threshold, delta=cfg.ph_delta, mode="up")
        if cfg.drift_detector in ("adwin", "both"):
            self.detectors["adwin"] = ADWIN(delta=cfg.adwin_delta)
        self.exceed = Exceedance() if task != "classification" and self.detectors else None
        self.boost_left = 0
        self.fade = {**dict.fromkeys(_FADE_KEYS, 0.0), "since_trigger": 0, "above": 0}

    @property
    def plastic(self) -> bool:
        return self.boost_left > 0

    # -- the faded errors ------------------------------------------------------------------------

    def fade_one(self, key: str, value: float, decay: float = FADE_FAST) -> None:
        f = self.fade
        f[key] = decay * f[key] + value
        f["w_" + key] = decay * f["w_" + key] + 1.0

    def fade_new_one(self, error: float) -> None:
        """The challenger's error on one new label (before its step), fast and slow."""
        self.fade_one("new", error)
        self.fade_one("slow", error, FADE_SLOW)

    def fade_new_many(self, errors: np.ndarray) -> None:
        """``fade_new_one`` for each in turn, folded in at once."""
        f, m = self.fade, len(errors)
        for key, decay in (("new", FADE_FAST), ("slow", FADE_SLOW)):
            w, total, last = fade_weights(decay, m)
            f[key] = last * f[key] + float(w @ errors)
            f["w_" + key] = last * f["w_" + key] + total

    # -- per label: the countdown, the detectors, the loss ratio ----------------------------------

    def count(self, labels: int) -> None:
        """``labels`` more labels: the boost counts down; the loss-ratio rule's streaks grow by
        all but the last, which ``loss_ratio`` counts."""
        self.boost_left = max(0, self.boost_left - labels)
        f = self.fade
        f["since_trigger"] += labels - 1
        if f["above"]:
            f["above"] += labels - 1

    def watch_one(self, error: float, loss: float) -> str | None:
        """Feed the champion's error (or loss, ``drift_on``) on one label; the detector that fired."""
        x = error if self.cfg.drift_on == "error" else loss
        if self.exceed is not None:
            x = self.exceed.update(x)
        hit = None
        for name, det in self.detectors.items():
            # only a rise of the loss is drift to react to; ADWIN also cuts on improvements
            if det.update(x) and hit is None and getattr(det, "change", 1.0) > 0:
                hit = name
        return hit

    def watch_many(self, errors: np.ndarray, losses: np.ndarray) -> str | None:
        """The batch's mean, once: Page-Hinkley weighs it by the row count; ADWIN sees it as one
        value (a smoother stream of its own)."""
        w = errors if self.cfg.drift_on == "error" else losses
        if self.exceed is not None:
            w = np.array([self.exceed.update(x) for x in np.asarray(w, np.float64).reshape(-1).tolist()])
        mean, count = float(w.mean()), len(w)
        hit = None
        for name, det in self.detectors.items():
            fired = det.update_many(mean, count) if hasattr(det, "update_many") else det.update(mean)
            if fired and hit is None and getattr(det, "change", 1.0) > 0:
                hit = name
        return hit

    def loss_ratio(self, replay_rows: int) -> dict | None:
        """The loss-ratio alarm's reason (``new_loss``, ``replay_loss``: the faded errors) when it
        fires on this label, else None. It waits for 16 batches of reservoir rows."""
        f, cfg = self.fade, self.cfg
        f["since_trigger"] += 1
        if self.boost_left > 0 or not f["w_replay"] or replay_rows < 16 * cfg.batch:
            f["above"] = 0
            return None
        new, old, slow = f["new"] / f["w_new"], f["replay"] / f["w_replay"], f["slow"] / f["w_slow"]
        # "stays": the ratio must hold on every one of plastic_min labels in a row, and the
        # new error must have risen above its own long-run level (else it is the
        # generalisation gap of a stationary stream, not a change)
        rising = new > 1.5 * slow + 1e-12
        f["above"] = f["above"] + 1 if rising and new > cfg.plastic_ratio * old + 1e-12 else 0
        if f["above"] < cfg.plastic_min or f["since_trigger"] < cfg.plastic_min:
            return None
        f["above"] = 0
        return {"new_loss": new, "replay_loss": old}

    def start(self) -> None:
        """An alarm: ``boost_labels`` labels of plasticity from now."""
        self.boost_left = self.cfg.boost_labels
        self.fade["since_trigger"] = 0

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"detectors": {k: d.state_dict() for k, d in self.detectors.items()},
                "exceedance": None if self.exceed is None else self.exceed.state_dict(),
                "fade": dict(self.fade), "boost_left": self.boost_left}

    def load_state_dict(self, s: dict) -> None:
        """Restore from a learner state's ``detectors``, ``exceedance``, ``fade`` and ``boost_left``."""
        for k, v in s.get("detectors", {}).items():
            if k in self.detectors:
                self.detectors[k].load_state_dict(v)
        if self.exceed is not None:  # an older state has none: the quantile starts afresh
            self.exceed.reset()
            if s.get("exceedance"):
                self.exceed.load_state_dict(s["exceedance"])
        fade = {k: (int(v) if k in ("since_trigger", "above") else float(v)) for k, v in s["fade"].items()}
        self.fade = {**dict.fromkeys(_FADE_KEYS, 0.0), "since_trigger": 0, "above": 0, **fade}
        self.boost_left = int(s["boost_left"])
