"""How the library's defaults were chosen: one grid of (lr, scale) over every stream of
``edge bench learning``, three initial weights each, quality only (docs/LEARNING.md).

    PYTHONPATH=. python bench/sweep_defaults.py [--out bench/out/sweep_defaults.json]

Every setting runs ``IncrementalModel(LinearModel(d, k), criterion=..., lr=..., scale=...)``
per row (``learn_one``), prequential, on the same rows. A setting's score on a stream is
its rank among the settings by the mean over seeds of the stream's measure (accuracy,
or MSE for regression); the default is the setting with the best mean rank over the
streams (settings tied on it: the one better than each other tied one on the most
streams): one setting for all, nothing chosen per stream. ``scale`` is the library's
one switch: the inputs and, for regression, the target. The per-stream means are in the
JSON, beside river's linear model on the same rows, so the margin is visible.
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    import torch

    from edge.bench.learning import STREAMS, _quality, load_stream, run_edge, run_river
    from edge.bench.machine import cpu_info

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/out/sweep_defaults.json")
    ap.add_argument("--lrs", default="0.001,0.003,0.01,0.03,0.1")
    ap.add_argument("--scales", default="1,0")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--streams", default=",".join(STREAMS))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    grid = [(float(lr), bool(int(sc))) for lr, sc in itertools.product(args.lrs.split(","), args.scales.split(","))]
    streams, report = args.streams.split(","), {"command": "PYTHONPATH=. python bench/sweep_defaults.py " + " ".join(argv or []),
                                                "cpu": cpu_info(), "streams": {}, "settings": {}}
    for name in streams:
        task, X, y, k = load_stream(name, seed=0, pre=500, post=1500)
        qt = "regression" if task == "regression" else task
        measure = "mse" if task == "regression" else "accuracy"
        row = {"measure": measure, "river_linear": _quality(qt, run_river("linear", task, X, y, k)[0], y)[measure]}
        for lr, scale in grid:
            qs = [_quality(qt, run_edge(task, X, y, k, seed=s, lr=lr, scale=scale)[0], y)[measure] for s in range(args.seeds)]
            row[f"lr={lr:g},scale={scale}"] = float(np.mean(qs))
        report["streams"][name] = row
        print(name, {kk: round(v, 4) for kk, v in row.items() if isinstance(v, float)}, flush=True)
    for lr, scale in grid:
        key = f"lr={lr:g},scale={scale}"
        ranks = []
        for name in streams:
            r = report["streams"][name]
            vals = sorted((r[f"lr={a:g},scale={b}"] for a, b in grid), reverse=r["measure"] != "mse")
            ranks.append(1 + vals.index(r[key]))
        report["settings"][key] = {"mean_rank": float(np.mean(ranks)), "ranks": ranks}
    report["best"] = best = _best(report)
    print("mean rank:", {s: v["mean_rank"] for s, v in report["settings"].items()}, "best:", best)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


def _best(report: dict) -> str:
    """The best mean rank; a tie goes to the tied setting ahead of the other tied ones on
    the most streams (head to head), then to the first in grid order."""
    settings = report["settings"]
    top = min(v["mean_rank"] for v in settings.values())
    tied = [s for s, v in settings.items() if abs(v["mean_rank"] - top) < 1e-9]

    def wins(a: str) -> int:
        return sum(sum(1 for b in tied if b != a and (r[a] < r[b] if r["measure"] == "mse" else r[a] > r[b]))
                   for r in report["streams"].values())
    report["tied"] = {s: wins(s) for s in tied}
    return max(tied, key=wins)


if __name__ == "__main__":
    raise SystemExit(main())
