"""Synthetic feature streams with a controllable shift, for tests and examples of the learner.

The real benchmark runs the shipped backbone on ``edge.sim`` windows; this stand-in
skips the backbone so the learner's logic can be tested in milliseconds: Gaussian
class clusters in feature space, and a "shift" that maps features through a fixed
random affine transform (what a new mounting or a gain change does to a backbone's
features, to first order).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F


class ClusterStream:
    """Gaussian class clusters in ``dim`` dimensions; ``sample(n, shifted=)`` draws labelled features.

    >>> s = ClusterStream(dim=8, classes=3, seed=0)
    >>> z, y = s.sample(5, rng=np.random.default_rng(1))
    >>> z.shape, y.dtype
    ((5, 8), dtype('int64'))
    """

    def __init__(self, *, dim: int = 64, classes: int = 4, sep: float = 1.2, noise: float = 1.0,
                 shift: float = 1.0, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.dim, self.classes, self.noise = dim, classes, noise
        self.means = rng.normal(0, sep, (classes, dim)).astype(np.float32)
        q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
        # a partial rotation plus an offset: the shifted clusters overlap the wrong classes
        self.A = ((1 - shift) * np.eye(dim) + shift * q).astype(np.float32)
        self.b = (shift * rng.normal(0, sep, dim)).astype(np.float32)

    def sample(self, n: int, *, rng: np.random.Generator, shifted: bool = False, labels=None):
        y = rng.integers(0, self.classes, n) if labels is None else np.asarray(labels, np.int64)
        z = self.means[y] + rng.normal(0, self.noise, (n, self.dim)).astype(np.float32)
        if shifted:
            z = z @ self.A.T + self.b
        return z.astype(np.float32), y.astype(np.int64)


def fit_linear_head(z: np.ndarray, y: np.ndarray, classes: int, *, epochs: int = 200, lr: float = 0.05, seed: int = 0) -> dict:
    """A softmax-regression head ``{"weight", "bias"}`` fitted offline (the "shipped" head)."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(z.shape[1], classes)
    opt = torch.optim.Adam(lin.parameters(), lr=lr)
    zt, yt = torch.from_numpy(z), torch.from_numpy(y)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(lin(zt), yt).backward()
        opt.step()
    return {"weight": lin.weight.detach().numpy().copy(), "bias": lin.bias.detach().numpy().copy()}
