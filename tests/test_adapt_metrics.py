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


def test_log_loss_is_clipped_not_infinite():
    loss, err = sample_loss(np.array([1.0, 0.0]), 1, "classification")
    assert math.isfinite(loss) and err == 1.0


def test_prequential_regression_reports_mse_and_mae():
    p = Prequential("regression", window=2)
    p.update(np.array([0.0]), np.array([2.0]))
    p.update(np.array([1.0]), np.array([1.0]))
    m = p.get()
    assert m["mse"] == 2.0 and m["mae"] == 1.0 and m["n"] == 2
