"""Several device processes and one fleet server on a real broker and a real SQLite store.

Deltas flow, versions advance, devices rebase; a device offline for a while catches up
with everything it learned; ``kill -9`` of a device loses and double-counts nothing; a
forged global head is refused by every device. "Nothing lost" is checked exactly: the
sample counts of a device's stored deltas add up to the labels it had sent when it
last sent, and its sequence numbers are 1..N without a gap.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge.fleet.codec import Header, encode_tensor, pack_message
from edge.fleet.keys import generate_key
from edge.fleet.store import open_store
from edge.zoo import resolve_model
from tests.fleet_helpers import make_keys, server_toml

ROOT = Path(__file__).resolve().parent.parent
NODES = ("d1", "d2", "d3")
pytestmark = pytest.mark.timeout(600)


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _device_toml(root: Path, keys: dict, broker, node: str, fleet_extra: str = "") -> Path:
    p = root / f"{node}.toml"
    p.write_text(f'''[node]
name = "{node}"
state_dir = "{root / 'state'}"

[mqtt]
host = "{broker.host}"
port = {broker.port}
reconnect_min_s = 0.1
reconnect_max_s = 1.0

[model]
path = "{resolve_model('vibration').path}"

[adapt]
checkpoint_interval_s = 1.0

[fleet]
enabled = true
fleet = "test"
interval_s = 0.5
encoding = "topk8"
topk_fraction = 0.05
key_file = "{keys[node].private_path}"
server_key = "{keys['server'].public_path}"
{fleet_extra}
''')
    return p


class Fleet:
    def __init__(self, root: Path, broker, *, nodes=NODES, server_extra: str = ""):
        self.root, self.broker = root, broker
        self.keys = make_keys(root, nodes)
        self.db = root / "fleet.db"
        self.server_cfg = server_toml(root, self.keys, broker, store=str(self.db), k=3, t_s=1.0)
        if server_extra:  # more [server] keys (the helper writes [server] first, then [mqtt])
            text = self.server_cfg.read_text()
            self.server_cfg.write_text(text.replace("\n[mqtt]\n", f"\n{server_extra}\n\n[mqtt]\n", 1))
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs = root / "logs"
        self.logs.mkdir()

    def start_server(self):
        self.procs["server"] = self._spawn("server", [sys.executable, "-m", "edge.cli", "fleet-server", "run", "-c",
                                                     str(self.server_cfg)])

    def start_device(self, node: str, seed: int, fleet_extra: str = ""):
        cfg = _device_toml(self.root, self.keys, self.broker, node, fleet_extra)
        self.procs[node] = self._spawn(node, [sys.executable, str(ROOT / "tests" / "fleet_device.py"), str(cfg),
                                              str(self.status_path(node)), str(seed)])

    def _spawn(self, name, cmd):
        log = open(self.logs / f"{name}.log", "ab")
        try:
            return subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        finally:
            log.close()

    def status_path(self, node):
        return self.root / f"{node}.status.json"

    def status(self, node) -> dict:
        """The device's last status; {} only if none could be read for 5 s (one loaded run
        of the suite read {} here once, cause not found: the writer replaces the file atomically)."""
        for _ in range(100):
            try:
                st = json.loads(self.status_path(node).read_text())
                if st:
                    return st
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        return {}

    def wait(self, pred, timeout=120.0, what=""):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = pred()
            if v:
                return v
            time.sleep(0.2)
        logs = {p.name: p.read_text(errors="replace")[-1500:] for p in self.logs.glob("*.log")}
        raise AssertionError(f"timed out waiting for {what}; logs: {logs}")

    def stored(self, node):
        s = open_store(str(self.db))
        try:
            return sorted((d.seq, d.samples, d.applied_version) for d in s.deltas() if d.node == node)
        finally:
            s.close()

    def versions(self):
        s = open_store(str(self.db))
        try:
            return s.versions()
        finally:
            s.close()

    def assert_nothing_lost(self, node):
        """Stored seqs are 1..N, and their samples add up to what the device had sent by seq S."""
        def settled():
            st = self.status(node)
            if not st or st["outbox"] or st["seq"] == 0 or st.get("unreceipted"):
                return None
            rows = self.stored(node)
            return (st, rows) if rows and rows[-1][0] >= st["seq"] else None

        st, rows = self.wait(settled, what=f"{node}'s deltas to settle and be receipted")
        seqs = [r[0] for r in rows]
        assert seqs == list(range(1, len(seqs) + 1)), f"{node}: a gap or a duplicate in {seqs}"
        assert sum(r[1] for r in rows if r[0] <= st["seq"]) == st["labels_at_send"], (rows, st)

    def stop(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, broker):
    f = Fleet(tmp_path_factory.mktemp("fleet"), broker)
    f.start_server()
    for i, n in enumerate(NODES):
        f.start_device(n, seed=i)
    yield f
    f.stop()


def test_deltas_flow_versions_advance_and_devices_rebase(fleet):
    fleet.wait(lambda: all(fleet.status(n).get("base_version", 0) >= 2 for n in NODES), what="every device on version >= 2")
    vs = fleet.versions()
    assert vs[0].version >= 2 and all(v.n_deltas > 0 for v in vs if v.version > 0 and "rollback" not in v.note)
    assert all(fleet.status(n)["global_version"].startswith("fleet-") for n in NODES)
    for n in NODES:
        fleet.assert_nothing_lost(n)
        st = fleet.status(n)  # every delta was answered by the server, and accepted
        assert st["counters"].get("receipts_accepted", 0) >= 1 and not st["receipts_refused"], st


def test_an_offline_device_catches_up_with_everything_it_learned(fleet):
    p = fleet.procs["d3"]
    before = fleet.status("d3")
    p.send_signal(signal.SIGUSR1)
    fleet.wait(lambda: not fleet.status("d3").get("connected"), what="d3 offline")
    off = fleet.status("d3")
    fleet.wait(lambda: fleet.status("d3")["labels"] >= off["labels"] + 150, what="d3 learning offline")
    during = fleet.status("d3")
    assert during["seq"] <= off["seq"] + 1  # at most one delta prepared, waiting in the outbox
    assert fleet.stored("d3")[-1][0] <= off["seq"]
    p.send_signal(signal.SIGUSR2)
    fleet.wait(lambda: fleet.status("d3")["labels_at_send"] >= during["labels"] and not fleet.status("d3")["outbox"],
               what="d3's offline learning sent")
    fleet.assert_nothing_lost("d3")
    fleet.wait(lambda: fleet.status("d3")["base_version"] > before["base_version"], what="d3 rebased after catching up")


def test_kill_9_between_send_and_ack_loses_and_double_counts_nothing(fleet):
    # deterministic case: the delta is prepared and checkpointed but never acknowledged
    p = fleet.procs["d2"]
    p.send_signal(signal.SIGUSR1)
    fleet.wait(lambda: fleet.status("d2").get("outbox") == 1 and not fleet.status("d2").get("connected"),
               what="d2 holding an unacknowledged delta")
    pending_seq = fleet.status("d2")["seq"]
    p.kill()
    p.wait(10)
    fleet.start_device("d2", seed=1)
    fleet.wait(lambda: fleet.status("d2").get("pid") != p.pid and fleet.status("d2")["seq"] > pending_seq,
               what="restarted d2 past its pending delta")
    # and a few crashes at arbitrary moments while syncing
    for delay in (0.3, 0.7, 1.1):
        time.sleep(delay)
        q = fleet.procs["d2"]
        q.kill()
        q.wait(10)
        fleet.start_device("d2", seed=1)
        fleet.wait(lambda: fleet.status("d2").get("pid") != q.pid, what="d2 restarted")
    fleet.wait(lambda: fleet.status("d2")["seq"] > pending_seq + 2, what="d2 syncing after the crashes")
    fleet.assert_nothing_lost("d2")
    assert pending_seq in [r[0] for r in fleet.stored("d2")]


def test_a_forged_global_head_is_refused_by_every_device(fleet):
    model = resolve_model("vibration")
    m = model.manifest
    import numpy as np

    arrays = {"weight": np.zeros((len(m.classes), m.feature_size), np.float32), "bias": np.zeros(len(m.classes), np.float32)}
    h = Header(kind="global", fleet="test", model=m.name, model_hash=model.content_hash, head_kind="linear", node="srv",
               version=999_999)
    forged = pack_message(h, {k: encode_tensor(v, "fp32") for k, v in arrays.items()}, generate_key())
    from tests.helpers import Client

    c = Client(fleet.broker)
    try:
        c.c.publish("fleet/test/vibration/global", forged, qos=1, retain=True).wait_for_publish(5)
        fleet.wait(lambda: all(fleet.status(n).get("refused", {}).get("bad_signature", 0) >= 1 for n in NODES),
                   what="every device refusing the forged head")
        assert all(fleet.status(n)["base_version"] < 999_999 for n in NODES)
        assert all(["sync_refused", "bad_signature"] in fleet.status(n)["events"] for n in NODES)
    finally:
        c.c.publish("fleet/test/vibration/global", b"", qos=1, retain=True).wait_for_publish(5)
        c.close()
