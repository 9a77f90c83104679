"""The README's table of metric families is what a real daemon's ``/metrics`` serves, and a
scrape reads each part once (issue 19: the learner's dict was read once per family, 80
times a scrape, and its counters were flattened into gauge names)."""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge.observe import SYNC_FAMILIES
from tests.helpers import Client, batch
from tests.test_observe import _daemon, _get

pytestmark = pytest.mark.timeout(120)
README = Path(__file__).resolve().parent.parent / "README.md"
_ROW = re.compile(r"^\| `(edge_[a-z0-9_]+)` \| (counter|gauge|histogram|info) \| ([^|]*) \|")


def readme_families() -> dict[str, str]:
    """``{family: type}`` of the README's table (family names as exposed: counters with ``_total``)."""
    return {m.group(1): m.group(2) for line in README.read_text().splitlines() if (m := _ROW.match(line))}


def served_families(text: str) -> dict[str, tuple[str, set]]:
    out = {}
    for f in text_string_to_metric_families(text):
        if f.name.startswith("edge_"):
            name = f.name + "_total" if f.type == "counter" else f.name + ("_info" if f.type == "info" else "")
            out[name] = (f.type, {k for s in f.samples for k in s.labels if k != "le"})
    return out


def test_the_readme_lists_every_family_a_real_metrics_serves_with_its_type(broker, tmp_path):
    d, port = _daemon(tmp_path, {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.1}, "fams")
    c = Client(broker, "edge/fams/predictions/#")
    try:
        d._wait_connected(20)
        c.publish("sensors/m1/accel", batch(time.time(), 256))
        c.wait_for(lambda m: len(m) >= 1, timeout=30)
        code, body = _get(port, "/metrics")
        assert code == 200
        served = served_families(body.decode())
    finally:
        c.close()
        d.stop()
    listed = readme_families()
    missing = sorted(set(served) - set(listed))
    assert not missing, "families served but not in the README's table:\n" + "\n".join(
        f"| `{n}` | {t} | {', '.join(sorted(lb))} | |" for n, (t, lb) in ((n, served[n]) for n in missing))
    assert {n: t for n, (t, _) in served.items()} == {n: listed[n] for n in served}
    # what the table lists beyond this daemon's scrape is fleet sync's (only with [fleet])
    assert set(listed) - set(served) <= {spec[0] for spec in SYNC_FAMILIES}, sorted(set(listed) - set(served))


def test_one_scrape_reads_the_learner_once(broker, tmp_path, monkeypatch):
    from edge.adapt.worker import AdaptWorker

    calls = []
    read = AdaptWorker.metrics
    monkeypatch.setattr(AdaptWorker, "metrics", lambda self: calls.append(1) or read(self))  # before the registry is built
    d, port = _daemon(tmp_path, {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.1}, "once")
    try:
        calls.clear()
        code, body = _get(port, "/metrics")
        assert code == 200 and "edge_adapt_" in body.decode()
        assert len(calls) == 1, f"one scrape read the learner's metrics {len(calls)} times"
    finally:
        d.stop()
