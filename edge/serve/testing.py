"""A tiny model folder and its synthetic data, for tests of serving without the model zoo.

The same format as a shipped model (manifest.toml, model.py, weights.safetensors) so
the whole compile/serve path runs on it in seconds: a small 1D CNN whose backbone
weights are seeded and whose linear head is fitted in closed form on synthetic
windows, so that its classes are meaningful enough for the parity gate's agreement.

>>> X, y = synthetic_dataset(8, seed=1)
>>> X.shape, X.dtype, sorted(set(y.tolist())) <= [0, 1, 2]
((8, 3, 128), dtype('float32'), True)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

CHANNELS, WINDOW, FEATURES, CLASSES = 3, 128, 16, ("low", "mid", "high")

MODEL_PY = '''"""Tiny test model: Conv1d blocks with BatchNorm, global average pool, linear features."""
import torch.nn as nn


class Backbone(nn.Module):
    def __init__(self, manifest):
        super().__init__()
        c, d = manifest.channels, manifest.feature_size
        self.net = nn.Sequential(
            nn.Conv1d(c, 16, 7, padding=3), nn.BatchNorm1d(16), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(16, 24, 5, padding=2), nn.BatchNorm1d(24), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(24, 32, 3, padding=1), nn.BatchNorm1d(32), nn.ReLU(),
            nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, d))

    def forward(self, x):
        return self.net(x)


class Head(nn.Module):
    def __init__(self, manifest):
        super().__init__()
        self.linear = nn.Linear(manifest.feature_size, len(manifest.classes))

    def forward(self, z):
        return self.linear(z)

    def state_dict(self, *args, **kwargs):
        return {k.replace("linear.", ""): v for k, v in super().state_dict(*args, **kwargs).items()}

    def load_state_dict(self, sd, strict=True):
        return super().load_state_dict({"linear." + k: v for k, v in sd.items()}, strict)
'''

MANIFEST = '''name = "{name}"
version = "0.0.1"
[input]
channels = {channels}
window = {window}
sample_rate = 500.0
channel_names = ["ax", "ay", "az"]
[task]
kind = "classification"
classes = ["low", "mid", "high"]
[features]
size = {features}
[head]
kind = "linear"
[calibration]
generator = "edge.serve.testing:calibration_windows"
{extra}[parity]
{parity}
'''


def synthetic_dataset(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Windows ``[n, 3, 128]`` of a noisy tone whose frequency band is the class."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(CLASSES), n)
    t = np.arange(WINDOW) / 500.0
    f = np.array([20.0, 60.0, 120.0])[y] * rng.uniform(0.9, 1.1, n)
    phase = rng.uniform(0, 2 * np.pi, (n, CHANNELS, 1))
    gain = rng.uniform(0.8, 1.25, (n, CHANNELS, 1))
    x = gain * np.sin(2 * np.pi * f[:, None, None] * t[None, None, :] + phase)
    x += 0.2 * rng.standard_normal(x.shape) + rng.normal(0, 0.2, (n, CHANNELS, 1))
    return x.astype(np.float32), y.astype(np.int64)


def eval_sets(n: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The ``[eval] generator`` of a tiny model made with ``eval=True``: one labelled set."""
    return {"nominal": synthetic_dataset(n, seed + 50_000)}


def calibration_windows(n: int, seed: int = 0) -> np.ndarray:
    """The manifest's calibration generator: ``n`` unlabelled windows."""
    return synthetic_dataset(n, seed)[0]


def make_tiny_model(folder: str | Path, *, seed: int = 0, name: str = "tiny", parity: dict | None = None,
                    eval: bool = False, serve_precision: str | None = None):
    """Write a tiny model folder into ``folder`` and return it as a ``ModelFolder``.

    ``eval`` adds an ``[eval] generator`` (labelled check data); ``serve_precision`` a
    ``[serve] precision`` policy.

    Its head is a closed-form fit on random-feature CNN outputs (about 90% accurate),
    so more windows sit near a decision boundary than with a trained model: int8 class
    agreement is held to 95% unless ``parity`` says otherwise.
    """
    parity = {"int8_min_agreement": 0.95, **(parity or {})}
    import torch
    from safetensors.torch import save_file

    from edge.zoo import ModelFolder

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    par = "\n".join(f"{k} = {v!r}" for k, v in (parity or {}).items())
    extra = '[eval]\ngenerator = "edge.serve.testing:eval_sets"\nn = 300\n' if eval else ""
    if serve_precision:
        extra += f'[serve]\nprecision = "{serve_precision}"\n'
    (folder / "manifest.toml").write_text(MANIFEST.format(name=name, channels=CHANNELS, window=WINDOW,
                                                          features=FEATURES, parity=par, extra=extra))
    (folder / "model.py").write_text(MODEL_PY)
    (folder / "weights.safetensors").write_bytes(b"")
    mod = ModelFolder(folder).module
    torch.manual_seed(seed)
    manifest = ModelFolder(folder).manifest
    backbone = mod.Backbone(manifest)
    X, y = synthetic_dataset(512, seed=seed + 1)
    with torch.no_grad():
        backbone.train()  # set BatchNorm statistics from data, so folding them is exercised
        for m in backbone.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.momentum = None
        backbone(torch.from_numpy(X))
        backbone.eval()
        z = backbone(torch.from_numpy(X)).double().numpy()
    # Ridge regression of one-hot labels on the features: a useful head in closed form.
    za = np.hstack([z, np.ones((len(z), 1))])
    onehot = np.eye(len(CLASSES))[y]
    wb = np.linalg.solve(za.T @ za + 1e-2 * np.eye(za.shape[1]), za.T @ onehot)
    tensors = {f"backbone.{k}": v.contiguous() for k, v in backbone.state_dict().items()}
    tensors["head.weight"] = torch.tensor(wb[:-1].T, dtype=torch.float32).contiguous()
    tensors["head.bias"] = torch.tensor(wb[-1], dtype=torch.float32).contiguous()
    save_file(tensors, str(folder / "weights.safetensors"))
    return ModelFolder(folder)
