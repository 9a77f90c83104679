"""Drift detectors: agree with river's reference implementations, quiet on stationary data."""
from __future__ import annotations

import random

import pytest

from edge.adapt.drift import ADWIN, PageHinkley


def _stream(seed, n=1500, jump=1.0):
    rng = random.Random(seed)
    return [rng.gauss(0, 1) for _ in range(n)] + [rng.gauss(jump, 1) for _ in range(n)]


@pytest.mark.parametrize("seed", range(3))
def test_page_hinkley_matches_river(seed):
    rdrift = pytest.importorskip("river.drift")
    ours, ref = PageHinkley(), rdrift.PageHinkley()
    hits_ours = [i for i, x in enumerate(_stream(seed)) if ours.update(x)]
    hits_ref = []
    for i, x in enumerate(_stream(seed)):
        ref.update(x)
        if ref.drift_detected:
            hits_ref.append(i)
    assert hits_ours == hits_ref


@pytest.mark.parametrize("seed", range(3))
def test_adwin_detects_where_river_does(seed):
    rdrift = pytest.importorskip("river.drift")
    ref = rdrift.ADWIN()
    hits_ref = []
    for i, x in enumerate(_stream(seed)):
        ref.update(x)
        if ref.drift_detected:
            hits_ref.append(i)
    ours = ADWIN()
    hits = [i for i, x in enumerate(_stream(seed)) if ours.update(x)]
    assert hits and abs(hits[0] - hits_ref[0]) <= 64
    assert ours.change > 0 or len(hits) > 1  # a rise was seen as a rise


def test_detectors_stay_quiet_on_stationary_data():
    rng = random.Random(7)
    xs = [float(rng.random() < 0.1) for _ in range(3000)]  # a steady 10% error rate
    assert not any(ADWIN().update(x) for x in xs)
    ph = PageHinkley(threshold=8.0, delta=0.05, mode="up")
    assert not any(ph.update(x) for x in xs)


def test_error_rate_jump_is_detected_quickly():
    rng = random.Random(3)
    xs = [float(rng.random() < 0.05) for _ in range(500)] + [float(rng.random() < 0.5) for _ in range(500)]
    ph = PageHinkley(threshold=8.0, delta=0.05, mode="up")
    hits = [i for i, x in enumerate(xs) if ph.update(x)]
    assert hits and 500 <= hits[0] < 560


@pytest.mark.parametrize("cls", [PageHinkley, ADWIN])
def test_state_round_trip_continues_identically(cls):
    xs = _stream(1)
    a = cls()
    for x in xs[:1200]:
        a.update(x)
    b = cls()
    b.load_state_dict(a.state_dict())
    assert [a.update(x) for x in xs[1200:]] == [b.update(x) for x in xs[1200:]]
