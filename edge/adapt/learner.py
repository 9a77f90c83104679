"""The online learner: test-then-train, latent replay, champion/challenger, drift response.

Per label (``learn_one``) the learner

1. scores the sample with the serving head (champion), the challenger and the fleet's
   global head *before* any training: the prequential metrics every decision uses;
2. trains the challenger for ``steps_per_label`` steps on the new sample plus replayed
   features (recent labels and a class-balanced reservoir), pulled toward the global
   head by the L2 anchor, within the training budget;
3. promotes the challenger when it beats the champion by the margin over the recent
   window, or rolls the champion back to the global head when it has become worse than
   it; both swap an immutable ``HeadSnapshot`` in one assignment, so the serving thread
   reads ``learner.champion`` without a lock and never waits;
4. feeds the champion's error to the drift detectors and, on drift, adapts faster for a
   while (``AdaptConfig`` "Drift").

It runs in the daemon's learner thread; it does no I/O. Events go to ``on_event`` and
to a bounded queue drained by ``events()``.
"""
from __future__ import annotations

import collections
import logging
import time

import numpy as np

from edge.adapt.budget import TrainingBudget
from edge.config import AdaptConfig
from edge.adapt.drift import ADWIN, PageHinkley
from edge.adapt.heads import HeadSnapshot, make_head
from edge.adapt.metrics import Prequential
from edge.adapt.replay import RecentBuffer, ReplayBuffer
from edge.adapt.trainer import HeadTrainer
from edge.errors import StateError

log = logging.getLogger("edge.adapt")


class Learner:
    """Learns an adapter head online from ``(z, y)`` pairs; see the module docstring."""

    def __init__(self, *, task: str, feature_size: int, classes=None, outputs: int | None = None,
                 global_head: dict | None = None, global_version: str = "0", config: AdaptConfig | None = None,
                 on_event=None, clock=time.monotonic):
        self.task = task
        self.cfg = cfg = config or AdaptConfig()
        self.classes = tuple(classes) if classes is not None else ()
        if task == "classification":
            if len(self.classes) < 2:
                raise ValueError("a classification learner needs at least 2 classes")
            self.outputs = len(self.classes)
        else:
            self.outputs = int(outputs or 1)
        self.feature_size = int(feature_size)
        self._class_index = {str(c): i for i, c in enumerate(self.classes)}
        gw = None if global_head is None else np.asarray(global_head["weight"], np.float32)
        gb = None if global_head is None else np.asarray(global_head["bias"], np.float32)
        self.head = make_head(cfg.head, in_features=self.feature_size, out_features=self.outputs,
                              base_weight=gw, base_bias=gb, **cfg.head_options)
        self.trainer = HeadTrainer(self.head, task=task, batch=cfg.batch, lr=cfg.lr, optimizer=cfg.optimizer, anchor=cfg.anchor)
        ncls = self.outputs if task == "classification" else None
        self.replay = ReplayBuffer(feature_size=self.feature_size, max_bytes=cfg.replay_bytes, classes=ncls, outputs=self.outputs, seed=cfg.seed)
        self.recent = RecentBuffer(feature_size=self.feature_size, size=2 * cfg.batch, classes=ncls, outputs=self.outputs, seed=cfg.seed)
        n_recent = round((cfg.batch - 1) * cfg.recent_share)
        self._sources = [(self.recent, n_recent), (self.replay, cfg.batch - 1 - n_recent)]
        self.budget = TrainingBudget(steps_per_s=cfg.budget_steps_per_s, cpu_share=cfg.budget_cpu_share, clock=clock)
        self.preq = {k: Prequential(task, window=cfg.eval_window) for k in ("champion", "challenger", "global")}
        self.detectors = {}
        if cfg.drift_detector in ("page_hinkley", "both"):
            self.detectors["page_hinkley"] = PageHinkley(threshold=cfg.ph_threshold, delta=cfg.ph_delta, mode="up")
        if cfg.drift_detector in ("adwin", "both"):
            self.detectors["adwin"] = ADWIN(delta=cfg.adwin_delta)
        self.on_event = on_event
        self.clock = clock
        self._events: collections.deque = collections.deque(maxlen=1024)
        self.counters = collections.Counter()
        self.rejected = collections.Counter()
        self.boost_left = 0
        self.since_swap = 0
        self._set_global_snapshot(self.head.base_weight.numpy(), self.head.base_bias.numpy(), global_version)
        self.champion: HeadSnapshot = self._global

    # -- the serving side reads only this attribute: one atomic reference -----------------

    def _set_global_snapshot(self, weight, bias, version: str) -> None:
        self.global_version = str(version)
        self._global = HeadSnapshot.from_arrays({"weight": weight, "bias": bias}, kind="linear", task=self.task, version=self.global_version)

    def set_global(self, weights: dict, version: str) -> None:
        """Adopt a new fleet global head: it becomes the anchor and the rollback target.

        A champion that is the old global head is replaced at once; an adapted champion
        keeps serving and is rolled back only if the new global head proves better.
        """
        was_global = self.champion is self._global
        w, b = np.asarray(weights["weight"], np.float32), np.asarray(weights["bias"], np.float32)
        self.head.set_base(w, b)
        self._set_global_snapshot(w, b, version)
        self.preq["global"] = Prequential(self.task, window=self.cfg.eval_window)
        self.since_swap = 0
        if was_global:
            self.champion = self._global
        self._emit("global", version=self.global_version)

    def rebase(self, global_arrays: dict, version: str) -> None:
        """Fleet sync (edge.fleet.client): adopt a global head given by all its arrays (an
        ``mlp`` head's too) as the rollback target and the reference champion and
        challenger are measured against. The caller has already set the head itself (new
        global plus the residual not yet sent). Unlike ``set_global``, the global head's
        prequential record and the labels since the last swap carry over: a fleet's
        global head moves often and in small steps, and restarting both at every sync
        would keep a device from ever promoting what it learned."""
        was_global = self.champion is self._global
        self.global_version = str(version)
        self._global = HeadSnapshot.from_arrays(global_arrays, kind=self.head.kind, task=self.task, version=self.global_version)
        if was_global:
            self.champion = self._global
        self._emit("global", version=self.global_version)

    # -- learning ---------------------------------------------------------------------------

    def _target(self, y):
        """The label as a training target, or the reason it is rejected."""
        if self.task == "classification":
            if isinstance(y, (str, bytes)):
                c = self._class_index.get(y.decode() if isinstance(y, bytes) else y)
                return (None, "unknown_class") if c is None else (c, None)
            try:
                c = int(y)
            except (TypeError, ValueError, OverflowError):
                return None, "unknown_class"
            if c != y or not 0 <= c < self.outputs:
                return None, "unknown_class"
            return c, None
        t = np.asarray(y, dtype=np.float32).reshape(-1)
        if t.size != self.outputs:
            return None, "bad_shape"
        return (t, None) if np.isfinite(t).all() else (None, "non_finite")

    def reject(self, reason: str) -> dict:
        self.rejected[reason] += 1
        return {"accepted": False, "reason": reason}

    def learn_one(self, z, y) -> dict:
        """Test then train on one labelled feature vector; returns what happened."""
        z = np.asarray(z, dtype=np.float32).reshape(-1)
        if z.size != self.feature_size:
            return self.reject("bad_shape")
        if not np.isfinite(z).all():
            return self.reject("non_finite")
        t, why = self._target(y)
        if why:
            return self.reject(why)
        cfg, preq, counters = self.cfg, self.preq, self.counters
        champion, glob = self.champion, self._global
        z2 = z[None, :]
        s_champ = self._score(champion, z2)
        l_champ, e_champ = preq["champion"].update(s_champ, t)
        if champion is glob:
            preq["global"].update_values(l_champ, e_champ)
        else:
            preq["global"].update(self._score(glob, z2), t)
        boosting = self.boost_left > 0
        self.trainer.set_lr(cfg.lr * cfg.boost_lr if boosting else cfg.lr)
        s_chal, steps = None, cfg.steps_per_label * cfg.boost_steps if boosting else cfg.steps_per_label
        for _ in range(steps):
            if not self.budget.allow():
                counters["train_steps_skipped"] += 1
                break
            t0 = time.perf_counter()
            s = self.trainer.step(self.trainer.fill(z, t, self._sources))
            if s_chal is None:
                s_chal = s
            self.budget.charge(time.perf_counter() - t0)
            counters["train_steps"] += 1
        if s_chal is None:
            s_chal = self.trainer.score(z)
        preq["challenger"].update(s_chal, t)
        self.replay.add(z, t)
        self.recent.add(z, t)
        counters["labels"] += 1
        self.since_swap += 1
        self.boost_left = max(0, self.boost_left - 1)
        drift = self._update_drift(e_champ if cfg.drift_on == "error" else l_champ)
        swap = self._maybe_swap()
        return {"accepted": True, "served": s_champ, "loss": l_champ, "error": e_champ,
                "drift": drift, "swap": swap, "champion_version": self.champion.version}

    def _score(self, snap: HeadSnapshot, z2: np.ndarray) -> np.ndarray:
        """``snap.predict(z2)[0]`` (same arithmetic, so the same numbers as the serving
        thread), without the batch-shaped softmax's extra allocations."""
        s = snap.logits(z2)[0]
        if self.task == "classification":
            s -= s.max()
            np.exp(s, out=s)
            s /= s.sum()
        return s

    def _update_drift(self, x: float) -> str | None:
        hit = None
        for name, det in self.detectors.items():
            # only a rise of the loss is drift to react to; ADWIN also cuts on improvements
            if det.update(x) and hit is None and getattr(det, "change", 1.0) > 0:
                hit = name
        if hit:
            self.counters["drifts"] += 1
            self.boost_left = self.cfg.boost_labels
            self._emit("drift", detector=hit, labels=self.counters["labels"], **self._losses())
        return hit

    def _losses(self) -> dict:
        return {f"{k}_loss": v.loss.get() for k, v in self.preq.items()}

    def _maybe_swap(self) -> str | None:
        cfg = self.cfg
        need = cfg.eval_min // 2 if self.boost_left > 0 else cfg.eval_min
        if self.since_swap < need:
            return None
        champ = self.preq["champion"].loss.get()
        chal = self.preq["challenger"].loss.get()
        glob = self.preq["global"].loss.get()
        if self.champion is not self._global and champ > glob * (1 + cfg.rollback_margin) + 1e-9:
            self._rollback(champ, glob)
            return "rollback"
        if champ - chal > max(champ * cfg.promote_margin, glob * cfg.promote_floor) + 1e-9:
            self._promote(champ, chal)
            return "promotion"
        return None

    def _promote(self, champ_loss: float, chal_loss: float) -> None:
        self.counters["promotions"] += 1
        version = f"{self.global_version}+a{self.counters['promotions']}"
        old = self.champion.version
        self.champion = HeadSnapshot.from_head(self.head, task=self.task, version=version)  # the atomic swap
        self.preq["champion"].loss.copy_from(self.preq["challenger"].loss)
        self.preq["champion"].err.copy_from(self.preq["challenger"].err)
        self.since_swap = 0
        self._emit("promotion", version=version, previous=old, champion_loss=champ_loss, challenger_loss=chal_loss)

    def _rollback(self, champ_loss: float, glob_loss: float) -> None:
        self.counters["rollbacks"] += 1
        old = self.champion.version
        self.champion = self._global  # the atomic swap
        self.trainer.reset()  # the challenger starts over from the global head too
        for k in ("champion", "challenger"):
            self.preq[k].loss.copy_from(self.preq["global"].loss)
            self.preq[k].err.copy_from(self.preq["global"].err)
        self.since_swap = 0
        self._emit("rollback", version=self.global_version, previous=old, champion_loss=champ_loss, global_loss=glob_loss)

    # -- events, metrics, state -------------------------------------------------------------

    def _emit(self, kind: str, **fields) -> None:
        ev = {"type": kind, "t": self.clock(), **fields}
        self._events.append(ev)
        log.info("adapt %s: %s", kind, {k: v for k, v in fields.items()})
        if self.on_event is not None:
            try:
                self.on_event(ev)
            except Exception:  # a broken sink must not stop learning
                log.exception("adapt: on_event callback failed for a %s event", kind)

    def events(self) -> list[dict]:
        """Drain the events (promotion, rollback, drift, global) since the last call."""
        out = []
        while self._events:
            out.append(self._events.popleft())
        return out

    def metrics(self) -> dict:
        """Counters and gauges for export; ``labels_rejected`` is per reason."""
        c = self.counters
        champ, chal = self.preq["champion"].get(), self.preq["challenger"].get()
        m = {
            "labels_total": c["labels"], "labels_rejected": dict(self.rejected),
            "train_steps_total": c["train_steps"], "train_steps_skipped_total": c["train_steps_skipped"],
            "promotions_total": c["promotions"], "rollbacks_total": c["rollbacks"], "drifts_total": c["drifts"],
            "replay_samples": len(self.replay), "replay_bytes": self.replay.nbytes,
            "boost_labels_left": self.boost_left, "champion_is_global": self.champion is self._global,
            "champion_version": self.champion.version, "global_version": self.global_version,
        }
        for k, v in (("champion", champ), ("challenger", chal), ("global", self.preq["global"].get())):
            for name, val in v.items():
                if name != "n":
                    m[f"{k}_{name}"] = val
        return m

    def state_dict(self) -> dict:
        champ = self.champion
        return {
            "format": 1, "task": self.task, "head_kind": self.cfg.head, "feature_size": self.feature_size,
            "outputs": self.outputs, "classes": list(self.classes),
            "trainer": self.trainer.state_dict(), "replay": self.replay.state_dict(), "recent": self.recent.state_dict(),
            "champion": None if champ is self._global else {"arrays": dict(champ.arrays), "version": champ.version, "kind": champ.kind},
            "global": {"weight": self._global.arrays["weight"], "bias": self._global.arrays["bias"], "version": self.global_version},
            "preq": {k: v.state_dict() for k, v in self.preq.items()},
            "detectors": {k: d.state_dict() for k, d in self.detectors.items()},
            "counters": dict(self.counters), "rejected": dict(self.rejected),
            "boost_left": self.boost_left, "since_swap": self.since_swap,
        }

    def load_state_dict(self, s: dict) -> None:
        """Restore from ``state_dict``; a state for another head or task raises ``StateError``."""
        want = {"task": self.task, "head_kind": self.cfg.head, "feature_size": self.feature_size, "outputs": self.outputs}
        for k, v in want.items():
            if s.get(k) != v:
                raise StateError(f"checkpoint has {k} = {s.get(k)!r} but this learner has {v!r}; not restoring it")
        g = s["global"]
        self.head.set_base(g["weight"], g["bias"])
        self._set_global_snapshot(np.asarray(g["weight"]), np.asarray(g["bias"]), g["version"])
        self.trainer.load_state_dict(s["trainer"])
        self.replay.load_state_dict(s["replay"])
        self.recent.load_state_dict(s["recent"])
        c = s["champion"]
        self.champion = self._global if c is None else HeadSnapshot.from_arrays(c["arrays"], kind=c["kind"], task=self.task, version=c["version"])
        for k, v in s["preq"].items():
            self.preq[k].load_state_dict(v)
        for k, v in s.get("detectors", {}).items():
            if k in self.detectors:
                self.detectors[k].load_state_dict(v)
        self.counters = collections.Counter(s["counters"])
        self.rejected = collections.Counter(s["rejected"])
        self.boost_left, self.since_swap = int(s["boost_left"]), int(s["since_swap"])
