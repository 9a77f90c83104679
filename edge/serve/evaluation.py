"""Labelled check data of a model folder (``[eval]``) and accuracy on it.

``[eval] generator = "module:function"`` is called as ``function(n, seed)`` and returns
``(X, y)`` or ``{condition: (X, y)}``; ``[eval] file = "eval.npz"`` (relative to the
folder) holds ``X`` and ``y``, or ``X_<condition>`` and ``y_<condition>`` pairs. ``X`` is
``[N, C, L]`` float32 and ``y`` ``[N]`` class indices. ``[eval] n`` sets how many windows
per condition the generator makes. Accuracy is measured for classification models only,
with the model's own linear head in numpy (no torch).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.errors import ModelError
from edge.serve.calibration import check_windows, resolve_ref

EVAL_N = 500
EVAL_SEED = 0


def eval_sets(model, n: int | None = None, seed: int = EVAL_SEED) -> tuple[dict | None, str]:
    """({condition: (X, y)}, where from), or (None, why there is none)."""
    spec = model.manifest.eval
    n = int(n or spec.get("n", EVAL_N))
    if spec.get("file"):
        path = model.path / str(spec["file"])
        try:
            with np.load(path, allow_pickle=False) as d:
                raw = {k: d[k] for k in d.files}
        except (OSError, ValueError) as e:
            raise ModelError(f"{path}: cannot read [eval] file: {e}") from None
        if "X" in raw and "y" in raw:
            sets = {"eval": (raw["X"], raw["y"])}
        else:
            sets = {k[2:]: (raw[k], raw.get("y_" + k[2:])) for k in raw if k.startswith("X_")}
        where = f"[eval] file {Path(spec['file']).name}"
    elif spec.get("generator"):
        fn = resolve_ref(model, spec["generator"], what="eval.generator")
        try:
            out = fn(n, seed)
        except Exception as e:  # user code
            raise ModelError(f"{model.path}: eval generator failed: {type(e).__name__}: {e}") from e
        sets = dict(out) if isinstance(out, dict) else {"eval": tuple(out)}
        where = f"[eval] generator {spec['generator']} (n={n}, seed={seed})"
    else:
        return None, "no labelled check data ([eval] generator or file in manifest.toml): accuracy not measured"
    if model.manifest.task != "classification":
        return None, f"{where} present, but accuracy is measured for classification models only"
    checked = {}
    for cond, pair in sets.items():
        if len(pair) != 2 or pair[1] is None:
            raise ModelError(f"{model.path}: [eval] set {cond!r} needs windows X and labels y")
        x = check_windows(np.asarray(pair[0]), model, where=f"{where} {cond}")
        y = np.asarray(pair[1]).astype(np.int64).reshape(-1)
        if len(y) != len(x) or y.min() < 0 or y.max() >= len(model.manifest.classes):
            raise ModelError(f"{model.path}: [eval] set {cond!r}: labels must be {len(x)} class indices "
                             f"in [0, {len(model.manifest.classes)})")
        checked[cond] = (x, y)
    return checked, where


def accuracy(features, head, sets: dict, batch: int = 256) -> dict[str, float]:
    """Accuracy per condition of ``head(features(X))`` against ``y``.

    >>> sets = {"a": (np.zeros((4, 1, 2), np.float32), np.array([0, 0, 1, 1]))}
    >>> accuracy(lambda x: x[:, 0, :], lambda z: z + np.array([1.0, 0.0]), sets)
    {'a': 0.5}
    """
    out = {}
    for cond, (x, y) in sets.items():
        z = np.concatenate([features(x[i:i + batch]) for i in range(0, len(x), batch)])
        out[cond] = float((head(z).argmax(1) == y).mean())
    return out
