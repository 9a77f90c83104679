"""Where one ``learn_one`` of the library goes, piece by piece (BENCHMARKS.md, "Online
learning library vs river"), and a ``learn_many(32)`` batch against the same rows.

    PYTHONPATH=. python bench/timeit_learn_one.py [--out bench/out/learn_one_pieces.json]

Phishing (river's bundled data set, 9 features, binary), the bench's setting (the
library's defaults: ``IncrementalModel(LinearModel(9, 1), criterion=BCEWithLogitsLoss())``), one
learner warmed on 600 rows; each piece is called on its own (best of 3 repeats of
``timeit``), so the pieces do not add up exactly to the whole. The pieces are timed on
scratch copies where they would change the learner (the training step runs on a copy of
the batch it filled).
"""
from __future__ import annotations

import argparse
import copy
import time
import timeit

import numpy as np


def _best(fn, number: int) -> float:
    """Microseconds per call, best of 3 repeats."""
    return min(timeit.repeat(fn, number=number, repeat=3)) / number * 1e6


def _whole(ilm, X, y, *, batch: int) -> float:
    """Microseconds per learn_one row (``batch`` 0) or per learn_many batch over the rest of
    the stream, each of 3 repeats on its own copy of ``ilm`` (made outside the timing); best."""
    best = float("inf")
    start = 600 if not batch else 608
    for _ in range(3):
        m = copy.deepcopy(ilm)
        t0 = time.perf_counter()
        if batch:
            stop = start + (len(X) - start) // batch * batch
            for i in range(start, stop, batch):
                m.learn_many(X[i: i + batch], y[i: i + batch])
            calls = (stop - start) // batch
        else:
            for i in range(start, len(X)):
                m.learn_one(X[i], y[i])
            calls = len(X) - start
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def _whole_learner(lr, X, y) -> float:
    """Microseconds per ``Learner.learn_one`` row (the library's checks and wrapper left out), best of 3."""
    Z, T = X.astype(np.float32), [int(v) for v in y]
    best = float("inf")
    for _ in range(3):
        m = copy.deepcopy(lr)
        t0 = time.perf_counter()
        for i in range(600, len(X)):
            m.learn_one(Z[i], T[i])
        best = min(best, (time.perf_counter() - t0) / (len(X) - 600) * 1e6)
    return best


def main(argv=None) -> int:
    import torch

    from edge.bench.learning import load_stream
    from edge.bench.machine import cpu_info, write_result
    from edge.learning import IncrementalModel, LinearModel, _np

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/out/learn_one_pieces.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    _, X, y, _ = load_stream("phishing", seed=0, pre=0, post=0)
    torch.manual_seed(0)
    ilm = IncrementalModel(LinearModel(X.shape[1], 1), criterion=torch.nn.BCEWithLogitsLoss(), seed=0)
    for i in range(600):
        ilm.learn_one(X[i], y[i])
    lr = ilm.learner
    z, t = X[700].astype(np.float32), int(y[700])
    tr = lr.trainer
    n = tr.fill(z, t, lr._sources)
    zb, yb = tr.z_np[:n].copy(), tr.y_np[:n].copy()
    scratch = copy.deepcopy(lr)  # the pieces that learn run on this copy
    st = scratch.trainer
    scratch._last_sv = scratch.evaluator.test_one(scratch.champion, scratch._global, z, t)
    ev = scratch.evaluator
    ev.test_one(scratch.champion, scratch._global, z, t)  # builds the stacked scorer of this champion
    s2 = [0.3, 0.7]
    pieces = {
        "library wrapper's checks (shape, label, what is served)": (
            lambda: (ilm._engine(_np(z)), ilm._check_label(t), lr.serving()), 3000),
        "score the champion and the global head (one stacked product)": (lambda: ev._stack.scores(z, ev.mode), 3000),
        "test_one (both heads, the reference, three records)": (
            lambda: ev.test_one(scratch.champion, scratch._global, z, t), 3000),
        "fill + scale + step, one compiled call (16 rows)": (
            lambda: st.fill_step(z, t, scratch._sources, scratch.scaler, replay_loss=False), 3000),
        "training step alone (16 rows)": (lambda: st.step_arrays(zb.copy(), yb, first=1), 3000),
        "fill the batch from recent and replay (numpy path)": (lambda: st.fill(z, t, scratch._sources), 3000),
        "scaler learn_one": (lambda: scratch.scaler.learn_one(z), 3000),
        "reference test then learn": (lambda: scratch.reference.test_then_learn(t), 3000),
        "prequential update": (lambda: scratch.preq["champion"].update_values(0.3, 0.0), 3000),
        "drift detectors": (lambda: scratch.plasticity.watch_one(0.0, 0.1), 3000),
        "label guard": (lambda: scratch.guard.observe(scratch.guard.contradicts(s2, s2, t)), 3000),
        "paired tests (three bets)": (lambda: ev.pair_one(scratch._last_sv, 0.3, True), 3000),
        "promotion / swap check": (lambda: scratch._maybe_swap(), 3000),
        "replay and recent add": (lambda: (scratch.replay.add(z, t), scratch.recent.add(z, t)), 3000),
    }
    out = {"library learn_one, per row (rows 600-1249)": round(_whole(ilm, X, y, batch=0), 2),
           "Learner.learn_one, per row (rows 600-1249)": round(_whole_learner(lr, X, y), 2)}
    out.update({k: round(_best(fn, number), 2) for k, (fn, number) in pieces.items()})
    many = IncrementalModel(LinearModel(X.shape[1], 1), criterion=torch.nn.BCEWithLogitsLoss(), seed=0)
    for i in range(0, 608, 32):
        many.learn_many(X[i: i + 32], y[i: i + 32])
    out["library learn_many(32), per batch (rows 608-1247)"] = round(_whole(many, X, y, batch=32), 2)
    for k, v in out.items():
        print(f"{v:9.2f} us  {k}")
    import os

    write_result({"command": "PYTHONPATH=. python bench/timeit_learn_one.py", "cpu": cpu_info(), "load_avg": os.getloadavg(),
                  "us": out}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
