"""Recovery without a person: real device processes, a real fleet server, a real broker and SQLite.

1. The server's database is restored from an older backup while devices are ahead of it:
   they refuse its older heads as ``not_newer`` and it refuses their deltas as
   ``future_base`` (the deadlock the issue found), until the server starts a new epoch
   above every base; devices adopt it and their deltas are accepted again.
2. A device loses its state directory but keeps its key: it restarts at seq 0, the
   server refuses its first delta as ``replayed_seq`` with its stored seq, the device
   resumes after it, and its next deltas are accepted.
3. What sits retained on the global topic (a forged head, an older validly signed one,
   nothing) does not decide what a fresh device starts from: it asks, and reaches the
   server's latest version, in a quiet fleet (no new version, no periodic republish).
"""
from __future__ import annotations

import shutil
import signal
import sqlite3

import pytest

from edge.fleet.codec import Header, encode_tensor, pack_message
from edge.fleet.keys import create_key, export_public, generate_key
from edge.fleet.store import open_store
from tests.helpers import Client
from tests.test_fleet_devices import Fleet

pytestmark = pytest.mark.timeout(300)
GLOBAL = "fleet/test/vibration/global"


def _stop(fleet: Fleet, name: str) -> None:
    p = fleet.procs.pop(name)
    p.send_signal(signal.SIGTERM)
    p.wait(30)


def _latest(fleet: Fleet) -> int:
    vs = fleet.versions()
    return vs[0].version if vs else 0


def _pending(fleet: Fleet) -> int:
    s = open_store(str(fleet.db))
    try:
        return s.pending().count
    finally:
        s.close()


def _deltas(fleet: Fleet, node: str):
    s = open_store(str(fleet.db))
    try:
        return [d for d in s.deltas() if d.node == node]
    finally:
        s.close()


def test_a_server_restored_from_an_older_backup_and_its_devices_converge(tmp_path, broker):
    nodes = ("r1", "r2")
    f = Fleet(tmp_path, broker, nodes=nodes)
    try:
        f.start_server()
        for i, n in enumerate(nodes):
            f.start_device(n, seed=i)
        f.wait(lambda: _latest(f) >= 2, what="version 2")
        backup = tmp_path / "backup.db"
        src = sqlite3.connect(f.db)
        dst = sqlite3.connect(backup)
        src.backup(dst)  # a consistent copy of the live store, as an operator's backup job takes it
        dst.close()
        src.close()
        old = open_store(str(backup))
        try:
            n_backup = old.latest().version
        finally:
            old.close()
        f.wait(lambda: all(f.status(n).get("base_version", 0) >= n_backup + 2 for n in nodes),
               what="devices two versions past the backup")
        _stop(f, "server")
        ahead = _latest(f)
        for suffix in ("", "-wal", "-shm"):
            (f.db.parent / (f.db.name + suffix)).unlink(missing_ok=True)
        shutil.copy(backup, f.db)
        f.start_server()
        # the devices are ahead of the restored history; the server renumbers above them
        f.wait(lambda: all(f.status(n).get("base_version", 0) > ahead for n in nodes), timeout=120,
               what="devices on a version of the new epoch")
        f.wait(lambda: all(any(d.base_version > ahead for d in _deltas(f, n)) for n in nodes), timeout=120,
               what="deltas on the new epoch's versions accepted")
        notes = [v.note for v in f.versions()]
        assert any("epoch" in n for n in notes), notes
        for n in nodes:
            st = f.status(n)
            assert st["counters"].get("epoch_changes", 0) >= 1 or st["receipts_refused"].get("future_base"), st
            assert st["counters"].get("receipts_accepted", 0) >= 1
    finally:
        f.stop()


def test_a_device_that_lost_its_state_resumes_after_the_servers_seq(tmp_path, broker):
    nodes = ("s1", "s2")
    f = Fleet(tmp_path, broker, nodes=nodes)
    try:
        f.start_server()
        for i, n in enumerate(nodes):
            f.start_device(n, seed=i)
        f.wait(lambda: len(f.stored("s1")) >= 3, what="three of s1's deltas stored")
        _stop(f, "s1")
        before = max(r[0] for r in f.stored("s1"))
        shutil.rmtree(tmp_path / "state" / "s1")  # the key file lives elsewhere and stays
        f.start_device("s1", seed=0)
        f.wait(lambda: any(r[0] > before for r in f.stored("s1")), what="s1 storing deltas after its old seq")
        st = f.wait(lambda: (s := f.status("s1")) and s["seq"] > before and s, what="s1's status past its old seq")
        assert st["counters"].get("seq_resumed", 0) == 1, st
        assert st["base_version"] > 0  # it asked for the head at once instead of waiting at base 0
        # nothing the new life learned is lost: its refused first delta went out again after
        # the server's seq, so its stored deltas count every label it has sent
        def settled():
            st = f.status("s1")
            rows = [r for r in f.stored("s1") if r[0] > before]
            return (st, rows) if not st["outbox"] and not st["unreceipted"] and rows and rows[-1][0] >= st["seq"] else None

        st, rows = f.wait(settled, what="s1's new deltas settled")
        assert [r[0] for r in rows] == list(range(before + 1, st["seq"] + 1))
        assert sum(r[1] for r in rows) == st["labels_at_send"], (rows, st)
        assert set(st["receipts_refused"]) == {"replayed_seq"}  # its old life's seqs, no other reason
    finally:
        f.stop()


def _forged(model, version: int) -> bytes:
    import numpy as np

    m = model.manifest
    arrays = {"weight": np.zeros((len(m.classes), m.feature_size), np.float32), "bias": np.zeros(len(m.classes), np.float32)}
    h = Header(kind="global", fleet="test", model=m.name, model_hash=model.content_hash, head_kind="linear", node="srv",
               version=version)
    return pack_message(h, {k: encode_tensor(v, "fp32") for k, v in arrays.items()}, generate_key())


def test_a_fresh_device_reaches_the_latest_version_whatever_sits_retained(tmp_path, broker):
    from edge.zoo import resolve_model

    nodes = ("t1", "t2")
    # no periodic republish in this test: only a device's request can bring the latest head
    f = Fleet(tmp_path, broker, nodes=nodes, server_extra="republish_s = 86400")
    c = Client(broker)
    try:
        f.start_server()
        for i, n in enumerate(nodes):
            f.start_device(n, seed=i)
        f.wait(lambda: _latest(f) >= 4, what="version 4")
        for n in nodes:
            _stop(f, n)  # a quiet fleet: no more deltas, and no more versions once the buffer is applied
        f.wait(lambda: _pending(f) == 0, what="the server's buffer applied")
        latest = _latest(f)
        s = open_store(str(f.db))
        try:
            old = next(v for v in s.versions(limit=1000) if v.version == 1).message  # validly signed, old
        finally:
            s.close()
        kd = tmp_path / "keys"
        for name, retained in (("fresh-forged", _forged(resolve_model("vibration"), 10 ** 6)),
                               ("fresh-replayed", old), ("fresh-cleared", b"")):
            c.c.publish(GLOBAL, retained, qos=1, retain=True).wait_for_publish(5)
            f.keys[name] = create_key(kd, name, role="device")
            export_public(kd, name, to=tmp_path / "devices")
            # it learns but never sends (min_samples): the head can only come from its request
            f.start_device(name, seed=7, fleet_extra="min_samples = 1000000")
            st = f.wait(lambda: (s := f.status(name)) and s.get("base_version") == latest and s, timeout=60,
                        what=f"{name} on the latest version {latest}")
            assert st["counters"].get("requests", 0) >= 1 and st["seq"] == 0
            _stop(f, name)
        assert _latest(f) == latest  # nothing new was committed meanwhile: the request did it
    finally:
        c.c.publish(GLOBAL, b"", qos=1, retain=True).wait_for_publish(5)
        c.close()
        f.stop()
