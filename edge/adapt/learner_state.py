"""The learner's checkpoint (``state_dict`` / ``load_state_dict``) and its exported metrics.

Part of ``edge.adapt.learner.Learner`` (a mixin: these methods run on the learner's own
members), kept apart so that the learner's own file, the per-label path, reads in one
sitting. The format is ``STATE_FORMAT`` (2): a state of another format, head or task is
refused, and a restore is all or nothing (a half-restored learner would serve a mix).
"""
from __future__ import annotations

import collections

import numpy as np

from edge.adapt.heads import HeadSnapshot
from edge.errors import StateError

STATE_FORMAT = 2


class LearnerState:
    """``metrics``, ``state_dict``, ``load_state_dict`` (module docstring)."""

    def metrics(self) -> dict:
        """Counters and gauges for export; ``labels_rejected`` is per reason."""
        c = self.counters
        m = {
            "labels_total": c["labels"], "labels_rejected": dict(self.rejected),
            "train_steps_total": c["train_steps"], "train_steps_skipped_total": c["train_steps_skipped"],
            "promotions_total": c["promotions"], "refreshes_total": c["refreshes"], "rollbacks_total": c["rollbacks"],
            "drifts_total": c["drifts"],
            "promotions_held_total": c["promotions_held"], "label_anomalies_total": c["label_anomalies"],
            "guard_recent_share": self.guard.recent_share if self.guard is not None else 0.0,
            "replay_samples": len(self.replay), "replay_bytes": self.replay.nbytes,
            "boost_labels_left": self.plasticity.boost_left, "champion_is_global": self.champion is self._global,
            "champion_version": self.champion.version, "global_version": self.global_version,
        }
        for k, v in self.preq.items():
            for name, val in v.get().items():
                if name != "n":
                    m[f"{k}_{name}"] = val
        return m

    def state_dict(self) -> dict:
        champ = self.champion
        if champ is not self._global and not isinstance(champ, HeadSnapshot):
            raise StateError("a learner over a torch module cannot checkpoint its champion as arrays")
        return {
            "format": STATE_FORMAT, "task": self.task, "head_kind": self.head_kind, "feature_size": self.feature_size,
            "outputs": self.outputs, "classes": list(self.classes),
            "trainer": self.trainer.state_dict(), "replay": self.replay.state_dict(), "recent": self.recent.state_dict(),
            "champion": None if champ is self._global else {"arrays": dict(champ.arrays), "version": champ.version, "kind": champ.kind},
            "global": {"weight": self._global.arrays["weight"], "bias": self._global.arrays["bias"], "version": self.global_version}
            if self.closed_form else {"version": self.global_version},
            **self.evaluator.state_dict(),  # preq, pairs, reference
            **self.plasticity.state_dict(),  # detectors, exceedance, fade, boost_left
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "counters": dict(self.counters), "rejected": dict(self.rejected),
            "since_swap": self.since_swap,
            "guard": None if self.guard is None else self.guard.state_dict(),
            "unshared": None if self._unshared is None else dict(self._unshared),
        }

    def load_state_dict(self, s: dict) -> None:
        """Restore from ``state_dict``; a state of another format, head or task raises ``StateError``."""
        if not isinstance(s, dict) or s.get("format") != STATE_FORMAT:
            got = s.get("format") if isinstance(s, dict) else type(s).__name__
            raise StateError(f"checkpoint has learner state format {got!r}, this version reads {STATE_FORMAT}; "
                             "not restoring it (the head starts from the global head)")
        want = {"task": self.task, "head_kind": self.head_kind, "feature_size": self.feature_size, "outputs": self.outputs}
        for k, v in want.items():
            if s.get(k) != v:
                raise StateError(f"checkpoint has {k} = {s.get(k)!r} but this learner has {v!r}; not restoring it")
        if (s.get("scaler") is None) != (self.scaler is None):
            raise StateError(f"checkpoint has scale = {s.get('scaler') is not None} but this learner has {self.scaler is not None}")
        backup = self.state_dict() if self.closed_form else None
        try:
            self._load(s)
        except (KeyError, ValueError, TypeError) as e:
            if backup is not None:  # all or nothing: a half-restored learner would serve a mix
                self._load(backup)
            raise StateError(f"learner checkpoint is inconsistent ({type(e).__name__}: {str(e)[:200]}); not restoring it") from None

    def _load(self, s: dict) -> None:
        g = s["global"]
        if self.closed_form:
            self.head.set_base(g["weight"], g["bias"])
            self._set_global_snapshot(np.asarray(g["weight"]), np.asarray(g["bias"]), g["version"])
        self.trainer.load_state_dict(s["trainer"])
        self.replay.load_state_dict(s["replay"])
        self.recent.load_state_dict(s["recent"])
        c = s["champion"]
        self.champion = self._global if c is None else HeadSnapshot.from_arrays(c["arrays"], kind=c["kind"], task=self.task, version=c["version"])
        self.plasticity.load_state_dict(s)
        self._live_snap = None
        self._reference_snap = None
        if self.scaler is not None:
            self.scaler.load_state_dict(s["scaler"])
        self.counters = collections.Counter(s["counters"])
        self.rejected = collections.Counter(s["rejected"])
        self.since_swap = int(s["since_swap"])
        if self.guard is not None and s.get("guard"):
            self.guard.load_state_dict(s["guard"])
        u = s.get("unshared")  # an older state has none
        if u is not None:
            u, a = {k: np.asarray(v, np.float32) for k, v in u.items()}, self.head.arrays()
            if set(u) != set(a) or any(u[k].shape != a[k].shape for k in a):
                raise ValueError(f"the steps kept from the fleet have arrays {sorted(u)} that do not fit the head's")
        self._unshared = u
        self._set_sources(boosting=self.plasticity.plastic)
        self._update_logit_offset()
        self.evaluator.load_state_dict(s)  # last: the margins come from the restored records
