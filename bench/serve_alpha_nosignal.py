"""Issue 18: the serving tests' level on generated no-signal streams (the target independent of
the features; the distributions of tests/test_learning_serve_evidence.py): for each level, the
served squared error over the raw running mean's, per stream, and how often a learned head was
ever served. Writes ``bench/out/serve_alpha_nosignal.json``.
Run: ``PYTHONPATH=. python bench/serve_alpha_nosignal.py``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from torch import nn

import edge.adapt.evaluator as evaluator
from edge.learning import IncrementalModel, LinearModel

KINDS = ("normal", "uniform", "laplace", "exponential", "bimodal", "student_t3")
LEVELS = (0.05, 0.1, 0.2, 0.5)


def _stream(i: int):
    rng = np.random.default_rng(1000 + i)
    kind, n, d = KINDS[i % len(KINDS)], int(rng.integers(200, 1500)), int(rng.integers(2, 25))
    loc, scale = float(rng.uniform(-50, 50)), float(np.exp(rng.uniform(-2, 3)))
    draw = {"normal": lambda: rng.normal(size=n), "uniform": lambda: rng.uniform(-1.7, 1.7, n),
            "laplace": lambda: rng.laplace(size=n), "exponential": lambda: rng.exponential(size=n),
            "bimodal": lambda: rng.choice([-1.0, 1.0], n) + 0.2 * rng.normal(size=n),
            "student_t3": lambda: rng.standard_t(3, n)}[kind]
    y = (loc + scale * draw()).astype(np.float32).astype(np.float64)
    return kind, rng.normal(size=(n, d)).astype(np.float32), y


def _ratio(X, y, seed: int) -> tuple[float, bool]:
    ilm = IncrementalModel(LinearModel(X.shape[1], 1), criterion=nn.MSELoss(), seed=seed)
    served, ever = [], False
    for x, t in zip(X, y):
        served.append(float(np.asarray(ilm.learn_one(x, np.float32([t]))["served"]).reshape(-1)[0]))
        ever = ever or ilm.learner.serving() != "reference"
    s = np.asarray(served)
    ref = np.cumsum(y)[:-1] / np.arange(1, len(y))
    return float(np.sum((s[1:] - y[1:]) ** 2) / np.sum((ref - y[1:]) ** 2)), ever


def main(argv=None) -> int:
    streams = int(argv[0]) if argv else 30
    report = {"command": "PYTHONPATH=. python bench/serve_alpha_nosignal.py " + " ".join(argv or []), "levels": {}}
    data = [_stream(i) for i in range(streams)]
    for a in LEVELS:
        evaluator.SERVE_ALPHA = a
        rs = [_ratio(X, y, i % 3) for i, (_, X, y) in enumerate(data)]
        r = np.array([x[0] for x in rs])
        report["levels"][str(a)] = {"streams": streams, "max_ratio": float(r.max()), "mean_ratio": float(r.mean()),
                                    "ever_served_learned": int(sum(x[1] for x in rs)),
                                    "worst_kind": data[int(r.argmax())][0]}
        print(a, report["levels"][str(a)], flush=True)
    out = Path("bench/out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_alpha_nosignal.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
