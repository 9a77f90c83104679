"""``auto`` selection, precision defaults and the fallback chain (pure), and the CPU default."""
from __future__ import annotations

import pytest

from edge.errors import ConfigError
from edge.serve import load_backbone, serve_status
from edge.serve.choice import choose_auto, fallback_chain, resolve_precision
from edge.serve.testing import make_tiny_model

ALL = {"tensorrt": (True, "torch-tensorrt 2.5 on Orin"), "onnxruntime": (True, "onnxruntime 1.20"),
       "torch": (True, "core")}


def test_auto_picks_tensorrt_fp16_on_a_cuda_device_with_torch_tensorrt():
    key, precision, reason = choose_auto(ALL)

    assert (key, precision) == ("tensorrt", "fp16") and "Orin" in reason


def test_auto_picks_onnxruntime_int8_without_tensorrt_and_says_why():
    avail = {**ALL, "tensorrt": (False, "no CUDA device")}

    key, precision, reason = choose_auto(avail)

    assert (key, precision) == ("onnxruntime", "int8")
    assert "tensorrt unavailable (no CUDA device)" in reason and reason.endswith("onnxruntime int8")


def test_auto_falls_to_torch_when_nothing_compiled_is_available():
    avail = {**ALL, "tensorrt": (False, "no CUDA"), "onnxruntime": (False, "not importable")}

    assert choose_auto(avail)[:2] == ("torch", "fp32")


def test_auto_with_nothing_available_is_a_config_error():
    with pytest.raises(ConfigError, match="no serving backend"):
        choose_auto({k: (False, "x") for k in ALL})


@pytest.mark.parametrize("backend, given, expected", [
    ("onnxruntime", None, "int8"), ("tensorrt", None, "fp16"), ("torch", None, "fp32"),
    ("onnxruntime", "auto", "int8"), ("onnxruntime", "fp32", "fp32"),
])
def test_precision_defaults_per_backend(backend, given, expected):
    assert resolve_precision(backend, given) == expected


def test_an_unknown_precision_is_a_config_error():
    with pytest.raises(ConfigError, match="'int4' is not one of"):
        resolve_precision("onnxruntime", "int4")


def test_fallback_chain_walks_down_from_the_request():
    assert fallback_chain("tensorrt", "fp16") == [("tensorrt", "fp16"), ("onnxruntime", "int8"),
                                                  ("onnxruntime", "fp32"), ("torch", "fp32")]
    assert fallback_chain("onnxruntime", "fp32") == [("onnxruntime", "fp32"), ("torch", "fp32")]
    assert fallback_chain("torch", "fp32") == [("torch", "fp32")]


def test_auto_on_the_cpu_serves_the_measured_choice_and_says_why(tmp_path, monkeypatch):
    import edge.serve.select as select

    monkeypatch.setattr(select, "availability", lambda: {**ALL, "tensorrt": (False, "no CUDA device")})
    model = make_tiny_model(tmp_path / "m")

    backend, reason = load_backbone(model, cache_dir=tmp_path / "cache")

    assert backend.key == "onnxruntime" and backend.precision in ("int8", "fp32")
    assert reason.startswith("auto on ") and "tensorrt: no CUDA device" in reason and "parity ok" in reason
    assert "measured batch-1 p50: " in reason and "measured now" in reason


def test_an_unavailable_configured_backend_falls_back_with_the_install_hint(tmp_path):
    model = make_tiny_model(tmp_path / "m")

    backend, reason = load_backbone(model, backend="tensorrt", cache_dir=tmp_path / "cache")

    if backend.key != "tensorrt":
        assert "tensorrt fp16 refused" in reason and "edge-runtime[tensorrt]" in reason
        assert (backend.key, backend.precision) == ("onnxruntime", "int8")


def test_serve_status_lists_backends_auto_choice_and_artifacts(tmp_path):
    model = make_tiny_model(tmp_path / "m")
    load_backbone(model, backend="onnxruntime", cache_dir=tmp_path / "cache")

    s = serve_status(tmp_path / "cache")

    assert set(s["backends"]) >= {"torch", "onnxruntime", "tensorrt"}
    assert s["auto"]["backend"] in ("tensorrt", "onnxruntime")
    assert [(a["backend"], a["precision"], a["parity"]) for a in s["artifacts"]] == [
        ("onnxruntime", "int8", "within tolerance")]
