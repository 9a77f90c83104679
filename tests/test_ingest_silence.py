"""Readiness notices a connected source that went silent (issue 19): real broker, real daemon."""
from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.config import parse_config
from edge.daemon import Daemon
from edge.ingest.silence import SilenceWatch
from edge.supervise import wait_until
from tests.helpers import Client, batch

pytestmark = pytest.mark.timeout(120)


def test_readiness_turns_false_when_a_flowing_source_goes_silent_and_back_when_it_resumes(broker, tmp_path):
    d = Daemon(parse_config({"node": {"name": "sil", "state_dir": str(tmp_path / "state")},
                             "mqtt": {"host": broker.host, "port": broker.port},
                             "model": {"cache_dir": str(tmp_path / "cache")},
                             "metrics": {"source_silent_s": 1.0}}))
    ev = Client(broker, "edge/sil/events")
    d.start(connect_timeout=20)
    c = Client(broker)
    try:
        assert wait_until(lambda: d.readiness()[0], timeout=30)  # connected, nothing received yet: not judged
        c.publish("sensors/m1/accel", batch(time.time(), 64))
        assert wait_until(lambda: d.ingest.counters["messages"] >= 1, timeout=30)
        # no more input; the connection stays up (pings go on)
        assert wait_until(lambda: not d.readiness()[0], timeout=30)
        ok, info = d.readiness()
        assert info["sources"] == {"mqtt": True} and set(info["silent_sources"]) == {"mqtt"}
        assert d.ingest.connected.is_set() and info["node_connection"]
        (silent,) = ev.wait_for(lambda m: [e for e in ev.json_on("edge/sil/events") if e["type"] == "source_silent"])
        assert silent["source"] == "mqtt" and "source_silent_s" in silent["why"]
        c.publish("sensors/m1/accel", batch(time.time(), 64))
        assert wait_until(lambda: d.readiness()[0], timeout=30)
        ev.wait_for(lambda m: [e for e in ev.json_on("edge/sil/events") if e["type"] == "source_resumed"])
    finally:
        c.close()
        ev.close()
        d.stop()


@given(st.lists(st.tuples(st.integers(0, 3), st.floats(0, 5), st.booleans()), max_size=40))
def test_a_source_is_silent_only_after_flowing_and_a_connected_quiet_spell(steps):
    """Replays random (new messages, elapsed seconds, connected) steps against a plain model."""
    w, after = SilenceWatch(2.0), 2.0
    now, count, flowing, since, silent = 0.0, 0, False, 0.0, False
    w.observe("s", 0, now=now, connected=True)
    for more, dt, conn in steps:
        now += dt
        count += more
        change = w.observe("s", count, now=now, connected=conn)
        if more:
            expect = "resumed" if silent else None
            flowing, since, silent = True, now, False
        elif not conn:
            since, expect = now, None
        elif flowing and not silent and now - since >= after:
            silent, expect = True, "silent"
        else:
            expect = None
        assert change == expect
        assert set(w.silent(now)) == ({"s"} if silent else set())
