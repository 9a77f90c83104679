"""Where one ``Learner.learn_many(32)`` batch goes, part by part (BENCHMARKS.md, "Per-row glue,
second pass").

    PYTHONPATH=TREE python bench/timeit_learn_many.py --out bench/out/learn_many_pieces-NAME.json

Phishing (river's bundled data set, 9 features, binary), the library's defaults
(``IncrementalModel(LinearModel(9, 1), criterion=BCEWithLogitsLoss())``) warmed on 608 rows
by batches of 32; each part is called on its own on one batch (rows 640-671, best of 5
repeats of ``timeit``) on a copy of the learner, so the parts do not add up exactly to
the whole (a repeated batch would promote over and over): the whole is ``learn_many`` over
rows 608-1247 on fresh copies. Run it with
``PYTHONPATH`` at each tree to compare two trees (the JSON names the tree it ran).
"""
from __future__ import annotations

import argparse
import copy
import os
import timeit

import numpy as np


def _best(fn, number: int = 500) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def _whole(learner, X, y) -> float:
    """Microseconds per ``learn_many(32)`` batch over rows 608-1247, each of 5 repeats on its own
    copy of the learner (made outside the timing); best."""
    import time

    Z = X.astype(np.float32)
    best = float("inf")
    for _ in range(5):
        m = copy.deepcopy(learner)
        t0 = time.perf_counter()
        for i in range(608, 1248, 32):
            m.learn_many(Z[i: i + 32], y[i: i + 32])
        best = min(best, (time.perf_counter() - t0) / 20 * 1e6)
    return best


def main(argv=None) -> int:
    import torch

    import edge
    from edge.adapt import batch
    from edge.bench.learning import load_stream
    from edge.bench.machine import cpu_info, write_result
    from edge.learning import IncrementalModel, LinearModel

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/out/learn_many_pieces.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    _, X, y, _ = load_stream("phishing", seed=0, pre=0, post=0)
    torch.manual_seed(0)
    ilm = IncrementalModel(LinearModel(X.shape[1], 1), criterion=torch.nn.BCEWithLogitsLoss(), seed=0)
    for i in range(0, 608, 32):
        ilm.learn_many(X[i: i + 32], y[i: i + 32])
    lr = copy.deepcopy(ilm.learner)
    tr, ev = lr.trainer, lr.evaluator
    Z, Y = X[640:672].astype(np.float32), y[640:672]
    kw = dict(task=lr.task, feature_size=lr.feature_size, outputs=lr.outputs, n_classes=lr._n_classes,
              target=lr._target, rejected=lr.rejected)
    Za, T = batch.accepted_rows(Z, Y, **kw)
    sv = ev.test_many(lr.champion, lr._global, Za, T)
    train = dict(paid=len(Za), steps=1, sources=lr._sources, batch_size=lr.cfg.batch, scaler=lr.scaler)
    s_chal, _ = batch.train_rows(tr, Za, T, **train)
    lc, ec = ev.challenger_many(s_chal, T)
    parts = {
        "accepted rows (checks)": lambda: batch.accepted_rows(Z, Y, **kw),
        "test_many (both heads, the reference, three records)": lambda: ev.test_many(lr.champion, lr._global, Za, T),
        "label guard": lambda: lr.guard.observe_many(lr.guard.contradicts_many(sv.scores, sv.global_scores, T)),
        "train_rows (gather, scale, one step on the batch and its replay share)": lambda: batch.train_rows(tr, Za, T, **train),
        "challenger record": lambda: ev.challenger_many(s_chal, T),
        "paired tests (three, over the batch)": lambda: ev.pair_many(sv, lc, True),
        "replay and recent add": lambda: (lr.replay.add_many(Za, T), lr.recent.add_many(Za, T)),
        "faded errors": lambda: lr.plasticity.fade_new_many(ec),
        "drift detectors": lambda: lr.plasticity.watch_many(sv.error, sv.loss),
    }
    out = {k: round(_best(fn), 2) for k, fn in parts.items()}
    out["whole learn_many(32), per batch of rows 608-1247 (best of 5 copies)"] = round(_whole(ilm.learner, X, y), 2)
    for k, v in out.items():
        print(f"{v:9.2f} us  {k}")
    write_result({"command": "PYTHONPATH=TREE python bench/timeit_learn_many.py " + " ".join(argv or []),
                  "tree": os.path.dirname(os.path.dirname(os.path.abspath(edge.__file__))), "cpu": cpu_info(),
                  "load_avg": os.getloadavg(), "us_per_batch_of_32": out}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
