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


def test_state_round_trips():
    g = LabelGuard(window=10)
    for x in [True, False] * 20:
        g.observe(x)
    h = LabelGuard(window=10)
    h.load_state_dict(g.state_dict())
    assert (h.history, h.recent_share, h.seen) == (g.history, g.recent_share, g.seen)
