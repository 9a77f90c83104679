"""The daemon end to end over a real mosquitto: routing, windows, order, availability,
bad input, and recovery after the broker is killed and restarted mid-stream."""
from __future__ import annotations

import time

import pytest

from edge.config import parse_config
from edge.daemon import Daemon
from tests.helpers import Client, batch, poll

pytestmark = pytest.mark.timeout(180)


def make_daemon(broker, tmp, *, node="t1", adapt=False, **extra):
    doc = {"node": {"name": node, "state_dir": str(tmp / "state")},
           "mqtt": extra.pop("mqtt", {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5}),
           "model": {"cache_dir": str(tmp.parent / "cache")},
           "adapt": {"enabled": adapt}, **extra}
    d = Daemon(parse_config(doc))
    d.start(connect_timeout=10)
    return d


@pytest.fixture(scope="module")
def daemon(broker, tmp_path_factory):
    d = make_daemon(broker, tmp_path_factory.mktemp("d"))
    yield d
    d.stop()


def test_daemon_serves_the_measured_choice_by_default_on_the_cpu(daemon):
    b = daemon.engine.backend
    label = f"onnxruntime {b.precision}" + (f" ({b.variant})" if b.variant else "")
    assert b.key == "onnxruntime" and f"-> {label}" in daemon.backend_reason, (b.describe(), daemon.backend_reason)


def test_predictions_are_routed_per_device_and_stream(broker, daemon):
    c = Client(broker, "edge/t1/predictions/#")
    t0 = time.time()
    c.publish("sensors/m1/accel", batch(t0, 512))
    c.publish("sensors/m2/gyro", batch(t0, 256))
    c.wait_for(lambda m: len(m) >= 3)
    by_topic = {}
    for t, p, _ in c.msgs:
        by_topic.setdefault(t, []).append(p)
    assert set(by_topic) == {"edge/t1/predictions/m1/accel", "edge/t1/predictions/m2/gyro"}
    assert len(by_topic["edge/t1/predictions/m1/accel"]) == 2
    preds = c.json_on("edge/t1/predictions/m1/accel")
    assert preds[0]["device"] == "m1" and preds[0]["stream"] == "accel"
    assert preds[0]["prediction"] in ("normal", "imbalance", "misalignment", "bearing_wear")
    assert abs(sum(preds[0]["scores"].values()) - 1.0) < 1e-3
    c.close()


def test_window_boundaries_and_order(broker, daemon):
    c = Client(broker, "edge/t1/predictions/m3/#")
    t0 = time.time()
    for k in range(8):  # 8 x 100 samples = 800 -> windows at samples 0, 256, 512
        c.publish("sensors/m3/accel", batch(t0 + k * 0.1, 100))
    preds = c.wait_for(lambda m: len(m) >= 3 and c.json_on("edge/t1/predictions/m3"))
    # no fourth window: a later stream's window, served after everything published before it
    # (one sensor lane, in order), marks the point by which any extra one would have come
    mark = Client(broker, "edge/t1/predictions/m3mark/#")
    mark.publish("sensors/m3mark/accel", batch(t0, 256))
    mark.wait_for(lambda m: len(m) >= 1)
    mark.close()
    preds = c.json_on("edge/t1/predictions/m3/")
    assert len(preds) == 3
    starts = [p["t_start"] for p in preds]
    assert starts == sorted(starts)
    assert [round(s - t0, 6) for s in starts] == [0.0, 0.256, 0.512]
    assert [round(p["t"] - p["t_start"], 6) for p in preds] == [0.255] * 3
    c.close()


def test_bad_input_is_counted_and_skipped_while_good_streams_keep_serving(broker, daemon):
    c = Client(broker, "edge/t1/predictions/good/#")
    before = dict(daemon.pipeline.bad)
    now = time.time()
    bad = [b'{"t": 1, "v": [1, 2', b'{"t": %f, "v": [1, 2]}' % now, b'{"t": %f, "v": [1, NaN, 3]}' % now,
           b'{"t": 1e15, "v": [1, 2, 3]}', b"x" * (2 << 20), b"1,2,abc", b'{"t0": %f, "dt": -1, "v": [[1,2,3]]}' % now]
    for p in bad:
        c.publish("sensors/bad/accel", p)
    c.publish("sensors/good/accel", batch(now, 256))
    c.wait_for(lambda m: len(m) >= 1)
    # the 2 MiB one never reaches the daemon: its MQTT 5 Maximum Packet Size (from
    # max_payload_bytes) makes the broker drop it (tests/test_ingest_fastmqtt.py)
    for _ in range(50):
        if sum(daemon.pipeline.bad.values()) - sum(before.values()) >= len(bad) - 1:
            break
        time.sleep(0.1)
    diff = {k: v - before.get(k, 0) for k, v in daemon.pipeline.bad.items() if v - before.get(k, 0)}
    assert diff == {"bad_json": 2, "wrong_channels": 1, "absurd_time": 1, "bad_csv": 1, "bad_time": 1}
    assert daemon.pipeline.thread.is_alive()
    c.close()


def test_unknown_topic_and_label_garbage_do_not_stop_serving(broker, daemon):
    c = Client(broker, "edge/t1/predictions/after/#")
    c.publish("edge/t1/labels", b"not json")
    c.publish("edge/t1/labels", b'{"t": "x", "label": 3}')
    c.publish("sensors/after/accel", batch(time.time(), 256))
    c.wait_for(lambda m: len(m) >= 1)
    assert daemon.pipeline.bad.get("bad_label", 0) >= 1 and daemon.pipeline.bad.get("bad_time", 0) >= 1
    c.close()


def test_availability_is_retained_online_then_offline(broker, tmp_path):
    d = make_daemon(broker, tmp_path, node="avail")
    c = Client(broker, "edge/avail/status")
    c.wait_for(lambda m: any(p == b"online" and r for _, p, r in m))
    d.stop()
    c.wait_for(lambda m: m[-1][1] == b"offline")
    late = Client(broker, "edge/avail/status")  # a newcomer sees the retained state
    late.wait_for(lambda m: m and m[-1][1] == b"offline" and m[-1][2])
    c.close()
    late.close()


def test_status_reports_streams_backend_and_counters(broker, daemon):
    c = Client(broker, "edge/t1/predictions/m1/#")  # its own windows: the test does not rely on the ones before
    c.publish("sensors/m1/accel", batch(time.time() + 5.0, 512))
    c.wait_for(lambda m: len(m) >= 2)
    c.close()
    st = daemon.status()
    assert st["backend"]["precision"] == daemon.engine.backend.precision
    assert "sensors" not in st["streams"] and any(k.startswith("m1/") for k in st["streams"])
    assert st["pipeline"]["windows_served"] >= 2
    assert daemon.registry().render().count("edge_windows_served_total") >= 1


def test_broker_restart_resumes_stream(broker, daemon):
    c = Client(broker, "edge/t1/predictions/rs/#")
    t0 = time.time()
    c.publish("sensors/rs/accel", batch(t0, 256))
    c.wait_for(lambda m: len(m) >= 1)
    c.close()
    broker.kill()
    deadline = time.monotonic() + 10
    while daemon.link.connected.is_set() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not daemon.link.connected.is_set(), "daemon did not notice the broker died"
    broker.restart()
    assert daemon.link.wait_connected(15), "daemon did not reconnect"
    c2 = Client(broker, "edge/t1/predictions/rs/#")
    sent = [0]

    def served():  # resubscription may still be in flight: send window after window until one is served
        if c2.msgs:
            return True
        c2.publish("sensors/rs/accel", batch(t0 + 1.0 + 0.256 * sent[0], 256))
        sent[0] += 1
        return False
    poll(served, 15, interval=0.1, what="a window served after the reconnect")
    assert daemon.link.counters["connects"] >= 2 and daemon.pipeline.thread.is_alive()
    c2.close()


def test_metrics_endpoint_serves_prometheus_text_and_health(broker, tmp_path):
    import urllib.request

    from edge.broker import free_port

    port = free_port()
    d = make_daemon(broker, tmp_path, node="met", metrics={"port": port})
    try:
        c = Client(broker, "edge/met/predictions/#")
        c.publish("sensors/x/accel", batch(time.time(), 256))
        c.wait_for(lambda m: len(m) >= 1)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "edge_windows_served_total 1.0" in text
        assert f'edge_backend_latency_seconds_bucket{{backend="{d.engine.label}",le="+Inf"}}' in text
        assert "edge_pipeline_latency_seconds_count 1.0" in text
        assert 'edge_mqtt_connects_total{connection="link"} 1.0' in text
        assert 'edge_mqtt_held_unacked_total{connection="link"} 0.0' in text
        health = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert health.status == 200 and b'"ready": true' in health.read()
        c.close()
    finally:
        d.stop()


def test_daemon_speaks_mqtt_3_1_1_too(broker, tmp_path):
    d = make_daemon(broker, tmp_path, node="v311", mqtt={"host": broker.host, "port": broker.port, "protocol": "3.1.1"})
    try:
        c = Client(broker, "edge/v311/#", protocol="3.1.1")
        c.publish("sensors/old/accel", batch(time.time(), 256))
        c.wait_for(lambda m: any("/predictions/old/accel" in t for t, _, _ in m))
        assert any(t == "edge/v311/status" and p == b"online" for t, p, _ in c.msgs)
        c.close()
    finally:
        d.stop()
