"""The library API: IncrementalModel / LinearModel on every dataset form, and the example runs."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from edge.learning import IncrementalModel, LinearModel


def _data(n=400, seed=0, shift=0.0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 10)).astype(np.float32)
    w = np.linspace(-1, 1, 10).astype(np.float32)
    return X, (X @ w + shift)[:, None].astype(np.float32)


@pytest.mark.parametrize("form", ["arrays", "tensors", "pairs", "dataset", "loader"])
def test_online_learning_accepts_every_dataset_form(form):
    X, y = _data()
    data = {"arrays": lambda: (X, y), "tensors": lambda: (torch.from_numpy(X), torch.from_numpy(y)),
            "pairs": lambda: list(zip(X, y)), "dataset": lambda: TensorDataset(torch.from_numpy(X), torch.from_numpy(y)),
            "loader": lambda: DataLoader(TensorDataset(torch.from_numpy(X), torch.from_numpy(y)), batch_size=16)}[form]()
    ilm = IncrementalModel(LinearModel(in_features=10, out_features=1), lr=1e-2)
    stats = ilm.online_learning(data)
    assert stats["n"] == 400 and ilm.test((X, y))["mse"] < 0.1


def test_incremental_update_consolidates_and_replay_limits_forgetting():
    Xa, ya = _data(seed=1)
    Xb, yb = _data(seed=2, shift=2.0)
    losses = {}
    for ratio in (0.0, 0.5):
        model = LinearModel(in_features=10, out_features=1)
        ilm = IncrementalModel(model, seed=0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        ilm.incremental_update((Xa, ya), nn.MSELoss(), opt, epochs=20)
        out = ilm.incremental_update((Xb, yb), nn.MSELoss(), opt, epochs=5, replay_ratio=ratio)
        assert out["samples"] == 400 and out["steps"] == 5 * 13
        losses[ratio] = ilm.test((Xa, ya))["mse"]
    assert losses[0.5] < losses[0.0]


def test_classification_with_cross_entropy():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(600, 5)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    ilm = IncrementalModel(LinearModel(in_features=5, out_features=2), criterion=nn.CrossEntropyLoss(), lr=1e-2)
    stats = ilm.online_learning((X, y))
    assert 0 < stats["accuracy"] <= 1
    m = ilm.test((X, y))
    assert m["accuracy"] > 0.9 and m["log_loss"] < 0.5


def test_predict_returns_numpy():
    ilm = IncrementalModel(LinearModel(in_features=100, out_features=1))
    assert ilm.predict(np.zeros((3, 100), np.float32)).shape == (3, 1)


def test_the_financial_regression_example_runs():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, os.path.join(root, "examples", "incremental_regression.py")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "after streaming" in out.stdout and "r2" in out.stdout
