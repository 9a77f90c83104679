"""Replay buffers: bounded in bytes, class-balanced, restorable."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.adapt.replay import RecentBuffer, ReplayBuffer


def test_capacity_follows_the_byte_budget():
    buf = ReplayBuffer(feature_size=64, max_bytes=64 * 1024, classes=4)
    for i in range(5000):
        buf.add(np.zeros(64, np.float32), i % 4)
    assert len(buf) == buf.capacity and buf.nbytes <= 64 * 1024


def test_rare_class_keeps_its_share_in_an_imbalanced_stream():
    rng = np.random.default_rng(0)
    buf = ReplayBuffer(feature_size=8, max_bytes=200 * (8 * 4 + 8), classes=3, seed=1)
    for _ in range(20000):
        c = 2 if rng.random() < 0.02 else int(rng.integers(0, 2))
        buf.add(rng.normal(size=8).astype(np.float32), c)
    counts = buf.class_counts()
    assert counts.sum() == 200 and counts[2] >= 60  # a plain reservoir would keep ~4


def test_regression_buffer_is_a_uniform_reservoir():
    buf = ReplayBuffer(feature_size=2, max_bytes=100 * (2 * 4 + 4), outputs=1, seed=0)
    for i in range(10000):
        buf.add(np.array([i, i], np.float32), np.array([i], np.float32))
    kept = buf.z[: len(buf), 0]
    assert len(buf) == 100 and 3000 < kept.mean() < 7000  # not just the first or the last


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=300), st.integers(1, 40))
def test_balanced_buffer_bookkeeping_stays_consistent(labels, cap):
    buf = ReplayBuffer(feature_size=3, max_bytes=cap * (3 * 4 + 8), classes=5)
    for i, c in enumerate(labels):
        buf.add(np.full(3, i, np.float32), c)
    assert len(buf) == min(len(labels), buf.capacity)
    slots = sorted(s for cls in buf._slots for s in cls)
    assert slots == list(range(len(buf)))
    for c, cls_slots in enumerate(buf._slots):
        assert all(buf.y[s] == c for s in cls_slots)


def test_state_round_trip_keeps_samples_and_randomness():
    a = ReplayBuffer(feature_size=4, max_bytes=50 * 24, classes=2, seed=3)
    for i in range(500):
        a.add(np.full(4, i, np.float32), i % 2)
    b = ReplayBuffer(feature_size=4, max_bytes=50 * 24, classes=2, seed=99)
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a.sample_indices(10), b.sample_indices(10))
    assert b.class_counts().tolist() == a.class_counts().tolist()


def test_recent_buffer_keeps_the_last_samples():
    r = RecentBuffer(feature_size=1, size=3, classes=10)
    for i in range(10):
        r.add(np.array([i], np.float32), i)
    assert sorted(r.y[: len(r)].tolist()) == [7, 8, 9]


@given(st.lists(st.integers(0, 3), min_size=0, max_size=120), st.integers(1, 50),
       st.lists(st.integers(1, 40), min_size=1, max_size=6), st.integers(0, 3))
@settings(max_examples=60, deadline=None)
def test_add_many_is_add_in_turn(labels, cap, chunks, seed):
    """A batch offered at once leaves the class-balanced reservoir exactly as row-by-row offers:
    the same slots, samples, counts and random state."""
    one = ReplayBuffer(feature_size=3, max_bytes=cap * (3 * 4 + 8), classes=4, seed=seed)
    many = ReplayBuffer(feature_size=3, max_bytes=cap * (3 * 4 + 8), classes=4, seed=seed)
    Z = np.arange(len(labels) * 3, dtype=np.float32).reshape(len(labels), 3)
    for z, c in zip(Z, labels):
        one.add(z, c)
    i = 0
    for k in chunks * (len(labels) // max(1, sum(chunks)) + 1):
        if i >= len(labels):
            break
        many.add_many(Z[i: i + k], np.asarray(labels[i: i + k], np.int64))
        i += k
    assert len(one) == len(many) and one.seen.tolist() == many.seen.tolist()
    assert one._slots == many._slots
    np.testing.assert_array_equal(one.z[: len(one)], many.z[: len(many)])
    np.testing.assert_array_equal(one.y[: len(one)], many.y[: len(many)])
    assert one.rng.bit_generator.state == many.rng.bit_generator.state


# -- issue 18: restores after a config change, and inconsistent states -------------------------

@settings(max_examples=80, deadline=None)
@given(old=st.integers(1, 12), new=st.integers(1, 12), added=st.integers(0, 40), more=st.integers(0, 30))
def test_a_recent_buffer_restored_into_another_size_holds_only_real_rows_newest_first(old, new, added, more):
    """``[adapt] batch`` sets the recent buffer's size: a restore into a bigger one must not
    count empty slots as rows (they were zero rows labelled class 0), and the rows it keeps
    and the ones added later are the newest, in order."""
    a = RecentBuffer(feature_size=1, size=old, classes=100)
    for i in range(added):
        a.add(np.full(1, i, np.float32), i % 100)
    b = RecentBuffer(feature_size=1, size=new, classes=100)
    b.load_state_dict(a.state_dict())
    for i in range(added, added + more):
        b.add(np.full(1, i, np.float32), i % 100)
    kept = sorted(b.z[: len(b), 0].astype(int).tolist())
    restored = list(range(max(0, added - old), added))[-new:]  # what the old buffer held, cut to the new size
    expect = (restored + list(range(added, added + more)))[-new:]
    assert kept == expect


def test_a_replay_state_with_a_class_out_of_range_is_refused_as_inconsistent():
    import pytest

    buf = ReplayBuffer(feature_size=2, max_bytes=10_000, classes=3)
    for i in range(10):
        buf.add(np.zeros(2, np.float32), i % 3)
    bad = buf.state_dict()
    bad["y"] = bad["y"].copy()
    bad["y"][4] = 7
    with pytest.raises(ValueError, match="outside 0..2"):
        ReplayBuffer(feature_size=2, max_bytes=10_000, classes=3).load_state_dict(bad)
    r = RecentBuffer(feature_size=2, size=4, classes=3)
    with pytest.raises(ValueError, match="outside 0..2"):
        r.load_state_dict({"z": np.zeros((2, 2), np.float32), "y": np.array([0, -1]), "i": 0})


def test_a_learner_checkpoint_with_a_class_out_of_range_is_refused_whole():
    import pytest

    from edge.adapt.learner import Learner
    from edge.config import AdaptConfig
    from edge.errors import StateError

    lr = Learner(task="classification", feature_size=4, classes=range(3), config=AdaptConfig(seed=0))
    rng = np.random.default_rng(0)
    for i in range(30):
        lr.learn_one(rng.normal(size=4).astype(np.float32), i % 3)
    s = lr.state_dict()
    s["replay"] = dict(s["replay"], y=np.where(np.arange(len(s["replay"]["y"])) == 0, 9, s["replay"]["y"]))
    fresh = Learner(task="classification", feature_size=4, classes=range(3), config=AdaptConfig(seed=0))
    before = fresh.state_dict()
    with pytest.raises(StateError, match="inconsistent"):
        fresh.load_state_dict(s)
    assert np.array_equal(fresh.replay.y[: len(fresh.replay)], before["replay"]["y"])


def test_adam_state_of_another_shape_is_refused():
    import pytest

    from edge.adapt.adam import AdamState

    a = AdamState(4)
    s = a.state_dict()
    for bad in (dict(s, v=np.zeros(3, np.float32)), dict(s, m=np.zeros(5, np.float32)), dict(s, steps=-1)):
        with pytest.raises(ValueError):
            AdamState(4).load_state_dict(bad)
