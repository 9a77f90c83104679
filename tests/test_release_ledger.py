"""The server's per-device chunk bound and its no-duplicate rule (edge.fleet.release_ledger):
pure properties by hypothesis, then a flood of signed chunk requests from one device against
a real FleetServer and mosquitto (the rate bound holds, each asked chunk is accounted for,
and another device is still served in full).
"""
from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.fleet import release_codec as rc
from edge.fleet.keys import load_private, load_public
from edge.fleet.release import make_release
from edge.fleet.release_ledger import ChunkLedger
from edge.fleet.store import open_store
from tests.helpers import poll
from tests.test_release_server import MODEL, _cfg, _server, devices, keys  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(120)

_requests = st.lists(st.tuples(st.sampled_from(["a", "b"]), st.floats(0, 2.0),
                               st.lists(st.integers(0, 40), min_size=1, max_size=16, unique=True)),
                     min_size=1, max_size=60)


@settings(max_examples=200, deadline=None)
@given(_requests, st.floats(0.5, 50), st.integers(1, 64))
def test_no_device_is_sent_more_than_its_burst_plus_its_rate(reqs, rate, burst):
    led, now, t0, sent = ChunkLedger(rate=rate, burst=burst), 0.0, 0.0, {"a": 0, "b": 0}
    for node, dt, indices in reqs:
        now += dt
        send, dup, limited = led.plan(node, "r", indices, asked_at=now, now=now)
        assert len(send) + dup + limited == len(indices)
        for i in send:
            led.sent(node, "r", i, now)
        sent[node] += len(send)
        assert sent[node] <= burst + rate * (now - t0) + 1e-9


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=16, unique=True), st.floats(0, 5), st.floats(0.001, 5))
def test_a_chunk_is_skipped_only_when_it_was_sent_after_the_ask(indices, sent_at, gap):
    led = ChunkLedger(rate=1e6, burst=10_000)
    for i in indices:
        led.sent("a", "r", i, sent_at)
    before = led.plan("a", "r", indices, asked_at=sent_at - gap, now=sent_at + 10)
    after = led.plan("a", "r", indices, asked_at=sent_at + gap, now=sent_at + 10)
    other = led.plan("a", "other-release", indices, asked_at=sent_at - gap, now=sent_at + 10)
    assert before == ([], len(indices), 0)  # asked before the answer left: the same wait
    assert after == (list(indices), 0, 0)  # asked after it left: lost on the way, sent again
    assert other == (list(indices), 0, 0)


def test_a_chunk_request_flood_from_one_device_is_bounded_and_others_are_served(tmp_path, broker, keys, devices):
    cfg = _cfg(tmp_path, keys, broker)
    store = open_store(cfg.server.store)
    make_release(cfg, store, MODEL.path, load_private(keys["release"].private_path), waves="100")
    server = _server(cfg)
    try:
        flood, calm = devices["n1"], devices["n2"]
        m = flood.manifest(load_public(keys["release"].public_path))
        starts = [s for s in range(0, m.n_chunks, rc.MAX_COUNT)]
        asked = 0
        t0 = time.monotonic()
        for k in range(40):
            s = starts[k % len(starts)]
            flood.get(m, s, rc.MAX_COUNT)
            asked += min(rc.MAX_COUNT, m.n_chunks - s)
        c = server.releases.counters
        poll(lambda: sum(n for (k, o), n in list(c.items()) if k == "request") >= 40, 60, what="the 40 requests handled")
        elapsed = time.monotonic() - t0

        sent, dup, limited = c[("chunk", "sent")], c[("chunk", "duplicate_skipped")], c[("chunk", "rate_limited")]
        led = server.releases.ledger
        assert sent + dup + limited == asked
        assert sent <= led.burst + led.rate * elapsed, (sent, elapsed)
        assert sent < asked  # 40 requests of up to 16 chunks each: far over the bound
        flood.wait(lambda d: len(d.chunks) >= sent, "the chunks sent")

        calm.get(m, 0, rc.MAX_COUNT)
        calm.wait(lambda d: len(d.chunks) >= rc.MAX_COUNT, "another device's chunks, in full")
        text = server.registry().render()
        assert 'edge_fleet_release_chunks_skipped_total{reason="rate_limited"}' in text
    finally:
        server.stop()
        store.close()
