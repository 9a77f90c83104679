"""Per-row speed of two trees of edge side by side, with river's linear model in the same runs
(issue 18, "Per-row glue"; BENCHMARKS.md).

    PYTHONPATH=. python bench/glue_speed.py --before /tmp/before --after /tmp/after \\
        [--out bench/out/glue_speed.json]

Each tree runs in its own child process (``PYTHONPATH`` at the tree), the children
interleaved (before, after, before, after, ...), so both see the same load on the shared
machine; a tree's figure is each timing's minimum over its children, and a ratio is
river's minimum over all children against it. A child measures, on each stream, the
library's ``learn_one`` per row and ``learn_many(32)`` per row (``edge.bench.learning.run_edge``,
the library's defaults), the ``Learner``'s own ``learn_one`` per row on the same rows
(``Learner.learn_one`` under the library: its scaling and head), and river's
``StandardScaler | linear model`` per row (``run_river``): the ratios are within one child.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

STREAMS = ("trump_approval", "phishing", "image_segments", "no_signal", "sim_drift")


def _child(streams, repeats: int) -> dict:
    import numpy as np
    import torch

    from edge.bench.learning import load_stream, run_edge, run_river

    torch.set_num_threads(1)
    out = {}
    for name in streams:
        task, X, y, k = load_stream(name, seed=0, pre=500, post=1500)
        n = len(X)
        one = min(run_edge(task, X, y, k, batch=0)[1] for _ in range(repeats)) / n * 1e6
        many = min(run_edge(task, X, y, k, batch=32)[1] for _ in range(repeats)) / n * 1e6
        river = min(run_river("linear", task, X, y, k)[1] for _ in range(repeats)) / n * 1e6
        out[name] = {"rows": n, "features": int(X.shape[1]), "library_learn_one_us": round(one, 2),
                     "library_learn_many32_us_per_row": round(many, 2), "learner_learn_one_us": round(_learner(task, X, y, k), 2),
                     "river_linear_us": round(river, 2)}
        out[name]["learn_one_vs_river"] = round(river / one, 3)
        out[name]["learn_many32_vs_river"] = round(river / many, 3)
    return out


def _learner(task, X, y, k) -> float:
    """The Learner's ``learn_one`` per row, best of 3, on a copy of a library model's learner
    warmed on the first half of the rows (the second half timed)."""
    import copy

    import numpy as np
    import torch
    from torch import nn

    from edge.learning import IncrementalModel, LinearModel

    torch.manual_seed(0)
    crit = {"regression": nn.MSELoss(), "binary": nn.BCEWithLogitsLoss(), "multiclass": nn.CrossEntropyLoss()}[task]
    ilm = IncrementalModel(LinearModel(X.shape[1], 1 if task != "multiclass" else k), criterion=crit, seed=0)
    Y = y.astype(np.float32)[:, None] if task == "regression" else y
    half = len(X) // 2
    for i in range(half):
        ilm.learn_one(X[i], Y[i])
    Z = X.astype(np.float32)
    T = [Y[i] if task == "regression" else int(Y[i]) for i in range(len(X))]
    best = float("inf")
    for _ in range(3):
        lr = copy.deepcopy(ilm.learner)
        t0 = time.perf_counter()
        for i in range(half, len(X)):
            lr.learn_one(Z[i], T[i])
        best = min(best, (time.perf_counter() - t0) / (len(X) - half) * 1e6)
    return best


def _best(runs: dict, streams) -> dict:
    """Per tree and stream, each timing's minimum over that tree's children (the load only
    adds time), and the ratios to river's minimum over every child (river's code is the
    same in both trees: all children measure it)."""
    keys = ("library_learn_one_us", "library_learn_many32_us_per_row", "learner_learn_one_us", "river_linear_us")
    out = {}
    for w, rs in runs.items():
        out[w] = {}
        for s in streams:
            river = min(r[s]["river_linear_us"] for rr in runs.values() for r in rr)
            m = {k: min(r[s][k] for r in rs) for k in keys}
            m.update(rows=rs[0][s]["rows"], features=rs[0][s]["features"], river_linear_us_all=river,
                     learn_one_vs_river=round(river / m["library_learn_one_us"], 3),
                     learn_many32_vs_river=round(river / m["library_learn_many32_us_per_row"], 3),
                     learner_vs_river=round(river / m["learner_learn_one_us"], 3))
            out[w][s] = m
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="a tree of edge (e.g. git worktree add /tmp/before COMMIT)")
    ap.add_argument("--after", required=True)
    ap.add_argument("--rounds", type=int, default=2, help="children per tree, interleaved")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--streams", default=",".join(STREAMS))
    ap.add_argument("--out", default="bench/out/glue_speed.json")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    streams = args.streams.split(",")
    if args.child:
        print(json.dumps(_child(streams, args.repeats)))
        return 0
    runs: dict = {"before": [], "after": []}
    env1 = dict.fromkeys(("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"), "1")
    for _ in range(args.rounds):
        for which in ("before", "after"):
            tree = os.path.abspath(getattr(args, which))
            r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--before", "-", "--after", "-",
                                "--repeats", str(args.repeats), "--streams", args.streams],
                               env={**os.environ, **env1, "PYTHONPATH": tree}, capture_output=True, text=True, cwd=tree)
            if r.returncode:
                raise SystemExit(f"the {which} child failed:\n{r.stderr[-3000:]}")
            runs[which].append(json.loads(r.stdout.strip().splitlines()[-1]))
    best = _best(runs, streams)
    sys.path.insert(0, os.path.abspath(args.after))
    from edge.bench.machine import cpu_info, write_result

    result = {"command": "PYTHONPATH=. python bench/glue_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "cpu": cpu_info(), "load_avg": os.getloadavg(), "trees": {"before": args.before, "after": args.after},
              "best": best, "runs": runs}
    for s in streams:
        b, a = best["before"][s], best["after"][s]
        print(f"{s:15s} d={a['features']:3d}  learner {b['learner_learn_one_us']:7.1f} -> {a['learner_learn_one_us']:7.1f} us  "
              f"library {b['library_learn_one_us']:7.1f} -> {a['library_learn_one_us']:7.1f} us "
              f"({b['learn_one_vs_river']:.2f}x -> {a['learn_one_vs_river']:.2f}x river)  "
              f"many32 {b['library_learn_many32_us_per_row']:6.1f} -> {a['library_learn_many32_us_per_row']:6.1f} us/row "
              f"({b['learn_many32_vs_river']:.2f}x -> {a['learn_many32_vs_river']:.2f}x)  river {a['river_linear_us_all']:.1f} us")
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
