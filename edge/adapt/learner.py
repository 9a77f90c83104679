"""The online learner: test-then-train, latent replay, champion/challenger, drift response.

Per label (``learn_one``) the learner

1. scores the sample with the serving head (champion), the challenger and the fleet's
   global head *before* any training: the prequential metrics every decision uses;
2. trains the challenger for ``steps_per_label`` steps on the new sample plus replayed
   features (recent labels and a class-balanced reservoir), pulled toward the global
   head by the L2 anchor, within the training budget;
3. promotes the challenger only when an anytime-valid sequential test (betting, an
   e-value of ``1 / promote_alpha``) on the paired per-label losses says its gain over
   the champion, on the same labels, passes the margin (``edge.adapt.promotion``), and
   rolls the champion back to the global head by the same test; both swap an immutable ``HeadSnapshot`` in one assignment, so the serving
   thread reads ``learner.champion`` without a lock and never waits;
4. feeds the champion's error to the drift detectors; on drift, or when the new labels'
   loss stays well above the replayed rows' loss, it becomes plastic for a while: a
   higher learning rate, more steps, fewer reservoir rows and a weaker anchor
   (docs/LEARNING.md, "Plasticity");
5. keeps a trivial reference (running mean or class prior, ``edge.adapt.reference``)
   scored the same way: ``best()`` serves the learned head (champion or challenger)
   with the lower recent loss, or the reference unless that head beats it by
   ``promote_margin`` (the library's do-no-harm rule; the daemon serves the champion).

With ``AdaptConfig.scale`` the features are standardised online (``edge.adapt.scaler``)
before the head (the replay keeps raw features; every batch is scaled with the current
statistics); snapshots fold the scaling in, so they still take raw features.

It runs in the daemon's learner thread; it does no I/O. Events go to ``on_event`` and
to a bounded queue drained by ``events()``.
"""
from __future__ import annotations

import collections
import logging
import math
import time

import numpy as np

from edge.adapt.activations import binary_scores, softmax
from edge.adapt.batch import learn_many
from edge.adapt.budget import TrainingBudget
from edge.config import AdaptConfig
from edge.adapt.drift import ADWIN, Exceedance, PageHinkley
from edge.adapt.heads import HeadSnapshot, make_head
from edge.adapt.metrics import FADE_FAST as _FADE
from edge.adapt.metrics import FADE_SLOW as _SLOW
from edge.adapt.metrics import Prequential
from edge.adapt.optim import OptimizerSpec
from edge.adapt.guard import LabelGuard
from edge.adapt.promotion import BettingTest, is_betting_state
from edge.adapt.reference import Reference
from edge.adapt.replay import RecentBuffer, ReplayBuffer
from edge.adapt.scaler import OnlineScaler
from edge.adapt.trainer import HeadTrainer
from edge.errors import ConfigError, StateError

STATE_FORMAT = 2

log = logging.getLogger("edge.adapt")


class Learner:
    """Learns an adapter head online from ``(z, y)`` pairs; see the module docstring.

    ``head`` (optional) is a prebuilt head object (``edge.adapt.heads`` or
    ``edge.adapt.torch_head.ModuleHead``) used instead of ``config.head``; ``optimizer``
    (an ``OptimizerSpec``) overrides ``config.optimizer`` / ``config.lr``. A
    classification learner with ``outputs=1`` and two classes learns one binary logit.
    """

    def __init__(self, *, task: str, feature_size: int, classes=None, outputs: int | None = None,
                 global_head: dict | None = None, global_version: str = "0", config: AdaptConfig | None = None,
                 on_event=None, clock=time.monotonic, head=None, optimizer: OptimizerSpec | None = None):
        self.task = task
        self.cfg = cfg = config or AdaptConfig()
        self.classes = tuple(classes) if classes is not None else ()
        if task == "classification":
            if len(self.classes) < 2:
                raise ConfigError("a classification learner needs at least 2 classes")
            self.outputs = 1 if outputs == 1 and len(self.classes) == 2 else len(self.classes)
            self._n_classes = len(self.classes)
        else:
            self.outputs = int(outputs or 1)
            self._n_classes = 0
        self.feature_size = int(feature_size)
        self._class_index = {str(c): i for i, c in enumerate(self.classes)}
        if head is None:
            gw = None if global_head is None else np.asarray(global_head["weight"], np.float32)
            gb = None if global_head is None else np.asarray(global_head["bias"], np.float32)
            head = make_head(cfg.head, in_features=self.feature_size, out_features=self.outputs,
                             base_weight=gw, base_bias=gb, **cfg.head_options)
        if (head.in_features, head.out_features) != (self.feature_size, self.outputs):
            raise ConfigError(f"head maps {head.in_features} -> {head.out_features} but the learner needs "
                              f"{self.feature_size} -> {self.outputs}")
        self.head = head
        self.head_kind = getattr(head, "kind", cfg.head)
        self.closed_form = getattr(head, "grad_np", None) is not None
        if cfg.scale and not self.closed_form:
            raise ConfigError("adapt.scale needs a closed-form head (linear, lowrank, mlp); scale the inputs of a module yourself")
        spec = optimizer or OptimizerSpec(kind=cfg.optimizer, lr=cfg.lr)
        self.lr = spec.lr
        self.anchor = cfg.anchor if self.closed_form else 0.0
        self.trainer = HeadTrainer(self.head, task=task, batch=cfg.batch, lr=spec.lr, optimizer=spec, anchor=self.anchor)
        ncls = self._n_classes or None
        self.replay = ReplayBuffer(feature_size=self.feature_size, max_bytes=cfg.replay_bytes, classes=ncls, outputs=self.outputs, seed=cfg.seed)
        self.recent = RecentBuffer(feature_size=self.feature_size, size=2 * cfg.batch, classes=ncls, outputs=self.outputs, seed=cfg.seed)
        self._set_sources(boosting=False)
        self.scaler = OnlineScaler(self.feature_size) if cfg.scale else None
        self.reference = Reference(task=task, outputs=self.outputs, in_features=self.feature_size)
        self._reference_snap: HeadSnapshot | None = None
        self._live_snap: tuple[int, HeadSnapshot] | None = None  # (labels, the challenger's snapshot)
        self.budget = TrainingBudget(steps_per_s=cfg.budget_steps_per_s, cpu_share=cfg.budget_cpu_share, clock=clock)
        self.preq = {k: Prequential(task, window=cfg.eval_window) for k in ("champion", "challenger", "global", "reference")}
        # the paired evidence of each swap (edge.adapt.promotion.BettingTest), restarted at every swap:
        # challenger vs champion at the promotion's margin and at the refresh's, global vs champion
        self.pairs = {k: BettingTest(bound=cfg.promote_bound) for k in ("promote", "refresh", "rollback")}
        self._margins = (0.0, 0.0, 0.0, 1.0)  # the next label's promote, refresh, rollback margins and loss scale
        # labels that mostly contradict what both heads are sure of hold promotions (edge.adapt.guard)
        self.guard = LabelGuard(confidence=cfg.guard_confidence, share=cfg.guard_share, ratio=cfg.guard_ratio,
                                window=cfg.eval_window) if cfg.guard and task == "classification" else None
        self._anomaly_open = False
        # the sum of the steps the head took while the guard held: kept out of what fleet sync shares
        self._unshared: dict | None = None
        self.detectors = {}
        if cfg.drift_detector in ("page_hinkley", "both"):
            self.detectors["page_hinkley"] = PageHinkley(threshold=cfg.ph_threshold, delta=cfg.ph_delta, mode="up")
        if cfg.drift_detector in ("adwin", "both"):
            self.detectors["adwin"] = ADWIN(delta=cfg.adwin_delta)
        # regression and forecasting: the detectors watch exceedances of the error's running
        # quantile, not the error itself, whose unit is the target's (edge.adapt.drift.Exceedance)
        self.exceed = Exceedance() if task != "classification" and self.detectors else None
        self.on_event = on_event
        self.clock = clock
        self._events: collections.deque = collections.deque(maxlen=1024)
        self.counters = collections.Counter()
        self.rejected = collections.Counter()
        self.boost_left = 0
        self.since_swap = 0
        self.fade = {"new": 0.0, "replay": 0.0, "slow": 0.0, "w_new": 0.0, "w_replay": 0.0, "w_slow": 0.0,
                     "since_trigger": 0, "above": 0}
        self._set_global_snapshot(None, None, global_version)
        self.champion = self._global
        # class evidence: until a class has cfg.class_evidence labels, the loss pulls its
        # logit down on the other classes' rows only in proportion (docs/LEARNING.md)
        self._evidence = cfg.class_evidence if task == "classification" and self.closed_form else 0
        self._update_logit_offset()

    def _update_logit_offset(self) -> None:
        """The trainer's logit offset from the labels seen per class: ``log(min(1, (n + 0.1) /
        class_evidence))``, or none once every class has its evidence (counts only grow)."""
        n = self.replay.seen.astype(np.float64)
        if not self._evidence or n.min() >= self._evidence:
            self.trainer.logit_offset = None
            return
        self.trainer.logit_offset = np.log(np.minimum(1.0, (n + 0.1) / self._evidence)).astype(np.float32)

    @property
    def _offset_done(self) -> bool:
        """No class needs its evidence any more (or class evidence is off)."""
        return self.trainer.logit_offset is None

    def _set_sources(self, *, boosting: bool) -> None:
        """The batch's rows: the new label, then recent labels, then the reservoir.

        While boosting only ``boost_replay`` of the reservoir's usual rows stay; the
        rest come from the recent labels (the plasticity policy)."""
        cfg = self.cfg
        rest = cfg.batch - 1
        n_replay = rest - round(rest * cfg.recent_share)
        if boosting:
            n_replay = round(n_replay * cfg.boost_replay)
        self._sources = [(self.recent, rest - n_replay), (self.replay, n_replay)]
        self.trainer.anchor = self.anchor * (cfg.boost_anchor if boosting else 1.0)
        self._boosting = boosting

    # -- the serving side reads only this attribute: one atomic reference -----------------

    def _set_global_snapshot(self, weight, bias, version: str) -> None:
        self.global_version = str(version)
        if self.closed_form:
            if weight is None:
                weight, bias = self.head.base_weight, self.head.base_bias
            self._global = HeadSnapshot.from_arrays({"weight": weight, "bias": bias}, kind="linear", task=self.task, version=self.global_version)
        else:
            self._global = self.head.base_snapshot(task=self.task, version=self.global_version)

    def _snapshot(self, version: str):
        snap = self.head.snapshot(task=self.task, version=version)
        if self.scaler is not None:
            snap = HeadSnapshot.from_arrays(self.scaler.fold(snap.arrays), kind=snap.kind, task=self.task, version=version)
        return snap

    def set_global(self, weights: dict, version: str) -> None:
        """Adopt a new fleet global head: it becomes the anchor and the rollback target.

        A champion that is the old global head is replaced at once; an adapted champion
        keeps serving and is rolled back only if the new global head proves better.
        """
        if not self.closed_form:
            raise ConfigError("a learner over a torch module has no fleet global head")
        was_global = self.champion is self._global
        w, b = np.asarray(weights["weight"], np.float32), np.asarray(weights["bias"], np.float32)
        self.head.set_base(w, b)
        self._set_global_snapshot(w, b, version)
        self.preq["global"] = Prequential(self.task, window=self.cfg.eval_window)
        self.since_swap = 0
        self.pairs["rollback"].reset()
        if was_global:
            self.champion = self._global
        self._emit("global", version=self.global_version)

    def adopt_consolidated(self, suffix: str) -> None:
        """Serve the head as trained now, as version ``<global>+<suffix>`` (the library's
        ``incremental_update``: an explicit request, with no prequential evidence to test),
        and start the learned heads' records and every test afresh, so that the result is
        served until new labels compare it with the reference. The one owner of these
        members: ``edge.learning`` calls this instead of setting them."""
        self._reference_snap = None
        self.champion = self._snapshot(f"{self.global_version}+{suffix}")
        for k in ("champion", "challenger"):
            self.preq[k] = Prequential(self.task, window=self.cfg.eval_window)
        self._restart_evidence()
        self._margins = self._next_margins()

    def serving(self) -> str:
        """What ``best()`` serves now: ``"reference"``, ``"champion"`` or ``"challenger"``.

        Do no harm: of the learned heads, the one with the lower recent prequential loss
        (the challenger while it is ahead of the champion, ``_live_better``), when its
        recent loss is below the trivial reference's over the same labels by
        ``promote_margin``, else the reference; with fewer than ``promote_block`` labels
        to compare, the reference (or an adapted champion that has no record yet, e.g.
        after ``incremental_update``). The library's
        ``predict`` so follows what it learns at once, while a promotion (the event, and
        the head the daemon serves) still needs the paired test."""
        learned = "challenger" if self._live_better() else "champion"
        mine = self.preq[learned].loss
        if mine.n >= self.cfg.promote_block:  # lower by the promotion margin: no chasing of noise
            return learned if mine.get() < self.preq["reference"].loss.get() * (1.0 - self.cfg.promote_margin) else "reference"
        return "champion" if self.champion is not self._global and not mine.n else "reference"

    def _live_better(self) -> bool:
        """The challenger's recent prequential loss is below the champion's (since the last
        swap both are scored on the same labels)."""
        chal, champ = self.preq["challenger"].loss, self.preq["champion"].loss
        return chal.n >= self.cfg.promote_block and champ.n > 0 and chal.get() < champ.get()

    def set_optimizer(self, spec: OptimizerSpec, *, module_optimizer=None) -> None:
        """Train with ``spec`` from now on (the library: the user's optimizer replaces its default)."""
        self.lr = spec.lr
        self.trainer.set_optimizer(spec, module_optimizer=module_optimizer)

    def best(self) -> HeadSnapshot:
        """The snapshot ``serving()`` names (the library's served head)."""
        which = self.serving()
        if which == "reference":
            if self._reference_snap is None:
                self._reference_snap = self.reference.snapshot(f"{self.global_version}+reference")
            return self._reference_snap
        if which == "challenger":
            n = self.counters["labels"]
            if self._live_snap is None or self._live_snap[0] != n:
                self._live_snap = (n, self._snapshot(f"{self.challenger_version()}~{n}"))
            return self._live_snap[1]
        return self.champion

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
            if c != y or not 0 <= c < self._n_classes:
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
            s_glob = s_champ
            l_glob, _ = l_champ, preq["global"].update_values(l_champ, e_champ)
        else:
            s_glob = self._score(glob, z2)
            l_glob, _ = preq["global"].update(s_glob, t)
        held = self._observe_guard(s_champ[None], s_glob[None], [int(t)]) if self.guard is not None else False
        l_ref, e_ref = self.reference.test_then_learn(t)
        preq["reference"].update_values(l_ref, e_ref)
        self._reference_snap = None
        sc = self.scaler
        if sc is not None:  # replay keeps raw features: each batch is scaled with today's statistics
            sc.learn_one(z)
        boosting = self.boost_left > 0
        if boosting != self._boosting:
            self._set_sources(boosting=boosting)
        self.trainer.set_lr(self.lr * cfg.boost_lr if boosting else self.lr)
        s_chal, steps = None, cfg.steps_per_label * cfg.boost_steps if boosting else cfg.steps_per_label
        tr = self.trainer
        before = self._arrays_if(held)
        for _ in range(steps if self._grant(1, steps) else 0):
            t0 = time.perf_counter()
            n = tr.fill(z, t, self._sources)
            if sc is not None:
                sc.transform_many(tr.z_np[:n], out=tr.z_np[:n])
            # the replayed rows' loss (plasticity rule) on every 4th label: it is a faded mean anyway
            tr.last_loss_of = tr.ranges[1] if s_chal is None and not counters["labels"] & 3 else None
            s = tr.step(n)
            if s_chal is None:
                s_chal = s
                if tr.last_loss_of and tr.ranges[1][1] > tr.ranges[1][0]:
                    self._fade("replay", tr.last_loss)
            self.budget.charge(time.perf_counter() - t0)
            counters["train_steps"] += 1
        self._keep_apart(before)
        if s_chal is None:
            s_chal = tr.score(z if sc is None else sc.transform_one(z))
        l_chal, e_chal = preq["challenger"].update(s_chal, t)
        self._fade("new", e_chal)
        self._fade("slow", e_chal, _SLOW)
        pairs, (m_p, m_r, m_b, scale) = self.pairs, self._margins
        pairs["promote"].update(l_champ, l_chal, m_p, scale)
        if champion is not glob:
            pairs["refresh"].update(l_champ, l_chal, m_r, scale)
            pairs["rollback"].update(l_champ, l_glob, m_b, scale)
        self.replay.add(z, t)
        self.recent.add(z, t)
        counters["labels"] += 1
        if self.trainer.logit_offset is not None:
            self._update_logit_offset()
        self.since_swap += 1
        self.boost_left = max(0, self.boost_left - 1)
        watch = e_champ if cfg.drift_on == "error" else l_champ
        drift = self._update_drift(watch if self.exceed is None else self.exceed.update(watch))
        if drift is None:
            drift = self._loss_ratio_trigger()
        swap = self._maybe_swap()
        return {"accepted": True, "served": s_champ, "loss": l_champ, "error": e_champ,
                "challenger": s_chal, "challenger_loss": l_chal,
                "drift": drift, "swap": swap, "champion_version": self.champion.version}

    def learn_many(self, Z, Y) -> dict:
        """Test then train on a batch (``edge.adapt.batch.learn_many``: every row scored by every
        head, then one step on the batch plus its share of replayed rows)."""
        return learn_many(self, Z, Y)

    # -- the rules learn_one and learn_many share ----------------------------------------------

    def _observe_guard(self, served, global_scores, targets) -> bool:
        """Note each label with the guard (rows of the champion's and the global head's scores
        before training); whether it holds now. The one guard path of both entry points."""
        g = self.guard
        if g is None:
            return False
        if len(targets) == 1:  # learn_one's hot path: the scalar form of the same rule (tested equal)
            return g.observe(g.contradicts(served[0], global_scores[0], int(targets[0])))
        return g.observe_many(g.contradicts_many(served, global_scores, targets))

    def _grant(self, labels: int, steps: int) -> int:
        """How many of ``labels`` labels (the first ones) may train their ``steps`` steps now;
        the others are counted as skipped. The one budget path of both entry points."""
        n = self.budget.take(labels, cost=steps)
        self.counters["train_steps_skipped"] += labels - n
        return n

    def _arrays_if(self, held: bool) -> dict | None:
        return self.head.arrays() if held and self.closed_form else None

    def _keep_apart(self, before: dict | None) -> None:
        """Add what the head learned since ``before`` (taken while the guard held) to the unshared sum."""
        if before is None:
            return
        now, u = self.head.arrays(), self._unshared
        self._unshared = {k: now[k] - before[k] + (u[k] if u is not None else 0.0) for k in now}

    def fleet_arrays(self) -> dict:
        """The head's arrays that fleet sync may share: the learning head's, less every step it
        took while the label guard held. A held challenger so contributes nothing to the fleet
        (while held, this is the head as it was when the guard tripped, moved by rebases only);
        what it learned stays on the device, where the guard keeps it from serving."""
        a, u = self.head.arrays(), self._unshared
        return a if u is None else {k: a[k] - u[k] for k in a}

    def _fade(self, key: str, loss: float, decay: float = _FADE) -> None:
        f = self.fade
        f[key] = decay * f.get(key, 0.0) + loss
        f["w_" + key] = decay * f.get("w_" + key, 0.0) + 1.0

    def _loss_ratio_trigger(self) -> str | None:
        """Plastic when the new labels' error stays well above the replayed rows' error."""
        f, cfg = self.fade, self.cfg
        f["since_trigger"] += 1
        if self.boost_left > 0 or not f["w_replay"] or len(self.replay) < 16 * cfg.batch:
            f["above"] = 0
            return None
        new, old, slow = f["new"] / f["w_new"], f["replay"] / f["w_replay"], f["slow"] / f["w_slow"]
        # "stays": the ratio must hold on every one of plastic_min labels in a row, and the
        # new error must have risen above its own long-run level (else it is the
        # generalisation gap of a stationary stream, not a change)
        rising = new > 1.5 * slow + 1e-12
        f["above"] = f.get("above", 0) + 1 if rising and new > cfg.plastic_ratio * old + 1e-12 else 0
        if f["above"] < cfg.plastic_min or f["since_trigger"] < cfg.plastic_min:
            return None
        f["above"] = 0
        self._start_boost("loss_ratio", new_loss=new, replay_loss=old)
        return "loss_ratio"

    def _score(self, snap, z2: np.ndarray) -> np.ndarray:
        """``snap.predict(z2)[0]`` (same arithmetic, so the same numbers as the serving
        thread), without the batch-shaped softmax's extra allocations."""
        s = snap.logits(z2)[0]
        if self.task == "classification":
            return binary_scores(s) if len(s) == 1 else softmax(s, inplace=True)
        return s

    def _update_drift(self, x: float) -> str | None:
        hit = None
        for name, det in self.detectors.items():
            # only a rise of the loss is drift to react to; ADWIN also cuts on improvements
            if det.update(x) and hit is None and getattr(det, "change", 1.0) > 0:
                hit = name
        if hit:
            self._start_boost(hit)
        return hit

    def _update_drift_many(self, mean: float, count: int) -> str | None:
        """The batch's mean error, once: Page-Hinkley weighs it by ``count`` rows; ADWIN
        sees it as one value (a smoother stream of its own)."""
        hit = None
        for name, det in self.detectors.items():
            fired = det.update_many(mean, count) if hasattr(det, "update_many") else det.update(mean)
            if fired and hit is None and getattr(det, "change", 1.0) > 0:
                hit = name
        if hit:
            self._start_boost(hit)
        return hit

    def _start_boost(self, detector: str, **why) -> None:
        self.counters["drifts"] += 1
        self.boost_left = self.cfg.boost_labels
        self.fade["since_trigger"] = 0
        self._emit("drift", detector=detector, labels=self.counters["labels"], **self._losses(), **why)

    def _losses(self) -> dict:
        return {f"{k}_loss": v.loss.get() for k, v in self.preq.items()}

    def _maybe_swap(self) -> str | None:
        """Swap if the evidence says so; then fix the margins the next label is tested at."""
        swap = self._decide()
        self._margins = self._next_margins()
        return swap

    def _alpha(self) -> float:
        """The test's level: ``promote_alpha``, or the higher ``promote_alpha_drift`` while plastic."""
        return self.cfg.promote_alpha_drift if self.boost_left > 0 else self.cfg.promote_alpha

    def _decide(self) -> str | None:
        cfg = self.cfg
        boosting = self.boost_left > 0
        if self.since_swap < (cfg.eval_min // 2 if boosting else cfg.eval_min):
            return None
        alpha, pairs = self._alpha(), self.pairs
        adapted = self.champion is not self._global
        if adapted and pairs["rollback"].passes(alpha):
            self._rollback(pairs["rollback"].evidence(alpha))
            return "rollback"
        g = self.guard
        held = g is not None and g.tripped
        if not held:
            self._anomaly_open = False
        if g is not None and g.seen < g.warmup:
            # the guard cannot judge the labels yet, and a drift alarm lets the test pass on
            # little evidence: a poisoning stream from the first label would be promoted
            return None
        if pairs["promote"].passes(alpha):
            if held:
                self.counters["promotions_held"] += 1
                if not self._anomaly_open:  # one event per episode, not one per label
                    self._anomaly_open = True
                    self.counters["label_anomalies"] += 1
                    self._emit("label_anomaly", held=self.challenger_version(), contradicting_share=round(g.recent_share, 3),
                               history_share=round(g.history, 4), labels=self.counters["labels"],
                               why="recent labels mostly contradict what the serving and global heads are both sure of")
                return "held"
            self._promote(pairs["promote"].evidence(alpha))
            return "promotion"
        # refresh: an adapted champion follows the challenger that continues its training
        # when it is ahead by the floor alone (not the relative margin), after refresh_labels
        # labels since the last swap, by the same test (docs/LEARNING.md, "Refreshes")
        if cfg.refresh_labels and adapted and self.since_swap >= cfg.refresh_labels and not held \
                and pairs["refresh"].passes(alpha):
            self._promote(pairs["refresh"].evidence(alpha), refresh=True)
            return "refresh"
        return None

    def _next_margins(self) -> tuple[float, float, float, float]:
        """The margins the next label is tested at, from the labels before it (so they are
        fixed before it is scored, as the test needs): promotion ``promote_margin`` of the
        champion's loss and at least ``promote_floor`` of the better of the global head's and
        the reference's (a fresh random global head can be worse than predicting the mean by
        orders of magnitude); refresh the floor alone; rollback ``rollback_margin`` of the
        global head's loss and the floor of the reference's. The loss scale: 1 (nats) for
        classification, the reference's loss for regression (its unit is the target's)."""
        cfg, preq = self.cfg, self.preq
        champ, glob, ref = (_finite(preq[k].loss.get()) for k in ("champion", "global", "reference"))
        floor = min(glob, ref) * cfg.promote_floor
        scale = 1.0 if self.task == "classification" else (ref if ref > 1e-12 else 1.0)
        return (max(champ * cfg.promote_margin, floor), floor,
                max(glob * cfg.rollback_margin, ref * cfg.promote_floor), scale)

    def challenger_version(self) -> str:
        """The version a promotion would give the challenger now."""
        return f"{self.global_version}+a{self.counters['promotions'] + 1}"

    def _promote(self, evidence: dict, *, refresh: bool = False) -> None:
        kind = "refresh" if refresh else "promotion"
        self.counters["refreshes" if refresh else "promotions"] += 1
        version = f"{self.global_version}+a{self.counters['promotions']}"
        if refresh:
            version += f".r{self.counters['refreshes']}"
        old = self.champion.version
        self.champion = self._snapshot(version)  # the atomic swap
        self.preq["champion"].loss.copy_from(self.preq["challenger"].loss)
        self.preq["champion"].err.copy_from(self.preq["challenger"].err)
        self._restart_evidence()
        self._emit(kind, version=version, previous=old, champion_loss=evidence.pop("champion_mean_loss"),
                   challenger_loss=evidence.pop("challenger_mean_loss"), **evidence)

    def _rollback(self, evidence: dict) -> None:
        self.counters["rollbacks"] += 1
        old = self.champion.version
        self.champion = self._global  # the atomic swap
        self.trainer.reset()  # the challenger starts over from the global head too
        self._unshared = None  # ... and with it, what it learned while held is gone
        for k in ("champion", "challenger"):
            self.preq[k].loss.copy_from(self.preq["global"].loss)
            self.preq[k].err.copy_from(self.preq["global"].err)
        self._restart_evidence()
        self._emit("rollback", version=self.global_version, previous=old, champion_loss=evidence.pop("champion_mean_loss"),
                   global_loss=evidence.pop("challenger_mean_loss"), **evidence)

    def _restart_evidence(self) -> None:
        """Every swap starts new tests (each spends its alpha again: docs/LEARNING.md, "Promotions")."""
        self.since_swap = 0
        for p in self.pairs.values():
            p.reset()

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
        m = {
            "labels_total": c["labels"], "labels_rejected": dict(self.rejected),
            "train_steps_total": c["train_steps"], "train_steps_skipped_total": c["train_steps_skipped"],
            "promotions_total": c["promotions"], "refreshes_total": c["refreshes"], "rollbacks_total": c["rollbacks"],
            "drifts_total": c["drifts"],
            "promotions_held_total": c["promotions_held"], "label_anomalies_total": c["label_anomalies"],
            "guard_recent_share": self.guard.recent_share if self.guard is not None else 0.0,
            "replay_samples": len(self.replay), "replay_bytes": self.replay.nbytes,
            "boost_labels_left": self.boost_left, "champion_is_global": self.champion is self._global,
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
            "preq": {k: v.state_dict() for k, v in self.preq.items()},
            "detectors": {k: d.state_dict() for k, d in self.detectors.items()},
            "exceedance": None if self.exceed is None else self.exceed.state_dict(),
            "pairs": {k: p.state_dict() for k, p in self.pairs.items()},
            "reference": self.reference.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "fade": dict(self.fade),
            "counters": dict(self.counters), "rejected": dict(self.rejected),
            "boost_left": self.boost_left, "since_swap": self.since_swap,
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
        for k, v in s["preq"].items():
            self.preq[k].load_state_dict(v)
        for k, v in s.get("detectors", {}).items():
            if k in self.detectors:
                self.detectors[k].load_state_dict(v)
        if self.exceed is not None:  # an older state has none: the quantile starts afresh
            self.exceed.reset()
            if s.get("exceedance"):
                self.exceed.load_state_dict(s["exceedance"])
        pairs = s["pairs"]
        for k, p in self.pairs.items():
            # a state from before issue 18 holds PairedBlocks' block means, which are no
            # e-values: that evidence restarts (a new test), the rest of the state is kept
            if is_betting_state(pairs.get(k)):
                p.load_state_dict(pairs[k])
            else:
                p.reset()
        self._live_snap = None
        self.reference.load_state_dict(s["reference"])
        self._reference_snap = None
        if self.scaler is not None:
            self.scaler.load_state_dict(s["scaler"])
        self.fade = {k: (int(v) if k in ("since_trigger", "above") else float(v)) for k, v in s["fade"].items()}
        self.counters = collections.Counter(s["counters"])
        self.rejected = collections.Counter(s["rejected"])
        self.boost_left, self.since_swap = int(s["boost_left"]), int(s["since_swap"])
        if self.guard is not None and s.get("guard"):
            self.guard.load_state_dict(s["guard"])
        u = s.get("unshared")  # an older state has none
        if u is not None:
            u, a = {k: np.asarray(v, np.float32) for k, v in u.items()}, self.head.arrays()
            if set(u) != set(a) or any(u[k].shape != a[k].shape for k in a):
                raise ValueError(f"the steps kept from the fleet have arrays {sorted(u)} that do not fit the head's")
        self._unshared = u
        self._set_sources(boosting=self.boost_left > 0)
        self._update_logit_offset()
        self._margins = self._next_margins()


def _finite(x: float, default: float = 0.0) -> float:
    """``x``, or ``default`` for NaN (an empty window) and infinities."""
    return x if math.isfinite(x) else default
