"""The parity gate: a compiled backbone must agree with the fp32 reference on golden inputs.

Golden inputs are seeded and of two kinds: simulated windows like the calibration data
(but from another seed) and Gaussian noise with the same per-channel mean and spread,
which probes the artifact off the data it was calibrated on. The gate compares features
(max abs error, per-window cosine) and the classes the model's own head predicts from
each; the tolerances come from the manifest's ``[parity]`` table. Agreement of classes
is judged on the simulated windows only: on noise the head's scores are near-ties, so
flips there measure the head, not the artifact.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import ParityError
from edge.serve.calibration import held_out_windows

GOLDEN_SEED = 20_240_917
N_SIMULATED, N_RANDOM = 96, 32

DEFAULTS = {
    "fp32_max_abs": 1e-3, "fp32_min_agreement": 0.99,
    "fp16_min_cosine": 0.999, "fp16_worst_cosine": 0.99, "fp16_min_agreement": 0.99,
    "int8_min_cosine": 0.98, "int8_worst_cosine": 0.90, "int8_min_agreement": 0.97,
}


def tolerances(model, precision: str) -> dict[str, float]:
    """The manifest's ``[parity]`` values for ``precision``, defaults filled in."""
    t = {**DEFAULTS, **{k: float(v) for k, v in model.manifest.parity.items()}}
    return {k[len(precision) + 1:]: v for k, v in t.items() if k.startswith(precision + "_")}


@dataclass
class Golden:
    """Golden inputs by set name and the fp32 reference features of each."""

    inputs: dict[str, np.ndarray]
    reference: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = ""

    @classmethod
    def make(cls, model, *, calibration_file=None, seed: int = GOLDEN_SEED) -> "Golden":
        """Held-out windows (never the calibration ones) plus random windows of their statistics."""
        m = model.manifest
        sets = {}
        sim, source = held_out_windows(model, calibration_file, N_SIMULATED, seed)
        rng = np.random.default_rng(seed)
        if sim is not None:
            sets["simulated"] = sim
            mu = sim.mean(axis=(0, 2), keepdims=True)
            sd = sim.std(axis=(0, 2), keepdims=True) + 1e-6
        else:
            mu, sd = 0.0, 1.0
        shape = (N_RANDOM, m.channels, m.window)
        sets["random"] = (rng.standard_normal(shape) * sd + mu).astype(np.float32)
        return cls(inputs=sets, source=source)

    def with_reference(self, reference_backend) -> "Golden":
        self.reference = {k: reference_backend.features(x) for k, x in self.inputs.items()}
        return self

    def save(self, path: Path) -> None:
        arrays = {f"in_{k}": v for k, v in self.inputs.items()}
        arrays.update({f"ref_{k}": v for k, v in self.reference.items()})
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: Path) -> "Golden":
        with np.load(path, allow_pickle=False) as d:
            inputs = {k[3:]: d[k] for k in d.files if k.startswith("in_")}
            ref = {k[4:]: d[k] for k in d.files if k.startswith("ref_")}
        return cls(inputs=inputs, reference=ref)


@dataclass
class ParityReport:
    """How a candidate's features compare with the reference, and whether that passes."""

    backend: str
    precision: str
    n: int
    max_abs_err: float
    min_cosine: float
    mean_cosine: float
    agreement: float | None
    per_set: dict[str, dict[str, float | None]]
    tolerances: dict[str, float]
    passed: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        agree = "n/a" if self.agreement is None else f"{self.agreement:.1%}"
        return (f"{self.backend} {self.precision}: max_abs_err={self.max_abs_err:.3g} "
                f"cosine mean={self.mean_cosine:.5f} min={self.min_cosine:.5f} class agreement={agree} "
                f"on {self.n} golden windows")

    def raise_if_failed(self) -> None:
        if not self.passed:
            raise ParityError(f"{self.backend} {self.precision} artifact refused: {self.reason} ({self.summary()})")


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = (a.astype(np.float64) * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = den == 0
    cos = np.where(both_zero, 1.0, num / np.where(both_zero, 1.0, den))
    return np.where(np.isfinite(cos), cos, -1.0)


def _stats(ref: np.ndarray, got: np.ndarray, head) -> dict[str, float | None]:
    cos = _cosine(ref, got)
    err = np.abs(ref.astype(np.float64) - got)
    agree = None if head is None else float((head(ref).argmax(1) == head(got).argmax(1)).mean())
    return {"n": len(ref), "max_abs_err": float(np.nan_to_num(err, nan=np.inf).max()),
            "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()), "agreement": agree}


def compare(golden: Golden, outputs: dict[str, np.ndarray], *, backend: str, precision: str,
            tol: dict[str, float], head=None) -> ParityReport:
    """A ``ParityReport`` for ``outputs`` (features per golden set) against the reference. Pure."""
    per_set = {}
    for name, ref in golden.reference.items():
        got = outputs[name]
        if got.shape != ref.shape:
            raise ParityError(f"{backend} {precision} artifact refused: features of shape {list(got.shape)} "
                              f"where the reference has {list(ref.shape)}")
        per_set[name] = _stats(ref, got, head)
    everything = list(per_set.values())
    max_abs = max(s["max_abs_err"] for s in everything)
    min_cos = min(s["min_cosine"] for s in everything)
    n = sum(s["n"] for s in everything)
    mean_cos = sum(s["mean_cosine"] * s["n"] for s in everything) / n
    judged = per_set.get("simulated") or per_set.get("random")
    agreement = judged["agreement"]
    failures = []
    if "max_abs" in tol and not max_abs <= tol["max_abs"]:
        failures.append(f"max abs error {max_abs:.3g} > {tol['max_abs']:g}")
    if "min_cosine" in tol and not mean_cos >= tol["min_cosine"]:
        failures.append(f"mean cosine {mean_cos:.4f} < {tol['min_cosine']:g}")
    if "worst_cosine" in tol and not min_cos >= tol["worst_cosine"]:
        failures.append(f"worst-window cosine {min_cos:.4f} < {tol['worst_cosine']:g}")
    if agreement is not None and "min_agreement" in tol and not agreement >= tol["min_agreement"]:
        failures.append(f"class agreement {agreement:.1%} < {tol['min_agreement']:.1%}")
    return ParityReport(backend=backend, precision=precision, n=n, max_abs_err=max_abs, min_cosine=min_cos,
                        mean_cosine=mean_cos, agreement=agreement, per_set=per_set, tolerances=tol,
                        passed=not failures, reason="; ".join(failures) or "within tolerance")


def head_scores(model):
    """The model's own head as ``z [B, D] -> scores [B, K]`` (None unless classification).

    INTERNALS.md fixes the head's state dict as a linear layer (``weight [K, D]``,
    ``bias [K]``), so it runs in numpy, straight from the weights file: the gate on load
    then needs no torch forward pass, which keeps the start-up under its budget.
    """
    if model.manifest.task != "classification":
        return None
    from safetensors.numpy import load_file

    tensors = load_file(str(model.path / "weights.safetensors"))
    w, b = tensors.get("head.weight"), tensors.get("head.bias")
    if w is None or b is None or w.ndim != 2 or b.shape != (w.shape[0],):
        raise ParityError(f"{model.path}: head weights are not a linear layer (head.weight [K, D], head.bias [K])")
    w, b = w.astype(np.float32), b.astype(np.float32)
    return lambda z: z @ w.T + b


def check(model, backend, golden: Golden, *, head=None) -> ParityReport:
    """Run ``golden`` through ``backend`` and compare with the reference (does not raise)."""
    outputs = {k: backend.features(x) for k, x in golden.inputs.items()}
    return compare(golden, outputs, backend=backend.key, precision=backend.precision,
                   tol=tolerances(model, backend.precision), head=head)
