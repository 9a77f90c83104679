"""The evaluator: prequential scores of every head, and the paired evidence between them.

Test then train: each labelled sample is scored by the champion (the served head), the
fleet's global head and the trivial reference *before* anything learns from it, and by
the challenger before its step; the windowed losses (``edge.adapt.metrics.Prequential``)
are what ``serving()``, the margins and the dashboards read, and the paired per-label
losses feed the three sequential tests (``edge.adapt.promotion.BettingTest``):
challenger vs champion at the promotion's margin and at the refresh's, and global head
vs an adapted champion (rollback). The margins each label is tested at are fixed from
the labels before it (``edge.adapt.policy.margins``). A fourth kind of evidence,
``ServeTests``, decides what the library's ``predict`` serves: the trivial reference until
a learned head beats it on a paired test, and the reference again when the reverse test
says so. No I/O, no training.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from edge.adapt.activations import binary_scores, softmax
from edge.adapt.metrics import Prequential, sample_losses
from edge.adapt.policy import NO_MARGINS, SERVE_ALPHA, Margins, margins
from edge.adapt.promotion import BettingTest, is_betting_state
from edge.adapt.reference import Reference
from edge.adapt.rowscore import Stack, loss_err, mode_of

HEADS = ("champion", "challenger", "global", "reference")
TESTS = ("promote", "refresh", "rollback")


@dataclass(slots=True)
class Served:
    """One label's (or a batch's) scores and losses of the champion and the global head, before
    training: lists and floats for one label (``test_one``), arrays for a batch."""

    scores: list | np.ndarray  # the champion's: what was served
    loss: float | np.ndarray
    error: float | np.ndarray
    global_scores: list | np.ndarray
    global_loss: float | np.ndarray
    reference_loss: float | np.ndarray  # the trivial reference's, before it learned the label


class ServeTests:
    """What the library's ``predict`` serves, on anytime-valid evidence (issue 18).

    The reference serves until ``leave`` (a ``BettingTest`` of reference loss minus the
    learned head's, per label, at margin ``Margins.serve``) reaches an e-value of
    ``1 / SERVE_ALPHA``; then the learned head serves until ``back`` (the reverse pairing)
    does. Each switch starts both tests afresh. Only the test that can switch is fed, one
    ``update`` a label. The learned head's loss is the one ``serving()`` would serve: the
    challenger's while ``live`` (its windowed loss is below the champion's, decided before
    the label), else the champion's, so the evidence is about the predictions served.
    A fixed-sample rule (10 labels 5% below the reference) served noise on a no-signal
    stream in rows 10-32 (BENCHMARKS.md, "Serving on evidence")."""

    __slots__ = ("learned", "live", "leave", "back", "need")

    def __init__(self, bound: float):
        self.learned = False  # the learned head serves (else the reference)
        self.live = False  # of the learned heads, the challenger serves
        self.leave, self.back = BettingTest(bound=bound), BettingTest(bound=bound)
        self.need = _threshold(SERVE_ALPHA)

    def one(self, learned_loss: float, reference_loss: float, margin: float, scale: float) -> None:
        """One label's paired losses (plain floats)."""
        t, a, b = self._paired(learned_loss, reference_loss)
        t.update(a, b, margin, scale)
        self._settle(t)

    def many(self, learned_losses, reference_losses, margin: float, scale: float) -> None:
        """A batch's paired losses (arrays), read once at its end: the batch was served by one choice."""
        t, a, b = self._paired(learned_losses, reference_losses)
        t.update_many(a, b, margin, scale)
        self._settle(t)

    def _paired(self, learned, reference):
        """The test that could end the current choice, with the losses in its order: while the
        learned head serves, evidence that it is worse (``back``); else that it is better."""
        return (self.back, learned, reference) if self.learned else (self.leave, reference, learned)

    def _settle(self, t: BettingTest) -> None:
        if t.log_wealth >= self.need:
            self.switch(not self.learned)

    def switch(self, learned: bool) -> None:
        self.learned = bool(learned)
        self.leave.reset()
        self.back.reset()

    def state_dict(self) -> dict:
        return {"learned": self.learned, "leave": self.leave.state_dict(), "back": self.back.state_dict()}

    def load_state_dict(self, s) -> None:
        """Restore; a state without serving evidence (from before it existed) restarts it, serving
        the reference until a learned head passes the test again."""
        if not (isinstance(s, dict) and is_betting_state(s.get("leave")) and is_betting_state(s.get("back"))):
            self.switch(False)
            return
        learned = s.get("learned")
        if not isinstance(learned, bool):
            raise ValueError(f"serving state 'learned' must be true or false, got {learned!r}")
        self.leave.load_state_dict(s["leave"])
        self.back.load_state_dict(s["back"])
        self.learned = learned


@functools.lru_cache(maxsize=16)
def _threshold(alpha: float) -> float:
    """The log-wealth ``BettingTest.passes`` needs at ``alpha``."""
    return -math.log(alpha)


class _Unstacked:
    """``rowscore.Stack``'s interface for heads that do not stack (an MLP's, a torch module's):
    each scored on its own, the batch way."""

    __slots__ = ("champion", "glob", "classification")

    def __init__(self, champion, glob, classification: bool):
        self.champion, self.glob, self.classification = champion, glob, classification

    def fits(self, champion, glob) -> bool:
        return self.champion is champion and self.glob is glob

    def scores(self, z: np.ndarray, mode: int) -> tuple[list, list]:
        p = self._one(self.champion, z)
        return p, p if self.glob is self.champion else self._one(self.glob, z)

    def scores_many(self, Z: np.ndarray, classification: bool) -> tuple[np.ndarray, np.ndarray]:
        s = self.champion.predict(Z)
        return s, s if self.glob is self.champion else self.glob.predict(Z)

    def _one(self, snap, z) -> list:
        s = snap.logits(z[None, :])[0]
        if self.classification:
            s = binary_scores(s) if len(s) == 1 else softmax(s, inplace=True)
        return s.tolist()


class Evaluator:
    """Prequential records of the four heads and the three paired tests; see the module docstring."""

    def __init__(self, *, task: str, outputs: int, feature_size: int, config):
        self.task, self.cfg = task, config
        self.classification = task == "classification"
        self.preq = {k: Prequential(task, window=config.eval_window) for k in HEADS}
        self.reference = Reference(task=task, outputs=outputs, in_features=feature_size)
        self.pairs = {k: BettingTest(bound=config.promote_bound) for k in TESTS}
        self.serve = ServeTests(config.promote_bound)
        self.margins: Margins = NO_MARGINS
        self.mode = mode_of(task, outputs)
        self._stack = None  # the champion's and global head's stacked maps (rowscore.Stack)
        self._index_preq()

    def _index_preq(self) -> None:
        """The per-row path's handles on the records (champion, global, reference, challenger):
        refreshed whenever a record is replaced."""
        p = self.preq
        self._preq_one = (p["champion"], p["global"], p["reference"], p["challenger"])

    # -- test: every head scored before it learns ------------------------------------------

    def test_one(self, champion, glob, z: np.ndarray, t) -> Served:
        """Score one sample ``z`` ``[D]`` (float32) with the champion, the global head (the same
        scores when the champion is the global head) and the reference, and record them.
        ``t``: the class index, or the targets as a list of floats. The scores are lists of
        floats (``edge.adapt.rowscore``: one stacked product for both heads)."""
        st, mode, preq = self._stack, self.mode, self._preq_one
        if st is None or not st.fits(champion, glob):
            st = self._stack = Stack.of(champion, glob) or _Unstacked(champion, glob, self.classification)
        s, sg = st.scores(z, mode)
        loss, err = loss_err(s, t, mode)
        preq[0].update_values(loss, err)
        if sg is s:
            lg = loss
            preq[1].update_values(loss, err)
        else:
            lg, eg = loss_err(sg, t, mode)
            preq[1].update_values(lg, eg)
        lr, er = self.reference.test_then_learn(t)
        preq[2].update_values(lr, er)
        return Served(s, loss, err, sg, lg, lr)

    def test_many(self, champion, glob, Z: np.ndarray, T) -> Served:
        """``test_one`` for each row of ``Z`` ``[n, D]`` (the reference scores each row before it learns it)."""
        preq, task = self.preq, self.task
        st = self._stack
        if st is None or not st.fits(champion, glob):
            st = self._stack = Stack.of(champion, glob) or _Unstacked(champion, glob, self.classification)
        s, sg = st.scores_many(Z, self.classification)
        loss, err = sample_losses(s, T, task)
        preq["champion"].update_many(loss, err)
        if sg is s:
            lg, eg = loss, err
        else:
            lg, eg = sample_losses(sg, T, task)
        preq["global"].update_many(lg, eg)
        lr, er = sample_losses(self.reference.learn_many(T), T, task)
        preq["reference"].update_many(lr, er)
        return Served(s, loss, err, sg, lg, lr)

    def challenger_one(self, scores: list, t) -> tuple[float, float]:
        """Record the challenger's scores of one sample (a list), taken before its step: ``(loss, error)``."""
        loss, err = loss_err(scores, t, self.mode)
        self._preq_one[3].update_values(loss, err)
        return loss, err

    def challenger_many(self, scores: np.ndarray, T) -> tuple[np.ndarray, np.ndarray]:
        loss, err = sample_losses(scores, T, self.task)
        self.preq["challenger"].update_many(loss, err)
        return loss, err

    # -- the paired evidence -----------------------------------------------------------------

    def pair_one(self, sv: Served, challenger_loss: float, adapted: bool) -> None:
        """Bet one label's paired losses in the tests, at the margins fixed before it."""
        pairs, m, se = self.pairs, self.margins, self.serve
        pairs["promote"].update(sv.loss, challenger_loss, m.promote, m.scale)
        se.one(challenger_loss if se.live else sv.loss, sv.reference_loss, m.serve, m.scale)
        if adapted:
            pairs["refresh"].update(sv.loss, challenger_loss, m.refresh, m.scale)
            pairs["rollback"].update(sv.loss, sv.global_loss, m.rollback, m.scale)

    def pair_many(self, sv: Served, challenger_losses: np.ndarray, adapted: bool) -> None:
        """``pair_one`` for each row in turn, at the margins fixed before the batch."""
        pairs, m, se = self.pairs, self.margins, self.serve
        lc, lh = sv.loss, challenger_losses
        pairs["promote"].update_many(lc, lh, m.promote, m.scale)
        se.many(lh if se.live else lc, sv.reference_loss, m.serve, m.scale)
        if adapted:
            pairs["refresh"].update_many(lc, lh, m.refresh, m.scale)
            pairs["rollback"].update_many(lc, sv.global_loss, m.rollback, m.scale)

    def passing(self, alpha: float, rollback_alpha: float) -> tuple[bool, bool, bool]:
        """Whether the promotion and refresh tests pass at ``alpha`` now, and the rollback test at
        ``rollback_alpha`` with the global head's raw mean loss below the champion's (a
        rollback discards learning: never when the learned head did better on the labels)."""
        p = self.pairs
        promote, refresh, back = p["promote"], p["refresh"], p["rollback"]
        need = _threshold(alpha)
        if promote.log_wealth < need and refresh.log_wealth < need and back.log_wealth < _threshold(rollback_alpha):
            return False, False, False  # the usual case, in three comparisons
        return promote.passes(alpha), refresh.passes(alpha), back.passes(rollback_alpha) and back.raw_gain()

    def update_margins(self) -> None:
        """Fix the margins the next label is tested at, from the windowed losses so far, and
        which learned head would serve it (``ServeTests.live``: the challenger once it has
        ``promote_block`` labels and its windowed loss is below the champion's)."""
        c, g, r, h = self._preq_one
        lc = c.loss.get()
        self.margins = margins(self.cfg, self.task, champion=lc, glob=g.loss.get(), reference=r.loss.get())
        hl = h.loss
        self.serve.live = hl.n >= self.cfg.promote_block and c.loss.n > 0 and hl.get() < lc

    # -- after a swap ---------------------------------------------------------------------------

    def restart(self) -> None:
        """New tests (each spends its alpha again: docs/LEARNING.md, "Promotions")."""
        for p in self.pairs.values():
            p.reset()

    def promoted(self) -> None:
        """The challenger now serves: its record becomes the champion's."""
        preq = self.preq
        preq["champion"].loss.copy_from(preq["challenger"].loss)
        preq["champion"].err.copy_from(preq["challenger"].err)
        self.restart()

    def rolled_back(self) -> None:
        """The global head serves again, and the challenger restarts from it: both take its record."""
        preq = self.preq
        for k in ("champion", "challenger"):
            preq[k].loss.copy_from(preq["global"].loss)
            preq[k].err.copy_from(preq["global"].err)
        self.restart()

    def new_global(self) -> None:
        """A new fleet global head: its record and the rollback test start afresh."""
        self.preq["global"] = Prequential(self.task, window=self.cfg.eval_window)
        self._index_preq()
        self.pairs["rollback"].reset()

    def consolidated(self) -> None:
        """The learned heads changed outside the test (the library's ``incremental_update``):
        their records and every test start afresh; the consolidated champion serves (an explicit
        request) until the reverse serving test sends ``predict`` back to the reference."""
        for k in ("champion", "challenger"):
            self.preq[k] = Prequential(self.task, window=self.cfg.eval_window)
        self._index_preq()
        self.restart()
        self.serve.switch(True)

    # -- read-outs and state -------------------------------------------------------------------

    def losses(self) -> dict:
        return {f"{k}_loss": v.loss.get() for k, v in self.preq.items()}

    def state_dict(self) -> dict:
        return {"preq": {k: v.state_dict() for k, v in self.preq.items()},
                "pairs": {k: p.state_dict() for k, p in self.pairs.items()},
                "reference": self.reference.state_dict(), "serve": self.serve.state_dict()}

    def load_state_dict(self, s: dict) -> None:
        """Restore the ``preq``, ``pairs`` and ``reference`` entries of a learner state. A state
        from before issue 18 holds PairedBlocks' block means, which are no e-values: that
        evidence restarts (a new test), as does a state without ``serve`` (the reference serves
        until a learned head passes the serving test again); a missing entry raises ``KeyError``."""
        for k, v in s["preq"].items():
            self.preq[k].load_state_dict(v)
        pairs = s["pairs"]
        for k, p in self.pairs.items():
            if is_betting_state(pairs.get(k)):
                p.load_state_dict(pairs[k])
            else:
                p.reset()
        self.reference.load_state_dict(s["reference"])
        self.serve.load_state_dict(s.get("serve"))
        self.update_margins()
