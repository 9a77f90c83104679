"""Both fleet stores: dedup by (node, seq), versions, exactly-once claiming, rollback on failure."""
from __future__ import annotations

import uuid

import pytest

import dataclasses
import sqlite3

from edge.fleet.store import REPLAYED, RESENT, STORED, DeltaRecord, SQLiteStore, open_store

PG = "postgresql://postgres@127.0.0.1:5432/test"


def _pg_available() -> bool:
    try:
        import psycopg

        psycopg.connect(PG, connect_timeout=3).close()
        return True
    except Exception:
        return False


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = SQLiteStore(tmp_path / "fleet.db")
        yield s
        s.close()
        return
    if not _pg_available():
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432 (.ci/run starts one)")
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    s = open_store(f"{PG}?schema={schema}")
    yield s
    s.close()
    with psycopg.connect(PG, autocommit=True) as c:
        c.execute(f'DROP SCHEMA "{schema}" CASCADE')


def _rec(node="n1", seq=1, base=0):
    return DeltaRecord(node=node, seq=seq, base_version=base, samples=10, norm=1.0, digest=f"{node}{seq}", message=b"m")


def test_a_resent_delta_is_stored_once(store):
    store.ensure_version0(b"v0")
    assert store.add_deltas([_rec(seq=1), _rec(seq=2)]) == [STORED, STORED]
    assert store.add_deltas([_rec(seq=1)]) == [RESENT]
    assert store.seen("n1", 1) and not store.seen("n1", 3)
    dev = store.devices()[0]
    assert (dev.accepted, dev.rejected, dev.reasons) == (2, 0, {})  # a resend is neither new nor a fault


def test_other_content_under_a_stored_seq_is_a_replay_and_an_identical_one_a_resend(store):
    store.ensure_version0(b"v0")
    other = dataclasses.replace(_rec(seq=1), digest="something else", message=b"other")
    # within one batch too: the first copy is stored, the second compared with it
    assert store.add_deltas([_rec(seq=1), _rec(seq=1), other]) == [STORED, RESENT, REPLAYED]
    assert store.add_deltas([other, _rec(seq=1)]) == [REPLAYED, RESENT]
    assert [d.message for d in store.deltas()] == [b"m"]
    dev = store.devices()[0]
    assert (dev.accepted, dev.rejected, dev.reasons) == (1, 2, {"replayed_seq": 2})


def test_stored_seq_is_the_highest_seq_stored_per_node(store):
    store.ensure_version0(b"v0")
    store.add_deltas([_rec(seq=3), _rec(seq=9), _rec(seq=4), _rec(node="n2", seq=2)])
    assert store.stored_seq("n1") == 9 and store.stored_seq("nobody") == 0
    assert store.stored_seqs(["n1", "n2", "n3"]) == {"n1": 9, "n2": 2, "n3": 0}


def test_a_store_has_an_epoch_from_its_creation(store):
    e = store.epoch()
    assert len(e) == 16 and int(e, 16) >= 0
    assert store.epoch() == e  # kept, not drawn per call


def test_an_sqlite_store_reopened_keeps_its_epoch_and_one_from_before_epochs_gets_one(tmp_path):
    s = SQLiteStore(tmp_path / "a.db")
    e = s.epoch()
    s.close()
    s = SQLiteStore(tmp_path / "a.db")
    assert s.epoch() == e
    s.close()
    old = tmp_path / "old.db"  # a store made before the meta table existed
    with sqlite3.connect(old) as c:
        c.execute("CREATE TABLE versions (version INTEGER PRIMARY KEY, parent INTEGER NOT NULL, created REAL NOT NULL, "
                  "n_deltas INTEGER NOT NULL, note TEXT NOT NULL, message BLOB NOT NULL)")
        c.execute("INSERT INTO versions VALUES (0, 0, 0, 0, 'initial', x'00')")
    s = SQLiteStore(old)
    assert len(s.epoch()) == 16 and s.latest().version == 0
    s.close()


def test_a_new_epoch_resigns_the_latest_head_past_the_claimed_base(store):
    store.ensure_version0(b"v0")
    store.add_deltas([_rec(seq=1)])
    store.commit_version(lambda latest, ds: (b"v1", "agg"))
    e = store.epoch()
    seen = []

    def resign(latest, v):
        seen.append((latest.version, latest.message, v))
        return f"head of {latest.version} as {v}".encode()

    rec = store.start_epoch(115, resign, "new epoch")
    assert (rec.version, rec.parent, rec.n_deltas, rec.note) == (116, 1, 0, "new epoch")
    assert seen == [(1, b"v1", 116)] and store.latest().message == b"head of 1 as 116"
    assert store.epoch() != e
    # a claim the store already reaches (a second future_base of the same restore) starts nothing
    e2 = store.epoch()
    assert store.start_epoch(116, resign, "again") is None and store.start_epoch(3, resign, "old") is None
    assert store.epoch() == e2 and store.latest().version == 116
    # aggregation goes on from the new version
    store.add_deltas([_rec(seq=2, base=116)])
    assert store.commit_version(lambda latest, ds: (b"v117", "agg")).version == 117


def test_a_failed_resign_starts_no_epoch(store):
    store.ensure_version0(b"v0")
    e = store.epoch()

    def boom(latest, v):
        raise RuntimeError("signing failed")

    with pytest.raises(RuntimeError):
        store.start_epoch(10, boom, "new epoch")
    assert store.epoch() == e and store.latest().version == 0


def test_commit_claims_every_pending_delta_exactly_once(store):
    store.ensure_version0(b"v0")
    store.add_deltas([_rec(seq=i) for i in range(1, 6)])
    seen = []
    v1 = store.commit_version(lambda latest, ds: (seen.append([d.seq for d in ds]) or b"v1", "agg"))
    assert v1.version == 1 and v1.n_deltas == 5 and seen == [[1, 2, 3, 4, 5]]
    assert store.commit_version(lambda latest, ds: (b"never", "")) is None
    assert store.pending().count == 0
    assert {d.applied_version for d in store.deltas()} == {1}


def test_a_failed_build_leaves_the_deltas_pending(store):
    store.ensure_version0(b"v0")
    store.add_deltas([_rec(seq=1)])

    def boom(latest, ds):
        raise RuntimeError("died mid-aggregation")

    with pytest.raises(RuntimeError):
        store.commit_version(boom)
    assert store.pending().count == 1 and store.latest().version == 0
    assert store.commit_version(lambda latest, ds: (b"v1", "")).n_deltas == 1


def test_rejections_are_counted_per_device_and_reason(store):
    store.count_rejections([("n2", "bad_signature"), ("n2", "bad_signature"), ("n2", "norm_too_large")])
    d = {x.node: x for x in store.devices()}["n2"]
    assert d.rejected == 3 and d.reasons == {"bad_signature": 2, "norm_too_large": 1}


def test_add_version_moves_forward(store):
    store.ensure_version0(b"v0")
    rec = store.add_version(lambda v: f"v{v}".encode(), "rollback to 0")
    assert rec.version == 1 and store.latest().message == b"v1"
    assert [v.version for v in store.versions()] == [1, 0]


def test_two_instances_creating_one_new_schema_at_once_both_start():
    """CREATE SCHEMA IF NOT EXISTS races on the catalog: the store serialises it."""
    import threading

    pytest.importorskip("psycopg")
    from edge.fleet.pgstore import PostgresStore

    url = f"{PG}?schema=race_{uuid.uuid4().hex[:10]}"
    errors, stores = [], []
    barrier = threading.Barrier(4)

    def open_one():
        barrier.wait()
        try:
            stores.append(PostgresStore(url))
        except Exception as e:  # noqa: BLE001 - the test reports any failure
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(stores) == 4


def test_a_postgresql_store_reconnects_after_its_connection_is_killed():
    """A PostgreSQL blip (restart, failover, a killed backend) fails the operation in flight;
    the next one opens a new connection and stores, so the server's retry resumes."""
    psycopg = pytest.importorskip("psycopg")
    if not _pg_available():
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432 (.ci/run starts one)")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    s = open_store(f"{PG}?schema={schema}")
    try:
        s.ensure_version0(b"v0")
        (pid,) = s._one("SELECT pg_backend_pid()")
        with psycopg.connect(PG, autocommit=True) as c:
            c.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(psycopg.OperationalError):
            s.add_deltas([_rec(seq=1)])
        assert s.add_deltas([_rec(seq=1)]) == [STORED]
        assert s.stored_seq("n1") == 1 and s.latest().version == 0 and s.reconnects == 1
    finally:
        s.close()
        with psycopg.connect(PG, autocommit=True) as c:
            c.execute(f'DROP SCHEMA "{schema}" CASCADE')
