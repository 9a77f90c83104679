"""The head's optimizer: a closed set of kinds, their hyper-parameters, and SGD in numpy.

``OptimizerSpec`` names the optimizer and its hyper-parameters, the ones of
``torch.optim.Adam`` / ``AdamW`` / ``SGD``; ``spec_from_torch`` reads them off a torch
optimizer a user built, so that the library honours that optimizer on the fast path
(without importing torch: it reads ``param_groups``). ``make_optimizer`` builds the
numpy state that updates a head's flat parameter buffer. Pure: arrays in, arrays out.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge.adapt.adam import AdamState
from edge.errors import ConfigError

KINDS = ("adam", "adamw", "sgd")


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer and its hyper-parameters (torch's names and defaults; SGD momentum
    defaults to 0.9 as the daemon has always used)."""

    kind: str = "adam"
    lr: float = 1e-3
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.9
    dampening: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"optimizer kind {self.kind!r} is not one of {', '.join(KINDS)}")


def spec_from_torch(opt) -> OptimizerSpec:
    """The spec of a ``torch.optim.Adam``/``AdamW``/``SGD`` instance (its first param group).

    Anything else, or an option the fast path does not implement (amsgrad, maximize,
    several parameter groups with different settings), raises ``ConfigError``.
    """
    name = type(opt).__name__
    groups = getattr(opt, "param_groups", None)
    if name not in ("Adam", "AdamW", "SGD") or not groups:
        raise ConfigError(f"optimizer {name} is not supported on the fast path; use torch.optim.Adam, AdamW or SGD")
    g = groups[0]
    keys = ("lr", "betas", "eps", "weight_decay", "momentum", "dampening", "nesterov")
    if any({k: h.get(k) for k in keys} != {k: g.get(k) for k in keys} for h in groups[1:]):
        raise ConfigError(f"{name} has parameter groups with different settings; the fast path takes one")
    if g.get("amsgrad") or g.get("maximize"):
        raise ConfigError(f"{name}(amsgrad/maximize) is not supported on the fast path")
    lr = float(g["lr"])
    if name == "SGD":
        return OptimizerSpec(kind="sgd", lr=lr, weight_decay=float(g.get("weight_decay", 0.0)),
                             momentum=float(g.get("momentum", 0.0)), dampening=float(g.get("dampening", 0.0)),
                             nesterov=bool(g.get("nesterov", False)))
    return OptimizerSpec(kind=name.lower(), lr=lr, betas=tuple(float(b) for b in g["betas"]), eps=float(g["eps"]),
                         weight_decay=float(g.get("weight_decay", 0.0)))


class SGDState:
    """``torch.optim.SGD``'s update (momentum, dampening, Nesterov, L2 weight decay) in numpy.

    >>> sgd, p = SGDState(1, momentum=0.9), np.array([1.0], np.float32)
    >>> for _ in range(2):
    ...     sgd.update(p, np.array([1.0], np.float32), lr=0.1)
    >>> round(float(p[0]), 3)
    0.71
    """

    kind = "sgd"

    def __init__(self, size: int, *, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0):
        self.momentum, self.dampening, self.nesterov = float(momentum), float(dampening), bool(nesterov)
        self.weight_decay = float(weight_decay)
        self.buf = np.zeros(size, np.float32)
        self._g = np.zeros(size, np.float32)
        self.steps = 0

    def clear(self) -> None:
        self.buf[:] = 0.0
        self.steps = 0

    def update(self, p: np.ndarray, g: np.ndarray, lr: float) -> None:
        d = self._g
        np.copyto(d, g)
        if self.weight_decay:
            d += p * np.float32(self.weight_decay)
        if self.momentum:
            if self.steps == 0:  # torch seeds the buffer with the first gradient, undamped
                np.copyto(self.buf, d)
            else:
                self.buf *= np.float32(self.momentum)
                self.buf += d * np.float32(1.0 - self.dampening)
            if self.nesterov:
                d += self.buf * np.float32(self.momentum)
            else:
                np.copyto(d, self.buf)
        self.steps += 1
        d *= np.float32(-lr)
        p += d

    def state_dict(self) -> dict:
        return {"kind": self.kind, "steps": self.steps, "buf": self.buf.copy()}

    def load_state_dict(self, s: dict) -> None:
        if s.get("kind") != self.kind or np.shape(s["buf"]) != self.buf.shape:
            raise ValueError(f"optimizer state is {s.get('kind')!r}, expected {self.kind!r} of size {self.buf.size}")
        self.buf[:], self.steps = s["buf"], int(s["steps"])


def make_optimizer(spec: OptimizerSpec, size: int):
    """The numpy optimizer state for a flat buffer of ``size`` parameters."""
    if spec.kind == "sgd":
        return SGDState(size, momentum=spec.momentum, dampening=spec.dampening, nesterov=spec.nesterov,
                        weight_decay=spec.weight_decay)
    return AdamState(size, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay, decoupled=spec.kind == "adamw")
