"""The learner thread with the forecast model: a window's own future samples train the head."""
from __future__ import annotations

import time

import numpy as np

from edge.adapt.heads import HeadSnapshot
from edge.adapt.worker import AdaptWorker
from edge.config import parse_config
from edge.ingest.types import StreamKey
from edge.sim import ProcessSim
from edge.state import CheckpointStore, ModelIdentity
from edge.zoo import resolve_model


def test_forecast_windows_are_trained_on_their_own_future(tmp_path):
    model = resolve_model("forecast")
    m = model.manifest
    _, head_sd = model.state_dicts()
    ghead = HeadSnapshot.from_arrays({k: v.numpy() for k, v in head_sd.items()}, kind="linear", task=m.task, version="g")
    cfg = parse_config({"node": {"name": "fc", "state_dir": str(tmp_path)}})
    events = []
    store = CheckpointStore(tmp_path / "fc" / "adapt", identity=ModelIdentity.of(model, head=cfg.adapt.head))
    w = AdaptWorker(cfg=cfg, model=model, global_head=ghead, publish_event=lambda kind, **f: events.append(kind),
                    store=store)
    backbone, _ = model.build()
    key = StreamKey("pump", "load")
    t, v = ProcessSim(seed=4).read(64 + 60 * 10 + 10)
    w.start()
    try:
        import torch

        for k in range(60):  # a window every 10 samples, then the samples that follow it
            end = 64 + 10 * k
            with torch.no_grad():
                z = backbone(torch.from_numpy(v[end - 64:end].T[None].astype(np.float32))).numpy()[0]
            w.offer_window(key, float(t[end - 64]), float(t[end - 1]), z, ghead.predict(z[None])[0])
            w.offer_samples(key, t[end:end + 10].tolist(), v[end:end + 10].tolist())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and w.metrics()["worker_self_supervised"] < 60:
            time.sleep(0.02)
        met = w.metrics()
        assert met["worker_self_supervised"] == 60 and met["worker_learned"] == 60
        assert met["learner_labels_total"] == 60 and met["forecast_pending"] == 0
    finally:
        w.stop()
    assert list((tmp_path / "fc" / "adapt").glob("*")), "no checkpoint at stop"


# ---- lanes, supervision, shutdown (issue 8) ------------------------------------------------

import itertools  # noqa: E402

import pytest  # noqa: E402

from edge.supervise import Supervisor, wait_until  # noqa: E402

KEY = StreamKey("m1", "vib")


def _worker(tmp_path, *, supervisor=None, queues=None, clock=None, model=None, events=None):
    model = model or resolve_model("vibration")
    m = model.manifest
    _, head_sd = model.state_dicts()
    ghead = HeadSnapshot.from_arrays({k: v.numpy() for k, v in head_sd.items()}, kind="linear", task=m.task, version="g")
    cfg = parse_config({"node": {"name": "w", "state_dir": str(tmp_path)}, "queues": queues or {}})
    store = CheckpointStore(tmp_path / "adapt", identity=ModelIdentity.of(model, head=cfg.adapt.head))
    events = events if events is not None else []
    kw = {"clock": clock} if clock is not None else {}
    return AdaptWorker(cfg=cfg, model=model, global_head=ghead, store=store, supervisor=supervisor,
                       publish_event=lambda kind, **f: events.append((kind, f)), **kw)


def _z(i: int) -> np.ndarray:
    return np.random.default_rng(i).normal(size=64).astype(np.float32)


def _window(w, i: int, key=KEY) -> None:
    w.offer_window(key, float(i), float(i) + 1.0, _z(i), np.full(4, 0.25, np.float32))


CLASSES = ("normal", "imbalance", "misalignment", "bearing_wear")


def test_labels_survive_a_flood_of_windows(tmp_path):
    w = _worker(tmp_path, queues={"learner_bytes": 1 << 17})
    n = 3000
    for i in range(n):  # not started yet: the learner lane must shed, the labels lane must not
        _window(w, i)
        if i >= n - 100:
            w.offer_label(None, i + 0.5, CLASSES[i % 4])  # node-wide labels for the newest windows
    met = w.metrics()
    assert met["lane_labels_dropped"] == 0 and met["lane_labels_depth"] == 100
    assert met["lane_learner_dropped"] > n - 200 and met["lane_learner_depth_bytes"] <= 1 << 17
    w.start()
    try:
        assert wait_until(lambda: w.metrics()["matcher_labels_matched_total"] == 100, timeout=60)
        assert wait_until(lambda: w.metrics()["lane_learner_depth"] == 0, timeout=60)
    finally:
        w.stop()
    met = w.metrics()
    assert met["worker_learned"] == 100 and met["learner_labels_total"] == 100 and met["worker_item_errors"] == 0


def test_an_item_that_raises_is_counted_and_skipped(tmp_path):
    sup = Supervisor(faults="")
    w = _worker(tmp_path, supervisor=sup)
    w.start()
    try:
        _window(w, 0, key=["not", "hashable"])  # a producer's bug: the matcher raises TypeError on this item
        for i in range(1, 4):
            _window(w, i)
            w.offer_label(KEY, i + 0.5, "imbalance")
        assert wait_until(lambda: w.counters["learned"] == 3, timeout=60)
        assert w.counters["item_errors"] == 1 and sup.errors == {("learner", "TypeError"): 1}
        assert w.thread.is_alive() and not sup.dead()
    finally:
        sup.stopping()
        w.stop()


def test_injected_faults_are_counted_and_the_loop_goes_on(tmp_path):
    sup = Supervisor(faults="learner:item:0.3", seed=1)
    w = _worker(tmp_path, supervisor=sup)
    w.start()
    try:
        for i in range(200):
            _window(w, i)
        assert wait_until(lambda: w.metrics()["lane_learner_taken"] == 200, timeout=60)
        assert wait_until(lambda: w.counters["item_errors"] == sup.errors.get(("learner", "InjectedFault")), timeout=10)
        n = sup.errors[("learner", "InjectedFault")]
        assert 20 < n < 120 and w.thread.is_alive() and not sup.dead()
        assert w.metrics()["matcher_windows_cached"] == 200 - n  # exactly the faulted items were skipped
    finally:
        sup.stopping()
        w.stop()


def test_a_killed_learner_thread_is_seen_as_dead(tmp_path):
    deaths = []
    sup = Supervisor(faults="learner:kill:3", on_death=lambda name, why: deaths.append(name))
    w = _worker(tmp_path, supervisor=sup)
    w.start()
    for i in range(5):
        _window(w, i)
    assert wait_until(lambda: "learner" in sup.dead(), timeout=30)
    assert "ThreadKill" in sup.dead()["learner"] and deaths == ["learner"]
    sup.stopping()
    w.stop(timeout_s=10)  # still drains what is queued and checkpoints
    assert w.counters["checkpoints"] == 1 and w.metrics()["matcher_windows_cached"] == 4


def test_shutdown_learns_what_is_queued_within_its_budget_and_counts_the_rest(tmp_path):
    ticks = itertools.count()
    w = _worker(tmp_path, clock=lambda: float(next(ticks)))  # one tick per look at the clock: a budget in items
    order = []
    for i in range(200):
        _window(w, i)
        order.append("w")
        if i % 10 == 0:
            w.offer_label(None, i + 0.5, CLASSES[i % 4])
            order.append("l")
    w.stop(timeout_s=100)  # never started: stop() itself drains
    c = w.counters
    assert c["shutdown_drained"] + c["shutdown_dropped"] == 220
    assert 0 < c["shutdown_dropped"] < 200
    assert c["learned"] == order[: c["shutdown_drained"]].count("l") > 5  # in offer order, each label learned
    again = _worker(tmp_path)  # the final checkpoint holds them
    assert again.metrics()["learner_labels_total"] == c["learned"]


def test_shutdown_of_a_running_worker_drains_everything_within_its_budget(tmp_path):
    w = _worker(tmp_path)
    w.start()
    for i in range(300):
        _window(w, i)
        w.offer_label(None, i + 0.5, CLASSES[i % 4])
    w.stop(timeout_s=120)
    met = w.metrics()
    assert met["worker_shutdown_dropped"] == 0 and met["matcher_labels_matched_total"] == 300
    assert met["lane_labels_depth"] == 0 and met["lane_learner_depth"] == 0 and w.counters["checkpoints"] >= 1


@pytest.mark.parametrize("change", ["retrained", "classes"])
def test_another_models_checkpoint_is_not_applied_and_an_event_says_why(tmp_path, change):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(resolve_model("vibration").path, other)
    if change == "retrained":
        with open(other / "model.py", "a") as f:
            f.write("\n# retrained\n")  # same shapes and classes, other content hash
    else:  # same shapes, one class renamed (the hash changes too: the manifest is hashed)
        text = (other / "manifest.toml").read_text()
        (other / "manifest.toml").write_text(text.replace('"bearing_wear"', '"cavitation"'))
    w1 = _worker(tmp_path, model=resolve_model(other))
    w1.start()
    for i in range(10):
        _window(w1, i)
        w1.offer_label(KEY, i + 0.5, "imbalance")
    w1.stop(timeout_s=60)
    assert w1.metrics()["learner_labels_total"] == 10
    events = []
    w2 = _worker(tmp_path, events=events)
    assert w2.metrics()["learner_labels_total"] == 0 and w2.champion.version == "g"
    assert w2.counters["checkpoint_mismatches"] == 1 and not w2.store.paths()
    stale = list((tmp_path / "adapt").glob("stale-vibration-*"))
    assert len(stale) == 1 and list(stale[0].glob("ckpt-*.edge")) and (stale[0] / "WHY.txt").is_file()
    w2.start()
    w2.stop()
    (kind, fields), = [e for e in events if e[0] == "checkpoint_mismatch"]
    assert ("content_hash" if change == "retrained" else "classes") in fields["why"]
    assert fields["moved_to"] == str(stale[0])
    assert fields["saved"]["content_hash"] != fields["model"]["content_hash"]


def test_a_store_not_bound_to_a_model_is_refused(tmp_path):
    model = resolve_model("vibration")
    _, head_sd = model.state_dicts()
    ghead = HeadSnapshot.from_arrays({k: v.numpy() for k, v in head_sd.items()}, kind="linear", task="classification", version="g")
    cfg = parse_config({"node": {"name": "w", "state_dir": str(tmp_path)}})
    with pytest.raises(ValueError, match="bound"):
        AdaptWorker(cfg=cfg, model=model, global_head=ghead, publish_event=lambda *a, **k: None,
                    store=CheckpointStore(tmp_path / "x"))


def test_a_checkpoint_the_learner_cannot_take_is_set_aside_too(tmp_path):
    model = resolve_model("vibration")
    ident = ModelIdentity.of(model, head="linear")
    CheckpointStore(tmp_path / "adapt", identity=ident).save({"format": 0, "task": "classification"})  # an old layout
    events = []
    w = _worker(tmp_path, events=events)
    assert w.counters["checkpoint_mismatches"] == 1 and w.champion.version == "g" and not w.store.paths()
    w.start()
    w.stop()
    (kind, fields), = [e for e in events if e[0] == "checkpoint_mismatch"]
    assert "cannot take" in fields["why"] and list((tmp_path / "adapt").glob("stale-vibration-*/ckpt-*.edge"))
    assert w.store.paths()  # the new lineage was saved at stop


def test_the_learner_lanes_bound_real_memory_not_just_their_own_count(tmp_path):
    import tracemalloc

    bound = 1 << 20
    w = _worker(tmp_path, queues={"learner_bytes": bound, "labels_bytes": bound})
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(8_000):  # not started: everything beyond the bounds is shed
            _window(w, i)
            w.offer_label(None, i + 0.5, CLASSES[i % 4])
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    met = w.metrics()
    assert met["lane_learner_dropped"] > 0 and met["lane_labels_dropped"] > 0
    assert grown < 2 * bound * 1.2, grown  # both lanes full, plus 20% for what the sizes leave out


def test_other_head_options_set_the_checkpoint_aside_instead_of_failing_the_start(tmp_path):
    model = resolve_model("vibration")
    m = model.manifest
    _, head_sd = model.state_dicts()
    ghead = HeadSnapshot.from_arrays({k: v.numpy() for k, v in head_sd.items()}, kind="linear", task=m.task, version="g")

    def worker(rank: int) -> AdaptWorker:
        cfg = parse_config({"node": {"name": "w", "state_dir": str(tmp_path)},
                            "adapt": {"head": "lowrank", "head_rank": rank}})
        store = CheckpointStore(tmp_path / "adapt", identity=ModelIdentity.of(model, head=cfg.adapt.head))
        return AdaptWorker(cfg=cfg, model=model, global_head=ghead, store=store, publish_event=lambda *a, **k: None)

    w = worker(4)
    for i in range(5):
        _window(w, i)
        w.offer_label(KEY, i + 0.5, "normal")
    w.stop(timeout_s=60)
    assert w.metrics()["learner_labels_total"] == 5
    w2 = worker(8)  # the same identity (model and head kind), but the state's shapes differ: torch raises
    assert w2.counters["checkpoint_mismatches"] == 1 and w2.metrics()["learner_labels_total"] == 0
    assert list((tmp_path / "adapt").glob("stale-vibration-*/WHY.txt"))


def test_a_rejected_label_is_logged_with_its_reason(tmp_path, caplog):
    w = _worker(tmp_path)
    w.start()
    try:
        with caplog.at_level("WARNING", logger="edge.adapt"):
            w.offer_window(KEY, 10.0, 10.255, np.zeros(64, np.float32), np.full(4, 0.25))
            w.offer_label(KEY, 10.1, "gearbox" * 50)  # no such class; a long value is cut
            assert wait_until(lambda: w.matcher.rejected.get("unknown_class") == 1, 10)
            assert wait_until(lambda: "rejected (unknown_class)" in caplog.text, 10)
        line = next(r.getMessage() for r in caplog.records if "unknown_class" in r.getMessage())
        assert len(line) < 250
    finally:
        w.stop()
