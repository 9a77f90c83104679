"""Process forecaster: a tiny MLP backbone and a linear head predicting the next values.

The head is linear in the features, yet must output absolute values (the target is the
stream's own future, in its own units). So the backbone hands the head the window's
last value, centred and scaled, as feature 0, and describes the *shape* of the recent
past (values relative to the last one) in the other features; the head then learns
"last value + predicted change". Fixed constants, not per-window statistics, keep level
and amplitude information for the head. Ops: Slice, Sub, Mul, Flatten, Gemm, ReLU,
Concat: all export to ONNX opset 17 and quantize statically to int8.
"""
from __future__ import annotations

import torch
from torch import nn

CENTER = 55.0  # typical level of the nominal process (% load)
SCALE = 15.0   # typical spread of levels across machines
DELTA_SCALE = 5.0  # typical excursion within a window


class Backbone(nn.Module):
    """Window [B, 1, L] float32 -> features [B, D]: D-1 shape features, then the scaled level."""

    def __init__(self, manifest) -> None:
        super().__init__()
        length, d = manifest.window * manifest.channels, manifest.feature_size
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(length, 64), nn.ReLU(), nn.Linear(64, d - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = x[:, :, -1:]
        shape = self.mlp((x - last) * (1.0 / DELTA_SCALE))
        level = (last[:, :, 0] - CENTER) * (1.0 / SCALE)
        return torch.cat([shape, level], dim=1)


class Head(nn.Linear):
    """Linear head: state dict exactly {"weight": [horizon, D], "bias": [horizon]}."""

    def __init__(self, manifest) -> None:
        super().__init__(manifest.feature_size, manifest.outputs)
