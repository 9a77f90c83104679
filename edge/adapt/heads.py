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

Training needs no autograd either: every head keeps its trainable parameters in one
flat float32 buffer (``flat``, shared with the torch parameters) and has a closed-form
numpy forward and gradient (``forward_np`` / ``grad_np``). On 32 x 64 arrays a torch op
costs 5-10 microseconds of dispatch and a numpy op about one, and the per-label step is
the learner's hot path; ``tests/test_adapt_heads.py`` checks the closed forms against
autograd.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edge.errors import ConfigError


def _base(in_features, out_features, base_weight, base_bias):
    """The base head as float32 tensors; zeros when none is shipped."""
    w = torch.zeros(out_features, in_features) if base_weight is None else torch.as_tensor(np.asarray(base_weight, dtype=np.float32)).clone()
    b = torch.zeros(out_features) if base_bias is None else torch.as_tensor(np.asarray(base_bias, dtype=np.float32)).clone()
    if tuple(w.shape) != (out_features, in_features) or tuple(b.shape) != (out_features,):
        raise ConfigError(
            f"base head has weight {tuple(w.shape)} and bias {tuple(b.shape)}; "
            f"expected ({out_features}, {in_features}) and ({out_features},)"
        )
    return w.float(), b.float()


def _flatten_parameters(module: nn.Module) -> np.ndarray:
    """Move the trainable parameters into one flat buffer; returns its numpy view.

    The parameters stay the same objects with the same shapes (the optimizer, the
    state dict and ``load_state_dict`` see no difference); their data become views of
    the buffer, so one vectorised optimizer update covers every parameter.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    off = 0
    for p in params:
        p.data = flat[off: off + p.numel()].view_as(p)
        off += p.numel()
    return flat.numpy()


def _views(module: nn.Module, names) -> dict[str, np.ndarray]:
    """Numpy views (no copies) of the named parameters and buffers."""
    return {k: getattr(module, k).detach().numpy() for k in names}


class LinearHead(nn.Module):
    """A full linear head; the anchor pulls weight and bias toward the base."""

    kind = "linear"

    def __init__(self, *, in_features, out_features, base_weight=None, base_bias=None):
        super().__init__()
        w, b = _base(in_features, out_features, base_weight, base_bias)
        self.weight = nn.Parameter(w.clone())
        self.bias = nn.Parameter(b.clone())
        self.register_buffer("base_weight", w)
        self.register_buffer("base_bias", b)
        self._setup_numpy()

    _NAMES = ("weight", "bias", "base_weight", "base_bias")

    def _setup_numpy(self) -> None:
        self.flat = _flatten_parameters(self)
        self._np = _views(self, self._NAMES)

    def forward(self, z):
        return F.linear(z, self.weight, self.bias)

    def anchor_loss(self):
        return (self.weight - self.base_weight).pow(2).sum() + (self.bias - self.base_bias).pow(2).sum()

    def forward_np(self, z: np.ndarray):
        """``(outputs [B, K], cache)`` for features ``z [B, D]``; the cache feeds ``grad_np``."""
        a = self._np
        out = z @ a["weight"].T
        out += a["bias"]
        return out, None

    def grad_np(self, z: np.ndarray, g: np.ndarray, anchor: float, out: np.ndarray, cache=None) -> None:
        """Write into ``out`` (shaped like ``flat``) the gradient of ``sum(outputs * g) + anchor * anchor_loss``.

        ``g`` is dLoss/dOutput for the batch ``z``; ``cache`` is what ``forward_np``
        returned with the outputs.
        """
        a = self._np
        k, d = a["weight"].shape
        gw = out[: k * d].reshape(k, d)
        gb = out[k * d:]
        np.matmul(g.T, z, out=gw)
        g.sum(axis=0, out=gb)
        if anchor:
            gw += (a["weight"] - a["base_weight"]) * np.float32(2 * anchor)
            gb += (a["bias"] - a["base_bias"]) * np.float32(2 * anchor)

    @torch.no_grad()
    def backward_from(self, z, g, anchor: float) -> None:
        """Set ``.grad`` in closed form from torch ``z`` and ``g = dLoss/dOutput`` (with the anchor term)."""
        flat = np.empty_like(self.flat)
        z_np, g_np = z.numpy(), g.numpy()
        self.grad_np(z_np, g_np, anchor, flat, self.forward_np(z_np)[1])
        grad = torch.from_numpy(flat)
        off = 0
        for p in self.parameters():
            if p.requires_grad:
                p.grad = grad[off: off + p.numel()].view_as(p)
                off += p.numel()

    def set_base(self, weight, bias):
        """Adopt a new base (fleet global head); the head itself is left where it is."""
        self.base_weight.copy_(torch.from_numpy(np.array(weight, dtype=np.float32)))
        self.base_bias.copy_(torch.from_numpy(np.array(bias, dtype=np.float32)))

    def reset_to_base(self):
        with torch.no_grad():
            self.weight.copy_(self.base_weight)
            self.bias.copy_(self.base_bias)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"weight": self.weight.detach().numpy().copy(), "bias": self.bias.detach().numpy().copy()}


class LowRankHead(LinearHead):
    """Base head frozen, plus a rank-``rank`` residual ``U @ V`` and a bias delta.

    ``V`` starts random and ``U`` at zero (the LoRA initialisation), so the head starts
    equal to its base and the gradient still reaches ``U`` from the first step. The
    anchor penalises the residual itself, ``|U V|^2 + |db|^2``.
    """

    kind = "lowrank"

    def __init__(self, *, in_features, out_features, base_weight=None, base_bias=None, rank=4, seed=0):
        nn.Module.__init__(self)
        w, b = _base(in_features, out_features, base_weight, base_bias)
        self.register_buffer("base_weight", w)
        self.register_buffer("base_bias", b)
        g = torch.Generator().manual_seed(seed)
        self.u = nn.Parameter(torch.zeros(out_features, rank))
        self.v = nn.Parameter(torch.randn(rank, in_features, generator=g) / in_features**0.5)
        self.bias_delta = nn.Parameter(torch.zeros(out_features))
        self._setup_numpy()

    _NAMES = ("u", "v", "bias_delta", "base_weight", "base_bias")

    def forward(self, z):
        return F.linear(z, self.base_weight + self.u @ self.v, self.base_bias + self.bias_delta)

    def anchor_loss(self):
        return (self.u @ self.v).pow(2).sum() + self.bias_delta.pow(2).sum()

    def forward_np(self, z: np.ndarray):
        a = self._np
        delta = a["u"] @ a["v"]
        out = z @ (a["base_weight"] + delta).T
        out += a["base_bias"] + a["bias_delta"]
        return out, delta

    def grad_np(self, z: np.ndarray, g: np.ndarray, anchor: float, out: np.ndarray, cache=None) -> None:
        """Closed-form gradients through ``W = W0 + U V`` (see ``LinearHead.grad_np``); ``cache`` is ``U V``."""
        a = self._np
        u, v = a["u"], a["v"]
        delta = u @ v if cache is None else cache
        gw = g.T @ z
        gb = g.sum(0)
        if anchor:
            gw += delta * np.float32(2 * anchor)
            gb += a["bias_delta"] * np.float32(2 * anchor)
        nu, nv = u.size, v.size
        np.matmul(gw, v.T, out=out[:nu].reshape(u.shape))
        np.matmul(u.T, gw, out=out[nu: nu + nv].reshape(v.shape))
        out[nu + nv:] = gb

    def reset_to_base(self):
        with torch.no_grad():
            self.u.zero_()
            self.bias_delta.zero_()

    def arrays(self) -> dict[str, np.ndarray]:
        with torch.no_grad():
            w = self.base_weight + self.u @ self.v
            b = self.base_bias + self.bias_delta
        return {"weight": w.numpy().copy(), "bias": b.numpy().copy()}


class MLPHead(LinearHead):
    """Base head frozen, plus a residual ``W2 relu(W1 z + b1) + b2`` with ``W2 = 0`` at start."""

    kind = "mlp"

    def __init__(self, *, in_features, out_features, base_weight=None, base_bias=None, hidden=32, seed=0):
        nn.Module.__init__(self)
        w, b = _base(in_features, out_features, base_weight, base_bias)
        self.register_buffer("base_weight", w)
        self.register_buffer("base_bias", b)
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(hidden, in_features, generator=g) * (2.0 / in_features) ** 0.5)
        self.b1 = nn.Parameter(torch.zeros(hidden))
        self.w2 = nn.Parameter(torch.zeros(out_features, hidden))
        self.b2 = nn.Parameter(torch.zeros(out_features))
        self._setup_numpy()

    _NAMES = ("w1", "b1", "w2", "b2", "base_weight", "base_bias")

    def forward(self, z):
        return F.linear(z, self.base_weight, self.base_bias) + F.linear(F.relu(F.linear(z, self.w1, self.b1)), self.w2, self.b2)

    def anchor_loss(self):
        return self.w2.pow(2).sum() + self.b2.pow(2).sum()

    def forward_np(self, z: np.ndarray):
        a = self._np
        h = z @ a["w1"].T
        h += a["b1"]
        np.maximum(h, 0.0, out=h)
        out = z @ a["base_weight"].T
        out += a["base_bias"]
        out += h @ a["w2"].T + a["b2"]
        return out, h

    def grad_np(self, z: np.ndarray, g: np.ndarray, anchor: float, out: np.ndarray, cache=None) -> None:
        """Closed-form backprop through the residual MLP; ``cache`` is the hidden activation."""
        a = self._np
        w1, w2 = a["w1"], a["w2"]
        h = cache
        if h is None:
            h = np.maximum(z @ w1.T + a["b1"], 0.0)
        n1, nb1, n2 = w1.size, a["b1"].size, w2.size
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
            gb2 += a["b2"] * np.float32(2 * anchor)

    def reset_to_base(self):
        with torch.no_grad():
            self.w2.zero_()
            self.b2.zero_()

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"weight": self.base_weight.numpy().copy(), "bias": self.base_bias.numpy().copy()}
        for k in ("w1", "b1", "w2", "b2"):
            out[k] = getattr(self, k).detach().numpy().copy()
        return out


HEADS: dict[str, type[LinearHead]] = {h.kind: h for h in (LinearHead, LowRankHead, MLPHead)}


def make_head(kind: str, *, in_features: int, out_features: int, base_weight=None, base_bias=None, **options) -> nn.Module:
    """A head by type key, starting equal to the base head (zeros when none is given).

    >>> h = make_head("lowrank", in_features=8, out_features=3, rank=2)
    >>> tuple(h(torch.zeros(5, 8)).shape)
    (5, 3)
    """
    if kind not in HEADS:
        raise ConfigError(f"adapt.head: kind {kind!r} is not one of {', '.join(sorted(HEADS))}")
    try:
        return HEADS[kind](in_features=in_features, out_features=out_features, base_weight=base_weight, base_bias=base_bias, **options)
    except TypeError as e:
        raise ConfigError(f"adapt.head: bad option for head {kind!r}: {e}") from None


def _softmax(s: np.ndarray) -> np.ndarray:
    s = s - s.max(axis=1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=1, keepdims=True)
    return s


@dataclass(frozen=True)
class HeadSnapshot:
    """An immutable head in numpy: what the serving thread predicts with.

    Swapping the serving head is one reference assignment of a new snapshot, atomic in
    Python; the arrays are read-only so no thread can change a head another one serves.

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
    def from_head(cls, head: nn.Module, *, task: str, version: str) -> "HeadSnapshot":
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
        return _softmax(s) if self.task == "classification" else s
