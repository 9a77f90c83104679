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
        step, eps_hat, shrink, l2 = self.advance(lr)
        if shrink != 1.0:
            p *= np.float32(shrink)
        if l2:
            np.multiply(p, np.float32(l2), out=self._g)
            self._g += g
            g = self._g
        m, v, tmp, den = self.m, self.v, self._tmp, self._den
        # m <- lerp(m, g, 1 - beta1); v <- beta2 v + (1 - beta2) g^2
        np.subtract(g, m, out=tmp)
        tmp *= np.float32(1.0 - self.beta1)
        m += tmp
        np.multiply(g, g, out=tmp)
        tmp *= np.float32(1.0 - self.beta2)
        v *= np.float32(self.beta2)
        v += tmp
        # p <- p - step * m / (sqrt(v) + eps_hat): torch's rule with both bias corrections folded in
        np.sqrt(v, out=den)
        den += np.float32(eps_hat)
        np.multiply(m, np.float32(-step), out=tmp)
        tmp /= den
        p += tmp

    def advance(self, lr: float) -> tuple[float, float, float, float]:
        """Count one step; its scalars ``(step, eps_hat, shrink, l2)``, shared by this numpy
        update and the compiled one (``edge.adapt.kernels``), so both apply one rule.

        torch's ``p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)`` is, multiplied through
        by ``sqrt(bc2)``, ``p -= step * m / (sqrt(v) + eps_hat)`` with ``step = lr sqrt(bc2) / bc1``
        and ``eps_hat = eps sqrt(bc2)``: two array operations fewer a step. ``shrink``
        scales the weights first (AdamW's decoupled decay), ``l2`` adds ``l2 * p`` to the
        gradient (Adam's L2 form).

        >>> [float(f"{x:.4g}") for x in AdamState(1).advance(0.1)]  # 0.1 * sqrt(0.001) / 0.1
        [0.03162, 3.162e-10, 1.0, 0.0]
        """
        self.steps += 1
        bc1 = 1.0 - self.beta1**self.steps
        bc2_sqrt = math.sqrt(1.0 - self.beta2**self.steps)
        wd = self.weight_decay
        shrink = 1.0 - lr * wd if self.decoupled else 1.0
        return lr * bc2_sqrt / bc1, self.eps * bc2_sqrt, shrink, 0.0 if self.decoupled else wd

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
