"""Vibration fault classifier: a compact 1D CNN backbone and a linear head.

Input normalisation lives inside the backbone so every backend sees raw g values:
each channel's window mean is removed (gravity and sensor bias carry no fault
information, and a tilted mount moves gravity between axes), then the window is divided
by a *fixed* scale, not by its own std. Amplitude is a real signal here (imbalance is
told from a healthy machine's residual 1x by how strong it is), so per-window
standardisation would throw it away. The price is honest: a sensor gain error shifts the
features, which is what the online head is for.

Only ops that export to ONNX (opset 17) and quantize statically to int8 cleanly:
Conv1d + BatchNorm1d (folded at export), ReLU, ReduceMean, Linear.
"""
from __future__ import annotations

import torch
from torch import nn

INPUT_SCALE_G = 0.1  # typical vibration amplitude (g): brings inputs to order 1


def _block(c_in: int, c_out: int, k: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False),
        nn.BatchNorm1d(c_out),
        nn.ReLU(),
    )


class Backbone(nn.Module):
    """Window [B, C, L] float32 (g) -> features [B, D]."""

    def __init__(self, manifest) -> None:
        super().__init__()
        c, d = manifest.channels, manifest.feature_size
        self.blocks = nn.Sequential(
            _block(c, 16, 7, 2),   # L/2: wide enough for the 180-380 Hz bearing ringing
            _block(16, 32, 5, 2),  # L/4
            _block(32, 48, 5, 2),  # L/8
            _block(48, 64, 3, 1),
        )
        self.proj = nn.Linear(64, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - x.mean(dim=2, keepdim=True)) * (1.0 / INPUT_SCALE_G)
        h = self.blocks(x).mean(dim=2)  # global average pool: band energies over time
        return self.proj(h)


class Head(nn.Linear):
    """Linear head on the features: state dict exactly {"weight": [K, D], "bias": [K]}."""

    def __init__(self, manifest) -> None:
        super().__init__(manifest.feature_size, manifest.outputs)
