"""Operations: the fleet server's start-up checks and --check, its password_file, paged
listings, private state folders, and fleet sync on /metrics and in `edge status`.

Commands run as real processes; the broker is a real mosquitto, the store a real SQLite.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import paho.mqtt.client as mqtt
import pytest

from edge.broker import BrokerProcess, free_port
from edge.config import parse_config
from edge.fleet.heads import global_topic
from edge.fleet.store import open_store
from tests.fleet_helpers import make_keys, server_toml

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(120)
NOWHERE = SimpleNamespace(host="127.0.0.1", port=1)  # --check never connects


def _edge(*args: str, cwd: Path, timeout: float = 100) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge.cli", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _server(tmp_path: Path, broker=NOWHERE, *, store: str | None = None) -> Path:
    keys = make_keys(tmp_path, ["d1"])
    return server_toml(tmp_path, keys, broker, store=store or str(tmp_path / "fleet.db"))


def _edit(path: Path, old: str, new: str) -> Path:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    return path


# --- fleet-server run --check: every start-up check, with the run's exit codes ------------------

def test_fleet_server_check_passes_on_a_good_config_without_starting(tmp_path):
    r = _edge("fleet-server", "run", "--check", "--config", str(_server(tmp_path)), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "OK" in r.stdout and "1 device key(s)" in r.stdout and "store at version" in r.stdout


@pytest.mark.parametrize("fault, code, says", [
    ("key_file", 9, "cannot read the private key"),
    ("devices_dir", 2, "[server] devices_dir"),
    ("store", 7, "[server] store"),
    ("plaintext", 2, "not on loopback"),
])
def test_fleet_server_check_fails_where_run_fails_with_the_same_code(tmp_path, fault, code, says):
    cfg = _server(tmp_path)
    if fault == "key_file":
        (tmp_path / "keys" / "srv.server.key").unlink()
    elif fault == "devices_dir":
        shutil.rmtree(tmp_path / "devices")
    elif fault == "store":
        (tmp_path / "afile").write_text("")
        _edit(cfg, f'store = "{tmp_path / "fleet.db"}"', f'store = "{tmp_path / "afile" / "fleet.db"}"')
    else:
        _edit(cfg, 'host = "127.0.0.1"', 'host = "192.0.2.10"')
    check = _edge("fleet-server", "run", "--check", "--config", str(cfg), cwd=tmp_path)
    run = _edge("fleet-server", "run", "--config", str(cfg), cwd=tmp_path)
    assert check.returncode == run.returncode == code, (check.stderr[-1000:], run.stderr[-1000:])
    assert says in check.stderr.splitlines()[-1]
    assert check.stderr.splitlines()[-1] == run.stderr.splitlines()[-1]


# --- the fleet server reads [mqtt] password_file, as the daemon does ----------------------------

def test_fleet_server_connects_with_its_password_file(tmp_path):
    if not shutil.which("mosquitto_passwd"):
        pytest.skip("mosquitto_passwd is not installed")
    shared = Path(tempfile.mkdtemp(prefix="edge-pw-"))  # mosquitto reads it after dropping root
    os.chmod(shared, 0o755)
    try:
        subprocess.run(["mosquitto_passwd", "-b", "-c", str(shared / "passwd"), "fleet-server", "s3cret"], check=True,
                       capture_output=True)
        os.chmod(shared / "passwd", 0o644)
        secret = tmp_path / "mqtt.secret"
        secret.write_text("s3cret\n")
        secret.chmod(0o600)
        with BrokerProcess(kind="mosquitto", extra_conf=f"allow_anonymous false\npassword_file {shared / 'passwd'}\n") as b:
            cfg = _server(tmp_path, b)
            cfg.write_text(cfg.read_text() + f'username = "fleet-server"\npassword_file = "{secret}"\n')
            got = threading.Event()
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
            c.username_pw_set("fleet-server", "s3cret")
            c.on_connect = lambda cl, *a: cl.subscribe(global_topic("fleet", "test", "vibration"), qos=1)
            c.on_message = lambda *a: got.set()
            c.connect(b.host, b.port)
            c.loop_start()
            p = subprocess.Popen([sys.executable, "-m", "edge.cli", "fleet-server", "run", "--config", str(cfg)],
                                 stdout=subprocess.DEVNULL, stderr=open(tmp_path / "srv.log", "wb"), cwd=tmp_path,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
            try:
                assert got.wait(60), "no global head: the server did not get in\n" + (tmp_path / "srv.log").read_text()[-2000:]
            finally:
                p.terminate()
                p.wait(30)
                c.loop_stop()
                c.disconnect()
    finally:
        shutil.rmtree(shared, ignore_errors=True)


# --- paged listings ---------------------------------------------------------------------------

def test_versions_and_devices_are_paged_and_say_what_they_leave_out(tmp_path):
    cfg = _server(tmp_path)
    store = open_store(str(tmp_path / "fleet.db"))
    try:
        store.ensure_version0(b"v0")
        for i in range(20):
            store.add_version(lambda v: b"head", f"n{i}")
        store.count_rejections([(f"dev-{i:02d}", "bad_signature") for i in range(7)])
    finally:
        store.close()
    r = _edge("fleet-server", "versions", "--limit", "5", "--config", str(cfg), cwd=tmp_path)
    lines = r.stdout.splitlines()
    assert r.returncode == 0, r.stderr[-2000:]
    assert [ln.split("\t")[0] for ln in lines[:-1]] == ["20", "19", "18", "17", "16"]
    assert lines[-1] == "... 16 older versions: --before 16"
    r = _edge("fleet-server", "versions", "--limit", "100", "--before", "3", "--config", str(cfg), cwd=tmp_path)
    assert [ln.split("\t")[0] for ln in r.stdout.splitlines()] == ["2", "1", "0"]  # nothing left out: no last line
    r = _edge("fleet-server", "devices", "--limit", "3", "--after", "dev-02", "--config", str(cfg), cwd=tmp_path)
    lines = r.stdout.splitlines()
    assert [ln.split('"')[3] for ln in lines[:-1]] == ["dev-03", "dev-04", "dev-05"]
    assert lines[-1] == "... 1 more device: --after dev-05"


# --- private state folders --------------------------------------------------------------------

def test_every_folder_made_for_the_state_dir_is_0700(tmp_path):
    from edge.daemon import Daemon

    old = os.umask(0o022)
    try:
        cfg = parse_config({"node": {"name": "n1", "state_dir": str(tmp_path / "var" / "lib" / "edge")}})
        Daemon(cfg)._prepare_state_dir()
    finally:
        os.umask(old)
    for d in (tmp_path / "var", tmp_path / "var" / "lib", tmp_path / "var" / "lib" / "edge",
              tmp_path / "var" / "lib" / "edge" / "n1"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


# --- fleet sync on /metrics and in `edge status` ----------------------------------------------

def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def fleet_daemon(broker, tmp_path):
    from edge.daemon import Daemon

    keys = make_keys(tmp_path, ["d1"])
    port = free_port()
    cfg = parse_config({"node": {"name": "d1", "state_dir": str(tmp_path / "state")},
                        "mqtt": {"host": broker.host, "port": broker.port},
                        "model": {"cache_dir": str(tmp_path / "cache")}, "metrics": {"port": port},
                        "fleet": {"enabled": True, "fleet": "test", "key_file": str(keys["d1"].private_path),
                                  "server_key": str(keys["server"].public_path), "interval_s": 3600.0}})
    d = Daemon(cfg)
    d.start(connect_timeout=10)
    try:
        yield d, port, tmp_path
    finally:
        d.stop()


def test_sync_families_are_on_metrics_from_the_start_once_each(fleet_daemon):
    from edge.observe import sync_keys

    d, port, _ = fleet_daemon
    code, text = _get(port, "/metrics")
    assert code == 200
    assert 'edge_fleet_sync_deltas_total{outcome="acked"} 0.0' in text
    assert 'edge_fleet_sync_globals_total{outcome="rebased"} 0.0' in text
    assert 'edge_fleet_sync_receipts_total{outcome="accepted"} 0.0' in text
    assert "# TYPE edge_fleet_sync_receipts_refused_total counter" in text  # by reason: no series before the first
    assert "# TYPE edge_fleet_sync_globals_refused_total counter" in text and "edge_fleet_sync_errors_total 0.0" in text
    assert "edge_fleet_sync_base_version 0.0" in text and "edge_fleet_sync_seq 0.0" in text
    assert "sync_sync" not in text
    # every name the client reports is exported by a declared family (a new counter needs its line)
    assert set(d.sync.metrics()) <= sync_keys(), set(d.sync.metrics()) - sync_keys()


def test_status_is_not_on_the_metrics_port_unless_asked_for(fleet_daemon):
    _, port, _ = fleet_daemon
    assert _get(port, "/status")[0] == 404
    assert _get(port, "/healthz")[0] == 200


def test_edge_status_shows_the_sync_state(fleet_daemon, capsys):
    from edge.cli import main

    d, _, tmp_path = fleet_daemon
    cfg = tmp_path / "edge.toml"
    cfg.write_text(f'[node]\nname = "d1"\nstate_dir = "{tmp_path / "state"}"\n')
    assert main(["status", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("fleet sync:"))
    assert "base version 0" in line and "seq 0" in line and "outbox empty" in line


def test_every_counter_the_sync_client_counts_has_a_family():
    """Also those that are zero at start (absent from ``metrics()`` until counted once)."""
    import re

    from edge.observe import sync_keys

    counted = set()
    for name in ("client.py", "courier.py"):  # the client and the delivery part it hands its counters to
        src = ROOT / "edge" / "fleet" / name
        if src.exists():
            counted |= {f"sync_{n}" for n in re.findall(r'\b(?:self|c)\.counters\["(\w+)"\]', src.read_text())}
    assert {"sync_prepared", "sync_acked"} <= counted
    assert counted <= sync_keys(), counted - sync_keys()
