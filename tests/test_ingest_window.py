"""The windower: boundaries, hop, gaps, order, rate, with property tests."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.ingest.window import Windower


def feed(w, n, *, t0=0.0, dt=0.001, start=0):
    ts = [t0 + i * dt for i in range(start, start + n)]
    return w.push(ts, [[float(i), -float(i)] for i in range(start, start + n)])


def test_windows_have_exact_boundaries_and_hop():
    w = Windower(length=8, hop=4, channels=2, sample_rate=1000.0)
    out = feed(w, 20)
    assert len(out) == 4  # windows start at 0, 4, 8, 12
    starts = [int(x[0, 0]) for _, _, x in out]
    assert starts == [0, 4, 8, 12]
    t0, t1, x = out[1]
    assert x.shape == (2, 8) and x.dtype == np.float32
    assert np.isclose(t0, 0.004) and np.isclose(t1, 0.011)
    assert x[1].tolist() == [-float(i) for i in range(4, 12)]


def test_hop_larger_than_length_skips_samples():
    w = Windower(length=4, hop=6, channels=2, sample_rate=1000.0)
    out = feed(w, 16)
    assert [int(x[0, 0]) for _, _, x in out] == [0, 6, 12]


def test_windows_are_the_same_however_samples_are_split():
    a = Windower(length=16, hop=5, channels=2, sample_rate=1000.0)
    b = Windower(length=16, hop=5, channels=2, sample_rate=1000.0)
    wa = feed(a, 100)
    wb = feed(b, 37) + feed(b, 1, start=37) + feed(b, 62, start=38)
    assert len(wa) == len(wb)
    assert all(np.array_equal(x, y) for (_, _, x), (_, _, y) in zip(wa, wb))


def test_small_gap_is_filled_by_interpolation():
    w = Windower(length=10, hop=10, channels=2, sample_rate=1000.0, max_fill=2)
    ts = [0.000, 0.001, 0.002, 0.005, 0.006, 0.007, 0.008, 0.009]  # 0.003 and 0.004 missing
    out = w.push(ts, [[t * 1000, 0.0] for t in ts])
    assert w.counters["filled"] == 2
    assert len(out) == 1
    assert np.allclose(out[0][2][0], np.arange(10), atol=1e-4)


def test_long_gap_restarts_the_window():
    w = Windower(length=10, hop=10, channels=2, sample_rate=1000.0, max_fill=2)
    feed(w, 6)
    out = feed(w, 10, start=50)
    assert w.counters["gaps"] == 1 and w.counters["discarded"] == 6
    assert len(out) == 1 and int(out[0][2][0, 0]) == 50


def test_out_of_order_and_duplicates_are_dropped():
    w = Windower(length=4, hop=4, channels=1, sample_rate=1000.0)
    out = w.push([0.000, 0.001, 0.001, 0.0005, 0.002, 0.003], [[0], [1], [9], [9], [2], [3]])
    assert w.counters["out_of_order"] == 2
    assert out[0][2].ravel().tolist() == [0.0, 1.0, 2.0, 3.0]


def test_rate_mismatch_is_flagged_and_windows_keep_coming():
    w = Windower(length=50, hop=50, channels=1, sample_rate=1000.0, rate_tolerance=0.1, max_fill=0)
    ts = [i * 0.0012 for i in range(1000)]  # 833 Hz: 20 % slow, within the gap threshold
    out = w.push(ts, [[0.0]] * 1000)
    assert not w.rate_ok and w.counters["rate_mismatch"] == 1
    assert 800 < w.estimated_rate < 870
    assert len(out) == 20


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 40), st.integers(1, 60), st.lists(st.integers(1, 50), min_size=1, max_size=20))
def test_property_window_count_and_contents(length, hop, chunks):
    w = Windower(length=length, hop=hop, channels=1, sample_rate=100.0)
    n = sum(chunks)
    out, start = [], 0
    for c in chunks:
        ts = [i / 100.0 for i in range(start, start + c)]
        out += w.push(ts, [[float(i)] for i in range(start, start + c)])
        start += c
    expected = 0 if n < length else (n - length) // hop + 1
    assert len(out) == expected
    for k, (t0, t1, x) in enumerate(out):
        assert x.ravel().tolist() == [float(i) for i in range(k * hop, k * hop + length)]
        assert np.isclose(t1 - t0, (length - 1) / 100.0)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-10, 10, allow_nan=False), min_size=1, max_size=200))
def test_property_any_times_never_raise_and_windows_are_well_formed(times):
    w = Windower(length=5, hop=2, channels=1, sample_rate=10.0, max_fill=3)
    out = w.push(times, [[0.0]] * len(times))
    for t0, t1, x in out:
        assert x.shape == (1, 5) and t1 > t0
    c = w.counters
    assert c["samples"] == len(times)
