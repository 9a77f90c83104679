"""Observability follows Prometheus conventions (parsed with prometheus-client's own parser),
and liveness and readiness are separate endpoints a load balancer understands."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge.broker import free_port
from edge.config import parse_config
from edge.daemon import Daemon
from tests.helpers import Client, batch

pytestmark = pytest.mark.timeout(120)


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _daemon(tmp_path, mqtt: dict, node: str, **metrics):
    port = free_port()
    cfg = parse_config({"node": {"name": node, "state_dir": str(tmp_path / "state")}, "mqtt": mqtt,
                        "model": {"cache_dir": str(tmp_path / "cache")}, "metrics": {"port": port, **metrics}})
    d = Daemon(cfg)
    d.start(connect_timeout=0)
    return d, port


def test_metrics_parse_with_prometheus_client_and_have_proper_types(broker, tmp_path):
    d, port = _daemon(tmp_path, {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.1}, "prom")
    c = Client(broker, "edge/prom/predictions/#")
    try:
        d._wait_connected(20)
        c.publish("sensors/m1/accel", batch(time.time(), 256))
        c.wait_for(lambda m: len(m) >= 1, timeout=30)
        code, body = _get(port, "/metrics")
        assert code == 200
        fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
        # counters are counters (exposed as *_total), gauges gauges, histograms histograms
        assert fams["edge_windows_served"].type == "counter"
        assert [s.name for s in fams["edge_windows_served"].samples if s.name.endswith("_total")]
        assert fams["edge_lane_depth_bytes"].type == "gauge"
        assert fams["edge_pipeline_latency_seconds"].type == "histogram"
        assert fams["edge_internal_errors"].type == "counter"
        # one quantity per family: the ingest connection's bytes and messages are apart
        assert fams["edge_mqtt_bytes"].type == "counter" and fams["edge_mqtt_messages"].type == "counter"
        assert {s.labels["connection"] for s in fams["edge_mqtt_messages"].samples} == {"ingest"}
        assert {s.labels["connection"] for s in fams["edge_mqtt_connects"].samples} == {"link", "ingest"}
        assert not any(name == "edge_adapt" for name in fams)
        assert fams["edge_adapt_learner_labels"].type == "counter"
        assert fams["edge_adapt_learner_labels_rejected"].type == "counter"
        assert any(n.startswith("process_") for n in fams) and "edge_build_info" in fams
        # every lane of every thread in one family per quantity, told apart by labels
        lanes = {(s.labels["thread"], s.labels["lane"]) for s in fams["edge_lane_items"].samples}
        assert lanes == {("pipeline", "sensor"), ("pipeline", "labels"), ("pipeline", "control"),
                         ("learner", "learner"), ("learner", "labels"), ("learner", "fleet")}
        # the learner's counters are counters, their reasons and outcomes labels, not names
        assert fams["edge_adapt_checkpoints"].type == "counter"
        assert {s.labels["outcome"] for s in fams["edge_adapt_checkpoints"].samples} >= {"written", "failed"}
        assert not [n for n in fams if n.startswith("edge_adapt_lane_") or n.startswith("edge_adapt_worker_")]
        edge_counters = [f for n, f in fams.items() if n.startswith("edge_") and f.type == "counter"]
        assert edge_counters and all(s.name.endswith(("_total", "_created")) for f in edge_counters for s in f.samples)
    finally:
        c.close()
        d.stop()


def test_readyz_fails_while_the_broker_is_down_and_healthz_stays_live(tmp_path):
    d, port = _daemon(tmp_path, {"host": "127.0.0.1", "port": free_port(), "reconnect_min_s": 0.1,
                                 "reconnect_max_s": 0.5}, "nobroker", status_endpoint=True)
    try:
        code, body = _get(port, "/readyz")
        assert code == 503 and json.loads(body)["node_connection"] is False
        code, body = _get(port, "/healthz")
        assert code == 200 and json.loads(body)["dead_threads"] == {}
        code, body = _get(port, "/status")  # asked for with [metrics] status_endpoint = true (off by default)
        assert code == 200 and json.loads(body)["node"] == "nobroker"
    finally:
        d.stop()


def test_readyz_turns_ready_once_connected(broker, tmp_path):
    d, port = _daemon(tmp_path, {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.1}, "rdy")
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _get(port, "/readyz")[0] != 200:
            time.sleep(0.1)
        code, body = _get(port, "/readyz")
        assert code == 200 and json.loads(body)["model_loaded"] is True
    finally:
        d.stop()


def test_logs_under_journald_carry_their_priority_and_no_colour(tmp_path):
    import subprocess
    import sys

    code = ("from edge.observe import setup_logging; import logging; setup_logging('info'); "
            "logging.getLogger('edge.t').warning('disk full'); logging.getLogger('edge.t').error('bad')")
    j = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**__import__("os").environ,
                       "JOURNAL_STREAM": "8:1234"}, timeout=60)
    assert j.stderr.splitlines() == ["<4>edge.t: disk full", "<3>edge.t: bad"]
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                           env={k: v for k, v in __import__("os").environ.items() if k != "JOURNAL_STREAM"})
    assert "WARNING" in plain.stderr and "\x1b[" not in plain.stderr
