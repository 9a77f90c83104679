"""The incremental-learning library API, usable without the daemon.

``IncrementalModel`` wraps any ``nn.Module`` and learns from a stream with the same
pieces the daemon uses (``edge.adapt``): test-then-train prequential metrics and a
bounded latent replay buffer mixed into every step against forgetting.

- ``online_learning(dataset)``: fast per-sample updates on a stream; each sample is
  scored first (prequential), then trained on together with replayed samples;
- ``incremental_update(dataset, criterion, optimizer)``: consolidation, a few passes
  over a batch of new data mixed with replay;
- ``test(dataset)``: metrics (MSE/MAE/R2 or accuracy/log-loss); ``predict(x)``: numpy.

Datasets may be a torch ``Dataset`` (indexable), a ``DataLoader`` (batches), a pair of
arrays ``(X, y)``, or any iterable of ``(x, y)`` samples. See docs/LEARNING.md.

>>> import torch
>>> model = LinearModel(in_features=3, out_features=1)
>>> ilm = IncrementalModel(model, seed=0)
>>> X = np.random.default_rng(0).normal(size=(200, 3)).astype(np.float32)
>>> stats = ilm.online_learning((X, X @ np.array([[1.0], [2.0], [-1.0]], np.float32)))
>>> stats["n"], ilm.predict(X[:2]).shape
(200, (2, 1))
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from edge.adapt.metrics import Prequential
from edge.adapt.replay import ReplayBuffer

__all__ = ["IncrementalModel", "LinearModel"]


class LinearModel(nn.Module):
    """``y = W x + b``: the seed design's baseline model (and a linear head)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x):
        return self.linear(x)


def _is_classifier(criterion) -> bool:
    return isinstance(criterion, (nn.CrossEntropyLoss, nn.NLLLoss))


def _pairs(dataset):
    """Yield ``(x, y)`` numpy samples from any of the supported dataset forms."""
    if isinstance(dataset, tuple) and len(dataset) == 2 and all(hasattr(a, "shape") for a in dataset) \
            and np.ndim(dataset[0]) >= 2 and len(dataset[0]) == len(dataset[1]):
        X, Y = (np.asarray(a.detach() if isinstance(a, torch.Tensor) else a) for a in dataset)
        yield from zip(X, Y)
        return
    if isinstance(dataset, torch.utils.data.DataLoader):
        for xb, yb in dataset:
            yield from zip(np.asarray(xb), np.asarray(yb))
        return
    items = dataset
    if isinstance(dataset, torch.utils.data.Dataset) and hasattr(dataset, "__len__"):
        items = (dataset[i] for i in range(len(dataset)))
    for x, y in items:
        yield (np.asarray(x.detach() if isinstance(x, torch.Tensor) else x),
               np.asarray(y.detach() if isinstance(y, torch.Tensor) else y))


class IncrementalModel:
    """Online and incremental learning for one ``nn.Module``, with replay against forgetting.

    ``criterion`` defaults to MSE (regression); pass ``nn.CrossEntropyLoss()`` for
    classification (labels are class indices). The default optimizer is Adam at ``lr``.
    ``replay_bytes`` bounds the replay buffer; ``replay_batch`` replayed samples join
    every online step.
    """

    def __init__(self, model: nn.Module, *, criterion=None, optimizer=None, lr: float = 1e-3,
                 replay_bytes: int = 4 << 20, replay_batch: int = 15, window: int = 200, seed: int = 0):
        torch.manual_seed(seed)
        self.model = model
        self.criterion = criterion if criterion is not None else nn.MSELoss()
        self.optimizer = optimizer if optimizer is not None else torch.optim.Adam(model.parameters(), lr=lr)
        self.replay_bytes, self.replay_batch, self.window, self.seed = replay_bytes, replay_batch, window, seed
        self.replay: ReplayBuffer | None = None  # sized on the first sample
        self._x_shape: tuple | None = None
        self.samples_seen = 0

    @property
    def task(self) -> str:
        return "classification" if _is_classifier(self.criterion) else "regression"

    def _buffer(self, x, y) -> ReplayBuffer:
        if self.replay is None:
            self._x_shape = tuple(np.shape(x))
            classes = self._n_classes() if self.task == "classification" else None
            self.replay = ReplayBuffer(feature_size=int(np.prod(self._x_shape)), max_bytes=self.replay_bytes,
                                       classes=classes, outputs=int(np.size(y)), seed=self.seed)
        return self.replay

    def _n_classes(self) -> int:
        with torch.no_grad():
            return int(self.model(torch.zeros(1, *self._x_shape)).shape[-1])

    def _tensors(self, xs, ys):
        x = torch.as_tensor(np.asarray(xs, np.float32).reshape(len(xs), *self._x_shape))
        if self.task == "classification":
            return x, torch.as_tensor(np.asarray(ys, np.int64).reshape(-1))
        return x, torch.as_tensor(np.asarray(ys, np.float32).reshape(len(ys), -1))

    def _step(self, x, y, criterion, optimizer) -> float:
        self.model.train()
        optimizer.zero_grad()
        out = self.model(x)
        loss = criterion(out, y if self.task == "classification" else y.reshape(out.shape))
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def _mixed(self, xs, ys, n_replay):
        """The new samples plus ``n_replay`` replayed ones, as tensors."""
        idx = self.replay.sample_indices(n_replay) if self.replay is not None else np.empty(0, np.int64)
        if len(idx):
            xs = np.concatenate([np.asarray(xs, np.float32).reshape(len(xs), -1), self.replay.z[idx]])
            ys = np.concatenate([np.asarray(ys).reshape(len(ys), -1), self.replay.y[idx].reshape(len(idx), -1)])
        return self._tensors(xs, ys)

    def online_learning(self, dataset, criterion=None, optimizer=None) -> dict:
        """Test-then-train, one sample at a time; returns the prequential metrics of this pass."""
        criterion = criterion or self.criterion
        optimizer = optimizer or self.optimizer
        preq = Prequential(self.task, window=self.window)
        for x, y in _pairs(dataset):
            buf = self._buffer(x, y)
            out = self.predict(np.asarray(x)[None])[0]
            if self.task == "classification":
                out = np.exp(out - out.max())
                out /= out.sum()
            preq.update(out, y)
            self._step(*self._mixed([x], [y], self.replay_batch), criterion, optimizer)
            buf.add(np.asarray(x, np.float32).reshape(-1), int(y) if self.task == "classification" else y)
            self.samples_seen += 1
        return preq.get()

    def incremental_update(self, dataset, criterion, optimizer, *, epochs: int = 3, batch_size: int = 32,
                           replay_ratio: float = 0.5) -> dict:
        """Consolidate on new data: ``epochs`` shuffled passes, each batch mixed with replay."""
        data = list(_pairs(dataset))
        if not data:
            return {"loss": math.nan, "samples": 0, "steps": 0}
        buf = self._buffer(*data[0])
        rng = np.random.default_rng(self.seed + self.samples_seen)
        n_replay = int(round(batch_size * replay_ratio / max(1e-9, 1 - replay_ratio))) if replay_ratio < 1 else batch_size
        losses, steps = [], 0
        for _ in range(epochs):
            losses, order = [], rng.permutation(len(data))
            for start in range(0, len(data), batch_size):
                xs, ys = zip(*(data[i] for i in order[start: start + batch_size]))
                losses.append(self._step(*self._mixed(xs, ys, n_replay), criterion, optimizer))
                steps += 1
        for x, y in data:
            buf.add(np.asarray(x, np.float32).reshape(-1), int(y) if self.task == "classification" else y)
        self.samples_seen += len(data)
        return {"loss": float(np.mean(losses)), "samples": len(data), "steps": steps}

    def test(self, dataset) -> dict:
        """Metrics on held-out data: mse, mae, r2 (regression) or accuracy, log_loss (classification)."""
        xs, ys = zip(*_pairs(dataset))
        pred = self.predict(np.stack(xs))
        y = np.asarray(ys)
        if self.task == "classification":
            p = np.exp(pred - pred.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            y = y.astype(np.int64).reshape(-1)
            return {"accuracy": float((pred.argmax(1) == y).mean()),
                    "log_loss": float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-7, None)).mean()), "n": len(y)}
        y = y.reshape(pred.shape).astype(np.float64)
        err = pred - y
        var = float(((y - y.mean(0)) ** 2).mean())
        mse = float((err**2).mean())
        return {"mse": mse, "mae": float(np.abs(err).mean()), "r2": 1 - mse / var if var > 0 else math.nan, "n": len(y)}

    def predict(self, x) -> np.ndarray:
        """Model outputs for a batch ``x`` (numpy or tensor), as numpy; raw logits for classifiers."""
        self.model.eval()
        with torch.no_grad():
            out = self.model(torch.as_tensor(np.asarray(x, np.float32)))
        return out.numpy()
