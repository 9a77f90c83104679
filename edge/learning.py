"""The incremental-learning library API, usable without the daemon.

``IncrementalModel`` wraps an ``nn.Module`` and learns from a stream with the daemon's
own learner (``edge.adapt.Learner``): test-then-train prequential metrics, a bounded
latent replay buffer mixed into every step, champion/challenger promotions by a paired
test, drift-aware plasticity and a trivial reference that keeps a stream with no signal
from costing anything (``predict`` serves the learned head with the lower recent loss,
unless it does not beat the reference's by 5%). See docs/LEARNING.md.

- A ``LinearModel`` (or an ``edge.adapt.heads`` head) takes the fast path: closed-form
  numpy steps, no autograd. Any other module trains by torch autograd through the same
  learner.
- The task comes from the criterion: ``MSELoss`` regression,
  ``CrossEntropyLoss`` multi-class (labels are class indices), ``BCEWithLogitsLoss``
  binary classification (one logit, labels 0/1).
- One optimizer per model: the optimizer given to the constructor, or to the first
  call that passes one, is the model's; its hyper-parameters (Adam/AdamW: lr, betas,
  eps, weight_decay; SGD: lr, momentum, dampening, nesterov, weight_decay) drive the
  fast path. One given after a call that trained with the library's default (Adam at
  ``lr``) replaces that default and keeps what was learned; a second, different one
  raises ``ConfigError``. The same holds for the criterion's task.
- No global random state is touched: ``seed`` seeds the learner's own generators.

- ``learn_one(x, y)`` / ``predict_one(x)``: river-style, one sample;
- ``learn_many(X, y)`` / ``predict_many(X)``: vectorised batches;
- ``online_learning(dataset)``: test-then-train over a stream;
- ``incremental_update(dataset, criterion, optimizer)``: consolidation passes over a batch;
- ``test(dataset)``: metrics; ``predict(x)``: the served outputs, numpy.

Datasets may be a torch ``Dataset`` (indexable), a ``DataLoader`` (batches), a pair of
arrays ``(X, y)``, or any iterable of ``(x, y)`` samples.

>>> model = LinearModel(in_features=3, out_features=1)
>>> ilm = IncrementalModel(model, seed=0)
>>> X = np.random.default_rng(0).normal(size=(200, 3)).astype(np.float32)
>>> stats = ilm.online_learning((X, X @ np.array([[1.0], [2.0], [-1.0]], np.float32)))
>>> stats["n"], stats["window"]["n"], ilm.predict(X[:2]).shape
(200, 200, (2, 1))
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from edge.adapt.heads import LinearHead, make_head
from edge.adapt.learner import Learner
from edge.adapt.metrics import sample_loss, sample_losses
from edge.adapt.optim import OptimizerSpec, spec_from_torch
from edge.adapt.scaler import OnlineScaler
from edge.config import AdaptConfig
from edge.errors import ConfigError, DataError

__all__ = ["DataError", "IncrementalModel", "LinearModel"]


class LinearModel(nn.Module):
    """``y = W x + b``: the seed design's baseline model (and a linear head)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias)

    def forward(self, x):
        return self.linear(x)


_REGRESSION = (nn.MSELoss,)
_MULTICLASS = (nn.CrossEntropyLoss,)
_BINARY = (nn.BCEWithLogitsLoss,)


def task_of(criterion) -> str:
    """``"regression"``, ``"classification"`` or ``"binary"`` for a torch loss.

    >>> task_of(nn.BCEWithLogitsLoss()), task_of(nn.CrossEntropyLoss()), task_of(nn.MSELoss())
    ('binary', 'classification', 'regression')
    """
    if isinstance(criterion, _BINARY):
        return "binary"
    if isinstance(criterion, _MULTICLASS):
        return "classification"
    if isinstance(criterion, _REGRESSION):
        return "regression"
    raise ConfigError(f"criterion {type(criterion).__name__} is not supported: use MSELoss (regression), "
                      "CrossEntropyLoss (classes) or BCEWithLogitsLoss (binary)")


def _np(a):
    return np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a)


def _pairs(dataset):
    """Yield ``(x, y)`` numpy samples from any of the supported dataset forms."""
    if isinstance(dataset, tuple) and len(dataset) == 2 and all(hasattr(a, "shape") for a in dataset) \
            and np.ndim(dataset[0]) >= 2:
        X, Y = _np(dataset[0]), _np(dataset[1])
        if len(X) != len(Y):
            raise DataError(f"X has {len(X)} rows but y has {len(Y)}")
        yield from zip(X, Y)
        return
    if isinstance(dataset, torch.utils.data.DataLoader):
        for xb, yb in dataset:
            yield from zip(_np(xb), _np(yb))
        return
    items = dataset
    if isinstance(dataset, torch.utils.data.Dataset) and hasattr(dataset, "__len__"):
        items = (dataset[i] for i in range(len(dataset)))
    for item in items:
        try:
            x, y = item
        except (TypeError, ValueError):
            raise DataError(f"a dataset item must be an (x, y) pair, got {type(item).__name__}") from None
        yield _np(x), _np(y)


def _arrays(dataset) -> tuple[np.ndarray, np.ndarray]:
    data = list(_pairs(dataset))
    if not data:
        raise DataError("the dataset is empty")
    X = np.stack([np.asarray(x, np.float32) for x, _ in data])
    Y = np.stack([np.asarray(y) for _, y in data])
    return X, Y


class IncrementalModel:
    """Online and incremental learning for one ``nn.Module``, on the daemon's learner.

    ``criterion`` sets the task (default MSE, regression). ``optimizer`` is the model's
    one optimizer (default Adam at ``lr``). ``replay_bytes`` bounds the replay buffer;
    ``replay_batch`` replayed rows join every online step. ``window`` is the recent
    window of the metrics. ``scale`` standardises inputs online, and a regression's target
    (the head learns in standard units; what is served is read back in the target's, and
    ``sync_module`` folds both into the module); the default (``None``)
    is on for the fast path (a ``LinearModel`` or a head) and off for any other module
    (scale its inputs yourself). The defaults, ``lr=1e-2`` and scaling on, are the one
    setting that did best over the streams of ``edge bench learning``
    (``bench/sweep_defaults.py``, BENCHMARKS.md), not a per-stream choice.
    ``config`` (an ``AdaptConfig``) overrides the learner's other settings.
    """

    def __init__(self, model, *, criterion=None, optimizer=None, lr: float = 1e-2, replay_bytes: int = 4 << 20,
                 replay_batch: int = 15, window: int = 200, seed: int = 0, scale: bool | None = None,
                 config: AdaptConfig | None = None):
        self.model = model
        self.criterion = criterion
        self.optimizer = optimizer
        self.lr = float(lr)
        self.replay_bytes, self.replay_batch, self.window, self.seed = replay_bytes, replay_batch, window, seed
        self.scale = self.fast_path if scale is None else bool(scale)
        self.config = config
        self.learner: Learner | None = None  # built on the first sample: its shape fixes the features
        self.target_scaler: OnlineScaler | None = None  # regression with scale: the learner's target units
        self.x_shape: tuple | None = None
        self.samples_seen = 0

    # -- set-up -----------------------------------------------------------------------------

    @property
    def task(self) -> str:
        t = task_of(self.criterion if self.criterion is not None else nn.MSELoss())
        return "classification" if t == "binary" else t

    @property
    def fast_path(self) -> bool:
        return isinstance(self.model, (LinearModel, LinearHead))

    def _adopt(self, criterion, optimizer) -> None:
        """A criterion or optimizer given to a call becomes the model's. One given after the
        library chose a default for itself (a first call without them) replaces that default
        and keeps what was learned; only one that conflicts with the user's own choice is an
        error (one criterion task, one optimizer per model)."""
        if criterion is not None:
            task_of(criterion)  # an unsupported criterion is refused before anything changes
            if self.criterion is None:
                if self.learner is not None and task_of(criterion) != "regression":
                    # the default (MSE regression) learned so far: keep its weights in the
                    # module and build the learner again for the task the user names
                    self._sync_module()
                    self.learner, self.x_shape = None, None
                self.criterion = criterion
            elif task_of(criterion) != task_of(self.criterion):
                raise ConfigError(f"this model learns with {type(self.criterion).__name__}; "
                                  f"{type(criterion).__name__} is another task (one criterion per model)")
        if optimizer is not None and optimizer is not self.optimizer:
            if self.optimizer is not None:
                raise ConfigError("this model already has its optimizer; pass the same one (one optimizer per model)")
            self.optimizer = optimizer
            if self.learner is not None:  # it trained with the library's default: the user's replaces it
                spec = spec_from_torch(optimizer) if self.fast_path else _try_spec(optimizer)
                self.learner.set_optimizer(spec, module_optimizer=None if self.fast_path else optimizer)

    def _outputs(self, x_shape) -> int:
        if isinstance(self.model, LinearModel):
            return self.model.linear.out_features
        if isinstance(self.model, LinearHead):
            return self.model.out_features
        with torch.no_grad():
            was = self.model.training
            self.model.eval()
            out = self.model(torch.zeros(1, *x_shape))
            self.model.train(was)
        return int(np.prod(out.shape[1:]))

    def _build(self, x) -> Learner:
        x = np.asarray(x)
        self.x_shape = tuple(x.shape)
        d = int(np.prod(self.x_shape))
        crit = self.criterion if self.criterion is not None else nn.MSELoss()
        kind = task_of(crit)
        k = self._outputs(self.x_shape)
        if kind == "binary" and k != 1:
            raise ConfigError(f"BCEWithLogitsLoss needs a model with one output, this one has {k}")
        if kind == "classification" and k < 2:
            raise ConfigError(f"CrossEntropyLoss needs a model with at least 2 outputs, this one has {k}")
        spec = spec_from_torch(self.optimizer) if self.optimizer is not None and self.fast_path else \
            (_try_spec(self.optimizer) or OptimizerSpec(kind="adam", lr=self.lr))
        cfg = self.config or AdaptConfig(
            batch=self.replay_batch + 1, replay_bytes=self.replay_bytes, eval_window=self.window,
            eval_min=min(40, self.window), anchor=0.0, budget_steps_per_s=1e6, budget_cpu_share=1.0,
            seed=self.seed, scale=self.scale)
        head = self._head(d, k, crit, spec)
        task = "regression" if kind == "regression" else "classification"
        classes = None if task == "regression" else (range(2) if kind == "binary" else range(k))
        self.learner = Learner(task=task, feature_size=d, classes=classes, outputs=k, config=cfg, head=head,
                               optimizer=spec, global_version="0")
        self.target_scaler = OnlineScaler(k) if self.scale and task == "regression" else None
        if self.target_scaler is not None:  # the reference served is the raw running mean (Reference.pin_zero)
            self.learner.reference.pin_zero()
        return self.learner

    def _learner_targets(self, T: np.ndarray, Z: np.ndarray | None = None) -> np.ndarray:
        """Regression targets ``[n, K]`` in the learner's units. With scaling the running target
        statistics take them first and they are standardised by them: the head learns in
        standard units, where one Adam step size fits a target around 120 as well as one
        near 0 (the learner, its reference and replay all work in these units). Rows the
        learner will reject (a non-finite target, or row of ``Z``) do not move the statistics."""
        ts = self.target_scaler
        if ts is None:
            return T
        ok = np.isfinite(T).all(1) if Z is None else np.isfinite(T).all(1) & np.isfinite(Z).all(1)
        ts.learn_many(T if ok.all() else T[ok])
        return ts.transform_many(T)

    def _raw(self, S, affine=None):
        """The learner's outputs (values, or a regression's) back in the target's units, by
        ``affine`` (``(mean, std)`` taken before the labels that followed) or today's."""
        ts = self.target_scaler
        if ts is None:
            return S
        mean, std = affine if affine is not None else ts.affine()
        return (np.asarray(S, np.float32) * std + mean).astype(np.float32)

    def _head(self, d, k, crit, spec):
        if isinstance(self.model, LinearHead):
            return self.model
        if isinstance(self.model, LinearModel):
            lin = self.model.linear
            if lin.in_features != d:
                raise DataError(f"samples have {d} features but the model takes {lin.in_features}")
            w = lin.weight.detach().numpy()
            b = lin.bias.detach().numpy() if lin.bias is not None else np.zeros(k, np.float32)
            return make_head("linear", in_features=d, out_features=k, base_weight=w, base_bias=b)
        from edge.adapt.torch_head import ModuleHead  # the only path that trains by autograd

        return ModuleHead(self.model, in_shape=self.x_shape, out_features=k, criterion=crit, optimizer=self.optimizer)

    def _engine(self, x) -> Learner:
        if self.learner is None:
            return self._build(x)
        shape = tuple(np.shape(x))
        if shape != self.x_shape:
            raise DataError(f"sample has shape {shape}; this model takes {self.x_shape}")
        return self.learner

    def _check_label(self, y) -> None:
        lr = self.learner
        if lr.task == "classification":
            c = np.asarray(y).reshape(-1)
            if c.size != 1 or not float(c[0]).is_integer() or not 0 <= int(c[0]) < lr._n_classes:
                raise DataError(f"label {str(np.asarray(y).tolist())[:40]} is not a class index in 0..{lr._n_classes - 1}")
        elif np.size(y) != lr.outputs:
            raise DataError(f"target has {np.size(y)} values; the model has {lr.outputs} outputs")

    def sync_module(self) -> None:
        """Write the served head's weights (what ``predict`` serves, or the champion while
        the trivial reference serves) into a ``LinearModel``, so that the user's module is
        the model being served: the fast path trains a numpy copy. ``online_learning`` and
        ``incremental_update`` call it at their end; after ``learn_one``/``learn_many``
        call it yourself before reading the module's parameters (a copy per row would cost
        more than the row)."""
        self._sync_module()

    def _sync_module(self) -> None:
        if isinstance(self.model, LinearModel) and self.learner is not None:
            lr = self.learner
            a = (lr.champion if lr.serving() == "reference" else lr.best()).arrays
            if self.target_scaler is not None:
                a = self.target_scaler.fold_output(a)
            with torch.no_grad():
                self.model.linear.weight.copy_(torch.from_numpy(np.array(a["weight"])))
                if self.model.linear.bias is not None:
                    self.model.linear.bias.copy_(torch.from_numpy(np.array(a["bias"])))

    # -- river-style ------------------------------------------------------------------------

    def learn_one(self, x, y) -> dict:
        """Test then train on one sample; returns the served prediction (before training) and its loss."""
        x = _np(x)
        self._engine(x)
        self._check_label(y)
        served, out = self._learn_row(x, y)
        return {"served": served, "loss": out["loss"], "drift": out["drift"], "swap": out["swap"]}

    def _learn_row(self, x, y):
        lr = self.learner
        which = lr.serving()  # decided before the label is seen
        served = lr.reference.served() if which == "reference" else None
        t, ts = _label(y, lr), self.target_scaler
        back = None if ts is None else ts.affine()  # what was served was predicted before this label
        learned = ts is not None and bool(np.isfinite(t).all())
        if learned:
            ts.learn_one(t)
        out = lr.learn_one(np.asarray(x, np.float32).reshape(-1), t if ts is None else ts.transform_one(t))
        if not out["accepted"]:
            if learned:  # a refused row (a non-finite feature) leaves the target statistics as they were
                ts.unlearn_one(t)
            raise DataError(f"sample {self.samples_seen} rejected: {out['reason']}")
        self.samples_seen += 1
        if ts is not None:  # the learner's units back to the target's (its reference's too)
            if which != "reference":
                served = out["challenger" if which == "challenger" else "served"]
            served = self._raw(served, back)
            out["loss"] = sample_loss(served, t, lr.task)[0]
            return served, out
        if which == "reference":
            out["loss"] = float(sample_losses(served[None], np.asarray([_label(y, lr)]), lr.task)[0][0])
            if lr.task == "classification" and lr.outputs == 1:
                served = np.asarray(served, np.float32)
        elif which == "challenger":
            served, out["loss"] = out["challenger"], out["challenger_loss"]
        else:
            served = out["served"]
        return served, out

    def predict_one(self, x) -> np.ndarray:
        """The served outputs for one sample: ``[K]`` (logits for a classifier)."""
        return self.predict(_np(x)[None])[0]

    def learn_many(self, X, y) -> dict:
        """Test then train on a batch (vectorised); returns ``{"n", "loss"}`` of the served predictions."""
        X, Y = _np(X), _np(y)
        if len(X) == 0:
            raise DataError("learn_many got an empty batch")
        if len(X) != len(Y):
            raise DataError(f"X has {len(X)} rows but y has {len(Y)}")
        lr = self._engine(X[0])
        if tuple(X.shape[1:]) != self.x_shape:
            raise DataError(f"samples have shape {tuple(X.shape[1:])}; this model takes {self.x_shape}")
        self._check_labels(Y)
        Z, T = X.reshape(len(X), -1), _labels(Y, lr)
        which = lr.serving()  # decided before the batch is seen, as predict would
        # the learner scores every row with the champion and the challenger before training:
        # those are the served scores unless the reference serves or a row will be rejected
        served = self._served_scores(Z) if which == "reference" or not np.isfinite(Z).all() else None
        back = None if self.target_scaler is None else self.target_scaler.affine()  # before this batch's labels
        out = lr.learn_many(Z, self._learner_targets(T, Z))
        self.samples_seen += out["accepted"]
        if served is None:
            served = self._raw(out["challenger" if which == "challenger" else "served"], back)
        loss, _ = sample_losses(served, T, lr.task)
        return {"n": out["accepted"], "loss": float(loss.mean()), "drift": out["drift"], "swap": out["swap"]}

    def predict_many(self, X) -> np.ndarray:
        return self.predict(X)

    def _check_labels(self, Y) -> None:
        lr = self.learner
        if lr.task == "classification":
            c = np.asarray(Y).reshape(len(Y), -1)
            if c.shape[1] != 1 or not np.all(np.mod(c, 1) == 0) or c.min() < 0 or c.max() >= lr._n_classes:
                bad = c[(c < 0) | (c >= lr._n_classes) | (np.mod(c, 1) != 0)].reshape(-1)[:3].tolist()
                raise DataError(f"labels {str(bad)[:60]} are not class indices in 0..{lr._n_classes - 1}")
        elif np.asarray(Y).reshape(len(Y), -1).shape[1] != lr.outputs:
            raise DataError(f"targets have {np.asarray(Y).reshape(len(Y), -1).shape[1]} values; the model has {lr.outputs} outputs")

    def _served_scores(self, Z: np.ndarray) -> np.ndarray:
        """Probabilities (classification) or values (regression) of what ``predict`` serves."""
        return self._raw(self.learner.best().predict(Z))

    # -- the seed API -----------------------------------------------------------------------

    def online_learning(self, dataset, criterion=None, optimizer=None, *, return_predictions: bool = False) -> dict:
        """Test-then-train, one sample at a time.

        Returns ``{"n", <metrics over the whole pass>, "window": <metrics over the last
        window samples>}`` (metrics: mse/mae or accuracy/log_loss), and with
        ``return_predictions=True`` also ``"predictions"``: every sample's served output
        (values, or class probabilities) before it was learned.
        """
        self._adopt(criterion, optimizer)
        preds, ys = [], []
        for x, y in _pairs(dataset):
            lr = self._engine(x)
            self._check_label(y)
            s, _ = self._learn_row(x, y)
            preds.append(s)
            ys.append(_label(y, lr))
        if not preds:
            raise DataError("online_learning got an empty dataset")
        self._sync_module()
        P = np.stack(preds)
        res = {"n": len(P), **_metrics(P, ys, self.learner.task), "window": {"n": min(len(P), self.window),
               **_metrics(P[-self.window:], ys[-self.window:], self.learner.task)}}
        if return_predictions:
            res["predictions"] = P
        return res

    def incremental_update(self, dataset, criterion=None, optimizer=None, *, epochs: int = 3, batch_size: int = 32,
                           replay_ratio: float = 0.5) -> dict:
        """Consolidate on new data: ``epochs`` shuffled passes in batches, each batch mixed
        with replayed rows so that ``replay_ratio`` of every step's rows are old ones."""
        self._adopt(criterion, optimizer)
        X, Y = _arrays(dataset)
        lr = self._engine(X[0])
        self._check_labels(Y)
        if not 0.0 <= replay_ratio < 1.0:
            raise ConfigError(f"replay_ratio = {replay_ratio} must be in [0, 1)")
        Z, T_raw = X.reshape(len(X), -1).astype(np.float32), _labels(Y, lr)
        T = self._learner_targets(T_raw)
        if lr.scaler is not None:
            lr.scaler.learn_many(Z)
        Zt = Z
        rng = np.random.default_rng(self.seed + self.samples_seen)
        n_replay = int(round(batch_size * replay_ratio / (1.0 - replay_ratio)))
        tr = lr.trainer
        tr.set_lr(lr.lr)
        losses, steps = [], 0
        for _ in range(epochs):
            order = rng.permutation(len(Zt))
            losses = []
            for start in range(0, len(Zt), batch_size):
                idx = order[start: start + batch_size]
                rep = lr.replay.sample_indices(n_replay)
                zb = np.concatenate([Zt[idx], lr.replay.z[rep]])
                yb = np.concatenate([T[idx], lr.replay.y[rep]])
                if lr.scaler is not None:
                    lr.scaler.transform_many(zb, out=zb)
                tr.last_loss_of = None
                s_new = tr.step_arrays(zb, yb, first=len(idx))  # the new rows' scores before the step
                losses.append(float(sample_losses(self._raw(s_new), T_raw[idx], lr.task)[0].mean()))
                steps += 1
        for i in range(len(Zt)):
            lr.replay.add(Zt[i], T[i])
            lr.recent.add(Zt[i], T[i])
            lr.reference.learn_one(T[i])
        # consolidation is an explicit request: serve its result, its records and tests afresh
        lr.adopt_consolidated(f"u{steps}")
        self.samples_seen += len(Zt)
        self._sync_module()
        return {"loss": float(np.mean(losses)) if losses else math.nan, "samples": len(Zt), "steps": steps}

    def test(self, dataset) -> dict:
        """Metrics on held-out data: mse, mae, r2 (regression) or accuracy, log_loss (classification)."""
        X, Y = _arrays(dataset)
        if self.learner is None:
            self._engine(X[0])
        self._check_labels(Y)
        lr = self.learner
        P = self._served_scores(X.reshape(len(X), -1).astype(np.float32))
        m = _metrics(P, _labels(Y, lr), lr.task)
        if lr.task == "regression":
            y = np.asarray(Y, np.float64).reshape(P.shape)
            var = float(((y - y.mean(0)) ** 2).mean())
            m["r2"] = 1 - m["mse"] / var if var > 0 else math.nan
        m["n"] = len(X)
        return m

    def predict(self, x) -> np.ndarray:
        """The served outputs for a batch ``x`` (numpy or tensor), as numpy: values for
        regression, raw logits for a classifier. Served: the trivial reference (the running
        mean, or the class prior) until a paired sequential test on the labels says a learned
        head beats it, then that head (champion or challenger, the lower recent loss) until
        the reverse test says the reference is better again (do no harm, ``Learner.serving``)."""
        x = _np(x)
        if self.learner is None:
            self.model.eval()
            with torch.no_grad():
                return self.model(torch.as_tensor(np.asarray(x, np.float32))).numpy()
        if tuple(x.shape[1:]) != self.x_shape:
            raise DataError(f"samples have shape {tuple(x.shape[1:])}; this model takes {self.x_shape}")
        return self._raw(self.learner.best().logits(x.reshape(len(x), -1).astype(np.float32)))

    def metrics(self) -> dict:
        """The learner's counters and per-head recent metrics (``Learner.metrics``)."""
        return {} if self.learner is None else self.learner.metrics()


def _try_spec(opt):
    if opt is None:
        return None
    try:
        return spec_from_torch(opt)
    except ConfigError:
        return OptimizerSpec(kind="adam", lr=float(opt.param_groups[0].get("lr", 1e-3)))


def _label(y, lr: Learner):
    if lr.task == "classification":
        return int(np.asarray(y).reshape(-1)[0])
    return np.asarray(y, np.float32).reshape(-1)


def _labels(Y, lr: Learner) -> np.ndarray:
    if lr.task == "classification":
        return np.asarray(Y).reshape(len(Y)).astype(np.int64)
    return np.asarray(Y, np.float32).reshape(len(Y), -1)


def _metrics(P: np.ndarray, ys, task: str) -> dict:
    if not len(P):
        return {}
    y = np.asarray(ys)
    loss, err = sample_losses(P, y, task)
    if task == "classification":
        return {"accuracy": float(1.0 - err.mean()), "log_loss": float(loss.mean())}
    return {"mse": float(loss.mean()), "mae": float(err.mean())}
