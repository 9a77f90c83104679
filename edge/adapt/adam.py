"""Adam in numpy over one flat parameter buffer: the optimizer of the per-label step.

``torch.optim.Adam.step`` spends ~30 microseconds in its Python wrapper, profiler hooks
and tensor grouping before a fused kernel that takes a few; for a head of a few
hundred parameters the same arithmetic in numpy costs ~7. Pure: arrays in, arrays
updated in place.
"""
from __future__ import annotations

import math

import numpy as np
import torch


class AdamState:
    """Adam's moments and step count for one flat parameter buffer, updated in numpy.

    The same update as ``torch.optim.Adam`` (no weight decay, no amsgrad), in the same
    float32 arithmetic; results agree with torch's fused kernel to float32 rounding
    (``tests/test_adapt_trainer.py``), not bit for bit: torch fuses multiply-adds.
    ``to_torch`` / ``from_torch`` move the state through a torch optimizer's per-parameter
    state, so checkpoints keep torch's format.
    """

    def __init__(self, size: int, *, betas=(0.9, 0.999), eps: float = 1e-8):
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps = float(eps)
        self.m = np.zeros(size, np.float32)
        self.v = np.zeros(size, np.float32)
        self._tmp = np.zeros(size, np.float32)
        self._den = np.zeros(size, np.float32)
        self.steps = 0

    def clear(self) -> None:
        self.m[:] = 0.0
        self.v[:] = 0.0
        self.steps = 0

    def update(self, p: np.ndarray, g: np.ndarray, lr: float) -> None:
        """One Adam step of ``p`` (in place) along gradient ``g``.

        The first step moves every weight by ``lr`` against the sign of its gradient:

        >>> adam, p = AdamState(2), np.array([1.0, -1.0], np.float32)
        >>> adam.update(p, np.array([0.5, -2.0], np.float32), lr=0.1)
        >>> [round(float(x), 3) for x in p], adam.steps
        ([0.9, -0.9], 1)
        """
        b1, b2 = self.beta1, self.beta2
        self.steps += 1
        bias_correction1 = 1.0 - b1**self.steps
        bias_correction2_sqrt = math.sqrt(1.0 - b2**self.steps)
        m, v, tmp, den = self.m, self.v, self._tmp, self._den
        # m <- lerp(m, g, 1 - beta1); v <- beta2 v + (1 - beta2) g^2
        np.subtract(g, m, out=tmp)
        tmp *= np.float32(1.0 - b1)
        m += tmp
        np.multiply(g, g, out=tmp)
        tmp *= np.float32(1.0 - b2)
        v *= np.float32(b2)
        v += tmp
        # p <- p - lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)
        np.sqrt(v, out=den)
        den /= np.float32(bias_correction2_sqrt)
        den += np.float32(self.eps)
        np.multiply(m, np.float32(-lr / bias_correction1), out=tmp)
        tmp /= den
        p += tmp

    def to_torch(self, opt: torch.optim.Optimizer, params) -> None:
        opt.state.clear()
        if not self.steps:
            return
        off = 0
        for q in params:
            n = q.numel()
            opt.state[q] = {"step": torch.tensor(float(self.steps)),
                            "exp_avg": torch.from_numpy(self.m[off: off + n].copy()).view_as(q),
                            "exp_avg_sq": torch.from_numpy(self.v[off: off + n].copy()).view_as(q)}
            off += n

    def from_torch(self, opt: torch.optim.Optimizer, params) -> None:
        self.clear()
        off = 0
        for q in params:
            n = q.numel()
            st = opt.state.get(q)
            if st:
                self.m[off: off + n] = st["exp_avg"].detach().reshape(-1).numpy()
                self.v[off: off + n] = st["exp_avg_sq"].detach().reshape(-1).numpy()
                self.steps = int(float(st["step"]))
            off += n
        opt.state.clear()  # the live state is here; to_torch writes it back for a checkpoint
