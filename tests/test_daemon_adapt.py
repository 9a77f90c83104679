"""Adaptation end to end over a real broker, and a kill -9 of a real daemon that resumes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge.config import parse_config
from edge.daemon import Daemon
from edge.sim import FAULTS, SHIFTS, Machine
from tests.helpers import Client

pytestmark = pytest.mark.timeout(240)


def labelled_windows(n, *, seed, shift, t0, seg=6):
    """``n`` windows of 256 samples from one machine under ``shift``; the fault changes every ``seg`` windows."""
    m = Machine(seed=seed, condition=SHIFTS[shift], t0=t0)
    order = list(np.random.default_rng(seed).permutation(len(FAULTS)))
    for k in range(n):
        fault = FAULTS[order[(k // seg) % len(FAULTS)]]
        m.fault = fault
        t, v = m.read(256)
        yield t, v, fault


def publish_window(c, device, t, v, label=None):
    c.publish(f"sensors/{device}/accel", {"t0": float(t[0]), "dt": 0.001, "v": np.round(v, 5).tolist()}, qos=1)
    if label is not None:
        c.publish("edge/ad/labels", {"t": float(t[128]), "label": label, "device": device, "stream": "accel"}, qos=1)


def accuracy(preds, truth):
    ok = [p["prediction"] == truth[round(p["t_start"], 3)] for p in preds if round(p["t_start"], 3) in truth]
    return float(np.mean(ok)), len(ok)


def _learning_node(broker, tmp_path) -> Daemon:
    """A started daemon that learns (node "ad"); the same state folder each time."""
    d = Daemon(parse_config({"node": {"name": "ad", "state_dir": str(tmp_path)},
                             "mqtt": {"host": broker.host, "port": broker.port},
                             "model": {"cache_dir": str(tmp_path / "cache")}, "adapt": {"enabled": True}}))
    d.start(connect_timeout=10)
    return d


def _adapting_daemon(broker, tmp_path):
    """A daemon that learns (node "ad") and a client listening to its predictions and events."""
    return _learning_node(broker, tmp_path), Client(broker, "edge/ad/predictions/#", "edge/ad/events")


def test_drifted_device_recovers_accuracy_from_labels(broker, tmp_path):
    d, c = _adapting_daemon(broker, tmp_path)
    try:
        truth: dict[float, str] = {}
        t0 = time.time() - 600
        stream = labelled_windows(560, seed=11, shift="mounting", t0=t0)
        before, after = [], []
        for k, (t, v, fault) in enumerate(stream):
            truth[round(float(t[0]), 3)] = fault
            publish_window(c, "m7", t, v, label=fault if k >= 80 else None)
            (before if k < 80 else after).append(round(float(t[0]), 3))
            if k % 40 == 39:  # let the learner keep up, as labels would trickle in for real
                c.wait_for(lambda m: len(m) >= k - 5, timeout=30)
        c.wait_for(lambda m: len([x for x in m if "/predictions/" in x[0]]) >= 560, timeout=60)
        preds = c.json_on("edge/ad/predictions/m7/accel")
        frozen_acc, n0 = accuracy([p for p in preds if round(p["t_start"], 3) in set(before)], truth)
        last = set(after[-120:])
        adapted_acc, n1 = accuracy([p for p in preds if round(p["t_start"], 3) in last], truth)
        events = [e["type"] for e in c.json_on("edge/ad/events")]
        assert n0 == 80 and n1 == 120
        assert "promotion" in events, events
        assert adapted_acc >= frozen_acc + 0.08, (frozen_acc, adapted_acc, events)
        m = d.adapt.metrics()
        assert m["learner_labels_total"] >= 400, m
    finally:
        c.close()
        d.stop()


def test_labels_sent_while_the_daemon_is_down_still_find_their_windows(broker, tmp_path):
    """A restart loses no label: windows served before a stop are in the checkpoint's label
    cache, the broker keeps the labels sent while the daemon is down (persistent session),
    and the next start matches every one of them to its window and learns it."""
    d, c = _adapting_daemon(broker, tmp_path)
    wins = list(labelled_windows(40, seed=7, shift="gain_offset", t0=time.time() - 120))
    try:
        for t, v, _ in wins:
            publish_window(c, "r1", t, v)
        c.wait_for(lambda m: len([x for x in m if "/predictions/" in x[0]]) >= 39, timeout=60)
        deadline = time.monotonic() + 30
        while d.adapt.metrics()["matcher_windows_cached"] < 39 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        d.stop()
    try:
        cached = d.adapt.metrics()["matcher_windows_cached"]  # after the stop's drain: what the checkpoint holds
        assert cached >= 39
        for t, _, fault in wins:  # the daemon is down: the broker keeps these for the node's session
            c.publish("edge/ad/labels", {"t": float(t[128]), "label": fault, "device": "r1", "stream": "accel"}, qos=1)
        d2 = _learning_node(broker, tmp_path)
        try:
            deadline = time.monotonic() + 60
            while d2.adapt.metrics()["matcher_labels_matched_total"] < cached and time.monotonic() < deadline:
                time.sleep(0.1)
            m = d2.adapt.metrics()
            assert m["matcher_labels_matched_total"] == cached, m
            assert m["learner_labels_total"] == cached and not m["matcher_labels_rejected"].get("unknown_stream"), m
        finally:
            d2.stop()
    finally:
        c.close()


def test_labels_that_arrive_while_the_daemon_stops_come_again_to_the_next_start(broker, tmp_path):
    """From the start of a stop the node's connection takes no label: labels sent while the
    pipeline drains are left unacknowledged (held), the broker sends them again to the next
    start, and that start learns every one of them; none is taken and then dropped."""
    from edge.supervise import wait_until

    d, c = _adapting_daemon(broker, tmp_path)
    wins = list(labelled_windows(12, seed=9, shift="gain_offset", t0=time.time() - 60))
    late = wins[:10]
    try:
        for t, v, _ in wins:
            publish_window(c, "s1", t, v)
        c.wait_for(lambda m: len([x for x in m if "/predictions/" in x[0]]) >= 11, timeout=60)
        assert wait_until(lambda: d.adapt.metrics()["matcher_windows_cached"] >= 11, timeout=30)
        drain = d.pipeline.stop

        def drain_while_labels_arrive(*a, **kw):  # the labels come while the daemon is stopping
            for t, _, fault in late:
                c.publish("edge/ad/labels", {"t": float(t[128]), "label": fault, "device": "s1", "stream": "accel"}, qos=1)
            wait_until(lambda: d.link.counters["held_unacked"] >= len(late), timeout=20)
            return drain(*a, **kw)

        d.pipeline.stop = drain_while_labels_arrive
    finally:
        d.stop()
    d2 = None
    try:
        m = d.adapt.metrics()
        assert d.link.counters["held_unacked"] == len(late) and m["matcher_labels_matched_total"] == 0, m
        assert d.pipeline.counters["shutdown_dropped"] == 0
        d2 = _learning_node(broker, tmp_path)
        assert wait_until(lambda: d2.adapt.metrics()["matcher_labels_matched_total"] >= len(late), timeout=60)
        m = d2.adapt.metrics()
        assert m["matcher_labels_matched_total"] == len(late) and m["learner_labels_total"] == len(late), m
    finally:
        if d2 is not None:
            d2.stop()
        c.close()


def _status(run: Path) -> dict:
    p = run / "kd" / "status.json"  # in the runtime folder, not the state folder
    return json.loads(p.read_text()) if p.exists() else {}


def test_kill_9_during_training_then_restart_resumes(broker, tmp_path):
    cfg = tmp_path / "edge.toml"
    state, run = tmp_path / "state", tmp_path / "run"
    cfg.write_text(f'[node]\nname = "kd"\nstate_dir = "{state}"\nruntime_dir = "{run}"\n[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
                   f'[model]\ncache_dir = "{tmp_path / "cache"}"\n[adapt]\ncheckpoint_interval_s = 1.0\n')
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}

    def start():
        return subprocess.Popen([sys.executable, "-m", "edge.cli", "run", "--config", str(cfg)], env=env,
                                stdout=subprocess.DEVNULL, stderr=open(tmp_path / "edge.log", "ab"))

    p = start()
    c = Client(broker, "edge/kd/predictions/#", "edge/kd/status")
    try:
        c.wait_for(lambda m: any(t == "edge/kd/status" and pl == b"online" for t, pl, _ in m), timeout=60)
        t0 = time.time() - 300
        for t, v, fault in labelled_windows(400, seed=5, shift="gain_offset", t0=t0):
            c.publish("sensors/k1/accel", {"t0": float(t[0]), "dt": 0.001, "v": np.round(v, 5).tolist()}, qos=1)
            c.publish("edge/kd/labels", {"t": float(t[128]), "label": fault}, qos=1)
        learned, deadline = 0, time.monotonic() + 60
        while time.monotonic() < deadline:  # status.json is rewritten every 5 s
            learned = _status(run).get("adapt", {}).get("learner_labels_total", 0)
            if learned >= 100 and list((state / "kd" / "adapt").glob("*")):
                break
            time.sleep(0.5)
        assert learned >= 100, (tmp_path / "edge.log").read_text()[-2000:]
        time.sleep(1.5)  # at least one more checkpoint interval while training continues
        os.kill(p.pid, signal.SIGKILL)  # mid-training: no chance to checkpoint at exit
        p.wait(10)
        p = start()
        c.wait_for(lambda m: [pl for t, pl, _ in m if t == "edge/kd/status"][-1:] == [b"online"] and
                   sum(1 for t, pl, _ in m if t == "edge/kd/status" and pl == b"online") >= 2, timeout=60)
        for _ in range(100):
            st = _status(run)
            if st.get("written", 0) > time.time() - 3 and "adapt" in st:
                break
            time.sleep(0.2)
        resumed = st["adapt"]["learner_labels_total"]
        assert resumed >= 50, f"restart did not resume from a checkpoint: {st['adapt']}"
        assert "restored the learner" in (tmp_path / "edge.log").read_text()
    finally:
        c.close()
        p.send_signal(signal.SIGTERM)
        p.wait(20)


def test_a_poisoning_label_stream_is_held_and_predictions_stay_right(broker, tmp_path):
    """Wrong labels from any client: the challenger learns them, but is held (label_anomaly), not served."""
    d, c = _adapting_daemon(broker, tmp_path)
    try:
        m = Machine(seed=21, fault="normal", t0=time.time() - 600)
        n = 400
        for k in range(n):
            t, v = m.read(256)
            publish_window(c, "p1", t, v, label="bearing_wear")  # the machine runs normally
            if k % 40 == 39:
                c.wait_for(lambda msgs: len(msgs) >= k - 5, timeout=30)
        c.wait_for(lambda msgs: len([x for x in msgs if "/predictions/" in x[0]]) >= n, timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and d.adapt.metrics()["learner_labels_total"] < n - 20:
            time.sleep(0.1)
        preds = c.json_on("edge/ad/predictions/p1/accel")
        events = c.json_on("edge/ad/events")
        kinds = [e["type"] for e in events]
        mt = d.adapt.metrics()
        assert "promotion" not in kinds, kinds
        assert "label_anomaly" in kinds and mt["learner_promotions_held_total"] >= 1, (kinds, mt)
        assert mt["learner_labels_total"] >= n - 20  # the poison is counted, not silently dropped
        late = [p["prediction"] for p in preds[-100:]]
        assert late.count("normal") >= 90, late
    finally:
        c.close()
        d.stop()
