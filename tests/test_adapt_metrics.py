"""Prequential metrics: the sliding window is exact, the losses are the textbook ones."""
from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.adapt.metrics import Prequential, RollingMean, sample_loss


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 20), st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=80))
def test_rolling_mean_equals_mean_of_last_window(window, xs):
    r = RollingMean(window)
    for x in xs:
        r.update(x)
    assert math.isclose(r.get(), float(np.mean(xs[-window:])), rel_tol=1e-6, abs_tol=1e-6)
    s = RollingMean(window)
    s.load_state_dict(r.state_dict())
    assert math.isclose(s.get(), r.get(), rel_tol=1e-9, abs_tol=1e-9)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 20), st.lists(st.lists(st.floats(-1e3, 1e3), max_size=50), min_size=1, max_size=8),
       st.integers(0, 7))
def test_update_many_is_update_in_turn_even_across_a_reset(window, chunks, reset_after):
    one, many = RollingMean(window), RollingMean(window)
    for k, xs in enumerate(chunks):
        for x in xs:
            one.update(x)
        many.update_many(xs)
        assert (one.n, one.i) == (many.n, many.i) and np.allclose(one.buf, many.buf)
        assert math.isclose(one.total, many.total, rel_tol=1e-9, abs_tol=1e-6)
        if k == reset_after:
            one.reset(), many.reset()
    p, q = Prequential("regression", window=window), Prequential("regression", window=window)
    flat = [x for xs in chunks for x in xs]
    for x in flat:
        p.update_values(abs(x), 1.0)
    q.update_many([abs(x) for x in flat], [1.0] * len(flat))
    assert p.n == q.n and math.isclose(p.get()["faded_loss"], q.get()["faded_loss"], rel_tol=1e-9, abs_tol=1e-9) \
        if flat else q.n == 0


def test_log_loss_is_clipped_not_infinite():
    loss, err = sample_loss(np.array([1.0, 0.0]), 1, "classification")
    assert math.isfinite(loss) and err == 1.0


def test_prequential_regression_reports_mse_and_mae():
    p = Prequential("regression", window=2)
    p.update(np.array([0.0]), np.array([2.0]))
    p.update(np.array([1.0]), np.array([1.0]))
    m = p.get()
    assert m["mse"] == 2.0 and m["mae"] == 1.0 and m["n"] == 2
