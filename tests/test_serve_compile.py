"""``compile_model`` (what ``edge compile`` runs): calibration sources, progress, summary."""
from __future__ import annotations

import io

import numpy as np
import pytest

from edge.errors import ModelError
from edge.serve import compile_model, load_backbone
from edge.serve.progress import Progress
from edge.serve.testing import make_tiny_model, synthetic_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_a_file_of_recorded_windows_calibrates_int8(tiny, tmp_path):
    x, _ = synthetic_dataset(300, seed=11)
    np.savez(tmp_path / "recorded.npz", X=x)

    r = compile_model(tiny, backend="onnxruntime", precision="int8", calibration=tmp_path / "recorded.npz",
                      cache_dir=tmp_path / "cache", progress=False)

    assert r.parity.passed and r.cache == "miss"
    assert r.parity.per_set["simulated"]["n"] == 96


def test_a_calibration_file_of_the_wrong_shape_says_what_the_model_needs(tiny, tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((10, 3, 64), np.float32))

    with pytest.raises(ModelError, match=r"shape \[10, 3, 64\], the model needs \[N, 3, 128\]"):
        compile_model(tiny, backend="onnxruntime", precision="int8", calibration=tmp_path / "bad.npy",
                      cache_dir=tmp_path / "cache", progress=False)


def test_without_calibration_data_int8_is_refused_and_fp32_served(tmp_path):
    model = make_tiny_model(tmp_path / "m", name="uncalibrated")
    manifest = model.path / "manifest.toml"
    manifest.write_text(manifest.read_text().replace('generator = "edge.serve.testing:calibration_windows"', ""))
    from edge.zoo import ModelFolder

    model = ModelFolder(model.path)

    with pytest.raises(ModelError, match="int8 needs calibration windows: pass --calibration FILE"):
        compile_model(model, backend="onnxruntime", precision="int8", cache_dir=tmp_path / "c", progress=False)
    backend, reason = load_backbone(model, backend="onnxruntime", cache_dir=tmp_path / "c")
    assert backend.precision == "fp32" and "int8 needs calibration windows" in reason


def test_long_steps_report_progress_and_the_result_summarises(tiny, tmp_path, monkeypatch):
    stream = io.StringIO()
    import edge.serve.compile as comp

    monkeypatch.setattr(comp, "Progress", lambda: Progress(stream))

    r = compile_model(tiny, backend="onnxruntime", precision="int8", cache_dir=tmp_path, progress=True)

    out = stream.getvalue()
    assert "export backbone to ONNX" in out and "calibrate and quantize int8" in out and "done in" in out
    assert r.summary().startswith(f"onnxruntime int8 ({r.variant}): cache miss; parity max_abs_err=")
    assert r.to_dict()["parity"]["passed"] is True
