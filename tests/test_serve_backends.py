"""Contract suite: every serving backend available here, on the same tiny model folder.

Each backend must match the fp32 reference within its precision's tolerance, reload
from the cache to the same numbers, be deterministic, and reject bad input clearly.
TensorRT rows are skipped, with the reason, where CUDA or torch-tensorrt is absent.
"""
from __future__ import annotations

import numpy as np
import pytest

from edge.errors import BackendUnavailable
from edge.serve import parity
from edge.serve.backends import availability, backend_keys, get_backend
from edge.serve.backends.base import Backend
from edge.serve.cache import ArtifactCache
from edge.serve.compile import obtain
from edge.serve.testing import make_tiny_model, synthetic_dataset

TRT_OK, TRT_WHY = availability()["tensorrt"]
needs_trt = [pytest.mark.tensorrt, pytest.mark.skipif(not TRT_OK, reason=f"TensorRT backend unavailable: {TRT_WHY}")]

CANDIDATES = [
    ("torch", "fp32"),
    ("onnxruntime", "fp32"),
    ("onnxruntime", "int8"),
    pytest.param(("tensorrt", "fp16"), marks=needs_trt, id="tensorrt-fp16"),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(tiny):
    return get_backend("torch").load(tiny, precision="fp32", threads=None)


@pytest.fixture(scope="module", params=CANDIDATES, ids=lambda c: "-".join(c))
def served(request, tiny, cache_dir):
    key, precision = request.param
    # threads=None keeps the torch reference from pinning torch's process-wide thread count
    backend, result = obtain(tiny, key, precision, cache=ArtifactCache(cache_dir),
                             threads=None if key == "torch" else 1)
    return backend, result


def test_features_match_the_fp32_reference_on_fresh_inputs(served, tiny, reference):
    backend, _ = served
    x, _ = synthetic_dataset(64, seed=4242)
    golden = parity.Golden(inputs={"simulated": x, "random": np.random.default_rng(7).standard_normal(x.shape)
                                   .astype(np.float32)}).with_reference(reference)

    report = parity.check(tiny, backend, golden, head=parity.head_scores(tiny))

    assert report.passed, report.summary()


def test_reload_from_cache_gives_identical_features(served, tiny, cache_dir):
    backend, first = served
    x, _ = synthetic_dataset(8, seed=1)

    again, result = obtain(tiny, backend.key, backend.precision, cache=ArtifactCache(cache_dir),
                           threads=backend.threads)

    assert result.cache in ("hit", "reference")
    assert result.artifact_hash == first.artifact_hash
    np.testing.assert_array_equal(again.features(x), backend.features(x))


def test_features_are_deterministic_and_shaped(served, tiny):
    backend, _ = served
    x, _ = synthetic_dataset(5, seed=3)

    a, b = backend.features(x), backend.features(x.copy())

    assert a.shape == (5, tiny.manifest.feature_size) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad, error, words", [
    (np.zeros((2, 3, 100), np.float32), ValueError, "[B, 3, 128]"),
    (np.zeros((3, 128), np.float32), ValueError, "[B, 3, 128]"),
    (np.zeros((2, 3, 128), np.float64), TypeError, "float32"),
    ([[0.0] * 128] * 3, TypeError, "numpy array"),
])
def test_bad_input_is_rejected_with_the_expected_shape(served, bad, error, words):
    backend, _ = served

    with pytest.raises(error) as e:
        backend.features(bad)

    assert words in str(e.value) and backend.key in str(e.value)


def test_describe_names_backend_precision_provider_and_artifact(served):
    backend, result = served

    d = backend.describe()

    assert (d["backend"], d["precision"]) == (backend.key, backend.precision)
    assert d["provider"] and d["threads"] in (None, 1)
    assert d["artifact_sha256"] == result.artifact_hash


def test_registry_knows_the_three_builtin_keys():
    assert {"torch", "onnxruntime", "tensorrt"} <= set(backend_keys())


def test_unknown_backend_names_the_known_ones():
    with pytest.raises(BackendUnavailable, match="known: .*onnxruntime"):
        get_backend("openvino")


@pytest.mark.skipif(TRT_OK, reason="TensorRT is available here")
def test_unavailable_tensorrt_names_the_extra_to_install():
    with pytest.raises(BackendUnavailable) as e:
        get_backend("tensorrt")

    assert "edge-runtime[tensorrt]" in str(e.value) and TRT_WHY in str(e.value)


def test_a_precision_a_backend_cannot_build_is_unavailable(tiny, cache_dir):
    with pytest.raises(BackendUnavailable, match="does not build fp16"):
        obtain(tiny, "onnxruntime", "fp16", cache=ArtifactCache(cache_dir))


def test_backends_subclass_the_contract():
    for key in backend_keys():
        cls = get_backend(key) if availability()[key][0] else None
        assert cls is None or issubclass(cls, Backend)


def test_torch_tensorrt_keyword_changes_between_releases_are_bridged():
    """JetPack's torch-tensorrt takes ``inputs=``; current releases take ``arg_inputs=``."""
    from edge.serve.backends.trt import _call

    def compile_jetpack(ep, inputs=None, *, enabled_precisions=None, **kwargs):
        return "jetpack", inputs, kwargs

    def compile_current(ep, arg_inputs=None, *, inputs=None, enabled_precisions=None):
        return "current", arg_inputs, inputs

    def save_jetpack(module, path, *, output_format="exported_program", inputs=None, retrace=False):
        return inputs, retrace

    assert _call(compile_jetpack, "ep", arg_inputs=[1], min_block_size=1) == ("jetpack", [1], {"min_block_size": 1})
    assert _call(compile_current, "ep", arg_inputs=[1], min_block_size=1) == ("current", [1], None)
    assert _call(save_jetpack, "m", "p", arg_inputs=[2], retrace=True) == ([2], True)
