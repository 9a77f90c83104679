"""Issue 18: the level of the library's serving tests (``edge.adapt.policy.SERVE_ALPHA``),
chosen by measurement across the 7 streams of ``edge bench learning``, the same for all.

For each level, each stream and seeds 0-2 (the LinearModel's initial weights): prequential
quality of what ``learn_one`` served (``edge.bench.learning.run_edge``), and the trivial
reference's. Writes ``bench/out/serve_alpha.json``. Run: ``PYTHONPATH=. python bench/serve_alpha.py``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

import edge.adapt.evaluator as evaluator
from edge.bench import learning as bl

LEVELS = (0.01, 0.05, 0.1, 0.2, 0.5)


def main(argv=None) -> int:
    levels = [float(a) for a in (argv or [])] or LEVELS
    report = {"command": "PYTHONPATH=. python bench/serve_alpha.py " + " ".join(argv or []), "cpu": bl._cpu(), "streams": {}}
    for name in bl.STREAMS:
        task, X, y, k = bl.load_stream(name, seed=0, pre=500, post=1500)
        q = "mse" if task == "regression" else "accuracy"
        r = {"metric": q, "reference": bl._quality(task, bl.run_reference(task, y, k), y)[q], "levels": {}}
        for a in levels:
            evaluator.SERVE_ALPHA = a
            vals = [bl._quality(task, bl.run_edge(task, X, y, k, seed=s)[0], y)[q] for s in range(3)]
            r["levels"][str(a)] = {"mean": float(np.mean(vals)), "min": float(min(vals)), "max": float(max(vals))}
        report["streams"][name] = r
        print(name, q, "reference", round(r["reference"], 4),
              {a: round(v["mean"], 4) for a, v in r["levels"].items()}, flush=True)
    out = Path("bench/out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_alpha.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
