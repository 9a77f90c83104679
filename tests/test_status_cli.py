"""`edge status` reads the running daemon live (its Unix socket), as a table or JSON."""
from __future__ import annotations

import json
import stat
import subprocess
import sys
import time

import pytest

from edge.config import parse_config
from edge.daemon import Daemon
from edge.state import runtime_dir
from tests.helpers import Client, batch

pytestmark = pytest.mark.timeout(120)


def test_edge_status_shows_the_live_daemon_as_a_table_and_json(broker, tmp_path):
    conf = tmp_path / "edge.toml"
    conf.write_text(f'[node]\nname = "stat"\nstate_dir = "{tmp_path / "state"}"\n'
                    f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
                    f'[model]\ncache_dir = "{tmp_path / "cache"}"\n')
    d = Daemon(parse_config({"node": {"name": "stat", "state_dir": str(tmp_path / "state")},
                             "mqtt": {"host": broker.host, "port": broker.port},
                             "model": {"cache_dir": str(tmp_path / "cache")}}))
    d.start(connect_timeout=20)
    c = Client(broker, "edge/stat/predictions/#")
    try:
        c.publish("sensors/m7/accel", batch(time.time(), 256))
        c.wait_for(lambda m: len(m) >= 1, timeout=30)
        sock = runtime_dir(d.cfg) / "edge.sock"
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        table = subprocess.run([sys.executable, "-m", "edge.cli", "status", "-c", str(conf)], capture_output=True,
                               text=True, timeout=60).stdout
        assert "node stat" in table and "m7/accel" in table and "live" in table
        js = json.loads(subprocess.run([sys.executable, "-m", "edge.cli", "status", "-c", str(conf), "--json"],
                                       capture_output=True, text=True, timeout=60).stdout)
        assert js["source"] == "live" and js["daemon"]["streams"]["m7/accel"]["windows"] == 1
    finally:
        c.close()
        d.stop()
    out = subprocess.run([sys.executable, "-m", "edge.cli", "status", "-c", str(conf)], capture_output=True,
                         text=True, timeout=60).stdout
    assert "not running" in out or "no daemon answers" in out


def test_status_file_is_private(broker, tmp_path):
    d = Daemon(parse_config({"node": {"name": "priv", "state_dir": str(tmp_path / "state")},
                             "mqtt": {"host": broker.host, "port": broker.port},
                             "model": {"cache_dir": str(tmp_path / "cache")}}))
    d.start(connect_timeout=10)
    try:
        d.write_status()
        p = runtime_dir(d.cfg) / "status.json"
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
        assert stat.S_IMODE(p.parent.stat().st_mode) & 0o077 == 0
    finally:
        d.stop()
