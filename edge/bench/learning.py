"""``edge bench learning``: the ``edge.learning`` library against river, same rows, one process.

Streams (all prequential: every row is predicted before it is learned):

- ``sim_drift``: ``edge.sim`` vibration windows through the shipped backbone (torch
  fp32) to features, ``--pre`` nominal rows then ``--post`` rows under a gain/offset
  shift; 4 classes, learned from scratch;
- ``phishing``: river's bundled ``Phishing`` (binary, 9 features, 1,250 rows);
- ``trump_approval``: river's bundled ``TrumpApproval`` (regression, 6 features, 1,001 rows);
- ``no_signal``: 20 random features and a target that does not depend on them;
- ``bananas``: river's bundled ``Bananas`` (binary, 2 features, 5,300 rows: not linear);
- ``chick_weights``: river's bundled ``ChickWeights`` (regression, 3 features, 578 rows);
- ``image_segments``: river's bundled ``ImageSegments`` (7 classes, 18 features, 2,310 rows).

river's other bundled files are multi-output or multi-label (SolarFlare, Yeast), a date
alone (AirlinePassengers, WaterFlow) or an anomaly set; the rest download.

Peers: river ``StandardScaler | LinearRegression`` (regression), ``StandardScaler |
LogisticRegression`` (binary) or ``StandardScaler | SoftmaxRegression`` (multi-class),
and ``HoeffdingTreeRegressor`` / ``HoeffdingTreeClassifier``, all with river's defaults. edge:
``IncrementalModel(LinearModel(d, k), criterion=criterion)``, the library's defaults
for every stream (nothing tuned to one; ``bench/sweep_defaults.py`` is how they were
chosen). The trivial reference (running mean / class
prior) is scored on the same rows. Speed is rows per second of the whole prequential
loop (predict + learn), per row and, for edge, with ``learn_many`` batches of 32.
The box is shared: figures move between runs; ratios within one run are the measure.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np

STREAMS = ("sim_drift", "phishing", "trump_approval", "no_signal", "bananas", "chick_weights", "image_segments")
RIVER = {"phishing": ("Phishing", "binary"), "trump_approval": ("TrumpApproval", "regression"),
         "bananas": ("Bananas", "binary"), "chick_weights": ("ChickWeights", "regression"),
         "image_segments": ("ImageSegments", "multiclass")}
EPS = 1e-7


def _cpu() -> dict:
    name, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "amx_tile") if f in have]
                break
    except OSError:
        pass
    return {"model": name, "features": flags}


def _river_dataset(name):
    """``(feature names, X, y, classes)`` of one of river's bundled data sets (read from the
    installed package); class labels become indices in the order of their sorted names."""
    from river import datasets

    rows = list(getattr(datasets, RIVER[name][0])())
    keys = list(rows[0][0])
    X = np.array([[float(x[k]) for k in keys] for x, _ in rows], np.float32)
    if RIVER[name][1] == "regression":
        return keys, X, np.array([float(t) for _, t in rows]), 0
    names = sorted({str(t) for _, t in rows})
    index = {c: i for i, c in enumerate(names)}
    return keys, X, np.array([index[str(t)] for _, t in rows], np.int64), len(names)


def load_stream(name: str, *, seed: int, pre: int, post: int):
    """``(task, X [n, d], y [n], classes)`` for one stream; task is regression, binary or multiclass."""
    if name in RIVER:
        _, X, y, k = _river_dataset(name)
        return RIVER[name][1], X, y, k
    if name == "no_signal":
        rng = np.random.default_rng(seed + 17)
        n = pre + post
        return "regression", rng.normal(size=(n, 20)).astype(np.float32), 3.0 + rng.normal(size=n), 0
    import torch

    from edge.sim import SHIFTS, make_dataset
    from edge.zoo import resolve_model

    torch.set_num_threads(1)
    bb, _ = resolve_model("vibration").build()
    Xp, yp = make_dataset(pre, seed=seed + 1)
    Xd, yd = make_dataset(post, seed=seed + 2, condition=SHIFTS["gain_offset"])
    X = np.concatenate([Xp, Xd])
    with torch.no_grad():
        Z = torch.cat([bb(torch.from_numpy(X[i: i + 512])) for i in range(0, len(X), 512)]).numpy()
    return "multiclass", Z.astype(np.float32), np.concatenate([yp, yd]).astype(np.int64), 4


def _quality(task: str, P: np.ndarray, y: np.ndarray) -> dict:
    """Prequential quality of predictions ``P`` (values, or class probabilities [n, K])."""
    if task == "regression":
        e = P.reshape(-1) - y
        return {"mse": float(np.mean(e * e)), "mae": float(np.mean(np.abs(e)))}
    p = np.clip(P[np.arange(len(y)), y], EPS, 1.0)
    out = {"accuracy": float(np.mean(P.argmax(1) == y)), "log_loss": float(-np.mean(np.log(p)))}
    if task == "binary":
        tp = float(np.sum((P.argmax(1) == 1) & (y == 1)))
        fp, fn = float(np.sum((P.argmax(1) == 1) & (y == 0))), float(np.sum((P.argmax(1) == 0) & (y == 1)))
        out["f1"] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return out


def run_edge(task, X, y, k, *, batch: int = 0, seed: int = 0, **options):
    """edge's prequential predictions, seconds and counters; ``options`` go to
    ``IncrementalModel`` (none in the bench: the library's defaults)."""
    import torch
    from torch import nn

    from edge.learning import IncrementalModel, LinearModel

    torch.manual_seed(seed)  # the LinearModel's initial weights: the same on every run of a stream
    crit = {"regression": nn.MSELoss(), "binary": nn.BCEWithLogitsLoss(), "multiclass": nn.CrossEntropyLoss()}[task]
    out = 1 if task != "multiclass" else k
    ilm = IncrementalModel(LinearModel(X.shape[1], out), criterion=crit, seed=seed, **options)
    Y = y.astype(np.float32)[:, None] if task == "regression" else y
    P = []
    t0 = time.perf_counter()
    if batch:
        for i in range(0, len(X), batch):
            xb = X[i: i + batch]
            if ilm.learner is not None:  # what predict serves: values (read back from the learner's units), or probabilities
                P.append(ilm.predict(xb) if task == "regression" else ilm.learner.best().predict(xb))
            else:
                P.append(np.zeros((len(xb), 2 if task == "binary" else out)) + (0.5 if task == "binary" else 0.0))
            ilm.learn_many(xb, Y[i: i + batch])
    else:
        for i in range(len(X)):
            s = ilm.learn_one(X[i], Y[i])["served"]
            P.append(np.asarray(s, np.float64)[None])
    dt = time.perf_counter() - t0
    P = np.concatenate(P)
    m = ilm.metrics()
    return P, dt, {"promotions": m["promotions_total"], "rollbacks": m["rollbacks_total"], "drifts": m["drifts_total"]}


def run_river(model_name, task, X, y, k):
    from river import linear_model, preprocessing, tree

    if model_name == "linear":
        est = {"regression": linear_model.LinearRegression, "binary": linear_model.LogisticRegression,
               "multiclass": linear_model.SoftmaxRegression}[task]()
        model = preprocessing.StandardScaler() | est
    else:
        model = tree.HoeffdingTreeRegressor() if task == "regression" else tree.HoeffdingTreeClassifier()
    names = [f"x{j}" for j in range(X.shape[1])]
    rows = [dict(zip(names, r)) for r in X.astype(float).tolist()]
    labels = y.tolist() if task == "regression" else [int(c) for c in y]
    P = np.zeros((len(X), 1 if task == "regression" else k))
    t0 = time.perf_counter()
    for i, (x, t) in enumerate(zip(rows, labels)):
        if task == "regression":
            P[i, 0] = model.predict_one(x)
        else:
            proba = model.predict_proba_one(x)
            for c, p in proba.items():
                P[i, int(c)] = p
            if not proba:
                P[i] = 1.0 / k
        model.learn_one(x, t)
    return P, time.perf_counter() - t0


def run_reference(task, y, k) -> np.ndarray:
    if task == "regression":
        c = np.cumsum(y) - y
        n = np.arange(len(y))
        return np.where(n > 0, c / np.maximum(n, 1), 0.0)[:, None]
    onehot = np.eye(k)[y]
    counts = 1.0 + np.cumsum(onehot, 0) - onehot
    return counts / counts.sum(1, keepdims=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="edge bench learning", description=__doc__.splitlines()[0].replace("`", ""))
    ap.add_argument("--out", default="bench/out", help="folder for learning.json")
    ap.add_argument("--streams", default=",".join(STREAMS))
    ap.add_argument("--pre", type=int, default=500, help="sim_drift: nominal rows before the shift (no_signal: rows / 2)")
    ap.add_argument("--post", type=int, default=1500, help="sim_drift: rows after the shift")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats (the best is kept: the box is shared)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=3,
                    help="edge's quality is also reported over this many initial weights (seed, seed+1, ...); river's models start at zero")
    args = ap.parse_args(argv)
    cpu = _cpu()
    print(f"cpu: {cpu['model']} ({', '.join(cpu['features'])})", flush=True)
    report = {"command": "edge bench learning " + " ".join(argv or []), "cpu": cpu, "streams": {}}
    for name in args.streams.split(","):
        task, X, y, k = load_stream(name, seed=args.seed, pre=args.pre, post=args.post)
        ref_task = "regression" if task == "regression" else task
        r = {"task": task, "rows": len(X), "features": int(X.shape[1])}
        def fn_seed(key, seed):
            return run_edge(task, X, y, k, batch=32 if key == "edge_learn_many32" else 0, seed=seed)
        runs = {"edge": lambda: fn_seed("edge", args.seed),
                "edge_learn_many32": lambda: fn_seed("edge_learn_many32", args.seed),
                "river_linear": lambda: run_river("linear", task, X, y, k)}
        runs["river_hoeffding_tree"] = lambda: run_river("tree", task, X, y, k)
        for key, fn in runs.items():
            best, P, extra = math.inf, None, None
            for _ in range(args.repeats):
                res = fn()
                P, dt = res[0], res[1]
                extra = res[2] if len(res) > 2 else None
                best = min(best, dt)
            r[key] = {**_quality(ref_task, P, y), "rows_per_s": len(X) / best, "us_per_row": 1e6 * best / len(X)}
            if key == "edge_learn_many32":  # the first batch is predicted before any label was seen
                r[key]["after_first_batch"] = _quality(ref_task, P[32:], y[32:])
            if extra:
                r[key].update(extra)
            if key.startswith("edge") and args.seeds > 1:  # the same rows, other initial weights
                qs = [r[key]] + [_quality(ref_task, fn_seed(key, args.seed + j)[0], y) for j in range(1, args.seeds)]
                r[key]["over_seeds"] = {m: {"mean": float(np.mean([q[m] for q in qs])), "min": float(min(q[m] for q in qs)),
                                            "max": float(max(q[m] for q in qs))} for m in _quality(ref_task, P, y)}
        r["reference"] = _quality(ref_task, run_reference(task, y, k), y)
        rl = r["river_linear"]["rows_per_s"]
        r["speed_vs_river_linear"] = {"edge_per_row": r["edge"]["rows_per_s"] / rl,
                                      "edge_learn_many32": r["edge_learn_many32"]["rows_per_s"] / rl}
        report["streams"][name] = r
        q = "mse" if task == "regression" else "accuracy"
        print(f"{name}: " + ", ".join(f"{kk} {q} {v[q]:.4f} {v['rows_per_s']:.0f} rows/s" for kk, v in r.items()
                                      if isinstance(v, dict) and "rows_per_s" in v)
              + f", reference {q} {r['reference'][q]:.4f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "learning.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'learning.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
