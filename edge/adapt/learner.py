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
   scored the same way: ``best()`` serves the learned head (champion or challenger)
   with the lower recent loss, or the reference unless that head beats it by
   ``promote_margin`` (the library's do-no-harm rule; the daemon serves the champion).

With ``AdaptConfig.scale`` the features are standardised online (``edge.adapt.scaler``)
before the head (the replay keeps raw features; every batch is scaled with the current
statistics); snapshots fold the scaling in, so they still take raw features.

The parts, each its own module: ``edge.adapt.evaluator`` (prequential scores and the
paired evidence), ``edge.adapt.policy`` (the pure promotion policy),
``edge.adapt.plasticity`` (detectors, loss ratio, boost) and ``edge.adapt.trainer``; this
class is the glue. ``learn_one`` and ``learn_many`` differ only in how they score and
train (one row, or a batch vectorised: ``edge.adapt.batch``); both go through
``_admit`` (the label guard, the training budget, the schedule) before training and
``_settle`` (counters, plasticity, the swap) after it, the one accounting path.

It runs in the daemon's learner thread; it does no I/O. Events go to ``on_event`` and
to a bounded queue drained by ``events()``.
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass

import numpy as np

from edge.adapt import batch, kernels
from edge.adapt.budget import TrainingBudget
from edge.adapt.evaluator import Evaluator, Served
from edge.adapt.guard import LabelGuard
from edge.adapt.heads import HeadSnapshot, make_head
from edge.adapt.optim import OptimizerSpec
from edge.adapt.plasticity import Plasticity
from edge.adapt.policy import HELD, PROMOTION, REFRESH, ROLLBACK, Situation, decide, level, needed_labels, rollback_level
from edge.adapt.replay import RecentBuffer, ReplayBuffer
from edge.adapt.scaler import OnlineScaler
from edge.adapt.trainer import HeadTrainer
from edge.config import AdaptConfig
from edge.errors import ConfigError, StateError

STATE_FORMAT = 2

log = logging.getLogger("edge.adapt")


@dataclass(slots=True)
class Grant:
    """What ``_admit`` allows the labels just scored: whether the guard holds, how many of
    them (the first ones) train, and their steps each."""

    held: bool
    paid: int
    steps: int


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
    @property
    def preq(self) -> dict:
        return self.evaluator.preq

    @property
    def pairs(self) -> dict:
        return self.evaluator.pairs

    @property
    def reference(self):
        return self.evaluator.reference

    @property
    def detectors(self) -> dict:
        return self.plasticity.detectors

    @property
    def exceed(self):
        return self.plasticity.exceed

    @property
    def boost_left(self) -> int:
        return self.plasticity.boost_left

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
        self.evaluator.new_global()
        self.since_swap = 0
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
        self.evaluator.consolidated()
        self.since_swap = 0
        self.evaluator.update_margins()

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

    def _start_boost(self, detector: str, **why) -> None:
        self.counters["drifts"] += 1
        self.plasticity.start()
        self._emit("drift", detector=detector, labels=self.counters["labels"], **self.evaluator.losses(), **why)

    # -- swaps: the policy decides (edge.adapt.policy), the learner carries it out -------------

    def _maybe_swap(self) -> str | None:
        """Swap if the evidence says so; then fix the margins the next label is tested at."""
        swap = self._decide()
        self.evaluator.update_margins()
        return swap

    def _decide(self) -> str | None:
        cfg, ev, g = self.cfg, self.evaluator, self.guard
        plastic = self.plasticity.plastic
        if self.since_swap < needed_labels(cfg, plastic):
            return None
        alpha, back_alpha = level(cfg, plastic), rollback_level(cfg)
        promote, refresh, rollback = ev.passing(alpha, back_alpha)
        tripped = g is not None and g.tripped
        if not tripped:
            self._anomaly_open = False
        if not (promote or refresh or rollback):  # every decision needs a passing test (policy.decide)
            return None
        d = decide(cfg, Situation(since_swap=self.since_swap, plastic=plastic, adapted=self.champion is not self._global,
                                  guard_ready=g is None or g.seen >= g.warmup, guard_tripped=tripped,
                                  promote=promote, refresh=refresh, rollback=rollback))
        if d == ROLLBACK:
            self._rollback(ev.pairs["rollback"].evidence(back_alpha))
        elif d == PROMOTION:
            self._promote(ev.pairs["promote"].evidence(alpha))
        elif d == REFRESH:
            self._promote(ev.pairs["refresh"].evidence(alpha), refresh=True)
        elif d == HELD:
            self._hold()
        return d

    def _hold(self) -> None:
        """A promotion the label guard holds: counted, and one event per episode."""
        self.counters["promotions_held"] += 1
        if not self._anomaly_open:
            g = self.guard
            self._anomaly_open = True
            self.counters["label_anomalies"] += 1
            self._emit("label_anomaly", held=self.challenger_version(), contradicting_share=round(g.recent_share, 3),
                       history_share=round(g.history, 4), labels=self.counters["labels"],
                       why="recent labels mostly contradict what the serving and global heads are both sure of")

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
        self.evaluator.promoted()
        self.since_swap = 0
        self._emit(kind, version=version, previous=old, champion_loss=evidence.pop("champion_mean_loss"),
                   challenger_loss=evidence.pop("challenger_mean_loss"), **evidence)

    def _rollback(self, evidence: dict) -> None:
        self.counters["rollbacks"] += 1
        old = self.champion.version
        self.champion = self._global  # the atomic swap
        self.trainer.reset()  # the challenger starts over from the global head too
        self._unshared = None  # ... and with it, what it learned while held is gone
        self.evaluator.rolled_back()
        self.since_swap = 0
        self._emit("rollback", version=self.global_version, previous=old, champion_loss=evidence.pop("champion_mean_loss"),
                   global_loss=evidence.pop("challenger_mean_loss"), **evidence)

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
