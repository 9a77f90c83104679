"""The real daemon with [fleet] enabled: its sync thread sends deltas and rebases on the server's versions."""
from __future__ import annotations

import time

import pytest

from edge.config import parse_config
from edge.daemon import Daemon
from edge.fleet.config import load_server_config
from edge.fleet.server import FleetServer
from edge.fleet.store import open_store
from tests.fleet_helpers import make_keys, server_toml
from tests.helpers import Client, poll
from tests.test_daemon_adapt import labelled_windows, publish_window

pytestmark = pytest.mark.timeout(300)


def test_daemon_syncs_its_head_with_the_fleet_server(broker, tmp_path):
    keys = make_keys(tmp_path, ["ad"])
    server = FleetServer(load_server_config(server_toml(tmp_path, keys, broker, store=str(tmp_path / "f.db"), k=1, t_s=0.5)))
    server.start()
    cfg = parse_config({"node": {"name": "ad", "state_dir": str(tmp_path / "state")},
                        "mqtt": {"host": broker.host, "port": broker.port},
                        "model": {"cache_dir": str(tmp_path / "cache")}, "adapt": {"enabled": True},
                        "fleet": {"enabled": True, "fleet": "test", "interval_s": 0.5,
                                  "key_file": str(keys["ad"].private_path), "server_key": str(keys["server"].public_path)}})
    d = Daemon(cfg)
    d.start(connect_timeout=10)
    c = Client(broker, "edge/ad/events")
    try:
        for k, (t, v, fault) in enumerate(labelled_windows(60, seed=3, shift="mounting", t0=time.time() - 300)):
            publish_window(c, "m1", t, v, label=fault)
        poll(lambda: d.status()["fleet"]["sync_base_version"] >= 1, 120, interval=0.2, what="a rebase on version 1")
        st = d.status()["fleet"]
        assert st["sync_base_version"] >= 1 and st["sync_seq"] >= 1
        assert c.wait_for(lambda m: [e for e in c.json_on("edge/ad/events") if e["type"] == "sync_rebased"], timeout=30)
        store = open_store(str(tmp_path / "f.db"))
        try:
            assert [x.node for x in store.deltas()][:1] == ["ad"] and store.latest().version >= 1
        finally:
            store.close()
        assert "edge_fleet_sync" in d.registry().render()
        # the server answered its deltas with receipts, on the daemon's own sync connection
        poll(lambda: d.status()["fleet"].get("sync_receipts_accepted"), 60, interval=0.2, what="a receipt for a delta")
        st = d.status()["fleet"]
        assert st["sync_receipts_accepted"] >= 1 and st["sync_requests"] >= 1 and st["sync_epoch"] > 0, st
    finally:
        c.close()
        d.stop()
        server.stop()
