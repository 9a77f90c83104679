"""A user's own torch module as a head: the one path that trains by autograd.

``ModuleHead`` gives an arbitrary ``nn.Module`` the interface the trainer and the
learner use (``forward_np``, ``autograd_step``, ``snapshot``, ``reset_to_base``,
``state_dict``), so that a module without a closed form learns through the same
learner as the daemon's heads: the same replay, prequential scoring, champion and
challenger, drift response. It runs the user's own criterion and the user's own
torch optimizer when one is given (one optimizer per model), else a torch optimizer
built from the ``OptimizerSpec``. torch is imported here, and this module is imported
only for such a module (``edge.learning``).
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from edge.adapt.activations import binary_scores, softmax


class ModuleSnapshot:
    """A frozen copy of a module, served like a ``HeadSnapshot`` (``logits`` / ``predict``)."""

    kind = "module"

    def __init__(self, module, *, in_shape: tuple, task: str, version: str):
        self.module = copy.deepcopy(module).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.in_shape, self.task, self.version = tuple(in_shape), task, str(version)

    def logits(self, z) -> np.ndarray:
        z = np.asarray(z, np.float32)
        x = torch.from_numpy(np.ascontiguousarray(z.reshape(-1, *self.in_shape)))
        with torch.no_grad():
            out = self.module(x)
        return out.reshape(len(x), -1).numpy().copy()

    def predict(self, z) -> np.ndarray:
        s = self.logits(z)
        if self.task != "classification":
            return s
        return binary_scores(s) if s.shape[1] == 1 else softmax(s, inplace=True)


class ModuleHead:
    """An ``nn.Module`` mapping ``[B, *in_shape]`` to ``[B, K]``, trained by autograd."""

    kind = "module"
    grad_np = None  # no closed form: the trainer calls autograd_step

    def __init__(self, module, *, in_shape: tuple, out_features: int, criterion, optimizer=None):
        self.module = module
        self.in_shape = tuple(in_shape)
        self.in_features = int(np.prod(self.in_shape))
        self.out_features = int(out_features)
        self.criterion = criterion
        self.user_optimizer = optimizer
        self.opt = optimizer
        self._initial = copy.deepcopy(module.state_dict())
        self._base = ModuleSnapshot(module, in_shape=self.in_shape, task="regression", version="0")

    def _x(self, z: np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(z.reshape(-1, *self.in_shape)))

    def bind_optimizer(self, spec, lr: float) -> None:
        """The user's optimizer if one was given, else one built from ``spec``."""
        if self.user_optimizer is not None:
            self.opt = self.user_optimizer
            return
        params = [p for p in self.module.parameters() if p.requires_grad]
        if spec.kind == "sgd":
            self.opt = torch.optim.SGD(params, lr=lr, momentum=spec.momentum, dampening=spec.dampening,
                                       nesterov=spec.nesterov, weight_decay=spec.weight_decay)
        else:
            cls = torch.optim.AdamW if spec.kind == "adamw" else torch.optim.Adam
            self.opt = cls(params, lr=lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)

    def forward_np(self, z: np.ndarray):
        self.module.eval()
        with torch.no_grad():
            out = self.module(self._x(z))
        return out.reshape(len(z), -1).numpy().copy(), None

    def autograd_step(self, z: np.ndarray, y: np.ndarray, lr: float, anchor: float, binary: bool) -> np.ndarray:
        """One step of the user's criterion and optimizer on the batch; row 0's outputs before it."""
        for g in self.opt.param_groups:  # the learner's rate (boosted after a drift) for this step
            g.setdefault("_edge_lr", g["lr"])
        base = self.opt.param_groups[0]["_edge_lr"]
        for g in self.opt.param_groups:
            g["lr"] = lr if self.user_optimizer is None else g["_edge_lr"] * lr / max(base, 1e-30)
        self.module.train()
        out = self.module(self._x(z))
        flat = out.reshape(len(z), -1)
        if binary:
            target = torch.from_numpy(y.astype(np.float32)).reshape(out.shape)
        elif y.dtype == np.int64:
            target = torch.from_numpy(y)
        else:
            target = torch.from_numpy(y).reshape(out.shape)
        loss = self.criterion(out, target)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return flat.detach()[0].numpy().copy()

    def snapshot(self, *, task: str, version: str) -> ModuleSnapshot:
        return ModuleSnapshot(self.module, in_shape=self.in_shape, task=task, version=version)

    def base_snapshot(self, *, task: str, version: str) -> ModuleSnapshot:
        snap = copy.copy(self._base)
        snap.task, snap.version = task, str(version)
        return snap

    def reset_to_base(self) -> None:
        self.module.load_state_dict(self._initial)

    def state_dict(self) -> dict:
        return {k: v.detach().numpy().copy() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, s: dict) -> None:
        self.module.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in s.items()})

    def optimizer_state(self) -> dict:
        return copy.deepcopy(self.opt.state_dict())

    def load_optimizer_state(self, s: dict) -> None:
        self.opt.load_state_dict(s)
