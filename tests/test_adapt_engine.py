"""The engine's new parts: torch-free import, paired-test promotions, old checkpoints, scaler, reference."""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edge.adapt.heads import HeadSnapshot, make_head
from edge.adapt.learner import Learner
from edge.adapt.promotion import PairedBlocks, t_quantile
from edge.adapt.reference import Reference
from edge.adapt.scaler import OnlineScaler
from edge.adapt.synth import ClusterStream, fit_linear_head
from edge.config import AdaptConfig
from edge.errors import StateError

K, D = 4, 32
FALSE_PROMOTIONS_PER_10K = 4  # the documented bound (docs/LEARNING.md, "Promotions")


def test_the_learner_and_the_learner_thread_import_and_step_without_torch():
    code = ("import sys, numpy as np\n"
            "import edge.adapt.learner, edge.adapt.heads, edge.adapt.worker\n"
            "from edge.adapt.learner import Learner\n"
            "for head in ('linear', 'lowrank', 'mlp'):\n"
            "    lr = Learner(task='classification', feature_size=4, classes=['a', 'b'], config=edge.adapt.learner.AdaptConfig(head=head, scale=True))\n"
            "    for i in range(100):\n"
            "        lr.learn_one(np.full(4, i % 3, np.float32), i % 2)\n"
            "    lr.learn_many(np.ones((8, 4), np.float32), [0, 1] * 4)\n"
            "    lr.champion.predict(np.zeros((2, 4)))\n"
            "    lr.load_state_dict(lr.state_dict())\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


@pytest.fixture(scope="module")
def world():
    stream = ClusterStream(dim=D, classes=K, sep=0.5, noise=1.0, seed=0)
    z, y = stream.sample(3000, rng=np.random.default_rng(0))
    return stream, fit_linear_head(z, y, K)


def _learner(world, **cfg):
    clock = [0.0]
    lr = Learner(task="classification", feature_size=D, classes=range(K), global_head=world[1],
                 config=AdaptConfig(**cfg), clock=lambda: clock[0])
    lr._clock = clock
    return lr


def _feed(lr, z, y):
    for a, b in zip(z, y):
        lr._clock[0] += 0.05
        lr.learn_one(a, int(b))


REFRESHES_PER_10K = 8  # the documented bound on the same stationary stream (docs/LEARNING.md, "Refreshes")


@pytest.fixture(scope="module")
def stationary(world):
    """A learner after 10,000 labels of a stationary stream (seed 100): fed once, read by two tests."""
    stream, _ = world
    z, y = stream.sample(10_000, rng=np.random.default_rng(100))
    lr = _learner(world)
    _feed(lr, z, y)
    return lr.metrics()


def test_false_promotions_on_a_long_stationary_stream_stay_within_the_documented_rate(stationary):
    assert stationary["promotions_total"] <= FALSE_PROMOTIONS_PER_10K


def test_refreshes_on_a_long_stationary_stream_stay_within_the_documented_rate(stationary):
    assert stationary["refreshes_total"] <= REFRESHES_PER_10K


def test_a_refresh_follows_the_challenger_without_counting_a_promotion(world):
    """After a shift the adapted champion follows its own challenger (event "refresh",
    its own counter and version suffix); with refresh_labels = 0 only promotions swap."""
    stream, _ = world
    z, y = stream.sample(1500, rng=np.random.default_rng(1), shifted=True)
    events = []
    lr = _learner(world)
    lr.on_event = events.append
    _feed(lr, z, y)
    kinds = [e["type"] for e in events]
    m = lr.metrics()
    assert m["refreshes_total"] == kinds.count("refresh") >= 1 and m["promotions_total"] == kinds.count("promotion") >= 1
    first = kinds.index("refresh")
    assert "promotion" in kinds[:first]  # never from the global head: a promotion comes first
    ev = events[first]
    assert ".r1" in ev["version"] and ev["challenger_loss"] < ev["champion_loss"]
    off = _learner(world, refresh_labels=0)
    _feed(off, z, y)
    assert off.metrics()["refreshes_total"] == 0


def test_an_old_format_checkpoint_is_a_state_error_not_a_key_error(world):
    lr = _learner(world)
    old = {"format": 1, "task": "classification", "head_kind": "linear", "feature_size": D, "outputs": K,
           "trainer": {"head": {}, "optimizer": {"state": {}, "param_groups": []}}}
    with pytest.raises(StateError, match="format 1"):
        lr.load_state_dict(old)
    stream, _ = world
    _feed(lr, *stream.sample(200, rng=np.random.default_rng(9), shifted=True))
    broken = lr.state_dict()
    del broken["pairs"]
    fresh = _learner(world)
    before = fresh.state_dict()
    with pytest.raises(StateError, match="inconsistent"):
        fresh.load_state_dict(broken)
    after = fresh.state_dict()  # all or nothing: the failed load left the learner as it was
    assert after["counters"] == before["counters"] and np.array_equal(after["replay"]["z"], before["replay"]["z"])


def test_scaled_learner_round_trips_its_state_and_serves_raw_features(world):
    stream, g = world
    a = _learner(world, scale=True)
    z, y = stream.sample(600, rng=np.random.default_rng(2), shifted=True)
    _feed(a, z * 50 + 1000, y)
    b = _learner(world, scale=True)
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a.scaler.mean, b.scaler.mean)
    with pytest.raises(StateError, match="scale"):
        _learner(world).load_state_dict(a.state_dict())


def test_loss_ratio_makes_the_learner_plastic_when_labels_change_for_the_same_inputs(world):
    stream, _ = world
    rng = np.random.default_rng(3)
    lr = _learner(world, drift_detector="none")
    _feed(lr, *stream.sample(1500, rng=rng))
    z, y = stream.sample(400, rng=rng)
    events = []
    lr.on_event = events.append
    _feed(lr, z, (y + 1) % K)  # a real change: every class renamed
    assert any(e["type"] == "drift" and e["detector"] == "loss_ratio" for e in events)


@settings(max_examples=50, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 40), st.integers(1, 5)),
              elements=st.floats(-1e4, 1e4, allow_nan=False)), st.integers(0, 40))
def test_scaler_learn_many_equals_learn_one(Z, split):
    one, many = OnlineScaler(Z.shape[1]), OnlineScaler(Z.shape[1])
    for z in Z:
        one.learn_one(z)
    many.learn_many(Z[:split])
    many.learn_many(Z[split:])
    np.testing.assert_allclose(many.mean, one.mean, rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(many.m2, one.m2, rtol=1e-6, atol=1e-3)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["linear", "mlp"]), st.integers(0, 2**16))
def test_folding_the_scaler_into_a_snapshot_equals_scaling_first(kind, seed):
    rng = np.random.default_rng(seed)
    Z = (rng.normal(size=(50, 6)) * rng.uniform(0.1, 10, 6) + rng.normal(0, 5, 6)).astype(np.float32)
    sc = OnlineScaler(6)
    sc.learn_many(Z)
    head = make_head(kind, in_features=6, out_features=2, base_weight=rng.normal(size=(2, 6)), base_bias=rng.normal(size=2))
    head.flat += rng.normal(size=head.flat.size).astype(np.float32) * 0.1
    folded = HeadSnapshot.from_arrays(sc.fold(head.arrays()), kind=kind, task="regression", version="v")
    np.testing.assert_allclose(folded.logits(Z), head(sc.transform_many(Z)), rtol=1e-4, atol=1e-3)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 2), min_size=1, max_size=60), st.integers(0, 60))
def test_reference_learn_many_scores_each_row_before_it(ys, split):
    one, many = Reference(task="classification", outputs=3), Reference(task="classification", outputs=3)
    before = [one.scores() for y in ys if one.learn_one(y) is None]  # scores after each row
    expected = [Reference(task="classification", outputs=3).scores()] + before[:-1]
    got = np.concatenate([many.learn_many(ys[:split]) if ys[:split] else np.zeros((0, 3)), many.learn_many(ys[split:])])
    np.testing.assert_allclose(got, np.array(expected), rtol=1e-12)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-100, 100, allow_nan=False), min_size=4, max_size=100))
def test_paired_statistic_is_antisymmetric(diffs):
    a, b = PairedBlocks(block=2, max_blocks=100), PairedBlocks(block=2, max_blocks=100)
    for d in diffs:
        a.add(d, 0.0)
        b.add(0.0, d)
    sa, sb = a.statistic(), b.statistic()
    assert (math.isnan(sa) and math.isnan(sb)) or sa == pytest.approx(-sb)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 50), st.floats(0, 50)), max_size=150), st.integers(1, 12), st.integers(2, 8),
       st.lists(st.integers(1, 40), min_size=1, max_size=5))
def test_paired_add_many_is_add_in_turn(pairs, block, max_blocks, chunks):
    """learn_many's batch of pairs leaves the blocks exactly as one add per label."""
    one, many = PairedBlocks(block=block, max_blocks=max_blocks), PairedBlocks(block=block, max_blocks=max_blocks)
    done = sum(one.add(a, b) for a, b in pairs)
    i, got = 0, 0
    while i < len(pairs):
        k = chunks[i % len(chunks)]
        part = pairs[i: i + k]
        got += many.add_many([a for a, _ in part], [b for _, b in part])
        i += k
    assert got == done and one.state_dict() == many.state_dict()


def test_paired_test_needs_the_minimum_count_and_a_clear_gain():
    p = PairedBlocks(block=5, max_blocks=20)
    for i in range(25):  # 5 blocks of a steady gain
        p.add(1.0, 0.5 + 0.01 * (i % 3))
    assert not p.significant(alpha=0.01, min_blocks=6) and p.significant(alpha=0.01, min_blocks=5)
    q = PairedBlocks(block=5, max_blocks=20)
    rng = np.random.default_rng(0)
    for _ in range(100):  # no gain, pure noise
        q.add(float(rng.normal()), float(rng.normal()))
    assert not q.significant(alpha=0.01, min_blocks=6)
    assert t_quantile(0.99, 10) == pytest.approx(2.764, abs=0.01)
