"""The TensorRT backend's logic that runs without a GPU: probes, fallback reasons, the
save call per torch-tensorrt release, the engine-cache fingerprint. Nothing here claims
the GPU path works; ``test_serve_tensorrt.py`` runs it where CUDA and torch-tensorrt exist."""
from __future__ import annotations

import sys
import types

import pytest

import edge.serve.backends.trt as trt
from edge.serve.backends import availability


def test_without_torch_tensorrt_or_a_gpu_the_reason_is_clear_and_torch_is_not_needed():
    ok, why = availability()["tensorrt"]

    if not ok:
        assert why in ("torch-tensorrt is not installed",) or why.startswith(("no CUDA device", "torch-tensorrt is not importable"))


def test_no_gpu_device_node_is_reported_before_importing_anything(monkeypatch):
    monkeypatch.setattr(trt.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(trt, "GPU_NODES", ("/nonexistent/nvidia0",))
    monkeypatch.setattr(trt, "_TRT", None)

    ok, why = trt.TensorRTBackend.availability()

    assert not ok and why == "no CUDA device (none of /nonexistent/nvidia0 exists)"


def test_int8_without_modelopt_names_the_package(monkeypatch):
    monkeypatch.setattr(trt.importlib.util, "find_spec", lambda name: None)

    ok, why = trt.TensorRTBackend.int8_available()

    assert not ok and "pip install nvidia-modelopt" in why


class _FakeTRT(types.SimpleNamespace):
    pass


def test_save_keeps_the_batch_dynamic_on_releases_that_take_dynamic_shapes(monkeypatch):
    calls = {}

    def save(module, path, *, output_format="exported_program", arg_inputs=None, dynamic_shapes=None, retrace=False):
        calls.update(arg_inputs=arg_inputs, dynamic_shapes=dynamic_shapes, retrace=retrace)

    monkeypatch.setattr(trt, "_TRT", _FakeTRT(save=save))
    trt.TensorRTBackend._save("gm", "p.ep", "x", ({0: "batch"},))

    assert calls == {"arg_inputs": ["x"], "dynamic_shapes": ({0: "batch"},), "retrace": True}


def test_save_does_not_retrace_at_the_example_batch_on_jetpack_releases(monkeypatch):
    calls = {}

    def save(module, path, *, output_format="exported_program", inputs=None, retrace=False):
        calls.update(inputs=inputs, retrace=retrace)

    monkeypatch.setattr(trt, "_TRT", _FakeTRT(save=save))
    trt.TensorRTBackend._save("gm", "p.ep", "x", ({0: "batch"},))

    assert calls == {"inputs": ["x"], "retrace": False}


def test_the_engine_fingerprint_includes_gpu_tensorrt_and_jetpack(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Orin (nvgpu)")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (8, 7))
    monkeypatch.setattr(trt, "_TRT", _FakeTRT(__version__="2.5.0"))
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setattr(trt, "jetpack_release", lambda: {"l4t": "R36.4.0", "jetpack": "6.1+b123"})

    p = trt.TensorRTBackend.platform()

    assert (p["gpu"], p["tensorrt"], p["torch_tensorrt"], p["l4t"], p["jetpack"]) == (
        "Orin (nvgpu)", "10.3.0", "2.5.0", "R36.4.0", "6.1+b123")
