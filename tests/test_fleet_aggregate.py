"""Aggregation math: weighting, staleness, robust rules against malicious deltas."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.fleet.aggregate import Contribution, aggregate_deltas, apply_delta, clip_by_norm, should_apply, staleness_weight


def _c(v, samples=1, staleness=0):
    return Contribution(arrays={"w": np.asarray(v, np.float32)}, samples=samples, staleness=staleness)


def test_sample_counts_weight_the_mean():
    out = aggregate_deltas([_c([1.0], 1), _c([0.0], 3)], clip_norm=100.0)
    np.testing.assert_allclose(out["w"], [0.25])


def test_stale_deltas_weigh_less():
    fresh_first = aggregate_deltas([_c([1.0], staleness=0), _c([0.0], staleness=3)], clip_norm=100.0)
    assert fresh_first["w"][0] > 0.5
    assert staleness_weight(8) < staleness_weight(1) < staleness_weight(0) == 1.0


def test_clipping_bounds_a_scaled_attacker():
    honest = [_c([1.0, 1.0]) for _ in range(8)]
    attacker = [_c([-1000.0, -1000.0]) for _ in range(2)]
    out = aggregate_deltas(honest + attacker, rule="clip")  # adaptive bound: the median norm
    assert (out["w"] > 0.5).all()


def test_trimmed_mean_and_median_ignore_outliers():
    batch = [_c([1.0]) for _ in range(8)] + [_c([1e6]), _c([-1e6])]
    for rule in ("trimmed_mean", "median"):
        np.testing.assert_allclose(aggregate_deltas(batch, rule=rule)["w"], [1.0])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-10, 10), min_size=1, max_size=12), st.sampled_from(["clip", "trimmed_mean", "median"]))
def test_identical_deltas_aggregate_to_themselves_under_every_rule(vals, rule):
    batch = [_c([v for v in vals]) for _ in range(5)]
    np.testing.assert_allclose(aggregate_deltas(batch, rule=rule, clip_norm=1e9)["w"], vals, rtol=1e-5, atol=1e-5)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-100, 100), min_size=1, max_size=10), st.floats(0.01, 50))
def test_clip_never_exceeds_the_bound(vals, bound):
    out = clip_by_norm({"w": np.array(vals)}, bound)
    assert np.linalg.norm(out["w"]) <= bound * (1 + 1e-9) + 1e-12


def test_buffer_applies_at_k_or_after_t():
    assert not should_apply(4, 0.0, k=5, t_s=10.0)
    assert should_apply(5, 0.0, k=5, t_s=10.0)
    assert should_apply(1, 10.0, k=5, t_s=10.0)


def test_apply_delta_adds_scaled():
    np.testing.assert_allclose(apply_delta({"w": np.ones(2)}, {"w": np.array([1.0, -1.0])}, server_lr=0.5)["w"], [1.5, 0.5])
