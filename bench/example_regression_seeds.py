"""Why ``examples/incremental_regression.py`` moved with the scaling default (issue 18): its
loop over several draws of its market, scored over the whole stream, not only its last 60 days.

    PYTHONPATH=. python bench/example_regression_seeds.py [--out bench/out/example_regression_seeds.json]

The example prints one figure after streaming: the MSE of its last 60 days. That figure
is one draw: this script runs the example's own loop (fit on 250 days with the user's
Adam 1e-3, then a month at a time ``online_learning`` and a consolidation every six
months) on ``--seeds`` draws of ``make_market`` and reports, per draw and setting, the
prequential MSE over the 2,750 streamed days (every day predicted before it is learned)
beside the last-60-day MSE. Settings: ``scale=False``; the default (inputs and the
target standardised online); and two probes that change one thing each, to tell the
causes apart: ``inputs_only`` (the target's scaler removed: the default before target
scaling) and ``frozen_after_fit`` (both scalers stop learning after the initial fit, so
nothing moves the space under the fitted weights while streaming); and the defaults with
the user's Adam at 5e-4 instead of 1e-3 (``default_adam_5e-4``: the step read in standard
units of the target).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _stream(ilm, X, y, lr: float = 1e-3) -> dict:
    """The example's ``main`` loop on one draw; the prequential and last-60-day MSE, and the
    rows the input scaler counted."""
    import torch
    from torch import nn

    criterion = nn.MSELoss()
    optimizer = torch.optim.Adam(ilm.model.parameters(), lr=lr)
    ilm.incremental_update((X[:250], y[:250]), criterion, optimizer, epochs=20)
    hook = getattr(ilm, "after_fit", None)
    if hook:
        hook()
    Xs, ys = X[250:], y[250:]
    se, n = 0.0, 0
    for month in range(0, len(Xs), 21):
        days = slice(month, month + 21)
        r = ilm.online_learning((Xs[days], ys[days]), criterion, optimizer)
        se, n = se + r["mse"] * r["n"], n + r["n"]
        if (month // 21) % 6 == 5:
            back = slice(max(0, month - 105), month + 21)
            ilm.incremental_update((Xs[back], ys[back]), criterion, optimizer, epochs=2)
    sc = ilm.learner.scaler
    return {"prequential_mse": se / n, "last60_mse": ilm.test((X[-60:], y[-60:]))["mse"],
            "scaler_rows": None if sc is None else int(sc.n), "rows": len(X)}


def _model(setting: str):
    import torch

    from edge.learning import IncrementalModel, LinearModel

    torch.manual_seed(0)  # the example's initial weights
    ilm = IncrementalModel(LinearModel(100, 1), scale=setting != "scale_false")  # default_adam_5e-4: the defaults
    if setting == "inputs_only":  # a probe: the learner sees the raw target, as before target scaling
        build = ilm._build

        def _build(x):
            lr = build(x)
            ilm.target_scaler = None
            return lr
        ilm._build = _build
    elif setting == "frozen_after_fit":  # a probe: no statistics move while streaming

        def freeze():
            for sc in (ilm.learner.scaler, ilm.target_scaler):
                sc.learn_one = lambda z: None
                sc.learn_many = lambda Z: None
        ilm.after_fit = freeze
    return ilm


def main(argv=None) -> int:
    sys.path.insert(0, str(ROOT / "examples"))
    from incremental_regression import make_market

    from edge.bench.learning import _cpu

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/out/example_regression_seeds.json")
    ap.add_argument("--seeds", type=int, default=6)
    args = ap.parse_args(argv)
    settings = ("scale_false", "default", "inputs_only", "frozen_after_fit", "default_adam_5e-4")
    report = {"command": "PYTHONPATH=. python bench/example_regression_seeds.py " + " ".join(argv or []),
              "cpu": _cpu(), "draws": {}, "mean": {}}
    for seed in range(args.seeds):
        X, y = make_market(3000, seed=seed)
        report["draws"][seed] = {s: _stream(_model(s), X, y, lr=5e-4 if s.endswith("5e-4") else 1e-3) for s in settings}
        print(seed, {s: round(r["prequential_mse"], 3) for s, r in report["draws"][seed].items()}, flush=True)
    for s in settings:
        rows = [report["draws"][d][s] for d in report["draws"]]
        report["mean"][s] = {k: float(np.mean([r[k] for r in rows])) for k in ("prequential_mse", "last60_mse")}
        report["mean"][s]["last60_range"] = [float(min(r["last60_mse"] for r in rows)), float(max(r["last60_mse"] for r in rows))]
    print("mean:", json.dumps(report["mean"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
