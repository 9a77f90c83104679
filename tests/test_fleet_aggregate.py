"""Aggregation math: weighting, staleness, robust rules against malicious deltas."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.fleet.aggregate import (Bounds, Contribution, Reference, aggregate, aggregate_deltas, apply_delta, clip_by_norm,
                                  should_apply, staleness_weight)


def _c(v, samples, staleness=0, node=None):
    """A contribution with a real sample count: labels learned since the device's previous delta."""
    return Contribution(arrays={"w": np.asarray(v, np.float32)}, samples=samples, staleness=staleness, node=node)


def test_sample_counts_weight_the_mean_up_to_the_cap():
    out = aggregate_deltas([_c([1.0], 20), _c([0.0], 60)], clip_norm=100.0, samples_ratio=3.0)
    np.testing.assert_allclose(out["w"], [0.25])
    # by default (samples_ratio 1) no device weighs more than the median device: 10, 30, 30 of 70
    out = aggregate_deltas([_c([1.0], 10), _c([0.0], 30), _c([0.0], 50)], clip_norm=100.0)
    np.testing.assert_allclose(out["w"], [10 / 70], rtol=1e-6)


def test_stale_deltas_weigh_less():
    fresh_first = aggregate_deltas([_c([1.0], 25, staleness=0), _c([0.0], 25, staleness=3)], clip_norm=100.0)
    assert fresh_first["w"][0] > 0.5
    assert staleness_weight(8) < staleness_weight(1) < staleness_weight(0) == 1.0


def test_clipping_bounds_a_scaled_attacker():
    honest = [_c([1.0, 1.0], 10 + 5 * i) for i in range(8)]
    attacker = [_c([-1000.0, -1000.0], 25) for _ in range(2)]
    out = aggregate_deltas(honest + attacker, rule="clip")  # first version: the median over distinct devices
    assert (out["w"] > 0.5).all()


def test_a_claim_above_the_typical_device_weighs_samples_ratio_typical_devices():
    batch = [_c([1.0, 0.0], 20, node=f"h{i}") for i in range(3)] + [_c([0.0, 1.0], 5000, node="big")]
    out = aggregate(batch, reference=Reference(norm=1.0, samples=20.0), bounds=Bounds(samples_ratio=2.0))
    assert out.weights["big"] == pytest.approx(40 / (3 * 20 + 40))
    capped = aggregate(batch, reference=Reference(norm=1.0, samples=20.0), bounds=Bounds(max_samples=10))
    assert capped.weights["big"] == pytest.approx(0.25)  # the server's absolute bound: everyone counts 10


def test_a_devices_deltas_in_one_batch_are_one_contribution():
    once = aggregate([_c([0.3, 0.0], 30, node="a"), _c([0.0, 1.0], 30, node="b")], reference=Reference(1.0, 30.0))
    thrice = aggregate([_c([0.1, 0.0], 10, node="a")] * 3 + [_c([0.0, 1.0], 30, node="b")], reference=Reference(1.0, 30.0))
    assert thrice.devices == 2
    np.testing.assert_allclose(thrice.delta["w"], once.delta["w"], rtol=1e-6)


def test_the_clip_bound_comes_from_the_reference_not_the_batch():
    batch = [_c([5.0, 0.0], 20, node=f"x{i}") for i in range(3)]  # every member large
    out = aggregate(batch, reference=Reference(norm=0.1, samples=20.0))
    assert out.tau == pytest.approx(0.1) and np.linalg.norm(out.delta["w"]) <= 0.1 + 1e-6
    assert out.reference.norm == pytest.approx(0.125)  # the next bound moved one bounded step


def test_trimmed_mean_and_median_ignore_outliers():
    batch = [_c([1.0], 15 + i) for i in range(8)] + [_c([1e6], 2**62), _c([-1e6], 30)]
    for rule in ("trimmed_mean", "median"):
        np.testing.assert_allclose(aggregate_deltas(batch, rule=rule)["w"], [1.0])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-10, 10), min_size=1, max_size=12), st.sampled_from(["clip", "trimmed_mean", "median"]),
       st.lists(st.integers(1, 500), min_size=5, max_size=5))
def test_identical_deltas_aggregate_to_themselves_under_every_rule(vals, rule, samples):
    batch = [_c([v for v in vals], n) for n in samples]
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


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.floats(-10, 10)), min_size=1, max_size=8),
       st.sampled_from(["clip", "trimmed_mean", "median"]))
def test_aggregation_leaves_its_inputs_untouched(rows, rule):
    """Merging and clipping work on copies: the caller's (e.g. the decoded-tensor cache's) arrays stay as they were."""
    batch = [Contribution({"w": np.array([v, 1.0], np.float64)}, samples=10 + d, staleness=0, node=f"d{d}") for d, v in rows]
    before = [c.arrays["w"].copy() for c in batch]
    aggregate(batch, rule=rule, reference=Reference(norm=0.5, samples=10.0))
    for c, b in zip(batch, before):
        np.testing.assert_array_equal(c.arrays["w"], b)
