"""The promotion guard (edge.adapt.guard): trips on labels that mostly contradict confident
predictions, not on an honest share of them, and a long attack cannot become its history."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.adapt.guard import LabelGuard


@settings(max_examples=60, deadline=None)
@given(rate=st.floats(0.0, 0.3), seed=st.integers(0, 10_000))
def test_an_honest_share_of_contradictions_never_trips(rate, seed):
    rng = np.random.default_rng(seed)
    g = LabelGuard(window=100)
    tripped = [g.observe(bool(x)) for x in rng.random(2000) < rate]
    assert not any(tripped[200:])  # after the first window the share stays well under one half


@settings(max_examples=30, deadline=None)
@given(clean=st.integers(100, 2000), rate=st.floats(0.0, 0.1))
def test_an_attack_trips_and_stays_tripped_however_long_it_lasts(clean, rate):
    rng = np.random.default_rng(0)
    g = LabelGuard(window=100)
    for x in rng.random(clean) < rate:
        g.observe(bool(x))
    before = g.history
    states = [g.observe(True) for _ in range(5000)]
    assert states[-1] and all(states[100:])
    assert g.history <= before + 0.1  # the attack did not teach the guard that it is normal


def test_contradiction_needs_both_heads_sure_of_the_same_class():
    g = LabelGuard(confidence=0.9)
    sure = np.array([0.95, 0.05])
    unsure = np.array([0.6, 0.4])
    assert g.contradicts(sure, sure, 1)
    assert not g.contradicts(sure, sure, 0)
    assert not g.contradicts(sure, unsure, 1)
    assert not g.contradicts(sure, np.array([0.05, 0.95]), 1)


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1), st.integers(0, 2)), min_size=1, max_size=20),
       conf=st.floats(0.5, 1.0))
def test_the_batch_form_of_the_contradiction_rule_is_the_scalar_one(rows, conf):
    g = LabelGuard(confidence=conf)
    served = np.array([[a, 1 - a, 0.0] for a, _, _ in rows])
    glob = np.array([[b, 0.0, 1 - b] for _, b, _ in rows])
    labels = [c for _, _, c in rows]
    assert g.contradicts_many(served, glob, labels).tolist() == [g.contradicts(s, h, c) for s, h, c in zip(served, glob, labels)]


def test_a_restored_guard_holds_as_it_did_before_the_restart():
    g = LabelGuard(window=20, warmup=0)
    for _ in range(20):
        g.observe(True)
    h = LabelGuard(window=20, warmup=0)
    h.load_state_dict(g.state_dict())
    assert g.tripped and h.tripped


def test_state_round_trips():
    g = LabelGuard(window=10)
    for x in [True, False] * 20:
        g.observe(x)
    h = LabelGuard(window=10)
    h.load_state_dict(g.state_dict())
    assert (h.history, h.recent_share, h.seen) == (g.history, g.recent_share, g.seen)


# ---- the guard in the learner: the fleet, learn_many and the budget (issue 16) ---------------
import pytest  # noqa: E402

from edge.adapt.learner import Learner  # noqa: E402
from edge.adapt.synth import ClusterStream, fit_linear_head  # noqa: E402
from edge.config import AdaptConfig  # noqa: E402

K, D = 4, 32


@pytest.fixture(scope="module")
def world():
    stream = ClusterStream(dim=D, classes=K, sep=0.5, noise=1.0, seed=0)
    z, y = stream.sample(3000, rng=np.random.default_rng(0))
    return stream, fit_linear_head(z, y, K)


def _learner(world, **cfg):
    clock = [0.0]
    return Learner(task="classification", feature_size=D, classes=[f"c{i}" for i in range(K)], global_head=world[1],
                   global_version="1.0", config=AdaptConfig(seed=0, drift_detector="none", **cfg), clock=lambda: clock[0])


def _poison(world, n=400, seed=4):
    z, y = world[0].sample(n, rng=np.random.default_rng(seed))
    return z, (y + 1) % K  # a miswired or hostile label source: every label wrong, consistently


def _same(a: dict, b: dict) -> bool:
    """Equal up to float32 rounding of the sums the learner keeps."""
    return set(a) == set(b) and all(np.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in a)


def test_a_held_challenger_contributes_nothing_to_the_fleet(world):
    lr = _learner(world)
    z, y = _poison(world)
    at_trip = None
    for a, b in zip(z, y):
        was = lr.guard.tripped
        before = lr.fleet_arrays()
        lr.learn_one(a, int(b))
        if lr.guard.tripped and not was and at_trip is None:
            at_trip = before  # what the head was before the label that tripped the guard
    assert at_trip is not None and lr.guard.tripped
    assert _same(lr.fleet_arrays(), at_trip)  # however long the hold: the shared head does not move
    assert not _same(lr.head.arrays(), at_trip)  # while the challenger itself learned the poison


def test_what_was_kept_from_the_fleet_survives_a_checkpoint(world):
    lr = _learner(world)
    z, y = _poison(world)
    for a, b in zip(z, y):
        lr.learn_one(a, int(b))
    back = _learner(world)
    back.load_state_dict(lr.state_dict())
    assert back.guard.tripped and _same(back.fleet_arrays(), lr.fleet_arrays())


def test_the_sync_client_sends_the_fleet_arrays_of_a_held_learner(world):
    from edge.bench.fleet import InlineWorker as Inline
    from edge.fleet.client import SyncClient
    from edge.fleet.codec import unpack_message
    from edge.fleet.feedback import add
    from edge.fleet.keys import generate_key

    lr = _learner(world)
    c = SyncClient(worker=Inline(lr), node="n1", fleet="f", model="m", model_hash="h", key=generate_key(),
                   server_keys=[generate_key().public_key()], publish=lambda *a, **k: None, encoding="fp32")
    z, y = _poison(world)
    for a, b in zip(z, y):
        lr.learn_one(a, int(b))
    assert lr.guard.tripped
    c.prepare_delta(c.worker)
    msg = unpack_message(c.outbox[1])
    sent = add(c.base, msg.tensors)
    for k, v in lr.fleet_arrays().items():
        np.testing.assert_allclose(sent[k], v, atol=1e-6)
    assert not np.allclose(sent["weight"], lr.head.arrays()["weight"], atol=1e-3)


@pytest.mark.parametrize("size", [1, 7, 50])
def test_learn_many_is_held_by_the_guard_as_learn_one_is(world, size):
    z, y = _poison(world)
    one, many = _learner(world), _learner(world)
    for a, b in zip(z, y):
        one.learn_one(a, int(b))
    for i in range(0, len(z), size):
        many.learn_many(z[i:i + size], y[i:i + size])
    assert one.guard.tripped and many.guard.tripped
    assert many.guard.seen == one.guard.seen == len(z)
    assert many.guard.recent_share == pytest.approx(one.guard.recent_share)
    for lr in (one, many):
        m = lr.metrics()
        assert m["promotions_total"] == 0 and lr.champion is lr._global
        assert not _same(lr.fleet_arrays(), lr.head.arrays())  # the held steps are kept from the fleet


@pytest.mark.parametrize("steps", [1, 3])
def test_the_training_budget_counts_a_batch_as_the_same_labels_one_by_one(world, steps):
    z, y = world[0].sample(50, rng=np.random.default_rng(6))
    one, many = _learner(world, budget_steps_per_s=10, steps_per_label=steps), \
        _learner(world, budget_steps_per_s=10, steps_per_label=steps)
    for a, b in zip(z, y):  # 50 labels in 0 simulated seconds
        one.learn_one(a, int(b))
    many.learn_many(z, y)
    keys = ("labels_total", "train_steps_total", "train_steps_skipped_total")
    assert {k: one.metrics()[k] for k in keys} == {k: many.metrics()[k] for k in keys}
    assert one.metrics()["train_steps_skipped_total"] > 0
    assert one.budget.tokens == many.budget.tokens and one.budget.skipped == many.budget.skipped


@settings(max_examples=200, deadline=None)  # the first batch of 4 or more loads the compiled rule
@given(st.lists(st.lists(st.booleans(), max_size=40), max_size=12), st.integers(1, 30), st.integers(0, 60),
       st.floats(0.0, 0.9), st.floats(0.5, 20.0), st.floats(1e-4, 0.5))
def test_observe_many_is_observe_in_turn(batches, window, warmup, share, ratio, weight):
    """Bit for bit: the compiled rule (batches of 4 or more, kernels.guard_many) and the Python one."""
    one, many = (LabelGuard(window=window, warmup=warmup, share=share, ratio=ratio, history_weight=weight)
                 for _ in range(2))
    for flags in batches:
        for f in flags:
            one.observe(f)
        many.observe_many(np.array(flags, bool))
        assert many.state_dict() == one.state_dict()
        assert (many.tripped, many._hits, many.recent_share) == (one.tripped, one._hits, one.recent_share)
