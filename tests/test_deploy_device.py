"""The device side of model releases (edge/deploy/) against a real mosquitto and a test-side
release publisher built from ``edge.fleet.release_codec`` (tests/release_helpers.py).

The device part runs as the daemon builds it (``DeployPart``: its own MqttLink, the
deploy thread, the shadow thread), serving the current model's int8 ONNX Runtime
artifact; live windows and labels go through its ``ShadowTap`` exactly as the pipeline
calls it (``features`` for a batch, then ``on_window`` per window). The restart that
serves a switch is handed in (recorded here); tests/test_release_e2e.py runs it for real.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.config import parse_config
from edge.deploy.part import DeployPart
from edge.fleet.keys import create_key, export_public, load_private, load_public
from edge.serve.cache import ArtifactCache
from edge.serve.compile import obtain
from edge.serve.testing import make_tiny_model, synthetic_dataset
from tests.helpers import poll
from tests.release_helpers import ReleasePublisher

pytestmark = pytest.mark.timeout(300)
NODE = "dev-1"


def _set_version(folder, version: str) -> None:
    p = folder / "manifest.toml"
    p.write_text(p.read_text().replace('version = "0.0.1"', f'version = "{version}"'))


def _scale_head(folder, factor: float) -> None:
    """Weaken (or flip, with a negative factor) the head: same backbone, other head."""
    from safetensors.numpy import load, save

    p = folder / "weights.safetensors"
    t = dict(load(p.read_bytes()))
    t["head.weight"] = (t["head.weight"] * factor).astype(np.float32)
    t["head.bias"] = (t["head.bias"] * factor).astype(np.float32)
    p.write_bytes(save(t))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """current: the tiny model with a head scaled down (unsure: high loss); good: the real head;
    worse: the head flipped; parity: a folder whose int8 build cannot meet its gate; same: the
    current model re-versioned (its backbone and shipped head)."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, version, factor, parity in [("current", "0.0.1", 0.1, None), ("good", "0.0.2", 1.0, None),
                                          ("worse", "0.0.3", -1.0, None),
                                          ("parity", "0.0.4", 1.0, {"int8_min_cosine": 1.5}),
                                          ("same", "0.0.5", 0.1, None)]:
        folder = root / name
        make_tiny_model(folder, name="tiny", parity=parity)
        _set_version(folder, version)
        if factor != 1.0:
            _scale_head(folder, factor)
        out[name] = folder
    return out


@pytest.fixture(scope="module")
def served(models, tmp_path_factory):
    """The current model as the device serves it: ONNX Runtime int8, gated, from a cache."""
    from edge.zoo import ModelFolder

    cache = tmp_path_factory.mktemp("cache")
    model = ModelFolder(models["current"])
    backend, _ = obtain(model, "onnxruntime", "int8", cache=ArtifactCache(cache))
    return model, backend, cache


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    dev = create_key(root / "keys", NODE, role="device")
    rel = create_key(root / "keys", "rel", role="release")
    other = create_key(root / "other", "rogue", role="release")
    export_public(root / "keys", "rel", role="release", to=root / "keys" / "releases")
    return {"device": dev, "release": load_private(rel.private_path), "rogue": load_private(other.private_path),
            "device_pub": load_public(dev.public_path)}


@pytest.fixture
def publisher(broker, keys):
    p = ReleasePublisher(broker, key=keys["release"], device_keys=[keys["device_pub"]], fleet="test", model="tiny")
    yield p
    p.close()


class Device:
    """A ``DeployPart`` as the daemon wires it, fed live windows through its tap; the scores it
    publishes come from the model's shipped head, or from ``served_head`` (an adapted head)."""

    def __init__(self, broker, keys, served, state_dir, served_head=None, **deploy):
        model, backend, cache = served
        self.model, self.backend = model, backend
        dep = {"enabled": True, "shadow_share": 1.0, "request_timeout_s": 2.0, **deploy}
        self.cfg = parse_config({
            "node": {"name": NODE, "state_dir": str(state_dir)},
            "mqtt": {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5},
            "model": {"path": str(model.path), "cache_dir": str(cache)},
            "fleet": {"fleet": "test", "key_file": str(keys["device"].private_path)},
            "deploy": dep})
        self.restarts: list[str] = []
        self.part = DeployPart(cfg=self.cfg, model=model, features=self._features, on_window=None, on_label=None,
                               request_restart=self.restarts.append)
        self.part.attach(backend)
        self.part.start()
        _, head = model.arrays() if served_head is None else (None, served_head)
        self.head_w, self.head_b = head["weight"], head["bias"]
        self.t = 0.0

    def _features(self, x):
        return self.backend.features(x)

    def feed(self, n: int, *, labels: bool = True, seed: int = 0) -> None:
        """``n`` windows through the tap (as the pipeline serves them), each labelled after."""
        tap = self.part.tap
        x, y = synthetic_dataset(n, seed=seed)
        for i in range(0, n, 8):
            xb = x[i:i + 8]
            z = tap.features(xb)
            logits = z @ self.head_w.T + self.head_b
            scores = np.exp(logits - logits.max(1, keepdims=True))
            scores /= scores.sum(1, keepdims=True)
            for j in range(len(xb)):
                t0 = self.t
                self.t += 1.0
                tap.on_window(("d", "s"), t0, t0 + 0.5, z[j], scores[j])
                if labels:
                    tap.on_label(("d", "s"), t0 + 0.25, int(y[i + j]))

    def status(self) -> dict:
        return self.part.status()["deploy"]

    def stop(self) -> None:
        self.part.stop()


def _active(state_dir) -> dict | None:
    p = state_dir / NODE / "deploy" / "active.json"
    return json.loads(p.read_text()) if p.exists() else None


def _steps(states: list[str]) -> list[str]:
    """Reported states with repeats folded (``downloading`` comes at the start and every 25%)."""
    return [s for i, s in enumerate(states) if i == 0 or states[i - 1] != s]


def _shadow_until(dev, pred, what, rounds: int = 60):
    for r in range(rounds):
        if pred():
            return
        dev.feed(16, seed=r)
        try:
            poll(pred, 1.0, what=what)
            return
        except AssertionError:
            pass
    raise AssertionError(f"timed out waiting for {what}")


def test_good_release_is_verified_gated_shadowed_and_switched(broker, keys, served, models, publisher, tmp_path):
    dev = Device(broker, keys, served, tmp_path)
    try:
        m = publisher.release(models["good"], release="00000000000000a1")
        poll(lambda: dev.status().get("phase") == "shadowing", 120, what="the gate passed and the shadow test runs")
        poll(lambda: "shadowing" in publisher.states(m.release), 10, what="the shadowing report")
        assert _steps(publisher.states(m.release)) == ["downloading", "verified", "shadowing"]
        assert _active(tmp_path) is None and not dev.restarts  # nothing switched before the evidence
        _shadow_until(dev, lambda: dev.restarts, "the switch")
        a = _active(tmp_path)
        assert a["release"] == m.release and a["digest"] == m.digest and a["previous"]["version"] == "0.0.1"
        assert (tmp_path / NODE / "deploy" / m.release / "model" / "manifest.toml").is_file()
        ev = [r.evidence for r in publisher.reports if r.state == "shadowing"][-1]
        assert "e_switch" in ev and "labels" in ev
        mets = dev.part.metrics()
        assert mets["deploy_shadow_windows_taken"] > 0 and mets["deploy_shadow_labels_matched"] >= m.min_labels
    finally:
        dev.stop()


def test_worse_release_is_refused_on_live_labels(broker, keys, served, models, publisher, tmp_path):
    dev = Device(broker, keys, served, tmp_path)
    try:
        m = publisher.release(models["worse"], release="00000000000000b2")
        poll(lambda: dev.status().get("phase") == "shadowing", 120, what="the shadow test")
        _shadow_until(dev, lambda: publisher.refusal(m.release), "the refusal")
        assert publisher.refusal(m.release) == "worse"
        assert _active(tmp_path) is None and not dev.restarts
        assert not (tmp_path / NODE / "deploy" / m.release).exists()
    finally:
        dev.stop()


def test_shadow_reference_is_the_shipped_head_not_the_adapted_one(broker, keys, served, models, publisher, tmp_path):
    """A learning device serves a head adapted on its labels (here the real head, far better than
    the current model's weak shipped one). A release of the current backbone with its shipped
    head is no worse than what a fresh device would serve, so it switches, although the adapted
    head beats it on the same labels (the evidence says by how much: it does not decide)."""
    from edge.zoo import ModelFolder

    _, adapted = ModelFolder(models["good"]).arrays()
    dev = Device(broker, keys, served, tmp_path, served_head=dict(adapted))
    try:
        m = publisher.release(models["same"], release="00000000000000c3", min_labels=20, margin=0.2)
        poll(lambda: dev.status().get("phase") == "shadowing", 120, what="the shadow test")
        _shadow_until(dev, lambda: dev.restarts or publisher.refusal(m.release), "a decision")
        assert publisher.refusal(m.release) is None and dev.restarts
        assert _active(tmp_path)["release"] == m.release
        poll(lambda: dev.status().get("phase") == "switching", 10, what="the switch in the status")
        ev = dev.status()["evidence"]
        assert ev["reference"] == "shipped" and ev["labels"] >= 20
        assert abs(ev["mean_diff"]) < 0.05  # the same backbone and head as the reference
        assert ev["mean_diff_served"] > 0.2  # the adapted head is better on these labels: not the reference
    finally:
        dev.stop()


def test_release_failing_parity_is_refused(broker, keys, served, models, publisher, tmp_path):
    dev = Device(broker, keys, served, tmp_path)
    try:
        m = publisher.release(models["parity"], release="00000000000000c3")
        poll(lambda: publisher.refusal(m.release), 120, what="the refusal")
        assert publisher.refusal(m.release) == "parity_failed"
        assert _steps(publisher.states(m.release)) == ["downloading", "verified", "refused"]
        assert _active(tmp_path) is None and not dev.restarts
    finally:
        dev.stop()


@pytest.mark.parametrize("how, reason", [("rogue_key", "bad_signature"), ("tampered", "chunk_mismatch"),
                                         ("truncated", "chunk_mismatch"), ("oversized", "too_large"),
                                         ("quota", "disk_full")])
def test_bad_release_is_refused_before_anything_is_unpacked(broker, keys, served, models, publisher, tmp_path,
                                                           how, reason):
    # the tiny model's bundle is about 25 kB in 7 chunks of 4 KiB
    deploy = {"max_bundle_bytes": 10_000} if how == "oversized" else {"max_disk_bytes": 40_000} if how == "quota" else {}
    dev = Device(broker, keys, served, tmp_path, **deploy)
    try:
        if how == "tampered":
            publisher.tamper = {3}
        if how == "truncated":
            publisher.truncate = {2}
        release = {"rogue_key": "00000000000000f1", "tampered": "00000000000000f2", "truncated": "00000000000000f3",
                   "oversized": "00000000000000f4", "quota": "00000000000000f5"}[how]
        m = publisher.release(models["good"], release=release, key=keys["rogue"] if how == "rogue_key" else None)
        poll(lambda: publisher.refusal(m.release), 60, what=f"the refusal of a {how} release")
        assert publisher.refusal(m.release) == reason
        assert "verified" not in publisher.states(m.release)
        assert not (tmp_path / NODE / "deploy" / m.release / "model").exists()
        assert _active(tmp_path) is None and not dev.restarts
        assert dev.part.metrics()["deploy_refused"] == {reason: 1}
    finally:
        dev.stop()


def test_download_resumes_after_a_stop_without_asking_again(broker, keys, served, models, publisher, tmp_path):
    publisher.answer_limit = 3  # the server answers three chunks, then goes quiet
    dev = Device(broker, keys, served, tmp_path)
    m = publisher.release(models["good"], release="00000000000000d4")
    poll(lambda: (dev.status().get("progress") or [0])[0] >= 3, 60, what="three chunks held")
    dev.stop()
    held = set(json.loads((tmp_path / NODE / "deploy" / m.release / "held.json").read_text())["held"])
    assert len(held) == 3
    first = dict(publisher.asked)
    publisher.answer_limit = None
    dev2 = Device(broker, keys, served, tmp_path)
    try:
        poll(lambda: dev2.status().get("phase") == "shadowing", 120, what="the resumed download verified and gated")
        again = {i for (r, i), n in publisher.asked.items() if r == m.release and n > first.get((r, i), 0)}
        assert not again & held, f"chunks held before the stop were asked for again: {sorted(again & held)}"
        assert again == set(range(m.n_chunks)) - held
    finally:
        dev2.stop()


def test_abort_returns_a_switched_device_to_the_previous_model(broker, keys, served, models, publisher, tmp_path):
    dev = Device(broker, keys, served, tmp_path)
    try:
        m = publisher.release(models["good"], release="00000000000000e5")
        poll(lambda: dev.status().get("phase") == "shadowing", 120, what="the shadow test")
        _shadow_until(dev, lambda: dev.restarts, "the switch")
    finally:
        dev.stop()
    assert _active(tmp_path)["release"] == m.release
    dev2 = Device(broker, keys, served, tmp_path)  # the start after the switch (the model it serves aside)
    try:
        poll(lambda: "switched" in publisher.states(m.release), 30, what="the switched report after the restart")
        publisher.set_state("aborted")
        poll(lambda: dev2.restarts, 30, what="the rollback")
        assert _active(tmp_path) is None  # the configured model serves again
    finally:
        dev2.stop()
    dev3 = Device(broker, keys, served, tmp_path)
    try:
        poll(lambda: "rolled_back" in publisher.states(m.release), 30, what="the rolled_back report")
        assert not dev3.restarts  # the retained aborted manifest does not loop
    finally:
        dev3.stop()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 8), st.floats(0, 8), st.floats(0, 8)), min_size=1, max_size=120))
def test_the_served_heads_loss_is_evidence_and_never_decides(pairs):
    """Whatever the served (adapted) head scores, the decision rests on reference vs candidate alone."""
    from edge.deploy.shadow import ShadowTest

    with_served, without = (ShadowTest(min_labels=10, margin=0.2, alpha=0.05) for _ in range(2))
    for ref, cand, served in pairs:
        with_served.add_pair(current_loss=ref, candidate_loss=cand, served_loss=served)
        without.add_pair(current_loss=ref, candidate_loss=cand)
        assert with_served.decision() == without.decision()
    ev = with_served.evidence()
    assert ev["reference"] == "shipped" and ev["mean_diff"] == without.evidence()["mean_diff"]
    assert ev["mean_diff_served"] == round(sum(c - s for _, c, s in pairs) / len(pairs), 5)
