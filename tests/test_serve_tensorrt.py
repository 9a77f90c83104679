"""TensorRT through torch-tensorrt: compile on the device, save, reload, parity.

Skipped, with the reason in the test output, where CUDA or torch-tensorrt is absent
(CI, any CPU-only machine). On a Jetson or a CUDA box with ``edge-runtime[tensorrt]``
these compile the tiny model's backbone; the first run takes a minute or so.
"""
from __future__ import annotations

import numpy as np
import pytest

from edge.serve import compile_model, load_backbone, parity
from edge.serve.backends import availability, get_backend
from edge.serve.testing import make_tiny_model, synthetic_dataset

OK, WHY = availability()["tensorrt"]
pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu,
              pytest.mark.skipif(not OK, reason=f"TensorRT backend unavailable here: {WHY}")]


def _has_modelopt() -> bool:
    try:
        import modelopt.torch.quantization  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.parametrize("precision", [
    "fp16",
    pytest.param("int8", marks=pytest.mark.skipif(not _has_modelopt(), reason=f"TensorRT int8 needs nvidia-modelopt{'' if OK else '; and ' + WHY}")),
])
def test_compile_save_reload_and_parity(tiny, tmp_path, precision):
    built = compile_model(tiny, backend="tensorrt", precision=precision, cache_dir=tmp_path, progress=False)
    backend, reason = load_backbone(tiny, backend="tensorrt", precision=precision, cache_dir=tmp_path)
    reference = get_backend("torch").load(tiny, precision="fp32", threads=None)
    x, _ = synthetic_dataset(64, seed=99)
    golden = parity.Golden(inputs={"simulated": x}).with_reference(reference)

    report = parity.check(tiny, backend, golden, head=parity.head_scores(tiny))

    assert built.cache == "miss" and "cache hit" in reason
    assert (backend.key, backend.precision) == ("tensorrt", precision)
    assert report.passed, report.summary()
    for b in (1, 8, 64, 100):  # the saved program keeps its dynamic batch (100: sliced by MAX_BATCH)
        assert backend.features(np.resize(x, (b,) + x.shape[1:])).shape == (b, tiny.manifest.feature_size)
    assert np.isfinite(backend.features(x)).all()


def test_auto_measures_tensorrt_on_this_device(tiny, tmp_path):
    built = compile_model(tiny, cache_dir=tmp_path, progress=False)
    backend, reason = load_backbone(tiny, cache_dir=tmp_path)

    trials = {t.candidate.label: t for t in built.decision.trials}
    assert trials["tensorrt fp16"].ok, trials["tensorrt fp16"].why
    assert (backend.key, backend.precision) == (built.decision.chosen.backend, built.decision.chosen.precision)
    assert reason.startswith("auto on ") and "recorded choice" in reason
