"""The per-message fast paths give exactly what the general ones give: ``decode_sample``
vs ``decode_payload``, ``Windower.push_one`` vs ``push``, ``Pipeline.offer_batch`` vs
``offer_message``; and the ingest queue stays bounded in messages."""
from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.errors import DecodeError
from edge.ingest.payload import decode_payload, decode_sample
from edge.ingest.topics import TopicRoute
from edge.ingest.window import Windower
from edge.config import ModelConfig, MqttConfig, QueueConfig, WindowConfig
from edge.pipeline import ModelShape, Ports, Routes, build_pipeline

pytestmark = pytest.mark.timeout(60)
NOW = 1_700_000_000.0

numbers = st.integers(-5, 5) | st.floats(-1e6, 1e6, allow_nan=False) | st.sampled_from([1e308, -1e308, True, None, "1"])
sample_docs = st.fixed_dictionaries({"v": st.lists(numbers, min_size=2, max_size=4)},
                                    optional={"t": numbers | st.floats(NOW - 10, NOW + 10), "t0": st.just(NOW), "x": numbers})


@settings(max_examples=400, deadline=None)
@given(doc=sample_docs, pad=st.sampled_from([b"", b" ", b"\n"]), skew=st.sampled_from([0.0, 3600.0]))
def test_decode_sample_agrees_with_decode_payload(doc, pad, skew):
    payload = pad + orjson.dumps(doc)
    fast = decode_sample(payload, channels=3, now=NOW, max_skew=skew)
    try:
        slow = decode_payload(payload, channels=3, now=NOW, max_skew=skew)
    except DecodeError:
        slow = None
    if fast is not None:
        assert slow == ([fast[0]], [fast[1]])
        assert (fast[0] is None or type(fast[0]) is float) and all(type(x) is float for x in fast[1])
    elif slow is not None and not pad:
        # only batches, padded payloads and values whose sum overflows leave the fast path
        assert len(slow[0]) != 1 or "t0" in doc or not math.isfinite(sum(slow[1][0]))


@settings(max_examples=400, deadline=None)
@given(garbage=st.binary(max_size=60))
def test_decode_sample_never_raises(garbage):
    r = decode_sample(b"{" + garbage, channels=3, now=NOW, max_skew=10.0)
    assert r is None or ((r[0] is None or type(r[0]) is float) and len(r[1]) == 3)


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.sampled_from([1.0, 1.0, 1.0, 1.02, 0.97, 2.0, 3.0, 7.0, 0.0, -1.0]), max_size=300),
       length=st.integers(1, 12), hop=st.integers(1, 20), max_fill=st.integers(0, 3))
def test_push_one_is_push_of_one(steps, length, hop, max_fill):
    kw = dict(length=length, hop=hop, channels=2, sample_rate=1000.0, max_fill=max_fill)
    a, b = Windower(**kw), Windower(**kw)
    t = 5.0
    for i, s in enumerate(steps):
        t += s * 0.001
        row = [float(i), -float(i)]
        wa = a.push([t], [list(row)])
        wb = b.push_one(t, list(row))
        assert [(x, y, w.tolist()) for x, y, w in wa] == [(x, y, w.tolist()) for x, y, w in wb]
    assert a.counters == b.counters and a.rate_ok == b.rate_ok and a._dt_est == b._dt_est


class _Head:
    version = "h"

    def predict(self, z):
        return np.tile([0.7, 0.3], (len(z), 1))


def _pipeline(published):
    return build_pipeline(window=WindowConfig(length=8, hop=4, sample_rate=1000.0, max_clock_skew_s=3600.0),
                          queues=QueueConfig(max_lag_s=0.0), model=ModelConfig(max_batch=3, max_wait_ms=0.0),
                          mqtt=MqttConfig(),
                          shape=ModelShape(channels=3, window=8, sample_rate=1000.0, classes=("a", "b"), model_id="m"),
                          routes=Routes(((TopicRoute("s/{device}/{stream}"), "auto"),), TopicRoute("edge/n/labels/#"),
                                        "edge/n"),
                          ports=Ports(features=lambda x: x.mean(axis=2), head_ref=_Head,
                                      send=lambda t, p: published.append((t, p))))


def _drain(p):
    ready: list = []
    while p._drain(ready):
        pass
    if ready:
        p._serve(ready)


messages = st.lists(st.tuples(
    st.sampled_from(["s/m1/accel", "s/m2/accel", "other/x", "edge/n/labels"]),
    st.sampled_from(["good", "good", "good", "int", "gap", "back", "batch", "bad", "csv", "label"])), max_size=120)


@settings(max_examples=100, deadline=None)
@given(msgs=messages, split=st.integers(1, 50))
def test_offer_batch_serves_what_offer_message_serves(msgs, split):
    t = {"s/m1/accel": NOW, "s/m2/accel": NOW, "other/x": NOW, "edge/n/labels": NOW}
    raw = []
    for topic, kind in msgs:
        t[topic] += {"gap": 0.01, "back": -0.002}.get(kind, 0.001)
        payload = {"good": b'{"t": %r, "v": [0.5, 1.5, -2.0]}' % t[topic], "int": b'{"t": %r, "v": [1, 2, 3]}' % t[topic],
                   "gap": b'{"t": %r, "v": [0.5, 1.5, -2.0]}' % t[topic], "back": b'{"t": %r, "v": [1.0, 1.0, 1.0]}' % t[topic],
                   "batch": b'{"t0": %r, "dt": 0.001, "v": [[1,2,3],[4,5,6]]}' % t[topic], "bad": b'{"t": 1, "v": [1, 2',
                   "csv": b"%r,1,2,3" % t[topic], "label": b'{"t": %r, "label": "a"}' % t[topic]}[kind]
        raw.append((topic, payload))
    one, many = [], []
    p1, p2 = _pipeline(one), _pipeline(many)
    for topic, payload in raw:
        p1.offer_message(topic, payload, NOW)
    for k in range(0, len(raw), split):
        p2.offer_batch(raw[k:k + split], NOW)
    _drain(p1)
    _drain(p2)
    assert one == many
    assert p1.counters == p2.counters and p1.bad == p2.bad
    assert {str(k): w.counters for k, w in p1.windowers.items()} == {str(k): w.counters for k, w in p2.windowers.items()}
