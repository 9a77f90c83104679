"""The serving loop with in-memory fakes: micro-batching, label routing, byte-bounded lanes,
supervision of per-item failures, and draining at stop."""
from __future__ import annotations

import threading
import time

import numpy as np
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.adapt.heads import HeadSnapshot
from edge.ingest.topics import TopicRoute
from edge.ingest.types import StreamKey
from edge.config import ModelConfig, MqttConfig, QueueConfig, WindowConfig
from edge.pipeline import ModelShape, Ports, Routes, build_pipeline
from edge.supervise import Supervisor

HEAD = HeadSnapshot.from_arrays({"weight": np.eye(2, 4, dtype=np.float32), "bias": np.zeros(2, np.float32)},
                                kind="linear", task="classification", version="t")


def make(max_wait_ms=0.0, sensor_bytes=1 << 20, labels_bytes=1 << 20, send=None, supervisor=None, max_lag_s=0.0,
         drain_s=2.0, max_streams=10_000):
    batches, published, labels = [], [], []

    def features(x):
        batches.append(len(x))
        return np.zeros((len(x), 4), np.float32)

    p = build_pipeline(window=WindowConfig(length=4, hop=4, sample_rate=1000.0, max_clock_skew_s=0.0,
                                           max_streams=max_streams),
                       queues=QueueConfig(ingest_bytes=sensor_bytes, labels_bytes=labels_bytes, max_lag_s=max_lag_s,
                                          shutdown_drain_s=drain_s),
                       model=ModelConfig(max_batch=8, max_wait_ms=max_wait_ms), mqtt=MqttConfig(),
                       shape=ModelShape(channels=1, window=4, sample_rate=1000.0, classes=("a", "b"), model_id="m@1"),
                       routes=Routes(((TopicRoute("s/{device}/{stream}"), "auto"),), TopicRoute("edge/n/labels/#"),
                                     "edge/n"),
                       ports=Ports(features=features, head_ref=lambda: HEAD,
                                   send=send or (lambda t, b: published.append((t, b))),
                                   on_label=lambda k, t, v: labels.append((k, t, v))),
                       supervisor=supervisor)
    return p, batches, published, labels


def window(p, device, t0=100.0):
    p.push_samples(StreamKey(device, "x"), np.arange(4) * 0.001 + t0, np.zeros((4, 1), np.float32))


def wait(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.005)
    return cond()


def test_windows_ready_within_max_wait_share_one_backbone_call():
    p, batches, published, _ = make(max_wait_ms=300.0)
    p.start()
    try:
        window(p, "a")
        time.sleep(0.02)  # pacing: b comes 20 ms after a, well within max_wait_ms
        window(p, "b")
        assert wait(lambda: len(published) == 2)
        assert batches == [2]
    finally:
        p.stop()


def test_without_max_wait_each_drain_is_served_at_once():
    p, batches, published, _ = make(max_wait_ms=0.0)
    p.start()
    try:
        window(p, "a")
        assert wait(lambda: len(published) == 1)
        window(p, "b")
        assert wait(lambda: len(published) == 2)
        assert batches == [1, 1]
    finally:
        p.stop()


def test_labels_on_a_stream_topic_name_their_stream():
    p, _, _, labels = make()
    p.start()
    try:
        p.offer_message("edge/n/labels/m1/x", b'{"t": 5.0, "label": "a"}', 5.0)
        p.offer_message("edge/n/labels", b'{"t": 6.0, "label": "b", "device": "m2", "stream": "y"}', 6.0)
        assert wait(lambda: len(labels) == 2)
        assert labels == [(StreamKey("m1", "x"), 5.0, "a"), (StreamKey("m2", "y"), 6.0, "b")]
    finally:
        p.stop()


def test_a_full_sensor_lane_drops_the_oldest_by_bytes_and_counts_it():
    p, _, _, _ = make(sensor_bytes=1 << 16)
    payload = b'{"t0": 1.0, "dt": 0.001, "v": [%s]}' % b",".join([b"[1]"] * 2000)  # ~8 KB
    for i in range(20):  # the thread is not started: nothing is consumed
        p.offer_batch([(f"s/d{i}/x", payload)], float(i))
    lane = p.inbox.sensor
    assert lane.depth_bytes <= 1 << 16
    assert lane.counters["dropped"] == 20 - len(lane) > 0
    assert lane.take().msgs[0][0] == f"s/d{lane.counters['dropped']}/x"  # the oldest went first


def test_labels_are_never_shed_by_sensor_overload():
    p, _, _, labels = make(sensor_bytes=1 << 16)
    for i in range(200):
        p.offer_batch([("s/d/x", b'{"t": %d.0, "v": [1]}' % i)] * 50, float(i))
        if i % 20 == 0:
            p.offer_message("edge/n/labels/d/x", b'{"t": %d.0, "label": "a"}' % i, float(i))
    assert p.inbox.sensor.counters["dropped"] > 0 and p.inbox.labels.counters["dropped"] == 0
    p.start()
    try:
        assert wait(lambda: len(labels) == 10)
    finally:
        p.stop()


def test_stale_sensor_data_is_shed_when_taken():
    p, _, published, _ = make(max_lag_s=0.05)
    now = [100.0]
    p.inbox.sensor.clock = lambda: now[0]  # the lane's clock, stepped: "old" waits 0.2 s in the lane
    window(p, "old")
    now[0] += 0.2
    window(p, "new")
    p.start()
    try:
        assert wait(lambda: len(published) == 1)
        assert published[0][0] == "edge/n/predictions/new/x"
        assert p.inbox.sensor.counters["stale"] == 1
    finally:
        p.stop()


def test_a_failing_backend_skips_its_windows_and_serving_goes_on():
    p, batches, published, _ = make()
    calls = threading.Event()

    def bad_features(x):
        calls.set()
        raise RuntimeError("backend crashed")

    good = p.server.features
    p.server.features = bad_features
    p.start()
    try:
        window(p, "a")
        assert calls.wait(5)
        assert wait(lambda: p.counters["serve_errors"] == 1)
        p.server.features = good
        window(p, "a", t0=200.0)
        assert wait(lambda: len(published) == 1) and p.thread.is_alive()
    finally:
        p.stop()


def test_an_exception_in_one_item_is_counted_and_skipped():
    sup = Supervisor()
    p, _, published, labels = make(supervisor=sup)

    def boom(*a):
        raise RecursionError("hostile")

    p.on_label = boom
    p.start()
    try:
        p.offer_message("edge/n/labels/m1/x", b'{"t": 5.0, "label": "a"}', 5.0)
        window(p, "a")
        assert wait(lambda: len(published) == 1)
        assert sup.errors == {("pipeline", "RecursionError"): 1} and not sup.dead()
    finally:
        p.stop()


def test_a_refused_publish_is_counted_as_failed_not_published():
    p, _, _, _ = make(send=lambda t, b: False)
    p.start()
    try:
        window(p, "a")
        assert wait(lambda: p.publisher.counters["publish_failed"] == 1)
        assert p.publisher.counters["published"] == 0
    finally:
        p.stop()


def test_a_killed_pipeline_thread_is_reported_dead():
    sup = Supervisor(faults="pipeline:kill:2")
    p, _, _, _ = make(supervisor=sup)
    p.start()
    window(p, "a")
    window(p, "b", t0=300.0)
    assert wait(lambda: "pipeline" in sup.dead())
    assert not p.thread.is_alive()


def test_stop_serves_what_is_queued_and_counts_the_rest():
    p, _, published, _ = make(drain_s=5.0)
    for i in range(5):
        window(p, f"d{i}")
    p.start()
    p.stop()
    assert len(published) == 5 and p.counters["shutdown_dropped"] == 0
    q, _, _, _ = make(drain_s=0.0)
    for i in range(5):
        window(q, f"d{i}")
    q.start()
    q.stop()
    assert len(published) == 5 and q.counters["shutdown_dropped"] + q.counters["windows_served"] == 5


def test_streams_beyond_max_streams_are_rejected_as_bad_input():
    p, _, published, _ = make(max_streams=2)
    p.start()
    try:
        for dev in ("a", "b", "c"):
            window(p, dev)
        assert wait(lambda: len(published) == 2 and p.bad.get("too_many_streams") == 1)
        assert set(map(str, p.windowers)) == {"a/x", "b/x"}
    finally:
        p.stop()


def test_a_stream_reset_cuts_the_stream_where_its_source_did_although_control_is_taken_first():
    """Samples before the reset, the reset, samples after it, all queued before the pipeline
    runs: control is drained before sensor data, yet the reset applies after the samples
    offered before it (no window joins the two sessions)."""
    p, _, published, _ = make()
    key = StreamKey("mcu", "x")
    p.push_samples(key, np.arange(3) * 0.001 + 100.0, np.zeros((3, 1), np.float32))  # 3 of a 4-sample window
    p.reset_stream(key, "hello")  # the device restarted
    p.push_samples(key, np.arange(2) * 0.001 + 100.003, np.zeros((2, 1), np.float32))
    p.start()
    try:
        assert wait(lambda: key in p.windowers and p.windowers[key].counters["samples"] == 5)
        w = p.windowers[key]
        assert p.counters["stream_resets"] == 1 and w.counters["discarded"] == 3
        assert w.counters["windows"] == 0 and published == []
    finally:
        p.stop()


def test_a_stream_reset_forgets_the_partial_window():
    p, _, published, _ = make()
    key = StreamKey("mcu", "x")
    p.start()
    try:
        p.push_samples(key, np.arange(3) * 0.001 + 100.0, np.zeros((3, 1), np.float32))  # 3 of a 4-sample window
        assert wait(lambda: key in p.windowers and p.windowers[key].counters["samples"] == 3)
        p.reset_stream(key, "hello")  # the device restarted
        assert wait(lambda: p.counters["stream_resets"] == 1)
        p.push_samples(key, np.arange(2) * 0.001 + 100.003, np.zeros((2, 1), np.float32))
        assert wait(lambda: p.windowers[key].counters["samples"] == 5)
        w = p.windowers[key]
        assert w.counters["discarded"] == 3 and w.counters["windows"] == 0 and published == []
    finally:
        p.stop()


def test_every_message_and_sample_is_processed_or_counted_as_lost():
    # a flood of 1000-sample messages into a small lane with a tiny lag budget: each one is
    # served, dropped (lane full), shed (stale), refused (a read bigger than the lane) or
    # left at stop; the counts add up in messages and in samples, not only in items and bytes
    p, _, _, _ = make(sensor_bytes=64 << 10, max_lag_s=0.002, drain_s=0.0)
    rows = [[0.5]] * 1000

    def msg(k: int) -> tuple[str, bytes]:
        return "s/fl/x", orjson.dumps({"t0": 100.0 + k, "dt": 0.001, "v": rows})
    sent = sent_samples = 0
    p.start()
    try:
        for k in range(0, 600, 2):  # reads of two messages, as the ingest connection hands them over
            p.offer_batch([msg(k), msg(k + 1)], time.time())
            sent, sent_samples = sent + 2, sent_samples + 2000
        assert not p.offer_batch([msg(1000 + i) for i in range(20)], time.time())  # one read beyond the lane
        sent, sent_samples = sent + 20, sent_samples + 20_000
    finally:
        p.stop()
    lane = p.inbox.sensor.stats()
    c = p.counters
    lost = {r: lane[f"{r}_messages"] for r in ("dropped", "stale", "oversized")}
    # how many are served rather than shed depends on how busy the machine is (on a loaded one,
    # every message can go stale within 2 ms): the accounting must add up either way
    assert lost["oversized"] == 20 and lane["oversized_bytes"] > 64 << 10
    assert sent == c["messages"] + sum(lost.values()) + c["shutdown_dropped"], (c, lane)
    windowed = sum(s.windower.counters["samples"] for _, s in p.bank.snapshot())
    lost_samples = sum(lane[f"{r}_samples"] for r in ("dropped", "stale", "oversized"))
    assert sent_samples == windowed + lost_samples + c["shutdown_dropped_samples"], (c, lane, windowed)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.floats(-1e6, 1e6), min_size=2, max_size=2), min_size=1, max_size=20),
       st.sampled_from(["sample", "batch", "list", "csv"]))
def test_the_samples_a_lost_payload_is_counted_for_are_what_decoding_it_gives(rows, form):
    from edge.ingest.payload import decode_payload
    from edge.pipeline.accounting import payload_samples

    if form == "sample":
        payload = orjson.dumps({"t": 1.0, "v": rows[0]})
    elif form == "batch":
        payload = orjson.dumps({"t0": 1.0, "dt": 0.001, "v": rows})
    elif form == "list":
        payload = orjson.dumps([{"t": 1.0 + i, "v": r} for i, r in enumerate(rows)])
    else:
        payload = "\n".join(",".join(repr(x) for x in r) for r in rows).encode()
    assert payload_samples(payload) == len(decode_payload(payload, channels=2, now=1.0)[0])
