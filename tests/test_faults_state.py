"""Fault suite, part 6: learner state bound to its model, across a real daemon restart
(finding 6 of issue 8).

A daemon learns from labels over MQTT and checkpoints at stop. The model folder is then
changed the way an operator would: retrained (same shapes, other weights, so another
content hash) or given another class list (same count). The restarted daemon must not
apply the old checkpoint: it serves the shipped head, starts the learner fresh, and says
why in an event on ``edge/<node>/events``. Unchanged, the same restart restores it.
(The tight-disk and kill -9 cases are tests/test_state_disk.py's.)
"""
from __future__ import annotations

import shutil
import time

import pytest

from tests.faultkit import ROOT, WINDOW, Probe, poll, start_daemon
from tests.helpers import Client, batch

pytestmark = pytest.mark.timeout(240)


def _retrain(model) -> None:
    """Other weights of the same shapes: what a retrain gives."""
    from safetensors.torch import load_file, save_file

    sd = load_file(model / "weights.safetensors")
    name = sorted(sd)[0]
    sd[name] = sd[name] * 1.01 + 1e-3
    save_file(sd, model / "weights.safetensors")


def _other_classes(model) -> None:
    p = model / "manifest.toml"
    p.write_text(p.read_text().replace('"bearing_wear"', '"cavitation"'))


def _learn(broker, d, node: str, n: int = 12) -> int:
    c = Client(broker)
    t0 = time.time()
    for k in range(n):  # consecutive windows of one stream, each with a label inside it
        c.publish("sensors/ck/accel", batch(t0 + k * WINDOW * 0.001, WINDOW))
        c.publish(f"edge/{node}/labels", {"t": t0 + (k + 0.5) * WINDOW * 0.001, "label": "imbalance",
                                          "device": "ck", "stream": "accel"})
    c.close()

    def learned():
        n_learned = d.adapt.metrics()["learner_labels_total"]
        return n_learned >= n // 2 and n_learned
    return poll(learned, 90, what="labels learned")


@pytest.mark.parametrize("change", ["none", "retrained", "classes"])
def test_a_checkpoint_of_another_model_is_not_applied_after_a_restart(broker, tmp_path, change):
    started = time.time()
    node = f"ck-{change}"
    model = tmp_path / "model"
    shutil.copytree(ROOT / "models" / "vibration", model)
    kw = dict(node=node, adapt=True, model={"path": str(model), "backend": "torch"})  # torch: no compile per hash
    d1 = start_daemon(broker, tmp_path, **kw)
    try:
        assert _learn(broker, d1, node) > 0
    finally:
        d1.stop()
    learned = d1.adapt.metrics()["learner_labels_total"]  # what the checkpoint at stop holds
    assert list((tmp_path / "state" / node / "adapt").glob("ckpt-*")), "no checkpoint at stop"
    if change == "retrained":
        _retrain(model)
    elif change == "classes":
        _other_classes(model)
    events = Client(broker, f"edge/{node}/events")  # returns once subscribed: events are not retained
    d2 = start_daemon(broker, tmp_path, **kw)
    probe = Probe(broker, node)
    try:
        m = d2.adapt.metrics()
        pred = probe.check()
        if change == "none":
            assert m["learner_labels_total"] == learned and d2.adapt.counters["checkpoint_mismatches"] == 0, m
            return
        assert m["learner_labels_total"] == 0, m
        assert d2.adapt.counters["checkpoint_mismatches"] == 1
        assert pred["head"] == d2.global_head.version and pred["head"].endswith("+shipped"), pred
        ev = events.wait_for(lambda _: [e for e in events.json_on(f"edge/{node}/events")
                                        if e.get("type") == "checkpoint_mismatch"], timeout=30)[0]
        assert ("content_hash" if change == "retrained" else "classes") in ev["why"], ev
        assert started <= ev["t"] <= time.time(), ev  # Unix time (finding 9), not a monotonic clock
        assert ev["moved_to"] and list((tmp_path / "state" / node / "adapt").glob("stale-*")), ev
    finally:
        probe.close()
        events.close()
        d2.stop()
