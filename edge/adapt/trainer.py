"""One lean training step of a head on (new sample + replayed samples).

The hot path of online learning: per label it must cost well under a millisecond on
one core. So the batch tensors are allocated once and filled in place through numpy
views (``np.take(..., out=)``), the optimizer is built once, and the challenger's
test-then-train score of the new sample is read from row 0 of the step's own forward
pass instead of a second forward.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch.nn import functional as F


class HeadTrainer:
    """Owns a head's optimizer and preallocated batch; ``fill`` then ``step``."""

    def __init__(self, head, *, task: str, batch: int, lr: float, optimizer: str = "adam", anchor: float = 0.0):
        self.head = head
        self.task = task
        self.anchor = float(anchor)
        self.lr = float(lr)
        params = [p for p in head.parameters() if p.requires_grad]
        self.opt = _optimizer(optimizer, params, lr)
        d = head.base_weight.shape[1]
        k = head.base_weight.shape[0]
        self.zb = torch.zeros(batch, d)
        self.yb = torch.zeros(batch, dtype=torch.long) if task == "classification" else torch.zeros(batch, k)
        self.z_np = self.zb.numpy()
        self.y_np = self.yb.numpy()
        self.batch = batch
        self._minus_one = torch.full((batch, 1), -1.0)

    def set_lr(self, lr: float) -> None:
        if lr != self.opt.param_groups[0]["lr"]:
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
                np.take(buf.z, idx, axis=0, out=self.z_np[row: row + k])
                np.take(buf.y, idx, axis=0, out=self.y_np[row: row + k])
                row += k
        return row

    def refill_replay(self, n_rows: int, sources) -> int:
        """Resample the replay rows for a further step on the same new sample."""
        return self.fill(self.z_np[0].copy(), self.y_np[0].copy(), sources)

    def step(self, n: int) -> torch.Tensor:
        """One optimizer step on the first ``n`` rows; returns row 0's output *before* the step.

        Heads with a closed-form ``backward_from`` (linear, low-rank) skip autograd.
        The batch loss itself is never computed: nothing needs it (the prequential
        metrics come from row 0), and on this path every 20 microseconds count.
        """
        z, y = self.zb[:n], self.yb[:n]
        if self.head.backward_from is None:
            out = self.head(z)
            loss = F.cross_entropy(out, y) if self.task == "classification" else F.mse_loss(out, y)
            if self.anchor:
                loss = loss + self.anchor * self.head.anchor_loss()
            self.opt.zero_grad(set_to_none=False)
            loss.backward()
            out = out.detach()
        else:
            with torch.no_grad():
                out = self.head(z)
                if self.task == "classification":
                    g = torch.softmax(out, 1)
                    g.scatter_add_(1, y[:, None], self._minus_one[:n])
                    g /= n
                else:
                    g = out - y
                    g *= 2.0 / g.numel()
                self.head.backward_from(z, g, self.anchor)
        self.opt.step()
        return out[0]

    @torch.no_grad()
    def score(self, z) -> torch.Tensor:
        """The head's raw output for one sample, without training."""
        self.z_np[0] = z
        return self.head(self.zb[:1])[0]

    def reset(self) -> None:
        """Back to the base head with a fresh optimizer state (after a rollback)."""
        self.head.reset_to_base()
        self.opt.state.clear()

    def state_dict(self) -> dict:
        """A copy: the live optimizer tensors keep changing (and a second learner loading
        them must not share them)."""
        return copy.deepcopy({"head": self.head.state_dict(), "optimizer": self.opt.state_dict()})

    def load_state_dict(self, s: dict) -> None:
        self.head.load_state_dict({k: torch.as_tensor(v) for k, v in s["head"].items()})
        self.opt.load_state_dict(s["optimizer"])
        self.set_lr(self.lr)


def _optimizer(kind: str, params, lr: float):
    """Fused CPU Adam where torch has it (a third of the single-tensor step's cost)."""
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, foreach=False)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, foreach=False)
