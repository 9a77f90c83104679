"""`edge status` tells the truth about a real `edge run` process (issue 21): it finds the daemon
by the same config rule as `edge run`, shows the backend and human names, says STALE (never
live) after the daemon stopped, and exits non-zero when no daemon answers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faultkit import ROOT, config_doc, free_port, healthz, poll, toml

pytestmark = pytest.mark.timeout(180)


def _status(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge.cli", "status", *args], capture_output=True, text=True,
                          timeout=60, env=env)


@pytest.fixture
def daemon_by_env(broker, tmp_path):
    """`edge run` with no --config: it reads $EDGE_CONFIG, as `edge status` must too."""
    port = free_port()
    conf = tmp_path / "edge.toml"
    conf.write_text(toml(config_doc(broker, tmp_path, node="truth", metrics_port=port, adapt=True)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGE_CONFIG": str(conf)}
    log = tmp_path / "run.log"
    proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "run"], stderr=open(log, "wb"),
                            stdout=subprocess.DEVNULL, env=env)

    def healthy():
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            return healthz(port) == 200
        except OSError:
            return False
    try:
        poll(healthy, 90, 0.2, "edge run to become healthy")
        yield proc, env, conf
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_status_finds_the_daemon_run_started_without_a_config_flag(daemon_by_env):
    proc, env, _ = daemon_by_env
    p = _status(env)
    assert p.returncode == 0, p.stdout + p.stderr
    head = p.stdout.splitlines()[0]
    assert head.startswith("node truth") and head.endswith("· live")
    assert "backend ?" not in head and "backend onnxruntime" in head  # the daemon sends "backend"
    learner = [line for line in p.stdout.splitlines() if line.startswith("learner:")]
    assert learner and "labels taken" in learner[0] and "learner_" not in learner[0]
    js = json.loads(_status(env, "--json").stdout)
    assert js["live"] is True and js["source"] == "live"


def test_status_after_the_daemon_stopped_is_stale_and_exits_1(daemon_by_env):
    proc, env, conf = daemon_by_env
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    p = _status(env)
    assert p.returncode == 1
    head = p.stdout.splitlines()[0]
    assert "live" not in head and ("STALE" in head or head.startswith("not running"))
    js = json.loads(_status(env, "--json").stdout)
    assert js["live"] is False


def test_status_with_no_daemon_at_all_exits_1_and_says_how_to_point_it(tmp_path):
    conf = tmp_path / "none.toml"
    conf.write_text(f'[node]\nname = "none"\nstate_dir = "{tmp_path / "state"}"\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EDGE_CONFIG", None)
    p = _status(env, "--config", str(conf))
    assert p.returncode == 1 and p.stdout.startswith("not running")
    env["HOME"] = str(tmp_path)  # the built-in default state folder, empty here
    p = _status(env)
    if not Path("/etc/edge-runtime/edge.toml").exists():
        assert p.returncode == 1 and "--config" in p.stdout and "EDGE_CONFIG" in p.stdout
