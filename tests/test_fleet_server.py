"""The fleet server on a real broker and a real SQLite file: validate, store, aggregate, publish."""
from __future__ import annotations

import json
import sqlite3
import time
import urllib.error
import urllib.request

import pytest

from edge.broker import free_port
from edge.cli import main
from edge.fleet.codec import unpack_message, verify_signature
from edge.fleet.config import load_server_config
from edge.fleet.keys import load_public
from edge.fleet.receipts import unpack_receipt
from edge.fleet.server import FleetServer, build_aggregator
from edge.fleet.store import SQLiteStore, open_store
from tests.fleet_helpers import make_keys, server_toml, signed_delta
from tests.helpers import Client, poll


@pytest.fixture
def setup(tmp_path, broker):
    keys = make_keys(tmp_path, ["n1", "n2"])
    cfg_path = server_toml(tmp_path, keys, broker, store=str(tmp_path / "fleet.db"), k=2, t_s=60.0)
    text = cfg_path.read_text() + f"\n[metrics]\nport = {free_port()}\n"
    cfg_path.write_text(text)
    server = FleetServer(load_server_config(cfg_path))
    server.start()
    watcher = Client(broker, "fleet/test/vibration/global")
    yield keys, server, watcher, cfg_path
    server.stop()
    watcher.c.publish("fleet/test/vibration/global", b"", qos=1, retain=True).wait_for_publish(5)  # clear for the next test
    watcher.close()


def _globals(msgs):
    return [unpack_message(p) for t, p, _ in msgs if t.endswith("/global")]


def test_deltas_become_a_signed_retained_global_version(setup, broker):
    keys, server, watcher, cfg_path = setup
    assert server.connected.wait(10)
    v0 = watcher.wait_for(lambda m: _globals(m))[0]
    assert v0.header.version == 0 and verify_signature(v0, load_public(keys["server"].public_path))
    watcher.publish("fleet/test/vibration/delta/n1", signed_delta(keys["n1"].private_path, node="n1", seq=1))
    watcher.publish("fleet/test/vibration/delta/n2", signed_delta(keys["n2"].private_path, node="n2", seq=1, seed=1))
    v1 = watcher.wait_for(lambda m: [g for g in _globals(m) if g.header.version == 1])[0]
    assert v1.header.samples == 2 and verify_signature(v1, load_public(keys["server"].public_path))
    late = Client(broker, "fleet/test/vibration/global")  # a device joining later gets it retained
    try:
        assert late.wait_for(lambda m: [g for g in _globals(m) if g.header.version == 1])
    finally:
        late.close()


def test_bad_deltas_are_rejected_with_their_reason_per_device(setup, broker, capsys):
    keys, server, watcher, cfg_path = setup
    assert server.connected.wait(10)
    good = signed_delta(keys["n1"].private_path, node="n1", seq=7)
    watcher.publish("fleet/test/vibration/delta/n1", good)
    watcher.publish("fleet/test/vibration/delta/n1", good)  # a resend after a lost ack
    watcher.publish("fleet/test/vibration/delta/n1", signed_delta(keys["n2"].private_path, node="n1", seq=8))
    watcher.publish("fleet/test/vibration/delta/n1", signed_delta(keys["n1"].private_path, node="n1", seq=9, scale=100.0))
    watcher.publish("fleet/test/vibration/delta/zz", b"garbage" * 20)
    store = open_store(str(cfg_path.parent / "fleet.db"))
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            devs = {d.node: d for d in store.devices()}
            if "n1" in devs and devs["n1"].rejected >= 1 and "(unknown)" in devs and devs["(unknown)"].rejected >= 2:
                break
            time.sleep(0.1)
        assert devs["n1"].accepted == 1
        # the resend is the stored delta again (accepted, not a fault); a delta n1's key did not
        # sign is blamed on nobody, like the garbage
        assert devs["n1"].reasons == {"norm_too_large": 1}
        assert devs["(unknown)"].reasons == {"garbage": 1, "bad_signature": 1}
    finally:
        store.close()
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_server.port}/metrics", timeout=5).read().decode()
    assert 'edge_fleet_deltas_rejected_total{reason="bad_signature"} 1' in body
    assert "edge_fleet_trusted_keys 2" in body and "edge_fleet_trust_reloads_total" in body
    assert main(["fleet-server", "devices", "-c", str(cfg_path)]) == 0
    assert '"norm_too_large": 1' in capsys.readouterr().out


def test_rollback_publishes_an_earlier_head_as_a_new_version(setup, broker, capsys):
    keys, server, watcher, cfg_path = setup
    assert server.connected.wait(10)
    watcher.publish("fleet/test/vibration/delta/n1", signed_delta(keys["n1"].private_path, node="n1", seq=1))
    watcher.publish("fleet/test/vibration/delta/n2", signed_delta(keys["n2"].private_path, node="n2", seq=1))
    watcher.wait_for(lambda m: [g for g in _globals(m) if g.header.version == 1])
    assert main(["fleet-server", "rollback", "0", "-c", str(cfg_path)]) == 0
    v2 = watcher.wait_for(lambda m: [g for g in _globals(m) if g.header.version == 2])[0]
    v0 = [g for g in _globals(watcher.msgs) if g.header.version == 0][0]
    v1 = [g for g in _globals(watcher.msgs) if g.header.version == 1][0]
    assert all((v2.tensors[k] == v0.tensors[k]).all() for k in v0.tensors)
    # the rollback keeps the fleet's reference: the next clip bound is still the fleet's history
    assert v1.header.metrics["ref_norm"] > 0
    assert v2.header.metrics == v1.header.metrics
    assert main(["fleet-server", "versions", "-c", str(cfg_path)]) == 0
    assert "rollback to version 0" in capsys.readouterr().out


def _until(pred, timeout: float = 20.0, what: str = ""):
    return poll(pred, timeout, interval=0.02, what=what)


def _healthz(server) -> tuple[int, dict]:
    try:
        r = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_server.port}/healthz", timeout=5)
        return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_full_queue_and_a_locked_store_lose_nothing_and_ack_nothing_unstored(tmp_path, broker, protocol):
    """The store is locked by another process while 40 deltas arrive at a server whose queue
    holds 16: storing is retried (counted, /healthz 503 with the reason), the queue never
    holds more than 16, what does not fit waits unacknowledged at the broker (MQTT 5: the
    Receive Maximum; 3.1.1: left unacked, fetched again by a reconnect once drained), and
    once the lock is gone every delta is stored and receipted, none twice."""
    keys = make_keys(tmp_path, ["n1"])
    name = f"srv-bp-{protocol.replace('.', '')}"
    cfg_path = server_toml(tmp_path, keys, broker, store=str(tmp_path / "fleet.db"), name=name, k=1000, t_s=3600.0)
    cfg_path.write_text(cfg_path.read_text().replace("[mqtt]", "queue = 16\n\n[mqtt]")
                        + f'protocol = "{protocol}"\n\n[metrics]\nport = {free_port()}\n')
    cfg = load_server_config(cfg_path)
    store = SQLiteStore(tmp_path / "fleet.db", timeout=0.05)  # a locked write fails fast, so the test does not wait 30 s
    server = FleetServer(cfg, aggregator=build_aggregator(cfg, store=store))
    server.start()
    receipts = Client(broker, "fleet/test/vibration/receipt/n1")
    lock = sqlite3.connect(tmp_path / "fleet.db", isolation_level=None)
    try:
        assert server.connected.wait(10)
        lock.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
        for seq in range(1, 41):
            receipts.publish("fleet/test/vibration/delta/n1", signed_delta(keys["n1"].private_path, node="n1", seq=seq, seed=seq))
        _until(lambda: server.counters["store_errors"] >= 2 and server.counters["backpressure"] >= 1, what="backpressure")
        code, body = _healthz(server)
        assert code == 503 and "locked" in body["reason"] and body["store_ok"] is False
        assert body["queue"] <= 16 and not receipts.msgs
        lock.execute("ROLLBACK")
        _until(lambda: len(store.deltas()) >= 40, what="40 deltas stored")
        assert sorted(d.seq for d in store.deltas()) == list(range(1, 41))
        assert not server.counters["ack_barrier_timeouts"]
        if protocol == "5":  # each handled once: no ack lost at a reconnect (3.1.1's storms of them rarely lose one)
            assert server.counters["received"] == 40
        _until(lambda: len({unpack_receipt(p, [load_public(keys["server"].public_path)]).seq for t, p, _ in receipts.msgs}) == 40,
               what="a receipt for each")
        assert _healthz(server)[0] == 200
        if protocol == "3.1.1":
            assert server.counters["held_unacked"] >= 1 and server.counters["redeliver_reconnects"] >= 1
    finally:
        lock.close()
        receipts.close()
        server.stop()
        store.close()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_the_server_and_the_daemon_build_their_connection_alike(tmp_path, broker, protocol):
    """One factory (edge.mqttconn) for the daemon's MqttLink and the fleet server: the same
    protocol, credentials (the server's password read from [mqtt] password_file), TLS with
    certificate checks, reconnect delays, manual acks and persistent session."""
    import ssl

    from edge.ingest.mqtt import MqttLink

    keys = make_keys(tmp_path, ["n1"])
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    cfg_path = server_toml(tmp_path, keys, broker, store=str(tmp_path / "fleet.db"), name="srv-alike")
    cfg_path.write_text(cfg_path.read_text() + f'protocol = "{protocol}"\nusername = "fleet-server"\n'
                        f'password_file = "{secret}"\nsession_expiry_s = 120\ntls = true\n')  # the system CAs; nothing connects
    cfg = load_server_config(cfg_path)
    server = FleetServer(cfg)
    link = MqttLink(cfg.mqtt, client_id="daemon-alike", status_topic="st/alike", subscriptions=[], on_message=print)
    a, b = server.client, link.client
    assert b._password == b"s3cret" and a._username == b"fleet-server"
    for attr in ("_protocol", "_username", "_password", "_manual_ack", "_reconnect_min_delay", "_reconnect_max_delay",
                 "_clean_start", "_ssl"):
        assert getattr(a, attr) == getattr(b, attr), attr
    assert a._ssl and a._ssl_context.verify_mode == b._ssl_context.verify_mode == ssl.CERT_REQUIRED
    if protocol == "5":
        assert server.conn.connect_kw["clean_start"] is False is link._connect_kw["clean_start"]
        assert server.conn.connect_kw["properties"].SessionExpiryInterval == 120
        assert link._connect_kw["properties"].SessionExpiryInterval == 120
        assert server.conn.connect_kw["properties"].ReceiveMaximum == 0xFFFF  # the queue (100,000), capped


def test_a_delta_the_aggregator_cannot_handle_is_taken_and_the_rest_goes_on(tmp_path, broker, monkeypatch):
    """Fault injection: validation raising on one message (a bug a hostile message might find)
    must not stall the stream behind it as a store error does: that message is counted and
    taken, the others (of its batch, when they came together) are stored and receipted."""
    keys = make_keys(tmp_path, ["n1"])
    cfg = load_server_config(server_toml(tmp_path, keys, broker, store=str(tmp_path / "fleet.db"), name="srv-poison",
                                         k=1000, t_s=3600.0))
    agg = build_aggregator(cfg)
    real = agg.ingest

    def ingest(items):
        if any(p == b"poison" for _, p in items):
            raise ValueError("validation bug")
        return real(items)

    monkeypatch.setattr(agg, "ingest", ingest)
    server = FleetServer(cfg, aggregator=agg)
    server.start()
    watch = Client(broker, "fleet/test/vibration/receipt/n1")
    try:
        assert server.connected.wait(10)
        for seq, payload in ((1, None), (0, b"poison"), (2, None)):
            watch.publish("fleet/test/vibration/delta/n1", payload or signed_delta(keys["n1"].private_path, node="n1", seq=seq))
        got = watch.wait_for(lambda m: len(m) >= 2 and m)
        pub = load_public(keys["server"].public_path)
        assert sorted(unpack_receipt(p, [pub]).seq for t, p, _ in got) == [1, 2]
        assert server.counters["ingest_errors"] == 1 and server.counters["store_errors"] == 0
        assert server.agg.store.stored_seq("n1") == 2 and server.health()[0]
    finally:
        watch.close()
        server.stop()
