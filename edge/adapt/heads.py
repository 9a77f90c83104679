"""Adapter heads by type key, and the immutable numpy snapshot the serving path uses.

Three heads sit on the frozen backbone's features ``z [B, D]`` and learn online:

- ``linear``: a full linear layer, initialised from the shipped (or fleet) head;
- ``lowrank``: the shipped head frozen plus a rank-r residual ``U @ V`` and a bias delta,
  so a device moves in a small subspace that is cheap to sync and hard to wreck;
- ``mlp``: the shipped head frozen plus a small residual MLP whose output layer starts
  at zero, for shifts a linear correction cannot express.

Every head starts out computing exactly the base head, exposes ``anchor_loss()`` (the
squared distance to the base: the L2 anchor that keeps it from wandering) and
``arrays()`` (its effective parameters as numpy). ``HeadSnapshot`` freezes those arrays
so the serving thread can predict with pure numpy: no torch, no locks, no autograd.

The heads are plain numpy objects, not torch modules: importing this module (or the
learner, or the learner thread) does not import torch, so a serving-only install and
its start-up time stay free of it. Every head keeps its trainable parameters in one
flat float32 buffer (``flat``; the named parameters are views of it) and has a
closed-form forward and gradient (``forward_np`` / ``grad_np``): on 32 x 64 arrays a
torch op costs 5-10 microseconds of dispatch and a numpy op about one, and the
per-label step is the learner's hot path. ``tests/test_adapt_heads.py`` checks the
closed forms against torch autograd on reference modules built inside the test.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edge.adapt.activations import binary_scores, softmax
from edge.errors import ConfigError


def _base(in_features, out_features, base_weight, base_bias):
    """The base head as float32 arrays; zeros when none is shipped."""
    w = np.zeros((out_features, in_features), np.float32) if base_weight is None else np.array(base_weight, np.float32)
    b = np.zeros(out_features, np.float32) if base_bias is None else np.array(base_bias, np.float32).reshape(-1)
    if w.shape != (out_features, in_features) or b.shape != (out_features,):
        raise ConfigError(
            f"base head has weight {w.shape} and bias {b.shape}; "
            f"expected ({out_features}, {in_features}) and ({out_features},)"
        )
    return w, b


class LinearHead:
    """A full linear head; the anchor pulls weight and bias toward the base.

    >>> h = LinearHead(in_features=2, out_features=1, base_weight=[[1.0, 2.0]], base_bias=[0.5])
    >>> h(np.array([[1.0, 1.0]], np.float32)).tolist(), h.param_names
    ([[3.5]], ('weight', 'bias'))
    """

    kind = "linear"
    param_names: tuple = ("weight", "bias")

    def __init__(self, *, in_features, out_features, base_weight=None, base_bias=None):
        self.base_weight, self.base_bias = _base(in_features, out_features, base_weight, base_bias)
        self._init_params({"weight": self.base_weight.copy(), "bias": self.base_bias.copy()})

    def _init_params(self, initial: dict) -> None:
        """Lay the named parameters out in one flat buffer and bind each name to a view of it."""
        self.shapes = {k: initial[k].shape for k in self.param_names}
        self.flat = np.concatenate([np.asarray(initial[k], np.float32).reshape(-1) for k in self.param_names])
        off = 0
        for k in self.param_names:
            n = int(np.prod(self.shapes[k]))
            setattr(self, k, self.flat[off: off + n].reshape(self.shapes[k]))
            off += n

    @property
    def in_features(self) -> int:
        return int(self.base_weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.base_weight.shape[0])

    def __call__(self, z) -> np.ndarray:
        return self.forward_np(np.asarray(z, np.float32))[0]

    def anchor_loss(self) -> float:
        return float(((self.weight - self.base_weight) ** 2).sum() + ((self.bias - self.base_bias) ** 2).sum())

    def forward_np(self, z: np.ndarray):
        """``(outputs [B, K], cache)`` for features ``z [B, D]``; the cache feeds ``grad_np``."""
        out = z @ self.weight.T
        out += self.bias
        return out, None

    def grad_np(self, z: np.ndarray, g: np.ndarray, anchor: float, out: np.ndarray, cache=None) -> None:
        """Write into ``out`` (shaped like ``flat``) the gradient of ``sum(outputs * g) + anchor * anchor_loss``.

        ``g`` is dLoss/dOutput for the batch ``z``; ``cache`` is what ``forward_np``
        returned with the outputs.
        """
        k, d = self.weight.shape
        gw = out[: k * d].reshape(k, d)
        gb = out[k * d:]
        np.matmul(g.T, z, out=gw)
        g.sum(axis=0, out=gb)
        if anchor:
            gw += (self.weight - self.base_weight) * np.float32(2 * anchor)
            gb += (self.bias - self.base_bias) * np.float32(2 * anchor)

    def set_base(self, weight, bias) -> None:
        """Adopt a new base (fleet global head); the head itself is left where it is."""
        self.base_weight[...] = np.asarray(weight, np.float32)
        self.base_bias[...] = np.asarray(bias, np.float32).reshape(-1)

    def reset_to_base(self) -> None:
        """In place: the flat buffer keeps backing the named parameters."""
        self.weight[...] = self.base_weight
        self.bias[...] = self.base_bias

    def arrays(self) -> dict[str, np.ndarray]:
        return {"weight": self.weight.copy(), "bias": self.bias.copy()}

    def snapshot(self, *, task: str, version: str) -> "HeadSnapshot":
        return HeadSnapshot.from_arrays(self.arrays(), kind=self.kind, task=task, version=version)

    def state_dict(self) -> dict[str, np.ndarray]:
        s = {k: getattr(self, k).copy() for k in self.param_names}
        s["base_weight"], s["base_bias"] = self.base_weight.copy(), self.base_bias.copy()
        return s

    def load_state_dict(self, s: dict) -> None:
        for k in (*self.param_names, "base_weight", "base_bias"):
            a = np.asarray(s[k], np.float32)
            dst = getattr(self, k)
            if a.shape != dst.shape:
                raise ValueError(f"head state {k} has shape {a.shape}, expected {dst.shape}")
            dst[...] = a


class LowRankHead(LinearHead):
    """Base head frozen, plus a rank-``rank`` residual ``U @ V`` and a bias delta.

    ``V`` starts random and ``U`` at zero (the LoRA initialisation), so the head starts
    equal to its base and the gradient still reaches ``U`` from the first step. The
    anchor penalises the residual itself, ``|U V|^2 + |db|^2``.
    """

    kind = "lowrank"
    param_names = ("u", "v", "bias_delta")

    def __init__(self, *, in_features, out_features, base_weight=None, base_bias=None, rank=4, seed=0):
        self.base_weight, self.base_bias = _base(in_features, out_features, base_weight, base_bias)
        rng = np.random.default_rng(seed)
        self._init_params({"u": np.zeros((out_features, rank), np.float32),
                           "v": (rng.standard_normal((rank, in_features)) / in_features**0.5).astype(np.float32),
                           "bias_delta": np.zeros(out_features, np.float32)})

    def anchor_loss(self) -> float:
        return float(((self.u @ self.v) ** 2).sum() + (self.bias_delta**2).sum())

    def forward_np(self, z: np.ndarray):
        delta = self.u @ self.v
        out = z @ (self.base_weight + delta).T
        out += self.base_bias + self.bias_delta
        return out, delta

    def grad_np(self, z: np.ndarray, g: np.ndarray, anchor: float, out: np.ndarray, cache=None) -> None:
        """Closed-form gradients through ``W = W0 + U V`` (see ``LinearHead.grad_np``); ``cache`` is ``U V``."""
        u, v = self.u, self.v
        delta = u @ v if cache is None else cache
        gw = g.T @ z
        gb = g.sum(0)
        if anchor:
            gw += delta * np.float32(2 * anchor)
            gb += self.bias_delta * np.float32(2 * anchor)
        nu, nv = u.size, v.size
        np.matmul(gw, v.T, out=out[:nu].reshape(u.shape))
        np.matmul(u.T, gw, out=out[nu: nu + nv].reshape(v.shape))
        out[nu + nv:] = gb

    def reset_to_base(self) -> None:
        self.u[...] = 0.0
        self.bias_delta[...] = 0.0

    def arrays(self) -> dict[str, np.ndarray]:
        return {"weight": self.base_weight + self.u @ self.v, "bias": self.base_bias + self.bias_delta}


class MLPHead(LinearHead):
    """Base head frozen, plus a residual ``W2 relu(W1 z + b1) + b2`` with ``W2 = 0`` at start."""

    kind = "mlp"
    param_names = ("w1", "b1", "w2", "b2")

    def __init__(self, *, in_features, out_features, base_weight=None, base_bias=None, hidden=32, seed=0):
        self.base_weight, self.base_bias = _base(in_features, out_features, base_weight, base_bias)
        rng = np.random.default_rng(seed)
        self._init_params({"w1": (rng.standard_normal((hidden, in_features)) * (2.0 / in_features) ** 0.5).astype(np.float32),
                           "b1": np.zeros(hidden, np.float32), "w2": np.zeros((out_features, hidden), np.float32),
                           "b2": np.zeros(out_features, np.float32)})

    def anchor_loss(self) -> float:
        return float((self.w2**2).sum() + (self.b2**2).sum())

    def forward_np(self, z: np.ndarray):
        h = z @ self.w1.T
        h += self.b1
        np.maximum(h, 0.0, out=h)
        out = z @ self.base_weight.T
        out += self.base_bias
        out += h @ self.w2.T + self.b2
        return out, h

    def grad_np(self, z: np.ndarray, g: np.ndarray, anchor: float, out: np.ndarray, cache=None) -> None:
        """Closed-form backprop through the residual MLP; ``cache`` is the hidden activation."""
        w1, w2 = self.w1, self.w2
        h = cache
        if h is None:
            h = np.maximum(z @ w1.T + self.b1, 0.0)
        n1, nb1, n2 = w1.size, self.b1.size, w2.size
        gh = g @ w2
        gh *= h > 0  # relu: no gradient where the unit is off (as torch, also at exactly 0)
        np.matmul(gh.T, z, out=out[:n1].reshape(w1.shape))
        gh.sum(axis=0, out=out[n1: n1 + nb1])
        gw2 = out[n1 + nb1: n1 + nb1 + n2].reshape(w2.shape)
        gb2 = out[n1 + nb1 + n2:]
        np.matmul(g.T, h, out=gw2)
        g.sum(axis=0, out=gb2)
        if anchor:
            gw2 += w2 * np.float32(2 * anchor)
            gb2 += self.b2 * np.float32(2 * anchor)

    def reset_to_base(self) -> None:
        self.w2[...] = 0.0
        self.b2[...] = 0.0

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"weight": self.base_weight.copy(), "bias": self.base_bias.copy()}
        for k in self.param_names:
            out[k] = getattr(self, k).copy()
        return out


HEADS: dict[str, type[LinearHead]] = {h.kind: h for h in (LinearHead, LowRankHead, MLPHead)}


def make_head(kind: str, *, in_features: int, out_features: int, base_weight=None, base_bias=None, **options) -> LinearHead:
    """A head by type key, starting equal to the base head (zeros when none is given).

    >>> h = make_head("lowrank", in_features=8, out_features=3, rank=2)
    >>> h(np.zeros((5, 8), np.float32)).shape
    (5, 3)
    """
    if kind not in HEADS:
        raise ConfigError(f"adapt.head: kind {kind!r} is not one of {', '.join(sorted(HEADS))}")
    try:
        return HEADS[kind](in_features=in_features, out_features=out_features, base_weight=base_weight, base_bias=base_bias, **options)
    except TypeError as e:
        raise ConfigError(f"adapt.head: bad option for head {kind!r}: {e}") from None


@dataclass(frozen=True)
class HeadSnapshot:
    """An immutable head in numpy: what the serving thread predicts with.

    Swapping the serving head is one reference assignment of a new snapshot, atomic in
    Python; the arrays are read-only so no thread can change a head another one serves.
    A classification head with a single output is a binary logit (``BCEWithLogitsLoss``):
    its scores are ``[1 - p, p]``.

    >>> snap = HeadSnapshot.from_arrays({"weight": np.eye(2, dtype=np.float32), "bias": np.zeros(2, np.float32)},
    ...                                 kind="linear", task="classification", version="v1")
    >>> [round(float(p), 3) for p in snap.predict(np.array([[2.0, 0.0]]))[0]]
    [0.881, 0.119]
    """

    kind: str
    task: str
    version: str
    arrays: dict = field(repr=False)

    @classmethod
    def from_arrays(cls, arrays: dict, *, kind: str, task: str, version: str) -> "HeadSnapshot":
        frozen = {}
        for k, v in arrays.items():
            a = np.array(v, dtype=np.float32, copy=True)
            a.setflags(write=False)
            frozen[k] = a
        return cls(kind=kind, task=task, version=str(version), arrays=frozen)

    @classmethod
    def from_head(cls, head, *, task: str, version: str) -> "HeadSnapshot":
        return cls.from_arrays(head.arrays(), kind=head.kind, task=task, version=version)

    @property
    def in_features(self) -> int:
        return int(self.arrays["weight"].shape[1])

    @property
    def out_features(self) -> int:
        return int(self.arrays["weight"].shape[0])

    def logits(self, z) -> np.ndarray:
        """Raw outputs ``[B, K]`` for features ``z [B, D]`` (or one ``[D]`` vector)."""
        a = self.arrays
        z = np.asarray(z, dtype=np.float32)
        if z.ndim == 1:
            z = z[None, :]
        s = z @ a["weight"].T + a["bias"]
        if "w1" in a:
            h = z @ a["w1"].T + a["b1"]
            np.maximum(h, 0.0, out=h)
            s += h @ a["w2"].T + a["b2"]
        return s

    def predict(self, z) -> np.ndarray:
        """Scores ``[B, K]``: softmax probabilities for classification, raw values otherwise."""
        s = self.logits(z)
        if self.task != "classification":
            return s
        return binary_scores(s) if s.shape[1] == 1 else softmax(s, inplace=True)
