"""Reproducible recipe for the forecast model: ``python models/forecast/train.py``.

Trains on simulated NOMINAL process windows (``edge.sim.make_forecast_dataset``;
nothing downloaded), CPU, seeded. Writes ``weights.safetensors`` (``backbone.*``,
``head.*``), ``manifest.toml`` ``[metrics]`` and the table in ``CARD.md``: MAE and RMSE
over the whole horizon on nominal data and on each ``edge.sim.PROCESS_SHIFTS``, next to
the naive persistence forecast (repeat the last value) that a model must beat.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # run from a checkout without installing

from edge import sim  # noqa: E402
from edge.zoo import ModelFolder, save_weights, write_metrics  # noqa: E402

SEED = 0
N_TRAIN = 20_000
EPOCHS = 30
BATCH = 256
LR = 3e-3
N_EVAL = 2_000
EVAL_SEED = 1_000


def build(seed: int = SEED):
    """Fresh (backbone, head); the head starts as persistence (output = last value)."""
    folder = ModelFolder(HERE)
    torch.manual_seed(seed)
    backbone, head = folder.module.Backbone(folder.manifest), folder.module.Head(folder.manifest)
    with torch.no_grad():
        head.weight.mul_(0.01)
        head.weight[:, -1] = folder.module.SCALE
        head.bias.fill_(folder.module.CENTER)
    return backbone, head


def _dataset(n: int, seed: int, cond: sim.ProcessCondition = sim.ProcessCondition()):
    m = ModelFolder(HERE).manifest
    return sim.make_forecast_dataset(n, seed=seed, window=m.window, horizon=m.outputs,
                                     sample_rate=m.sample_rate, condition=cond)


def train(*, seed: int = SEED, n_train: int = N_TRAIN, epochs: int = EPOCHS, threads: int = 2):
    """Train on nominal process windows with MSE; returns (backbone, head) in eval mode."""
    torch.set_num_threads(threads)
    backbone, head = build(seed)
    X, Y = (torch.from_numpy(a) for a in _dataset(n_train, seed * 100 + 1))
    opt = torch.optim.AdamW(list(backbone.parameters()) + list(head.parameters()), lr=LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=epochs * (n_train // BATCH))
    gen = torch.Generator().manual_seed(seed)
    backbone.train(), head.train()
    for epoch in range(epochs):
        order = torch.randperm(n_train, generator=gen)
        total = 0.0
        for b in range(n_train // BATCH):
            idx = order[b * BATCH:(b + 1) * BATCH]
            loss = torch.nn.functional.mse_loss(head(backbone(X[idx])), Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        print(f"epoch {epoch + 1}/{epochs}: mse {total / (n_train // BATCH):.4f}", flush=True)
    return backbone.eval(), head.eval()


@torch.no_grad()
def errors(backbone, head, X: np.ndarray, Y: np.ndarray) -> dict[str, float]:
    """MAE/RMSE over all horizon steps of the model and of persistence."""
    pred = head(backbone(torch.from_numpy(X))).numpy()
    pers = np.repeat(X[:, 0, -1:], Y.shape[1], axis=1)
    out = {}
    for name, p in (("model", pred), ("persistence", pers)):
        out[f"{name}_mae"] = round(float(np.abs(p - Y).mean()), 4)
        out[f"{name}_rmse"] = round(float(np.sqrt(((p - Y) ** 2).mean())), 4)
    return out


def evaluate(backbone, head, *, n: int = N_EVAL) -> dict[str, dict[str, float]]:
    """Errors per condition in ``sim.PROCESS_SHIFTS`` on fresh seeds never used in training."""
    return {name: errors(backbone, head, *_dataset(n, EVAL_SEED + i, cond))
            for i, (name, cond) in enumerate(sim.PROCESS_SHIFTS.items())}


def _write_metrics(res: dict[str, dict[str, float]], n_params: int, size_bytes: int) -> None:
    metrics = {"eval_windows": N_EVAL, "params": n_params, "weights_bytes": size_bytes}
    metrics.update({f"fp32_{k}_{c}": v for c, r in res.items() for k, v in r.items()})
    rows = "\n".join(f"| {c} | {r['model_mae']:.3f} | {r['model_rmse']:.3f} | {r['persistence_mae']:.3f} | "
                     f"{r['persistence_rmse']:.3f} |" for c, r in res.items())
    write_metrics(HERE, metrics, f"Parameters: {n_params}; weights file: {size_bytes / 1024:.0f} KiB. Errors in % load, "
                                 "averaged over the 10-step horizon.\n\n"
                                 "| condition | model MAE | model RMSE | persistence MAE | persistence RMSE |\n"
                                 f"|---|---|---|---|---|\n{rows}")


def main() -> None:
    t = time.time()
    backbone, head = train()
    res = evaluate(backbone, head)
    n_params, size_bytes = save_weights(HERE, backbone, head)
    _write_metrics(res, n_params, size_bytes)
    print(f"done in {time.time() - t:.0f}s: {res}")


if __name__ == "__main__":
    main()
