"""Adam in numpy over one flat parameter buffer: the optimizer of the per-label step.

``torch.optim.Adam.step`` spends ~30 microseconds in its Python wrapper, profiler hooks
and tensor grouping before a fused kernel that takes a few; for a head of a few
hundred parameters the same arithmetic in numpy costs ~7. Pure: arrays in, arrays
updated in place; no torch.
"""
from __future__ import annotations

import math

import numpy as np


class AdamState:
    """Adam's moments and step count for one flat parameter buffer, updated in numpy.

    The same update as ``torch.optim.Adam`` (``weight_decay`` added to the gradient, as
    torch's L2 form) or ``torch.optim.AdamW`` (``decoupled=True``: the weights shrink by
    ``lr * weight_decay`` first), in float32; results agree with torch to float32
    rounding (``tests/test_adapt_trainer.py``), not bit for bit: torch fuses
    multiply-adds.
    """

    kind = "adam"

    def __init__(self, size: int, *, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 decoupled: bool = False):
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.decoupled = bool(decoupled)
        self.m = np.zeros(size, np.float32)
        self.v = np.zeros(size, np.float32)
        self._tmp = np.zeros(size, np.float32)
        self._den = np.zeros(size, np.float32)
        self._g = np.zeros(size, np.float32)
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
        if self.weight_decay:
            if self.decoupled:
                p *= np.float32(1.0 - lr * self.weight_decay)
            else:
                np.multiply(p, np.float32(self.weight_decay), out=self._g)
                self._g += g
                g = self._g
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

    def state_dict(self) -> dict:
        return {"kind": self.kind, "steps": self.steps, "m": self.m.copy(), "v": self.v.copy()}

    def load_state_dict(self, s: dict) -> None:
        if s.get("kind") != self.kind or np.shape(s["m"]) != self.m.shape or np.shape(s["v"]) != self.v.shape:
            raise ValueError(f"optimizer state is {s.get('kind')!r} with moments of shapes {np.shape(s.get('m'))} and "
                             f"{np.shape(s.get('v'))}, expected {self.kind!r} of size {self.m.size}")
        steps = int(s["steps"])
        if steps < 0:
            raise ValueError(f"optimizer state has {steps} steps")
        self.m[:], self.v[:], self.steps = s["m"], s["v"], steps
