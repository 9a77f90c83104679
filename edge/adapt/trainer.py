"""One lean training step of a head on (new sample + replayed samples).

The hot path of online learning: per label it must cost well under a millisecond on
one core. So the batch arrays are allocated once and filled in place
(``ndarray.take(..., out=)``), and the challenger's test-then-train score of the new
sample is read from row 0 of the step's own forward pass instead of a second forward.

The step runs in numpy on the head's closed-form forward and gradient
(``forward_np`` / ``grad_np``) and a numpy optimizer over the head's flat parameter
buffer (``edge.adapt.optim``): at these sizes torch's per-op dispatch and the
optimizer's Python wrapper cost several times the arithmetic. A linear head under
Adam/AdamW runs the same rule compiled, in one call (``edge.adapt.kernels``; the numpy
step is its reference and fallback; ``compiled=False`` forces numpy). A head without a closed
form (a user's own torch module, ``edge.adapt.torch_head``) trains by autograd through
its own ``autograd_step``; only that path imports torch.

Losses: mean squared error (regression, forecasting), softmax cross-entropy
(classification with K >= 2 outputs) or binary cross-entropy on one logit
(classification with one output: ``BCEWithLogitsLoss``).
"""
from __future__ import annotations

import math

import numpy as np

from edge.adapt import kernels
from edge.adapt.activations import binary_scores, sigmoid, sigmoid_array, softmax
from edge.adapt.adam import AdamState
from edge.adapt.heads import LinearHead
from edge.adapt.optim import OptimizerSpec, make_optimizer


class HeadTrainer:
    """Owns a head's optimizer and preallocated batch; ``fill`` then ``step``."""

    def __init__(self, head, *, task: str, batch: int, lr: float | None = None, optimizer="adam", anchor: float = 0.0,
                 compiled: bool = True):
        self.head = head
        self.task = task
        self.classification = task == "classification"
        k, d = head.out_features, head.in_features
        self.binary = self.classification and k == 1
        self.anchor = float(anchor)
        spec = optimizer if isinstance(optimizer, OptimizerSpec) else OptimizerSpec(kind=optimizer, lr=lr if lr is not None else 1e-3)
        self.spec = spec
        self.lr = float(lr if lr is not None else spec.lr)
        self._lr = self.lr
        self.z_np = np.zeros((batch, d), np.float32)
        self.y_np = np.zeros(batch, np.int64) if self.classification else np.zeros((batch, k), np.float32)
        self.batch = batch
        self._rows = np.arange(batch)
        self.closed_form = getattr(head, "grad_np", None) is not None
        self.opt = None
        self._want_compiled = bool(compiled)
        if self.closed_form:
            self.grad = np.zeros(head.flat.size, np.float32)
            self.opt = make_optimizer(spec, head.flat.size)
        else:
            head.bind_optimizer(spec, self.lr)
        self._choose_path()
        self.ranges: list[tuple[int, int]] = []
        self.last_loss_of = None  # (start, end): rows whose mean loss the next step records
        self.last_loss = math.nan
        # classification: added to the logits inside the loss only (never to what is served
        # or scored), log of each class's evidence weight (edge.adapt.learner, "class evidence")
        self.logit_offset: np.ndarray | None = None

    def set_lr(self, lr: float) -> None:
        self._lr = float(lr)

    def _choose_path(self) -> None:
        """The compiled step for a plain linear head under Adam/AdamW, when numba imports."""
        fits = type(self.head) is LinearHead and isinstance(self.opt, AdamState)
        if fits and self._want_compiled:
            kernels.warn_unavailable_once()
        self.compiled = fits and self._want_compiled and kernels.AVAILABLE
        if self.compiled:
            kernels.warm()  # its first call's load, here and not inside a budgeted step
            k = self.head.out_features
            self._mode = (kernels.MODE_BINARY if self.binary else kernels.MODE_SOFTMAX) if self.classification \
                else kernels.MODE_REGRESSION
            self._grad64 = np.zeros(self.head.flat.size, np.float64)
            self._hp = np.zeros(6, np.float64)
            self._hp[4], self._hp[5] = self.opt.beta1, self.opt.beta2
            self._no_off = np.zeros(0, np.float32)
            self._no_yc = np.zeros(0, np.int64)
            self._no_yr = np.zeros((0, k), np.float32)
            self._width = 2 if self.binary else k

    def set_optimizer(self, spec: OptimizerSpec, *, module_optimizer=None) -> None:
        """Train from now on with ``spec`` (the head keeps its weights; the optimizer's moments
        start afresh); a module head runs ``module_optimizer`` itself when given. The library
        calls it when the user's optimizer replaces the default it chose (``edge.learning``)."""
        self.spec = spec
        self.lr = self._lr = float(spec.lr)
        if self.closed_form:
            self.opt = make_optimizer(spec, self.head.flat.size)
            self._choose_path()
            return
        if module_optimizer is not None:
            self.head.user_optimizer = module_optimizer
        self.head.bind_optimizer(spec, self.lr)

    def fill(self, z, y, sources) -> int:
        """Row 0 = the new sample; then ``n`` rows from each ``(buffer, n)`` in ``sources``.

        ``ranges`` records which rows came from which source.
        """
        self.z_np[0] = z
        self.y_np[0] = y
        row = 1
        self.ranges = []
        for buf, n in sources:
            idx = buf.sample_indices(min(n, self.batch - row))
            k = len(idx)
            if k:
                buf.z.take(idx, 0, self.z_np[row: row + k])
                buf.y.take(idx, 0, self.y_np[row: row + k])
            self.ranges.append((row, row + k))
            row += k
        return row

    def fill_step(self, z, y, sources, scaler, *, replay_loss: bool) -> np.ndarray:
        """``fill``, the scaler's transform of the batch (``scaler``: an ``OnlineScaler`` or None)
        and ``step``, in one compiled call where the head takes the compiled path (else those
        three: ``learn_one``'s per-label step, where each numpy call costs more than its
        arithmetic); returns row 0's scores before the step. ``replay_loss``: record the
        replayed rows' error (``last_loss``). ``ranges`` as ``fill`` sets them."""
        if not self.compiled:
            n = self.fill(z, y, sources)
            if scaler is not None:
                scaler.transform_many(self.z_np[:n], out=self.z_np[:n])
            self.last_loss_of = self.ranges[1] if replay_loss else None
            return self.step(n)
        (rec, n_rec), (rep, n_rep) = sources
        ri = rec.sample_indices(min(n_rec, self.batch - 1))
        pi = rep.sample_indices(min(n_rep, self.batch - 1 - len(ri)))
        a = 1 + len(ri)
        self.ranges = [(1, a), (a, a + len(pi))]
        self.last_loss_of = self.ranges[1] if replay_loss else None
        hp = self._hp
        hp[0], hp[1], hp[2], hp[3] = self.opt.advance(self._lr)
        want = self.last_loss_of
        lo, hi = want if want else (0, 0)
        h, o = self.head, self.opt
        off = self.logit_offset if self.classification and self.logit_offset is not None else self._no_off
        s0 = np.empty((1, self._width), np.float32)
        if self.classification:
            y0c, y0r, yc, yr = y, self._no_off, self.y_np, self._no_yr
            rc, rr, pc, pr = rec.y, self._no_yr, rep.y, self._no_yr
        else:
            y0c, y0r, yc, yr = 0, y, self._no_yc, self.y_np
            rc, rr, pc, pr = self._no_yc, rec.y, self._no_yc, rep.y
        sc = scaler is not None  # its float32 mean and inverse std, kept current by the scaler itself
        loss = kernels.fill_step(h.flat, h.out_features, h.in_features, self.z_np, yc, yr, z, y0c, y0r, rec.z, rc, rr, ri,
                                 rep.z, pc, pr, pi, sc, scaler._mean32 if sc else self._no_off,
                                 scaler._inv32 if sc else self._no_off, self._mode, off, float(self.anchor),
                                 h.base_weight, h.base_bias, self._grad64, o.m, o.v, hp, s0, lo, hi)
        if hi > lo:
            self.last_loss = loss
        return s0[0]

    def fill_step_many(self, Z: np.ndarray, T, recent, idx_rec: np.ndarray, replay, idx_rep: np.ndarray, scaler,
                       *, replay_loss: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``learn_many``'s first step in one compiled call (the compiled path only): the batch
        ``Z`` / ``T``, then rows ``idx_rec`` of ``recent`` and ``idx_rep`` of ``replay``, scaled
        (``scaler`` or None), one step. Returns the scores of ``Z``'s rows before the step and
        the filled batch ``(zb, yb)`` (scaled), for any further steps on the same rows."""
        m, k, d = len(Z), self.head.out_features, self.head.in_features
        n = m + len(idx_rec) + len(idx_rep)
        zb = np.empty((n, d), np.float32)
        if self.classification:
            yc, yr = np.empty(n, np.int64), self._no_yr
            t_c, t_r, rc, rr, pc, pr = T, self._no_yr, recent.y, self._no_yr, replay.y, self._no_yr
        else:
            yc, yr = self._no_yc, np.empty((n, k), np.float32)
            t_c, t_r, rc, rr, pc, pr = self._no_yc, T, self._no_yc, recent.y, self._no_yc, replay.y
        lo, hi = (m + len(idx_rec), n) if replay_loss else (0, 0)
        hp = self._hp
        hp[0], hp[1], hp[2], hp[3] = self.opt.advance(self._lr)
        h, o = self.head, self.opt
        off = self.logit_offset if self.classification and self.logit_offset is not None else self._no_off
        s0 = np.empty((m, self._width), np.float32)
        sc = scaler is not None  # its float32 mean and inverse std, kept current by the scaler itself
        loss = kernels.fill_step_many(h.flat, k, d, zb, yc, yr, Z, t_c, t_r, recent.z, rc, rr, idx_rec, replay.z, pc, pr,
                                      idx_rep, sc, scaler._mean32 if sc else self._no_off,
                                      scaler._inv32 if sc else self._no_off, self._mode, off, float(self.anchor),
                                      h.base_weight, h.base_bias, self._grad64, o.m, o.v, hp, s0, lo, hi)
        if hi > lo:
            self.last_loss = loss
        return s0, zb, (yc if self.classification else yr)

    def step(self, n: int) -> np.ndarray:
        """One optimizer step on the first ``n`` rows; returns row 0's scores *before* the step.

        Scores are probabilities for classification, raw outputs otherwise (the
        challenger's test-then-train prediction of the new sample). The batch loss is
        not computed; only, when ``last_loss_of`` names rows, their mean error
        (``last_loss``: 0/1 error or mean absolute error, the replayed rows' error that the
        plasticity rule compares; errors, not log-loss or MSE, because their tails are light).
        """
        if not self.closed_form:
            return self._scores(self.head.autograd_step(self.z_np[:n], self.y_np[:n], self._lr, self.anchor, self.binary))
        s0 = self.step_arrays(self.z_np[:n], self.y_np[:n], first=1)
        return s0[0]

    def step_arrays(self, z: np.ndarray, y: np.ndarray, *, first: int) -> np.ndarray:
        """One step on any batch ``z [n, D]``, ``y [n]`` / ``[n, K]``; the scores of its first
        ``first`` rows before the step (``learn_many``'s challenger predictions)."""
        if not self.closed_form:
            out = self.head.forward_np(z[:first])[0]
            self.head.autograd_step(z, y, self._lr, self.anchor, self.binary)
            return np.stack([self._scores(o) for o in out])
        if self.compiled:
            return self._step_compiled(z, y, first)
        n = len(z)
        g, cache = self.head.forward_np(z)
        want = self.last_loss_of
        off = self.logit_offset if self.classification else None
        plain = None
        if off is not None:  # the loss sees logits + offset; the scores and the replayed rows' error do not
            plain = self._plain_scores(g, y, first, want)
            want = None
            g += off[1] - off[0] if self.binary else off
        if self.binary:  # d(mean BCE)/d(logit) = (sigmoid - y) / n
            sigmoid_array(g, inplace=True)
            p0 = g[:first, 0]
            s0 = np.stack([1.0 - p0, p0], axis=1)
            if want and want[1] > want[0]:
                a, b = want
                self.last_loss = float(np.mean((g[a:b, 0] >= 0.5) != (y[a:b] == 1)))
            g[:, 0] -= y
            g /= n
        elif self.classification:  # d(mean cross-entropy)/d(logits) = (softmax - onehot) / n
            softmax(g, inplace=True)
            s0 = g[:first].copy()
            rows = self._rows[:n] if n <= self.batch else np.arange(n)
            if want and want[1] > want[0]:
                a, b = want
                self.last_loss = float(np.mean(g[a:b].argmax(1) != y[a:b]))
            g[rows, y] -= 1.0
            g /= n
        else:  # d(mean squared error)/d(outputs)
            s0 = g[:first].copy()
            g -= y
            if want and want[1] > want[0]:
                a, b = want
                self.last_loss = float(np.mean(np.abs(g[a:b])))
            g *= 2.0 / g.size
        self.head.grad_np(z, g, self.anchor, self.grad, cache)
        self.opt.update(self.head.flat, self.grad, self._lr)
        return s0 if plain is None else plain

    def _step_compiled(self, z: np.ndarray, y: np.ndarray, first: int) -> np.ndarray:
        """``step_arrays`` in one compiled call (``edge.adapt.kernels``): the same rule."""
        hp = self._hp
        hp[0], hp[1], hp[2], hp[3] = self.opt.advance(self._lr)
        want = self.last_loss_of
        a, b = want if want else (0, 0)
        off = self.logit_offset if self.classification and self.logit_offset is not None else self._no_off
        h, o = self.head, self.opt
        s0 = np.empty((first, self._width), np.float32)
        if self.classification:
            yc, yr = y, self._no_yr
        else:
            yc, yr = self._no_yc, y
        loss = kernels.linear_adam_step(h.flat, h.out_features, h.in_features, z, yc, yr, len(z), self._mode, off,
                                        float(self.anchor), h.base_weight, h.base_bias, self._grad64, o.m, o.v, hp,
                                        first, s0, a, b)
        if b > a:
            self.last_loss = loss
        return s0

    def _plain_scores(self, g: np.ndarray, y: np.ndarray, first: int, want) -> np.ndarray:
        """The first rows' scores, and the replayed rows' error (``last_loss``), from logits ``g``
        as they are served, before a ``logit_offset`` is added for the loss."""
        if want and want[1] > want[0]:
            a, b = want
            pred = (g[a:b, 0] >= 0.0) != (y[a:b] == 1) if self.binary else g[a:b].argmax(1) != y[a:b]
            self.last_loss = float(np.mean(pred))
        return binary_scores(g[:first]) if self.binary else softmax(g[:first])

    def score(self, z) -> np.ndarray:
        """The head's scores for one sample, without training (see ``step``)."""
        self.z_np[0] = z
        return self._scores(self.head.forward_np(self.z_np[:1])[0][0])

    def _scores(self, out: np.ndarray) -> np.ndarray:
        if not self.classification:
            return np.array(out, copy=True)
        if self.binary:
            p = sigmoid(out[0])
            return np.array([1.0 - p, p], np.float32)
        return softmax(out)

    def reset(self) -> None:
        """Back to the base head with a fresh optimizer state (after a rollback)."""
        self.head.reset_to_base()
        if self.opt is not None:
            self.opt.clear()
        else:
            self.head.bind_optimizer(self.spec, self._lr)

    def state_dict(self) -> dict:
        """A copy of the head and the optimizer state, all numpy (no torch format)."""
        opt = self.opt.state_dict() if self.opt is not None else self.head.optimizer_state()
        return {"head": self.head.state_dict(), "optimizer": opt}

    def load_state_dict(self, s: dict) -> None:
        self.head.load_state_dict(s["head"])
        if self.opt is not None:
            self.opt.load_state_dict(s["optimizer"])
        else:
            self.head.load_optimizer_state(s["optimizer"])
