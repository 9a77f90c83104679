"""Torch reference modules for the numpy heads, built only inside tests (the runtime's
heads are torch-free): the same parameters, forward and anchor loss, for autograd parity."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class TorchRef(nn.Module):
    """A head's torch twin: parameters copied from the head, in its ``param_names`` order."""

    def __init__(self, head):
        super().__init__()
        self.kind = head.kind
        self.names = head.param_names
        for k in self.names:
            setattr(self, k, nn.Parameter(torch.from_numpy(np.array(getattr(head, k)))))
        self.register_buffer("base_weight", torch.from_numpy(head.base_weight.copy()))
        self.register_buffer("base_bias", torch.from_numpy(head.base_bias.copy()))

    def ordered(self):
        return [getattr(self, k) for k in self.names]

    def forward(self, z):
        if self.kind == "linear":
            return F.linear(z, self.weight, self.bias)
        if self.kind == "lowrank":
            return F.linear(z, self.base_weight + self.u @ self.v, self.base_bias + self.bias_delta)
        return F.linear(z, self.base_weight, self.base_bias) + F.linear(F.relu(F.linear(z, self.w1, self.b1)), self.w2, self.b2)

    def anchor_loss(self):
        if self.kind == "linear":
            return (self.weight - self.base_weight).pow(2).sum() + (self.bias - self.base_bias).pow(2).sum()
        if self.kind == "lowrank":
            return (self.u @ self.v).pow(2).sum() + self.bias_delta.pow(2).sum()
        return self.w2.pow(2).sum() + self.b2.pow(2).sum()

    def flat(self) -> np.ndarray:
        return torch.cat([p.detach().reshape(-1) for p in self.ordered()]).numpy()
