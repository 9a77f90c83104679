"""The serving loop with in-memory fakes: micro-batching, routing of labels, drop-oldest."""
from __future__ import annotations

import threading
import time

import numpy as np

from edge.adapt.heads import HeadSnapshot
from edge.ingest.topics import TopicRoute
from edge.ingest.types import StreamKey
from edge.pipeline import Pipeline

HEAD = HeadSnapshot.from_arrays({"weight": np.eye(2, 4, dtype=np.float32), "bias": np.zeros(2, np.float32)},
                                kind="linear", task="classification", version="t")


def make(max_wait_ms=0.0, queue_size=1000):
    batches, published, labels = [], [], []

    def features(x):
        batches.append(len(x))
        return np.zeros((len(x), 4), np.float32)

    p = Pipeline(sources=[(TopicRoute("s/{device}/{stream}"), "auto")], label_route=TopicRoute("edge/n/labels/#"),
                 channels=1, window_kw=dict(length=4, hop=4, sample_rate=1000.0), features=features,
                 head_ref=lambda: HEAD, classes=("a", "b"), publish=lambda t, b: published.append(t), topic_base="edge/n",
                 model_id="m@1", queue_size=queue_size, max_batch=8, max_wait_ms=max_wait_ms,
                 on_label=lambda k, t, v: labels.append((k, t, v)))
    return p, batches, published, labels


def window(p, device, t0=100.0):
    p.push_samples(StreamKey(device, "x"), np.arange(4) * 0.001 + t0, np.zeros((4, 1), np.float32))


def wait(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.005)
    return cond()


def test_windows_ready_within_max_wait_share_one_backbone_call():
    p, batches, published, _ = make(max_wait_ms=300.0)
    p.start()
    try:
        window(p, "a")
        time.sleep(0.02)
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


def test_a_full_queue_drops_the_oldest_and_counts_it():
    p, _, _, _ = make(queue_size=16)
    for i in range(20):  # the thread is not started: nothing is consumed
        p.offer_message("s/d/x", b'{"t": %d, "v": [1]}' % i, float(i))
    assert p.counters["dropped"] == 4 and p.depth() == 16
    assert p.queue[0][2] == b'{"t": 4, "v": [1]}'


def test_a_failing_backend_skips_its_windows_and_serving_goes_on():
    p, batches, published, _ = make()
    calls = threading.Event()

    def bad_features(x):
        calls.set()
        raise RuntimeError("backend crashed")

    p.features = bad_features
    p.start()
    try:
        window(p, "a")
        assert calls.wait(5)
        assert wait(lambda: p.counters["serve_errors"] == 1)
        p.features = lambda x: np.zeros((len(x), 4), np.float32)
        window(p, "a", t0=200.0)
        assert wait(lambda: len(published) == 1) and p.thread.is_alive()
    finally:
        p.stop()


def test_streams_beyond_max_streams_are_rejected_as_bad_input():
    p, _, published, _ = make()
    p.max_streams = 2
    p.start()
    try:
        for dev in ("a", "b", "c"):
            window(p, dev)
        assert wait(lambda: len(published) == 2 and p.bad.get("too_many_streams") == 1)
        assert set(map(str, p.windowers)) == {"a/x", "b/x"}
    finally:
        p.stop()
