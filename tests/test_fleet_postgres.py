"""Two fleet servers on one PostgreSQL and one broker (shared subscription); one is killed
with SIGKILL inside its version transaction. Every accepted delta must end up applied
exactly once, asserted from the stored versions and deltas. An instance's session ends
with it (clean start, in a group): the deliveries it never acknowledged come again because
the devices send every delta until a receipt says it is stored (tests.test_fleet_scaleout)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge.fleet.codec import unpack_message
from edge.fleet.store import open_store
from tests.fleet_helpers import make_keys, server_toml, signed_delta
from tests.helpers import Client
from tests.helpers import fresh_pg_schema

ROOT = Path(__file__).resolve().parent.parent
PG = "postgresql://postgres@127.0.0.1:5432/test"
pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def schema():
    yield from fresh_pg_schema("fleet")


def _commit_lock_held(url) -> bool:
    import psycopg

    with psycopg.connect(PG, autocommit=True) as c:
        return c.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted").fetchone()[0] > 0


def _spawn(cfg, log):
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "edge.cli", "fleet-server", "run", "-c", str(cfg)], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=f, stderr=subprocess.STDOUT)


def _wait(pred, timeout, what, logs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}: " + " | ".join(Path(p).read_text()[-800:] for p in logs))


def test_two_servers_apply_every_delta_exactly_once_when_one_dies_mid_aggregation(tmp_path, broker, schema):
    nodes = [f"n{i}" for i in range(6)]
    keys = make_keys(tmp_path, nodes)
    url = f"{PG}?schema={schema}"
    # a commits as soon as 3 deltas wait, then pauses inside the transaction (the kill window);
    # b only commits what has waited 3 s, so it is the one left to take a's claimed deltas
    cfg_a = server_toml(tmp_path, keys, broker, store=url, name="srv-a", k=3, t_s=3600.0, group="fleet", pause=30.0)
    cfg_b = server_toml(tmp_path, keys, broker, store=url, name="srv-b", k=1000, t_s=3.0, group="fleet")
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    a = _spawn(cfg_a, logs[0])
    b = _spawn(cfg_b, logs[1])
    pub = Client(broker, "fleet/test/vibration/global")
    try:
        _wait(lambda: any(unpack_message(p).header.version == 0 for t, p, _ in pub.msgs if p), 90, "version 0", logs)
        _wait(lambda: "subscribed" in logs[0].read_text() and "subscribed" in logs[1].read_text(), 60, "both subscribed", logs)
        from tests.test_fleet_scaleout import SimDevices

        devs = SimDevices(broker, keys, nodes)
        for n in nodes:
            devs.send(n, 1)
        _wait(lambda: _commit_lock_held(url), 60, "srv-a inside its version transaction", logs)
        a.send_signal(signal.SIGKILL)
        a.wait(10)
        # its session ended with it: what it never acknowledged is sent again by the devices
        # (to b, or to a once systemd restarted it)
        devs.wait_all_receipted(60, logs)
        devs.close()
        cfg_a = server_toml(tmp_path, keys, broker, store=url, name="srv-a", k=3, t_s=3.0, group="fleet")
        a = _spawn(cfg_a, logs[0])
        store = open_store(url)
        try:
            _wait(lambda: store.pending().count == 0 and len(store.deltas()) == 6, 60, "srv-b to apply every delta", logs)
            deltas, versions = store.deltas(), store.versions()
            assert sorted(d.node for d in deltas) == nodes  # all six stored, each once
            applied = [d.applied_version for d in deltas]
            assert None not in applied
            made = {v.version: v for v in versions if v.version > 0}
            assert sum(v.n_deltas for v in made.values()) == 6  # no delta in two versions, none in none
            assert {v: applied.count(v) for v in set(applied)} == {v: r.n_deltas for v, r in made.items()}
            assert sorted(made) == list(range(1, len(made) + 1))  # versions contiguous: a's dead commit left no hole
        finally:
            store.close()
    finally:
        pub.close()
        for p in (a, b):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()


def test_a_postgresql_blip_is_retried_and_loses_no_delta(tmp_path, broker, schema):
    """The server's database connection is killed (a restart, a failover): the batch in
    flight fails, is counted and retried; the store reconnects and the delta is stored and
    receipted; nothing was acknowledged before."""
    import psycopg

    from edge.fleet.config import load_server_config
    from edge.fleet.keys import load_public
    from edge.fleet.receipts import unpack_receipt
    from edge.fleet.server import FleetServer

    keys = make_keys(tmp_path, ["n1"])
    url = f"{PG}?schema={schema}"
    server = FleetServer(load_server_config(server_toml(tmp_path, keys, broker, store=url, name="srv-blip", k=1000,
                                                        t_s=3600.0)))
    server.start()
    watch = Client(broker, "fleet/test/vibration/receipt/n1")
    try:
        assert server.connected.wait(10)
        (pid,) = server.agg.store._one("SELECT pg_backend_pid()")
        with psycopg.connect(PG, autocommit=True) as c:
            c.execute("SELECT pg_terminate_backend(%s)", (pid,))
        watch.publish("fleet/test/vibration/delta/n1", signed_delta(keys["n1"].private_path, node="n1", seq=1))
        (r,) = watch.wait_for(lambda m: [unpack_receipt(p, [load_public(keys["server"].public_path)]) for t, p, _ in m])
        assert (r.seq, r.status, r.stored_seq) == (1, "accepted", 1)
        assert server.counters["store_errors"] >= 1 and server.agg.store.reconnects >= 1
        assert server.health()[0] and server.agg.store.stored_seq("n1") == 1
    finally:
        watch.close()
        server.stop()


def test_two_instances_storing_the_same_devices_in_opposite_orders_never_deadlock(schema):
    """Two stores (two instances) add batches of the same 40 devices at once, one in
    ascending and one in descending order: rows are taken in one canonical order, so no
    transaction deadlocks (it did: the device rows were upserted in arrival order inside
    the delta transaction), and every delta is stored once."""
    import threading

    from edge.fleet.store import DeltaRecord

    url = f"{PG}?schema={schema}"
    stores = [open_store(url), open_store(url)]
    nodes = [f"n{i:02d}" for i in range(40)]
    errors = []

    def run(store, order, parity):
        try:
            for r in range(15):
                seq = 2 * r + parity
                store.add_deltas([DeltaRecord(node=n, seq=seq, base_version=0, samples=1, norm=1.0,
                                              digest=f"{n}-{seq}", message=b"m") for n in order])
        except Exception as e:  # a deadlock that escaped the store
            errors.append(e)
    try:
        threads = [threading.Thread(target=run, args=(stores[0], nodes, 0)),
                   threading.Thread(target=run, args=(stores[1], nodes[::-1], 1))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors[:1]
        assert stores[0].retries + stores[1].retries == 0  # none even needed a retry
        assert len(stores[0].deltas()) == 40 * 30
        assert {d.node: d.accepted for d in stores[0].devices()} == dict.fromkeys(nodes, 30)
    finally:
        for s in stores:
            s.close()


def test_a_deadlock_is_retried_by_the_store_and_nothing_is_lost(schema):
    """A real deadlock: another transaction holds device n2's row and then asks for n1's,
    while the store's statistics transaction holds n1's and waits for n2's. PostgreSQL
    aborts the store's transaction (``deadlock detected``); the store runs it again after
    a backoff and the batch is stored and counted once."""
    import threading

    import psycopg

    from edge.fleet.store import DeltaRecord

    def rec(node, seq):
        return DeltaRecord(node=node, seq=seq, base_version=0, samples=1, norm=1.0, digest=f"{node}-{seq}", message=b"m")
    url = f"{PG}?schema={schema}"
    store = open_store(url)
    store.add_deltas([rec("n1", 1), rec("n2", 1)])  # the device rows exist
    errors = []

    def add():
        try:
            store.add_deltas([rec("n1", 2), rec("n2", 2)])
        except Exception as e:
            errors.append(e)
    try:
        with psycopg.connect(PG, autocommit=True) as other:
            other.execute("SET deadlock_timeout = '60s'")  # the store's backend finds the cycle, so it is the victim
            other.execute(f'SET search_path TO "{schema}"')
            other.execute("BEGIN")
            other.execute("UPDATE devices SET rejected = rejected WHERE node = 'n2'")
            t = threading.Thread(target=add)
            t.start()
            _wait(lambda: store_waits(schema), 20, "the store to wait for n2's row")
            other.execute("UPDATE devices SET rejected = rejected WHERE node = 'n1'")  # the cycle; the store gives way
            other.execute("COMMIT")
        t.join(30)
        assert not errors, errors[:1]
        assert store.retries >= 1
        assert sorted((d.node, d.seq) for d in store.deltas()) == [("n1", 1), ("n1", 2), ("n2", 1), ("n2", 2)]
        assert {d.node: d.accepted for d in store.devices()} == {"n1": 2, "n2": 2}
    finally:
        store.close()


def store_waits(schema) -> bool:
    import psycopg

    with psycopg.connect(PG, autocommit=True) as c:
        return c.execute("SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'transactionid'").fetchone()[0] > 0


def test_an_instance_does_not_wait_for_another_instance_s_commit(schema):
    """While one store is inside a version commit, another's commit returns at once
    (``commit_busy``) instead of blocking its instance's storing until the first is done;
    the deltas it would have taken are committed by the first or by the next check."""
    import threading

    from edge.fleet.store import DeltaRecord

    url = f"{PG}?schema={schema}"
    a, b = open_store(url), open_store(url)
    inside, release, results = threading.Event(), threading.Event(), {}
    try:
        a.ensure_version0(b"v0")
        a.add_deltas([DeltaRecord(node="n1", seq=1, base_version=0, samples=1, norm=1.0, digest="d", message=b"m")])

        def slow_build(latest, deltas):
            inside.set()
            release.wait(30)
            return b"v1", "test"
        ta = threading.Thread(target=lambda: results.setdefault("a", a.commit_version(slow_build)))
        ta.start()
        assert inside.wait(20)
        tb = threading.Thread(target=lambda: results.setdefault("b", b.commit_version(lambda *x: (b"x", "x"))))
        tb.start()
        tb.join(20)
        assert not tb.is_alive() and results["b"] is None and b.commit_busy == 1
        release.set()
        ta.join(20)
        assert results["a"].version == 1 and results["a"].n_deltas == 1
    finally:
        release.set()
        a.close()
        b.close()
