"""An online standard scaler: running mean and variance per feature (Welford), bounded.

Features far from zero mean or unit variance (a date, a pressure in pascals) make a
linear head's bias and weights fight and one learning rate wrong for every weight.
The scaler keeps O(D) state whatever the stream's length, is checkpointed with the
learner, and can be folded into a linear layer so that a served snapshot takes raw
features. Pure: arrays in, arrays out.
"""
from __future__ import annotations

import numpy as np

from edge.adapt import kernels


class OnlineScaler:
    """``(z - mean) / std`` with the running mean and variance of everything seen.

    A feature with zero variance so far is only centred (its std counts as 1).

    >>> s = OnlineScaler(2)
    >>> for z in ([1.0, 10.0], [3.0, 10.0]):
    ...     s.learn_one(np.array(z))
    >>> s.transform_one(np.array([3.0, 12.0])).tolist()
    [1.0, 2.0]
    """

    def __init__(self, size: int):
        self.n = 0
        self.mean = np.zeros(size, np.float64)
        self.m2 = np.zeros(size, np.float64)
        self._mean32 = np.zeros(size, np.float32)
        self._inv32 = np.ones(size, np.float32)

    def learn_one(self, z: np.ndarray) -> None:
        self.n += 1
        if kernels.welford_one is not None and z.dtype == np.float32 and z.ndim == 1:  # the same update, one call
            kernels.welford_one(z, self.mean, self.m2, self.n, self._mean32, self._inv32)
            return
        d = z - self.mean
        self.mean += d / self.n
        self.m2 += d * (z - self.mean)
        self._refresh()

    def unlearn_one(self, z: np.ndarray) -> None:
        """Take back the last ``learn_one(z)`` (Welford run backwards): the library learns a
        target before its row is checked and takes it back when the row is refused, which
        costs less per row than checking first.

        >>> s = OnlineScaler(1)
        >>> for v in (1.0, 3.0, 8.0):
        ...     s.learn_one(np.array([v]))
        >>> s.unlearn_one(np.array([8.0]))
        >>> s.n, s.mean.tolist(), s.m2.tolist()
        (2, [2.0], [2.0])
        """
        z = np.asarray(z, np.float64).reshape(-1)
        if self.n <= 1:
            self.n, self.mean[:], self.m2[:] = 0, 0.0, 0.0
        else:
            prev = (self.n * self.mean - z) / (self.n - 1)
            self.m2 -= (z - prev) * (z - self.mean)
            self.mean[:] = prev
            self.n -= 1
        self._refresh()

    def learn_many(self, Z: np.ndarray) -> None:
        """Chan et al.'s parallel update: the same result as ``learn_one`` row by row."""
        Z = np.asarray(Z, np.float64)
        m = len(Z)
        if not m:
            return
        mean_b = Z.mean(0)
        m2_b = ((Z - mean_b) ** 2).sum(0)
        n = self.n + m
        d = mean_b - self.mean
        self.mean += d * (m / n)
        self.m2 += m2_b + d * d * (self.n * m / n)
        self.n = n
        self._refresh()

    def _refresh(self) -> None:
        self._mean32[:] = self.mean
        if self.n:
            var = self.m2 / self.n
            var[var <= 1e-24] = 1.0  # a constant feature so far: centre it only
            np.sqrt(var, out=var)
            np.divide(1.0, var, out=self._inv32, casting="unsafe")

    def transform_one(self, z: np.ndarray) -> np.ndarray:
        return (np.asarray(z, np.float32) - self._mean32) * self._inv32

    def transform_many(self, Z: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        out = np.subtract(np.asarray(Z, np.float32), self._mean32, out=out)
        out *= self._inv32
        return out

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, std)`` now, as copies: a target scaler's way back from standard units,
        ``S * std + mean``, taken before a label updates the statistics (so that what was
        predicted before the label is read back without it)."""
        return self._mean32.copy(), (1.0 / self._inv32).astype(np.float32)

    def fold_output(self, arrays: dict) -> dict:
        """A linear head's arrays rewritten to give raw targets: ``std * (W z + b) + mean``.

        >>> s = OnlineScaler(1)
        >>> s.learn_many(np.array([[1.0], [3.0]]))
        >>> a = s.fold_output({"weight": np.array([[2.0]]), "bias": np.array([0.5])})
        >>> a["weight"].tolist(), a["bias"].tolist()
        ([[2.0]], [2.5])
        """
        std = 1.0 / self._inv32
        out = dict(arrays)
        out["weight"] = np.asarray(arrays["weight"], np.float32) * std[:, None]
        out["bias"] = np.asarray(arrays["bias"], np.float32) * std + self._mean32
        return out

    def fold(self, arrays: dict) -> dict:
        """A head's arrays rewritten to take raw features: every first layer absorbs the scaling.

        ``W ((z - mu) * s) + b = (W * s) z + (b - (W * s) mu)``, for the linear part and
        for an MLP residual's first layer.
        """
        out = dict(arrays)
        for w, b in (("weight", "bias"), ("w1", "b1")):
            if w in arrays:
                ws = np.asarray(arrays[w], np.float32) * self._inv32
                out[w] = ws
                out[b] = np.asarray(arrays[b], np.float32) - ws @ self._mean32
        return out

    def state_dict(self) -> dict:
        return {"n": self.n, "mean": self.mean.copy(), "m2": self.m2.copy()}

    def load_state_dict(self, s: dict) -> None:
        if np.shape(s["mean"]) != self.mean.shape:
            raise ValueError(f"scaler state has {np.size(s['mean'])} features, expected {self.mean.size}")
        self.n, self.mean[:], self.m2[:] = int(s["n"]), s["mean"], s["m2"]
        self._refresh()
