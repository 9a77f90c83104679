"""The daemon as a process: starts before its broker, stops cleanly on SIGTERM."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge.broker import BrokerProcess, free_port
from edge.config import parse_config
from edge.daemon import Daemon
from tests.helpers import Client, batch

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parent.parent


def test_daemon_started_before_its_broker_connects_when_it_appears(tmp_path):
    port = free_port()
    cfg = parse_config({"node": {"name": "early", "state_dir": str(tmp_path)},
                        "mqtt": {"host": "127.0.0.1", "port": port, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5},
                        "model": {"cache_dir": str(tmp_path / "cache")}, "adapt": {"enabled": False}})
    d = Daemon(cfg)
    d.start(connect_timeout=0.5)  # nobody listens yet: start anyway, keep trying
    try:
        assert d.ready.is_set() and not d.health()[1]["broker_connected"]
        with BrokerProcess(port=port, kind="mosquitto") as b:
            assert d.link.wait_connected(15) and d.ingest.wait_connected(15)
            c = Client(b, "edge/early/predictions/#")
            c.publish("sensors/late/accel", batch(time.time(), 256))
            c.wait_for(lambda m: len(m) >= 1)
            assert d.health() == (True, {**d.health()[1], "broker_connected": True})
            c.close()
    finally:
        d.stop()


def test_sigterm_stops_edge_run_cleanly_with_offline_status_and_a_checkpoint(broker, tmp_path):
    cfg = tmp_path / "edge.toml"
    state = tmp_path / "var" / "state"  # neither folder exists: the daemon makes both, private
    run = tmp_path / "run"  # the runtime folder (a tmpfs under systemd): status.json lives there, not on flash
    cfg.write_text(f'[node]\nname = "term"\nstate_dir = "{state}"\nruntime_dir = "{run}"\n'
                   f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n[model]\ncache_dir = "{tmp_path / "cache"}"\n')
    log = tmp_path / "edge.log"
    p = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", "--config", str(cfg)], stderr=open(log, "wb"),
                         stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    c = Client(broker, "edge/term/status")
    try:
        c.wait_for(lambda m: m and m[-1][1] == b"online", timeout=60)
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0, log.read_text()[-2000:]
        c.wait_for(lambda m: m[-1][1] == b"offline")
        text = log.read_text()
        assert "stopping" in text and "stopped" in text and "Traceback" not in text
        assert list((state / "term" / "adapt").glob("*")), "no checkpoint written at shutdown"
        assert (run / "term" / "status.json").exists()
        for d in (tmp_path / "var", state, state / "term", state / "term" / "adapt"):
            assert d.stat().st_mode & 0o777 == 0o700, d
    finally:
        c.close()
        if p.poll() is None:
            p.kill()


def test_run_drains_checkpoints_and_says_offline_whatever_ends_its_loop(broker, tmp_path):
    # the main loop's own status write fails (an error no thread's supervision sees): run()
    # must still stop (drain, final checkpoint) and publish "offline", and exit non-zero
    cfg = parse_config({"node": {"name": "loopfail", "state_dir": str(tmp_path / "state")},
                        "mqtt": {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.1},
                        "model": {"cache_dir": str(tmp_path / "cache")}})
    d = Daemon(cfg)
    calls = []

    def failing_status():
        calls.append(1)
        raise RuntimeError("injected: the status write broke")
    d.write_status = failing_status
    c = Client(broker, "edge/loopfail/status")
    try:
        assert d.run() == 1
        assert d._stop.is_set() and len(calls) == 2  # the loop's write, then the final one
        c.wait_for(lambda m: m and m[-1][1] == b"offline", timeout=20)
        assert list((tmp_path / "state" / "loopfail" / "adapt").glob("*")), "no final checkpoint"
    finally:
        c.close()
        d.stop()


def test_the_serving_choice_is_logged_once_and_the_ready_line_names_the_backend(tmp_path, caplog):
    import logging

    cfg = parse_config({"node": {"name": "quiet", "state_dir": str(tmp_path)},
                        "model": {"cache_dir": str(tmp_path / "cache")}, "adapt": {"enabled": False}})
    d = Daemon(cfg)
    with caplog.at_level(logging.INFO):
        d._load_model()
    reason = d.backend_reason
    assert reason and sum(reason in r.getMessage() for r in caplog.records) == 1
    ready = [r.getMessage() for r in caplog.records if "ready to serve" in r.getMessage()]
    backend = d.engine.describe()["backend"]
    assert len(ready) == 1 and f" on {backend} " in ready[0], ready
