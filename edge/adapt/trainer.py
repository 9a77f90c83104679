"""One lean training step of a head on (new sample + replayed samples).

The hot path of online learning: per label it must cost well under a millisecond on
one core. So the batch arrays are allocated once and filled in place
(``ndarray.take(..., out=)``), and the challenger's test-then-train score of the new sample
is read from row 0 of the step's own forward pass instead of a second forward.

The step itself runs in numpy on the head's closed-form forward and gradient
(``forward_np`` / ``grad_np``) and, for Adam, a numpy Adam over the head's flat
parameter buffer (``AdamState``): at these sizes torch's per-op dispatch and the
optimizer's Python wrapper cost several times the arithmetic. The torch optimizer
object is kept for its checkpoint format (``state_dict`` is the one torch writes) and
runs the update itself for SGD. A head without a closed form would train by autograd.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch.nn import functional as F

from edge.adapt.adam import AdamState


class HeadTrainer:
    """Owns a head's optimizer and preallocated batch; ``fill`` then ``step``."""

    def __init__(self, head, *, task: str, batch: int, lr: float, optimizer: str = "adam", anchor: float = 0.0):
        self.head = head
        self.task = task
        self.classification = task == "classification"
        self.anchor = float(anchor)
        self.lr = float(lr)
        self.params = [p for p in head.parameters() if p.requires_grad]
        self.opt = _optimizer(optimizer, self.params, lr)
        d = head.base_weight.shape[1]
        k = head.base_weight.shape[0]
        self.zb = torch.zeros(batch, d)
        self.yb = torch.zeros(batch, dtype=torch.long) if self.classification else torch.zeros(batch, k)
        self.z_np = self.zb.numpy()
        self.y_np = self.yb.numpy()
        self.batch = batch
        self._rows = np.arange(batch)
        self._lr = float(lr)
        self.closed_form = getattr(head, "grad_np", None) is not None
        self.adam = None
        if self.closed_form:
            # the gradient lives in one flat buffer; the parameters' .grad are views of it
            # (what torch's SGD reads)
            self._grad_t = torch.zeros(head.flat.size)
            self.grad = self._grad_t.numpy()
            off = 0
            for p in self.params:
                p.grad = self._grad_t[off: off + p.numel()].view_as(p)
                off += p.numel()
            g = self.opt.param_groups[0]
            if isinstance(self.opt, torch.optim.Adam) and not (g["weight_decay"] or g["amsgrad"] or g["maximize"]):
                self.adam = AdamState(head.flat.size, betas=g["betas"], eps=g["eps"])

    def set_lr(self, lr: float) -> None:
        if lr != self._lr:
            self._lr = lr
            for g in self.opt.param_groups:
                g["lr"] = lr

    def fill(self, z, y, sources) -> int:
        """Row 0 = the new sample; then ``n`` rows from each ``(buffer, n)`` in ``sources``."""
        self.z_np[0] = z
        self.y_np[0] = y
        row = 1
        for buf, n in sources:
            idx = buf.sample_indices(min(n, self.batch - row))
            k = len(idx)
            if k:
                buf.z.take(idx, 0, self.z_np[row: row + k])
                buf.y.take(idx, 0, self.y_np[row: row + k])
                row += k
        return row

    def step(self, n: int) -> np.ndarray:
        """One optimizer step on the first ``n`` rows; returns row 0's scores *before* the step.

        Scores are softmax probabilities for classification, raw outputs otherwise (the
        challenger's test-then-train prediction of the new sample). The batch loss
        itself is never computed: nothing needs it (the prequential metrics come from
        row 0), and on this path every 20 microseconds count.
        """
        if not self.closed_form:
            return self._step_autograd(n)
        z = self.z_np[:n]
        g, cache = self.head.forward_np(z)
        if self.classification:  # d(mean cross-entropy)/d(logits) = (softmax - onehot) / n
            g -= g.max(axis=1, keepdims=True)
            np.exp(g, out=g)
            g /= g.sum(axis=1, keepdims=True)
            s0 = g[0].copy()
            g[self._rows[:n], self.y_np[:n]] -= 1.0
            g /= n
        else:  # d(mean squared error)/d(outputs)
            s0 = g[0].copy()
            g -= self.y_np[:n]
            g *= 2.0 / g.size
        self.head.grad_np(z, g, self.anchor, self.grad, cache)
        if self.adam is not None:
            self.adam.update(self.head.flat, self.grad, self._lr)
        else:
            self.opt.step()
        return s0

    def _step_autograd(self, n: int) -> np.ndarray:
        z, y = self.zb[:n], self.yb[:n]
        out = self.head(z)
        loss = F.cross_entropy(out, y) if self.classification else F.mse_loss(out, y)
        if self.anchor:
            loss = loss + self.anchor * self.head.anchor_loss()
        self.opt.zero_grad(set_to_none=False)
        loss.backward()
        self.opt.step()
        return self._scores(out.detach()[0].numpy())

    def score(self, z) -> np.ndarray:
        """The head's scores for one sample, without training (see ``step``)."""
        self.z_np[0] = z
        if self.closed_form:
            return self._scores(self.head.forward_np(self.z_np[:1])[0][0])
        with torch.no_grad():
            return self._scores(self.head(self.zb[:1])[0].numpy())

    def _scores(self, out: np.ndarray) -> np.ndarray:
        if not self.classification:
            return out.copy()
        e = np.exp(out - out.max())
        return e / e.sum()

    def reset(self) -> None:
        """Back to the base head with a fresh optimizer state (after a rollback)."""
        self.head.reset_to_base()
        self.opt.state.clear()
        if self.adam is not None:
            self.adam.clear()

    def state_dict(self) -> dict:
        """A copy: the live optimizer tensors keep changing (and a second learner loading
        them must not share them). The optimizer part is torch's own format."""
        if self.adam is not None:
            self.adam.to_torch(self.opt, self.params)
        return copy.deepcopy({"head": self.head.state_dict(), "optimizer": self.opt.state_dict()})

    def load_state_dict(self, s: dict) -> None:
        self.head.load_state_dict({k: torch.as_tensor(v) for k, v in s["head"].items()})
        self.opt.load_state_dict(s["optimizer"])
        if self.adam is not None:
            self.adam.from_torch(self.opt, self.params)
        self._lr = None  # force set_lr to write the configured rate into the loaded groups
        self.set_lr(self.lr)


def _optimizer(kind: str, params, lr: float):
    """Fused CPU Adam where torch has it (a third of the single-tensor step's cost)."""
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, foreach=False)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, foreach=False)
