"""The device's release gate holds a bundle to the device's own parity tolerances as a floor,
and a halt that comes while a bundle compiles is acted on before the candidate shadows.

Real mosquitto, the test-side release publisher (tests/release_helpers.py), the deploy
part as the daemon wires it (tests/test_deploy_device.Device), real ONNX Runtime int8 builds.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.deploy.gate import floor_tolerances
from edge.fleet.keys import create_key, export_public, load_private, load_public
from edge.serve.cache import ArtifactCache
from edge.serve.compile import obtain
from edge.serve.testing import make_tiny_model
from edge.zoo import ModelFolder
from tests.helpers import poll
from tests.release_helpers import ReleasePublisher
from tests.test_deploy_device import NODE, Device, _set_version, _steps

pytestmark = pytest.mark.timeout(300)

# ---- the floor, pure ---------------------------------------------------------------------------

BOUNDS = ["int8_min_cosine", "int8_worst_cosine", "int8_min_agreement", "int8_max_abs", "fp32_max_abs",
          "fp16_min_cosine"]
tables = st.dictionaries(st.sampled_from(BOUNDS), st.floats(0.0, 2.0, allow_nan=False), max_size=len(BOUNDS))


@settings(max_examples=200, deadline=None)
@given(device=tables, bundle=tables)
def test_the_floor_is_at_least_as_strict_as_the_device_and_the_bundle(device, bundle):
    out = floor_tolerances(device, bundle)
    assert set(out) == set(device) | set(bundle)
    for k, v in out.items():
        for side in (device, bundle):
            if k in side:
                assert v <= side[k] if "_max_" in k else v >= side[k], (k, side[k], v)
        assert v in (device.get(k), bundle.get(k))


def test_a_bound_of_no_known_direction_keeps_the_devices_value():
    assert floor_tolerances({"int8_fancy": 0.5}, {"int8_fancy": 9.0, "int8_other": 1.0}) == {
        "int8_fancy": 0.5, "int8_other": 1.0}


# ---- on the device -------------------------------------------------------------------------------

def _features_times_ten(folder) -> None:
    """The same classifier with its features scaled by 10 (the head divided by 10): the same
    predictions, but ten times the int8 artifact's absolute feature error."""
    from safetensors.numpy import load, save

    p = folder / "weights.safetensors"
    t = dict(load(p.read_bytes()))
    for k in ("backbone.net.13.weight", "backbone.net.13.bias"):
        t[k] = (t[k] * 10).astype(np.float32)
    t["head.weight"] = (t["head.weight"] / 10).astype(np.float32)
    p.write_bytes(save(t))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """current: the tiny model, its int8 max abs feature error held to 0.15 (it has about 0.04);
    loose: 10x features (about 0.4) whose own [parity] allows 10; good: the tiny model, 0.0.2."""
    root = tmp_path_factory.mktemp("gate")
    make_tiny_model(root / "current", name="tiny", parity={"int8_max_abs": 0.15})
    make_tiny_model(root / "loose", name="tiny", parity={"int8_max_abs": 10.0})
    _set_version(root / "loose", "0.0.2")
    _features_times_ten(root / "loose")
    make_tiny_model(root / "good", name="tiny", parity={"int8_max_abs": 0.15})
    _set_version(root / "good", "0.0.3")
    cache = root / "cache"
    model = ModelFolder(root / "current")
    backend, _ = obtain(model, "onnxruntime", "int8", cache=ArtifactCache(cache))
    dev = create_key(root / "keys", NODE, role="device")
    rel = create_key(root / "keys", "rel", role="release")
    export_public(root / "keys", "rel", role="release", to=root / "keys" / "releases")
    keys = {"device": dev, "release": load_private(rel.private_path), "device_pub": load_public(dev.public_path)}
    return {"root": root, "served": (model, backend, cache), "keys": keys}


@pytest.fixture
def publisher(broker, setup):
    k = setup["keys"]
    p = ReleasePublisher(broker, key=k["release"], device_keys=[k["device_pub"]], fleet="test", model="tiny")
    yield p
    p.close()


def test_a_bundle_with_loosened_tolerances_is_held_to_the_devices(broker, setup, publisher, tmp_path):
    loose = setup["root"] / "loose"
    # without the floor it would pass: its own tolerances admit its int8 artifact
    _, own = obtain(ModelFolder(loose), "onnxruntime", "int8", cache=ArtifactCache(tmp_path / "own-cache"))
    assert own.parity.passed and own.parity.max_abs_err > 0.15
    dev = Device(broker, setup["keys"], setup["served"], tmp_path / "state")
    try:
        m = publisher.release(loose, release="00000000000009a1")
        poll(lambda: publisher.refusal(m.release), 120, what="the refusal")
        assert publisher.refusal(m.release) == "parity_failed"
        assert _steps(publisher.states(m.release)) == ["downloading", "verified", "refused"]
        assert not dev.restarts and dev.part.metrics()["deploy_refused"] == {"parity_failed": 1}
    finally:
        dev.stop()


def test_a_halt_during_the_compile_is_acted_on_before_any_shadow_window(broker, setup, publisher, tmp_path,
                                                                       monkeypatch):
    import edge.deploy.gate as gate_mod

    real_gate, entered, go = gate_mod.gate, threading.Event(), threading.Event()

    def slow_gate(*a, **kw):  # the compile, held until the halt has reached the device
        entered.set()
        assert go.wait(60), "the test never let the compile go on"
        return real_gate(*a, **kw)

    monkeypatch.setattr(gate_mod, "gate", slow_gate)
    dev = Device(broker, setup["keys"], setup["served"], tmp_path / "state")
    try:
        m = publisher.release(setup["root"] / "good", release="00000000000009b2")
        poll(entered.is_set, 120, what="the compile started")
        halted = publisher.set_state("halted")
        agent = dev.part.agent
        poll(lambda: agent._newest_manifest is not None and agent._newest_manifest != agent._handled_manifest,
             30, what="the halted manifest at the device, behind the compile")
        assert halted.seq > m.seq
        go.set()
        poll(lambda: "rolled_back" in publisher.states(m.release), 60, what="the stop after the compile")
        dev.feed(32)  # live windows after the stop: none may reach a candidate
        assert _steps(publisher.states(m.release)) == ["downloading", "verified", "rolled_back"]
        assert dev.status()["phase"] == "stopped" and not dev.restarts
        assert dev.part.metrics()["deploy_shadow_windows_taken"] == 0
    finally:
        go.set()
        dev.stop()
