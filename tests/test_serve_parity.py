"""The parity gate: its arithmetic, int8 parity on fresh inputs, and refusal with fallback."""
from __future__ import annotations

import numpy as np
import pytest

from edge.errors import ParityError
from edge.serve import compile_model, load_backbone, parity
from edge.serve.backends import get_backend
from edge.serve.testing import make_tiny_model, synthetic_dataset


def _golden(n=50, d=8, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, d)).astype(np.float32)
    return parity.Golden(inputs={"simulated": np.zeros((n, 1, 1), np.float32)}, reference={"simulated": z}), z


def _head(z):
    return z[:, :3]


def test_identical_features_pass():
    golden, z = _golden()

    r = parity.compare(golden, {"simulated": z.copy()}, backend="x", precision="int8",
                       tol={"min_cosine": 0.98, "min_agreement": 0.97}, head=_head)

    assert r.passed and r.max_abs_err == 0 and r.agreement == 1.0 and r.min_cosine == pytest.approx(1.0)


def test_noisy_features_fail_on_cosine_and_say_by_how_much():
    golden, z = _golden()
    noisy = z + np.random.default_rng(1).standard_normal(z.shape).astype(np.float32)

    r = parity.compare(golden, {"simulated": noisy}, backend="x", precision="int8",
                       tol={"min_cosine": 0.98}, head=None)

    assert not r.passed and "mean cosine" in r.reason and "< 0.98" in r.reason
    with pytest.raises(ParityError, match="x int8 artifact refused: mean cosine"):
        r.raise_if_failed()


def test_flipped_classes_fail_on_agreement():
    golden, z = _golden()
    swapped = z.copy()
    swapped[:10, :3] = -swapped[:10, :3]

    r = parity.compare(golden, {"simulated": swapped}, backend="x", precision="int8",
                       tol={"min_agreement": 0.97}, head=_head)

    assert not r.passed and "class agreement" in r.reason and r.agreement < 0.97


def test_a_wrong_feature_shape_is_refused():
    golden, z = _golden()
    with pytest.raises(ParityError, match=r"shape \[50, 7\]"):
        parity.compare(golden, {"simulated": z[:, :7]}, backend="x", precision="fp32", tol={}, head=None)


def test_nan_features_never_pass():
    golden, z = _golden()
    bad = z.copy()
    bad[0, 0] = np.nan

    r = parity.compare(golden, {"simulated": bad}, backend="x", precision="fp32", tol={"max_abs": 1e-3}, head=None)

    assert not r.passed


def test_tolerances_come_from_the_manifest_with_defaults(tmp_path):
    model = make_tiny_model(tmp_path / "m", parity={"int8_min_cosine": 0.9})

    t8, t32 = parity.tolerances(model, "int8"), parity.tolerances(model, "fp32")

    assert t8["min_cosine"] == 0.9 and t8["min_agreement"] == 0.95 and t8["worst_cosine"] == 0.9
    assert t32 == {"max_abs": 1e-3, "min_agreement": 0.99}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_int8_is_within_tolerance_on_fresh_random_and_simulated_inputs(tiny, tmp_path):
    compile_model(tiny, backend="onnxruntime", precision="int8", cache_dir=tmp_path, progress=False)
    backend, _ = load_backbone(tiny, backend="onnxruntime", precision="int8", cache_dir=tmp_path)
    reference = get_backend("torch").load(tiny, precision="fp32", threads=None)
    x, _ = synthetic_dataset(128, seed=777)
    rand = np.random.default_rng(778).normal(x.mean(), x.std(), x.shape).astype(np.float32)
    golden = parity.Golden(inputs={"simulated": x, "random": rand}).with_reference(reference)

    report = parity.check(tiny, backend, golden, head=parity.head_scores(tiny))

    assert report.passed, report.summary()
    assert backend.precision == "int8"
    for name in ("simulated", "random"):
        assert report.per_set[name]["mean_cosine"] >= 0.98, (name, report.per_set[name])


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    """A model whose manifest demands of int8 what only fp32 can give."""
    return make_tiny_model(tmp_path_factory.mktemp("strict") / "model", name="strict",
                           parity={"int8_min_cosine": 0.9999999})


def test_an_artifact_outside_tolerance_is_refused_saying_what_differed(strict, tmp_path):
    with pytest.raises(ParityError) as e:
        compile_model(strict, backend="onnxruntime", precision="int8", cache_dir=tmp_path, progress=False)

    assert "onnxruntime int8 artifact refused: mean cosine" in str(e.value) and "< 1" in str(e.value)
    assert not list(tmp_path.glob("strict-*/onnxruntime-int8-*/meta.json")), "a refused artifact was committed"


def test_the_daemon_falls_back_to_the_next_backend_and_says_why(strict, tmp_path):
    backend, reason = load_backbone(strict, backend="onnxruntime", cache_dir=tmp_path)
    again, reason2 = load_backbone(strict, backend="onnxruntime", cache_dir=tmp_path)

    assert (backend.key, backend.precision) == ("onnxruntime", "fp32")
    assert "onnxruntime int8 refused" in reason and "mean cosine" in reason
    assert "serving onnxruntime fp32" in reason
    assert (again.key, again.precision) == ("onnxruntime", "fp32")
    assert "was refused when built" in reason2, "the refusal should be remembered, not rebuilt every start"


def test_auto_never_serves_a_refused_artifact_and_records_why(strict, tmp_path):
    backend, reason = load_backbone(strict, backend="auto", cache_dir=tmp_path)
    again, reason2 = load_backbone(strict, backend="auto", cache_dir=tmp_path)

    assert backend.precision == "fp32" and (again.key, again.precision) == (backend.key, "fp32")
    assert "onnxruntime int8 artifact refused: mean cosine" in reason and "measured now" in reason
    assert "recorded choice" in reason2, "the second start should serve the recorded choice, not re-measure"


def test_force_retries_a_remembered_refusal(strict, tmp_path):
    with pytest.raises(ParityError):
        compile_model(strict, backend="onnxruntime", precision="int8", cache_dir=tmp_path, progress=False)
    with pytest.raises(ParityError, match="was refused when built"):
        compile_model(strict, backend="onnxruntime", precision="int8", cache_dir=tmp_path, progress=False)
    with pytest.raises(ParityError, match="artifact refused: mean cosine"):
        compile_model(strict, backend="onnxruntime", precision="int8", cache_dir=tmp_path, progress=False,
                      force=True)


def test_a_broken_quantization_is_refused(tiny, tmp_path, monkeypatch):
    # Calibrating on windows at 1% of their real amplitude clips every activation.
    import edge.serve.compile as comp

    real = comp.calibration_windows
    monkeypatch.setattr(comp, "calibration_windows", lambda model, file=None: real(model, file) * 0.01)

    with pytest.raises(ParityError, match="onnxruntime int8 artifact refused"):
        compile_model(tiny, backend="onnxruntime", precision="int8", cache_dir=tmp_path, progress=False)
