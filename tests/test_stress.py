"""Readers on other threads (status, metrics, scrapes) against owners that churn their state.

Every read of state shared across threads is a snapshot taken under its owner's lock
(STYLE 19). Before that, ``AdaptWorker.metrics()`` (through ``LabelMatcher.metrics()``)
iterated the matcher's per-stream dict while the learner thread added and evicted
streams, and raised ``RuntimeError: dictionary changed size during iteration`` now and
then (80 of 20,000 calls under stream churn, issue 19). Each test here runs a bounded
amount of work (no fixed sleeps, no time limits asserted) and counts the readers' errors.
"""
from __future__ import annotations

import sys
import threading
import time

import numpy as np
import orjson
import pytest

from edge.ingest.types import StreamKey
from edge.supervise import wait_until
from tests.test_adapt_worker import _worker

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def fine_switching():
    """Switch threads every microsecond, so that a reader lands inside the owner's updates often."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


class Reader(threading.Thread):
    """Calls ``read`` until told to stop; keeps every exception it raised."""

    def __init__(self, read):
        super().__init__(daemon=True)
        self.read, self.calls, self.errors = read, 0, []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.read()
            except Exception as e:  # noqa: BLE001 - what the test counts
                self.errors.append(f"{type(e).__name__}: {e}")
            self.calls += 1

    def stop(self) -> "Reader":
        self.halt.set()
        self.join(30)
        return self


def test_learner_metrics_under_stream_churn_never_raise(tmp_path, fine_switching):
    # a cache of 64 KiB holds ~110 windows: each new stream's window evicts an older stream whole
    w = _worker(tmp_path, queues={"learner_bytes": 64 << 20})
    w.matcher.max_bytes = 64 << 10
    readers = [Reader(w.metrics) for _ in range(2)]
    n = 6000
    w.start()
    try:
        for r in readers:
            r.start()
        z = np.ones(64, np.float32)
        for i in range(n):
            w.offer_window(StreamKey(f"d{i}", "s"), float(i), i + 1.0, z, np.full(4, 0.25, np.float32))
            if i % 7 == 0:
                w.offer_label(StreamKey(f"d{i}", "s"), i + 0.5, "normal")
        assert wait_until(lambda: w.metrics()["lane_learner_taken"] == n, timeout=90)
    finally:
        for r in readers:
            r.stop()
        w.stop()
    errors = [e for r in readers for e in r.errors]
    assert sum(r.calls for r in readers) > 0 and not errors, f"{len(errors)} failed reads, e.g. {errors[:3]}"


def test_a_real_daemon_serves_status_and_metrics_while_streams_and_labels_churn(broker, tmp_path, fine_switching):
    # streams appear (in the pipeline's bank and the learner's cache, whose byte bound evicts
    # whole streams), labels and bad input arrive, while status and /metrics readers run
    from edge.config import parse_config
    from edge.daemon import Daemon
    from tests.helpers import Client, batch

    cfg = parse_config({"node": {"name": "churn", "state_dir": str(tmp_path / "state")},
                        "mqtt": {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.1},
                        "model": {"cache_dir": str(tmp_path / "cache")}, "adapt": {"label_cache_bytes": 64 << 10}})
    d = Daemon(cfg)
    d.start(connect_timeout=20)
    d.adapt.matcher.max_bytes = 16 << 10  # below the config's floor: ~28 windows, so streams churn from the start
    reg = d.registry()
    readers = [Reader(d.status), Reader(reg.render)]
    c = Client(broker)
    n = 600
    try:
        for r in readers:
            r.start()
        t = time.time()
        for i in range(n):  # a window on a new stream each, a label for it, and a bad input kind now and then
            c.c.publish(f"sensors/dev{i}/s{i % 3}", orjson.dumps(batch(t, 256)), qos=0)
            c.c.publish(f"edge/churn/labels/dev{i}/s{i % 3}", orjson.dumps({"t": t + 0.1, "label": "normal"}), qos=0)
            if i % 10 == 0:
                c.c.publish(f"sensors/bad{i}/s", b"{not json", qos=0)
        c.publish("sensors/last/s", batch(t, 256))  # QoS 1 after the rest: then wait for them all
        assert wait_until(lambda: d.pipeline.counters["windows_served"] >= n + 1, timeout=90)
        assert wait_until(lambda: d.adapt.metrics()["lane_learner_taken"] >= n + 1, timeout=90)
    finally:
        for r in readers:
            r.stop()
        c.close()
        d.stop()
    errors = [e for r in readers for e in r.errors]
    assert all(r.calls > 0 for r in readers) and not errors, f"{len(errors)} failed reads, e.g. {errors[:3]}"
    assert not reg._failed, reg._failed  # no family's reader failed at a scrape either
