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
   rolls the champion back to the global head by the same test; both swap an
   immutable ``HeadSnapshot`` in one assignment, so the serving thread reads ``learner.champion`` without a lock and never waits;
4. feeds the champion's error to the drift detectors; on drift, or when the new labels'
   loss stays well above the replayed rows' loss, it becomes plastic for a while: a
   higher learning rate, more steps, fewer reservoir rows and a weaker anchor
   (docs/LEARNING.md, "Plasticity");
5. keeps a trivial reference (running mean or class prior, ``edge.adapt.reference``)
   scored the same way: ``best()`` serves the reference until a paired sequential test
   says the learned head (champion or challenger, the lower recent loss) beats it, and
   the reference again on the reverse test (the library's do-no-harm rule,
   ``evaluator.ServeTests``; the daemon serves the champion).

With ``AdaptConfig.scale`` the features are standardised online (``edge.adapt.scaler``)
before the head (the replay keeps raw features; every batch is scaled with the current
statistics); snapshots fold the scaling in, so they still take raw features.

The parts, each its own module: ``edge.adapt.evaluator`` (prequential scores and the
paired evidence; one row in plain floats, ``edge.adapt.rowscore``), ``edge.adapt.policy``
(the pure promotion policy), ``edge.adapt.plasticity`` (detectors, loss ratio, boost) and
``edge.adapt.trainer``; this file is the per-label glue. Three mixins hold the rest of the
learner's methods: ``edge.adapt.snapshots`` (what is served and shared: ``serving``,
``best``, ``set_global``, ``rebase``, ``fleet_arrays``), ``edge.adapt.swaps`` (promotion,
refresh, rollback, hold and their events) and ``edge.adapt.learner_state`` (``metrics``,
``state_dict``, ``load_state_dict``). ``learn_one`` and ``learn_many`` differ only in how
they score and train (one row, or a batch: ``edge.adapt.batch``); both go through
``_admit`` (the label guard, the training budget, the schedule) before training and
``_settle`` (counters, plasticity, the swap) after it, the one accounting path.

It runs in the daemon's learner thread; it does no I/O.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass

import numpy as np

from edge.adapt import batch, kernels
from edge.adapt.budget import TrainingBudget
from edge.adapt.evaluator import Evaluator, Served
from edge.adapt.guard import LabelGuard
from edge.adapt.heads import HeadSnapshot, make_head
from edge.adapt.learner_state import STATE_FORMAT, LearnerState
from edge.adapt.optim import OptimizerSpec
from edge.adapt.plasticity import Plasticity
from edge.adapt.replay import RecentBuffer, ReplayBuffer
from edge.adapt.scaler import OnlineScaler
from edge.adapt.snapshots import Snapshots
from edge.adapt.swaps import Swaps
from edge.adapt.trainer import HeadTrainer
from edge.config import AdaptConfig
from edge.errors import ConfigError

__all__ = ["Learner", "STATE_FORMAT"]


@dataclass(slots=True)
class Grant:
    """What ``_admit`` allows the labels just scored: whether the guard holds, how many of
    them (the first ones) train, and their steps each."""

    held: bool
    paid: int
    steps: int


class Learner(Snapshots, Swaps, LearnerState):
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
        self.head = head = head if head is not None else self._make_head(global_head)
        if (head.in_features, head.out_features) != (self.feature_size, self.outputs):
            raise ConfigError(f"head maps {head.in_features} -> {head.out_features} but the learner needs "
                              f"{self.feature_size} -> {self.outputs}")
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
        if cfg.scale:
            kernels.warm()  # the scaler's compiled update: loaded here, not on the first label
        self.evaluator = Evaluator(task=task, outputs=self.outputs, feature_size=self.feature_size, config=cfg)
        self.plasticity = Plasticity(task=task, config=cfg)
        self._reference_snap: HeadSnapshot | None = None
        self._live_snap: tuple[int, HeadSnapshot] | None = None  # (labels, the challenger's snapshot)
        self.budget = TrainingBudget(steps_per_s=cfg.budget_steps_per_s, cpu_share=cfg.budget_cpu_share, clock=clock)
        # labels that mostly contradict what both heads are sure of hold promotions (edge.adapt.guard)
        self.guard = LabelGuard(confidence=cfg.guard_confidence, share=cfg.guard_share, ratio=cfg.guard_ratio,
                                window=cfg.eval_window) if cfg.guard and task == "classification" else None
        self._anomaly_open = False
        # the sum of the steps the head took while the guard held: kept out of what fleet sync shares
        self._unshared: dict | None = None
        self.on_event = on_event
        self.clock = clock
        self._events: collections.deque = collections.deque(maxlen=1024)
        self.counters = collections.Counter()
        self.rejected = collections.Counter()
        self.since_swap = 0
        self._set_global_snapshot(None, None, global_version)
        self.champion = self._global
        # class evidence: until a class has cfg.class_evidence labels, the loss pulls its
        # logit down on the other classes' rows only in proportion (docs/LEARNING.md)
        self._evidence = cfg.class_evidence if task == "classification" and self.closed_form else 0
        self._update_logit_offset()

    def _make_head(self, global_head: dict | None):
        gw = None if global_head is None else np.asarray(global_head["weight"], np.float32)
        gb = None if global_head is None else np.asarray(global_head["bias"], np.float32)
        return make_head(self.cfg.head, in_features=self.feature_size, out_features=self.outputs,
                         base_weight=gw, base_bias=gb, **self.cfg.head_options)

    # the parts' records, under the names the library and the tests read them by
    preq = property(lambda self: self.evaluator.preq)
    pairs = property(lambda self: self.evaluator.pairs)
    reference = property(lambda self: self.evaluator.reference)
    detectors = property(lambda self: self.plasticity.detectors)
    exceed = property(lambda self: self.plasticity.exceed)
    boost_left = property(lambda self: self.plasticity.boost_left)
    _offset_done = property(lambda self: self.trainer.logit_offset is None)  # every class has its evidence

    def _update_logit_offset(self) -> None:
        """The trainer's logit offset from the labels seen per class: ``log(min(1, (n + 0.1) /
        class_evidence))``, or none once every class has its evidence (counts only grow)."""
        n = self.replay.seen.astype(np.float64)
        if not self._evidence or n.min() >= self._evidence:
            self.trainer.logit_offset = None
            return
        self.trainer.logit_offset = np.log(np.minimum(1.0, (n + 0.1) / self._evidence)).astype(np.float32)

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

    def set_optimizer(self, spec: OptimizerSpec, *, module_optimizer=None) -> None:
        """Train with ``spec`` from now on (the library: the user's optimizer replaces its default)."""
        self.lr = spec.lr
        self.trainer.set_optimizer(spec, module_optimizer=module_optimizer)

    # -- learning: two ways to score and train, one accounting path ---------------------------

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
        champion, ev = self.champion, self.evaluator
        tl = t if self._n_classes else t.tolist()  # the scoring path's target: an int, or floats
        sv = ev.test_one(champion, self._global, z, tl)
        sc = self.scaler
        if sc is not None:  # replay keeps raw features: each batch is scaled with today's statistics
            sc.learn_one(z)
        grant = self._admit(sv, t, 1, one=True)
        s_chal, trained = self._train_one(z, t, grant)
        l_chal, e_chal = ev.challenger_one(s_chal.tolist(), tl)
        self.replay.add(z, t)
        self.recent.add(z, t)
        drift, swap = self._settle(1, sv, l_chal, e_chal, trained, adapted=champion is not self._global, one=True)
        return {"accepted": True, "served": np.array(sv.scores, np.float32), "loss": sv.loss, "error": sv.error,
                "challenger": s_chal, "challenger_loss": l_chal,
                "drift": drift, "swap": swap, "champion_version": self.champion.version}

    def _train_one(self, z: np.ndarray, t, grant: Grant) -> tuple[np.ndarray, int]:
        """The granted steps on the new sample plus its replayed rows; the challenger's scores
        of the sample before the first step (or without one), and the steps taken."""
        tr, sc, s_chal, taken = self.trainer, self.scaler, None, 0
        before = self._arrays_if(grant.held)
        t0 = time.perf_counter()
        for _ in range(grant.steps if grant.paid else 0):
            # the replayed rows' loss (plasticity rule) on every 4th label: it is a faded mean anyway
            s = tr.fill_step(z, t, self._sources, sc, replay_loss=s_chal is None and not self.counters["labels"] & 3)
            if s_chal is None:
                s_chal = s
                if tr.last_loss_of and tr.ranges[1][1] > tr.ranges[1][0]:
                    self.plasticity.fade_one("replay", tr.last_loss)
            taken += 1
        if taken:
            self.budget.charge(time.perf_counter() - t0)
        self._keep_apart(before)
        if s_chal is None:
            s_chal = tr.score(z if sc is None else sc.transform_one(z))
        return s_chal, taken

    def learn_many(self, Z, Y) -> dict:
        """Test then train on a batch: every row is scored by every head before one step on the
        batch plus its share of replayed rows (``batch - 1`` new rows per reservoir share, as
        ``learn_one``). Rows that ``learn_one`` would reject are rejected and counted; returns
        ``{"accepted", "served" [n, K], "challenger" [n, K], "drift", "swap"}``: the champion's
        and the challenger's scores of the accepted rows before they trained."""
        Z, T = batch.accepted_rows(Z, Y, task=self.task, feature_size=self.feature_size, outputs=self.outputs,
                                   n_classes=self._n_classes, target=self._target, rejected=self.rejected)
        m = len(Z)
        if not m:
            return {"accepted": 0, "served": np.zeros((0, self.outputs)), "drift": None, "swap": None}
        champion, ev = self.champion, self.evaluator
        sv = ev.test_many(champion, self._global, Z, T)
        grant = self._admit(sv, T, m, one=False)
        before = self._arrays_if(grant.held)
        t0 = time.perf_counter()
        s_chal, replay_loss = batch.train_rows(self.trainer, Z, T, paid=grant.paid, steps=grant.steps,
                                               sources=self._sources, batch_size=self.cfg.batch, scaler=self.scaler)
        self.budget.charge(time.perf_counter() - t0)
        self._keep_apart(before)
        if replay_loss is not None:
            self.plasticity.fade_one("replay", replay_loss)
        l_chal, e_chal = ev.challenger_many(s_chal, T)
        self.replay.add_many(Z, T)
        self.recent.add_many(Z, T)
        drift, swap = self._settle(m, sv, l_chal, e_chal, grant.paid * grant.steps, adapted=champion is not self._global,
                                   one=False)
        return {"accepted": m, "served": sv.scores, "challenger": s_chal, "drift": drift, "swap": swap}

    def _admit(self, sv: Served, targets, n: int, *, one: bool) -> Grant:
        """Before training, for ``n`` labels just scored (``learn_one``: one row's scores and target):
        note them with the label guard, set the schedule (plastic or not) and take the
        training budget's grant, the first labels first, counting the others as skipped.
        One path for both entry points (a batch of contradicting labels is held as the same
        labels one by one; the budget pays ``steps`` steps a label)."""
        g, cfg = self.guard, self.cfg
        held = False
        if g is not None:
            if one:  # learn_one's hot path: the scalar form of the same rule (tested equal)
                held = g.observe(g.contradicts(sv.scores, sv.global_scores, int(targets)))
            else:
                held = g.observe_many(g.contradicts_many(sv.scores, sv.global_scores, targets))
        self._reference_snap = None
        plastic = self.plasticity.plastic
        if plastic != self._boosting:
            self._set_sources(boosting=plastic)
        self.trainer.set_lr(self.lr * cfg.boost_lr if plastic else self.lr)
        steps = cfg.steps_per_label * cfg.boost_steps if plastic else cfg.steps_per_label
        paid = self.budget.take(n, cost=steps)
        self.counters["train_steps_skipped"] += n - paid
        return Grant(held, paid, steps)

    def _settle(self, n: int, sv: Served, challenger_loss, challenger_error, trained: int, *, adapted: bool, one: bool):
        """After training, for the same ``n`` labels (arrays from ``learn_many``): the paired evidence,
        the counters, the plasticity rules and the swap the policy calls for; ``(drift, swap)``.
        One path for both entry points: counters before the detectors, so that every event
        counts the labels that led to it."""
        ev, pl, c = self.evaluator, self.plasticity, self.counters  # one: plain floats; else arrays
        if one:
            ev.pair_one(sv, challenger_loss, adapted)
            pl.fade_new_one(challenger_error)
        else:
            ev.pair_many(sv, challenger_loss, adapted)
            pl.fade_new_many(challenger_error)
        c["labels"] += n
        c["train_steps"] += trained  # label-steps
        if self.trainer.logit_offset is not None:
            self._update_logit_offset()
        self.since_swap += n
        pl.count(n)
        drift = pl.watch_one(sv.error, sv.loss) if one else pl.watch_many(sv.error, sv.loss)
        if drift is not None:
            self._start_boost(drift)
        else:
            why = pl.loss_ratio(len(self.replay))
            if why is not None:
                drift = "loss_ratio"
                self._start_boost(drift, **why)
        return drift, self._maybe_swap()

    def _start_boost(self, detector: str, **why) -> None:
        self.counters["drifts"] += 1
        self.plasticity.start()
        self._emit("drift", detector=detector, labels=self.counters["labels"], **self.evaluator.losses(), **why)
