"""The shipped models: load through the zoo, build, shapes, hashing, weights, stated accuracy."""
from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
import torch

from edge import sim
from edge.zoo import ModelFolder, resolve_model

SHIPPED = ("vibration", "forecast")


@pytest.fixture(scope="module", params=SHIPPED)
def folder(request) -> ModelFolder:
    return resolve_model(request.param)


def _generator(spec: str):
    mod, fn = spec.split(":")
    return getattr(importlib.import_module(mod), fn)


def test_model_builds_and_maps_windows_to_features_and_outputs(folder):
    m = folder.manifest
    backbone, head = folder.build()
    x = torch.from_numpy(_generator(m.calibration["generator"])(4, 0))
    assert tuple(x.shape) == (4, m.channels, m.window) and x.dtype == torch.float32
    with torch.no_grad():
        z = backbone(x)
        out = head(z)
    assert tuple(z.shape) == (4, m.feature_size) and tuple(out.shape) == (4, m.outputs)
    assert not backbone.training and not head.training


def test_head_state_dict_is_exactly_weight_and_bias(folder):
    _, head = folder.build()
    sd = head.state_dict()
    m = folder.manifest
    assert set(sd) == {"weight", "bias"}
    assert tuple(sd["weight"].shape) == (m.outputs, m.feature_size) and tuple(sd["bias"].shape) == (m.outputs,)


def test_content_hash_is_stable(folder):
    again = ModelFolder(folder.path)
    assert again.content_hash == folder.content_hash and len(folder.content_hash) == 64


def test_weights_are_finite_and_small(folder):
    bb, hd = folder.state_dicts()
    assert all(torch.isfinite(t).all() for t in [*bb.values(), *hd.values()])
    assert (folder.path / "weights.safetensors").stat().st_size < 1_000_000


def test_vibration_manifest_matches_the_simulator():
    m = resolve_model("vibration").manifest
    assert m.classes == sim.FAULTS and (m.channels, m.window, m.sample_rate, m.feature_size) == (3, 256, 1000.0, 64)
    assert set(f"fp32_accuracy_{k}" for k in sim.SHIFTS) <= set(m.metrics)


def test_vibration_every_shift_costs_a_clear_drop():
    acc = {k: v for k, v in resolve_model("vibration").manifest.metrics.items() if k.startswith("fp32_accuracy_")}
    nominal = acc.pop("fp32_accuracy_nominal")
    assert 0.9 < nominal < 0.995  # high, not perfect
    assert all(v < nominal - 0.05 for v in acc.values()), acc


def test_vibration_nominal_accuracy_on_a_fresh_seed_matches_the_card():
    folder = resolve_model("vibration")
    backbone, head = folder.build()
    X, y = sim.make_dataset(600, seed=4242)
    with torch.no_grad():
        acc = float((head(backbone(torch.from_numpy(X))).argmax(1).numpy() == y).mean())
    stated = folder.manifest.metrics["fp32_accuracy_nominal"]
    assert stated - 0.04 <= acc <= min(stated + 0.04, 0.999)


def test_forecast_beats_persistence_on_a_fresh_seed_as_the_card_says():
    folder = resolve_model("forecast")
    m = folder.manifest
    backbone, head = folder.build()
    X, Y = sim.make_forecast_dataset(1000, seed=4242, window=m.window, horizon=m.outputs)
    with torch.no_grad():
        mae = float(np.abs(head(backbone(torch.from_numpy(X))).numpy() - Y).mean())
    persistence = float(np.abs(X[:, 0, -1:] - Y).mean())
    assert mae < persistence
    assert abs(mae - m.metrics["fp32_model_mae_nominal"]) < 0.15 * m.metrics["fp32_model_mae_nominal"]


def test_vibration_backbone_exports_to_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    backbone, _ = resolve_model("vibration").build()
    x = torch.from_numpy(sim.calibration_windows(8, seed=1))
    path = tmp_path / "bb.onnx"
    torch.onnx.export(backbone, (x,), str(path), opset_version=17, input_names=["x"], output_names=["z"],
                      dynamic_axes={"x": {0: "b"}, "z": {0: "b"}}, dynamo=False)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        assert np.allclose(got, backbone(x).numpy(), atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_training_recipe_is_deterministic(name, monkeypatch):
    folder = resolve_model(name)
    monkeypatch.syspath_prepend(str(folder.path))
    sys.modules.pop("train", None)
    train = importlib.import_module("train")
    a = train.train(n_train=1024, epochs=1)
    b = train.train(n_train=1024, epochs=1)
    for ma, mb in zip(a, b):
        for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values()):
            assert torch.equal(va, vb), k
    sys.modules.pop("train", None)


@pytest.mark.parametrize("name", SHIPPED)
def test_model_folder_writers_reproduce_the_shipped_files(name, tmp_path):
    import shutil

    from edge.zoo import ModelFolder, save_weights, write_metrics

    src = resolve_model(name).path
    dst = tmp_path / name
    shutil.copytree(src, dst)
    folder = ModelFolder(dst)
    n_params, size = save_weights(dst, *folder.build())
    assert (dst / "weights.safetensors").read_bytes() == (src / "weights.safetensors").read_bytes()
    assert size == folder.manifest.metrics["weights_bytes"] and n_params == folder.manifest.metrics["params"]
    card = (src / "CARD.md").read_text()
    block = card.split("<!-- metrics:start (written by train.py) -->\n")[1].split("\n<!-- metrics:end -->")[0]
    write_metrics(dst, dict(folder.manifest.metrics), block)
    assert (dst / "manifest.toml").read_text() == (src / "manifest.toml").read_text()
    assert (dst / "CARD.md").read_text() == card
