"""Both fleet stores: dedup by (node, seq), versions, exactly-once claiming, rollback on failure."""
from __future__ import annotations

import uuid

import pytest

from edge.fleet.store import DeltaRecord, SQLiteStore, open_store

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
    assert store.add_deltas([_rec(seq=1), _rec(seq=2)]) == [True, True]
    assert store.add_deltas([_rec(seq=1)]) == [False]
    assert store.seen("n1", 1) and not store.seen("n1", 3)
    dev = store.devices()[0]
    assert (dev.accepted, dev.rejected, dev.reasons) == (2, 1, {"replayed_seq": 1})


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
