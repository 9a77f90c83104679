"""Incremental regression on a financial-style stream: 100 features -> 1 output, MSE, Adam 1e-3.

The data is made here: daily "factor exposures" x (100 features) and a next-day return
y = x . beta + noise, where beta drifts slowly and, half way through, the market changes
regime (a third of the factor loadings flip). A model fitted on the first year keeps
learning online, consolidates each month, and is tested on both regimes.

    python examples/incremental_regression.py
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from edge.learning import IncrementalModel, LinearModel


def make_market(n_days: int, *, seed: int = 0):
    """(X [n, 100], y [n, 1]) with a slowly drifting beta and a regime change at n/2."""
    rng = np.random.default_rng(seed)
    beta = rng.normal(0, 0.1, 100)
    X = rng.standard_t(5, size=(n_days, 100)).astype(np.float32)  # fat tails, as returns have
    y = np.empty((n_days, 1), np.float32)
    for t in range(n_days):
        beta += rng.normal(0, 0.002, 100)  # slow drift
        if t == n_days // 2:
            beta[:33] *= -1  # regime change
        y[t, 0] = X[t] @ beta + rng.normal(0, 0.3)
    return X, y


def main() -> None:
    torch.manual_seed(0)
    X, y = make_market(3000)
    lab, stream = slice(0, 250), slice(250, 3000)
    model = LinearModel(in_features=100, out_features=1)
    ilm = IncrementalModel(model)
    criterion = nn.MSELoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    fit = ilm.incremental_update((X[lab], y[lab]), criterion, optimizer, epochs=20)
    print(f"initial fit on {fit['samples']} days: train loss {fit['loss']:.3f}")
    # test on the next month before the model has seen it
    print("before streaming, next month:", _fmt(ilm.test((X[250:270], y[250:270]))))

    frozen = IncrementalModel(copy.deepcopy(model))  # the same model, never updated again
    Xs, ys = X[stream], y[stream]
    for month in range(0, len(Xs), 21):
        days = slice(month, month + 21)
        ilm.online_learning((Xs[days], ys[days]), criterion, optimizer)  # fast per-day updates
        if (month // 21) % 6 == 5:  # consolidate twice a year over the last half year, with replay
            ilm.incremental_update((Xs[max(0, month - 105): month + 21], ys[max(0, month - 105): month + 21]),
                                   criterion, optimizer, epochs=2)
    last = slice(len(X) - 60, len(X))
    print("after streaming, last 60 days:", _fmt(ilm.test((X[last], y[last]))))
    print("frozen model,    last 60 days:", _fmt(frozen.test((X[last], y[last]))))
    print("prediction for the last day:", float(ilm.predict(X[-1:])[0, 0]), "actual:", float(y[-1, 0]))


def _fmt(m: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items())


if __name__ == "__main__":
    main()
