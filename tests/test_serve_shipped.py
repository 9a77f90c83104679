"""The shipped vibration model on ONNX Runtime int8: parity and accuracy against fp32."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge.serve import compile_model, load_backbone, parity
from edge.serve.backends import get_backend
from edge.zoo import resolve_model, shipped_models

WEIGHTS = Path(__file__).resolve().parent.parent / "models" / "vibration" / "weights.safetensors"
pytestmark = pytest.mark.skipif(not WEIGHTS.is_file(), reason="models/vibration has no weights yet")


@pytest.fixture(scope="module")
def shipped():
    from edge.zoo import resolve_model

    return resolve_model("vibration")


@pytest.fixture(scope="module")
def int8(shipped, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    result = compile_model(shipped, backend="onnxruntime", precision="int8", cache_dir=cache, progress=False)
    backend, reason = load_backbone(shipped, backend="onnxruntime", precision="int8", cache_dir=cache)
    return backend, reason, result


def test_shipped_model_builds_int8_that_passes_its_gate(int8):
    backend, reason, result = int8

    assert result.parity.passed, result.parity.summary()
    assert (backend.key, backend.precision) == ("onnxruntime", "int8"), reason


@pytest.mark.parametrize("name", sorted(shipped_models()))
def test_compile_and_run_agree_for_every_shipped_model(name, tmp_path):
    """``edge compile NAME`` (defaults) and the daemon's start serve the same artifact."""
    model = resolve_model(name)

    built = compile_model(model, cache_dir=tmp_path, progress=False)
    served, reason = load_backbone(model, cache_dir=tmp_path)

    chosen = built.decision.chosen
    assert (served.key, served.precision, served.variant) == (chosen.backend, chosen.precision, chosen.variant)
    assert (built.backend, built.precision, built.variant) == (chosen.backend, chosen.precision, chosen.variant)
    assert "recorded choice" in reason and "cache hit" in reason
    if model.manifest.serve.get("precision") == "fp32":
        assert served.precision == "fp32" and "policy fp32" in reason


def test_shipped_int8_matches_fp32_on_fresh_simulated_shifted_and_random_windows(shipped, int8):
    from edge.sim import SHIFTS, make_dataset

    backend = int8[0]
    reference = get_backend("torch").load(shipped, precision="fp32", threads=None)
    sets = {name: make_dataset(96, seed=31_337, condition=SHIFTS[name])[0] for name in ("nominal", "mounting")}
    x = sets["nominal"]
    sets["random"] = np.random.default_rng(5).normal(x.mean(axis=(0, 2), keepdims=True),
                                                    x.std(axis=(0, 2), keepdims=True), x.shape).astype(np.float32)
    golden = parity.Golden(inputs=sets).with_reference(reference)

    report = parity.check(shipped, backend, golden, head=parity.head_scores(shipped))

    tol = parity.tolerances(shipped, "int8")
    for name, stats in report.per_set.items():
        assert stats["mean_cosine"] >= tol["min_cosine"], (name, stats)
    assert report.per_set["nominal"]["agreement"] >= tol["min_agreement"], report.per_set


def test_shipped_int8_accuracy_is_within_a_point_of_fp32(shipped, int8):
    from edge.sim import make_dataset

    backend = int8[0]
    reference = get_backend("torch").load(shipped, precision="fp32", threads=None)
    head = parity.head_scores(shipped)
    x, y = make_dataset(400, seed=4_040)

    acc32 = (head(reference.features(x)).argmax(1) == y).mean()
    acc8 = (head(backend.features(x)).argmax(1) == y).mean()

    assert abs(acc8 - acc32) <= 0.01, (acc8, acc32)


def test_edge_compile_forecast_with_defaults_succeeds_and_serves_fp32(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "edge.cli", "compile", "forecast", "--quiet", "--cache-dir", str(tmp_path)],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)

    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("onnxruntime fp32: cache miss") and "policy fp32" in r.stdout
