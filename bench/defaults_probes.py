"""Ideas for the library's defaults that were measured and not taken (issue 18): each a
probe that changes one thing in the library, on every stream of ``edge bench learning``.

    PYTHONPATH=. python bench/defaults_probes.py [--out bench/out/defaults_probes.json]

Probes (quality only: ``learn_one``, prequential, the mean over ``--seeds`` initial
weights, the library's defaults otherwise):

- ``defaults``: the library as it is;
- ``reexpress_from_2`` / ``reexpress_from_50``: at every update of the input scaler the
  head is re-expressed so that its raw-space function does not move
  (``w' = w * s_new / s_old``, ``b' = b + (w * inv_old) . (mean_new - mean_old)``), from
  the 2nd or the 50th row on (the learner would have to hand its scaler the head);
- ``freeze_inputs_200``: the input scaler stops learning after 200 rows;
- ``freeze_target_50`` / ``freeze_target_200``: the target's statistics stop after 50 or 200;
- ``promote_block_40``: a learned head needs 40 labels of record, not 10, before the
  library may serve it (``AdaptConfig.promote_block``);
- ``raw_mean_reference``: when the reference serves, the raw running mean of the target
  is served instead of the learner's own reference read back from standard units.

They patch the library in this process only (probes, not code paths of the library).
"""
from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import numpy as np


def _reexpressing(start: int):
    from edge.adapt.scaler import OnlineScaler

    class Reexpress(OnlineScaler):
        head = None

        def _keeping(self, update, arg):
            h = self.head
            if h is None or self.n < start:
                return update(arg)
            mean0, inv0 = self._mean32.copy(), self._inv32.copy()
            update(arg)
            raw = h.weight * inv0  # the weights on raw features
            h.bias += raw @ (self._mean32 - mean0)
            h.weight[...] = raw / self._inv32

        def learn_one(self, z):
            self._keeping(super().learn_one, z)

        def learn_many(self, Z):
            self._keeping(super().learn_many, Z)
    return Reexpress


def _freezing(limit: int):
    from edge.adapt.scaler import OnlineScaler

    class Freeze(OnlineScaler):
        def learn_one(self, z):
            if self.n < limit:
                super().learn_one(z)

        def learn_many(self, Z):
            if self.n < limit:
                super().learn_many(np.asarray(Z)[: limit - self.n])
    return Freeze


def _apply(probe: str) -> None:
    """Patch the library for one probe (this process only)."""
    import edge.adapt.learner as learner_mod
    import edge.learning as lib
    from edge.config import AdaptConfig

    if probe.startswith("reexpress_from_"):
        learner_mod.OnlineScaler = _reexpressing(int(probe.rsplit("_", 1)[1]))
        build = lib.IncrementalModel._build

        def _build(self, x):
            lr = build(self, x)
            if lr.scaler is not None:
                lr.scaler.head = lr.head
            return lr
        lib.IncrementalModel._build = _build
    elif probe == "freeze_inputs_200":
        learner_mod.OnlineScaler = _freezing(200)
    elif probe.startswith("freeze_target_"):
        lib.OnlineScaler = _freezing(int(probe.rsplit("_", 1)[1]))
    elif probe == "promote_block_40":
        lib.AdaptConfig = functools.partial(AdaptConfig, promote_block=40)
    elif probe == "raw_mean_reference":
        learn_row = lib.IncrementalModel._learn_row

        def _learn_row(self, x, y):
            ts = self.target_scaler
            which = self.learner.serving()
            mean = None if ts is None else ts.affine()[0]
            served, out = learn_row(self, x, y)
            if ts is not None and which == "reference":
                served = mean
                t = np.asarray(y, np.float32).reshape(-1)
                out["loss"] = float(np.mean((served - t) ** 2))
            return served, out
        lib.IncrementalModel._learn_row = _learn_row
    elif probe != "defaults":
        raise SystemExit(f"unknown probe {probe!r}")


def _run(probe: str, seeds: int) -> dict:
    from edge.bench.learning import STREAMS, _quality, load_stream, run_edge, run_reference

    _apply(probe)
    out = {}
    for name in STREAMS:
        task, X, y, k = load_stream(name, seed=0, pre=500, post=1500)
        m = "mse" if task == "regression" else "accuracy"
        qs = [_quality(task, run_edge(task, X, y, k, seed=s)[0], y)[m] for s in range(seeds)]
        out[name] = {"measure": m, "mean": float(np.mean(qs)), "min": float(min(qs)), "max": float(max(qs)),
                     "reference": _quality(task, run_reference(task, y, k), y)[m]}
    return out


PROBES = ("defaults", "reexpress_from_2", "reexpress_from_50", "freeze_inputs_200", "freeze_target_50",
          "freeze_target_200", "promote_block_40", "raw_mean_reference")


def main(argv=None) -> int:
    import subprocess
    import sys

    from edge.bench.learning import _cpu

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/out/defaults_probes.json")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--probe", help=argparse.SUPPRESS)  # one probe, in a child (patches stay in it)
    args = ap.parse_args(argv)
    if args.probe:
        print(json.dumps(_run(args.probe, args.seeds)))
        return 0
    report = {"command": "PYTHONPATH=. python bench/defaults_probes.py " + " ".join(argv or []), "cpu": _cpu(), "probes": {}}
    for probe in PROBES:
        res = subprocess.run([sys.executable, __file__, "--probe", probe, "--seeds", str(args.seeds)],
                             capture_output=True, text=True, check=True)
        report["probes"][probe] = json.loads(res.stdout.strip().splitlines()[-1])
        print(probe, {s: round(v["mean"], 4) for s, v in report["probes"][probe].items()}, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
