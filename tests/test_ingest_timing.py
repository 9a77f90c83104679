"""The time policy, by properties: the ``Stamper`` for samples without a time (P1-P3 of
edge/ingest/timing.py) and the windower's rate and fill flags."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.ingest.timing import Stamper
from edge.ingest.window import Windower

pytestmark = pytest.mark.timeout(120)
NOW = 1_700_000_000.0
B = 1.0        # resync_s (the default)
J_MAX = 0.3    # receive jitter P1 is tested with


def _deliver(stamper, reads, per_message):
    """Stamp reads of untimed samples: [(received, n)], one ``stamp`` call or one ``stamp_one`` per sample."""
    out = []
    for (r, n), one in zip(reads, per_message):
        if one:
            out.extend(stamper.stamp_one(None, r) for _ in range(n))
        else:
            out.extend(stamper.stamp([None] * n, r))
    return out


def _windower(rate):
    return Windower(length=64, hop=32, channels=1, sample_rate=rate)


@st.composite
def nominal_stream(draw):
    """A stream sent at exactly its nominal rate, read in batches, with receive jitter."""
    rate = draw(st.sampled_from([250.0, 1000.0, 4000.0]))
    bmax = min(500, int((B - J_MAX - 0.01) * rate))  # P1's condition: n / rate + J < B
    sizes = draw(st.lists(st.integers(1, bmax), min_size=1, max_size=30))
    jitter = draw(st.lists(st.floats(0.0, J_MAX), min_size=len(sizes), max_size=len(sizes)))
    per_message = draw(st.lists(st.booleans(), min_size=len(sizes), max_size=len(sizes)))
    t0 = NOW + draw(st.floats(0.0, 1000.0))
    reads, k, r = [], 0, -math.inf
    for n, j in zip(sizes, jitter):
        k += n
        r = max(r, t0 + (k - 1) / rate + j)  # a read comes after its newest sample, never before the previous read
        reads.append((r, n))
    return rate, reads, per_message


@settings(max_examples=150, deadline=None)
@given(stream=nominal_stream())
def test_p1_a_nominal_untimed_stream_is_stamped_exactly_at_its_rate(stream):
    rate, reads, per_message = stream
    s = Stamper(sample_rate=rate, resync_s=B)
    ts = _deliver(s, reads, per_message)
    dt = 1.0 / rate
    assert all(abs((b - a) - dt) < 1e-6 for a, b in zip(ts, ts[1:]))
    assert s.behind == 0 and s.ahead == 0 and s.spacing == dt
    w = _windower(rate)
    w.push(ts, [[0.0]] * len(ts))
    c = w.counters
    assert c["out_of_order"] == 0 and c["gaps"] == 0 and c["filled"] == 0 and w.flagged is None


@st.composite
def any_arrivals(draw):
    """Reads of 0..500 untimed samples with non-decreasing receive times: bursts, pauses, stalls."""
    rate = draw(st.sampled_from([10.0, 1000.0, 20000.0]))
    steps = st.sampled_from([0.0, 1e-6, 1e-4, 1e-3]) | st.floats(0.0, 5.0) | st.sampled_from([0.9, 1.0, 1.1, 30.0])
    reads, r = [], NOW
    for dr, n in draw(st.lists(st.tuples(steps, st.integers(0, 500)), min_size=1, max_size=40)):
        r += dr
        reads.append((r, n))
    per_message = draw(st.lists(st.booleans(), min_size=len(reads), max_size=len(reads)))
    return rate, reads, per_message


@settings(max_examples=150, deadline=None)
@given(arrivals=any_arrivals())
def test_p2_stamps_stay_in_the_band_around_the_receive_clock_and_increase(arrivals):
    rate, reads, per_message = arrivals
    s = Stamper(sample_rate=rate, resync_s=B)
    step = 4.0 / rate  # the most a stamp can run past r + B per sample: spacing / 4, spacing <= 16 / rate
    w = Windower(length=16, hop=16, channels=1, sample_rate=rate)
    excess, prev_r, last = 0.0, None, -math.inf
    for (r, n), one in zip(reads, per_message):
        excess = max(0.0, excess - (r - prev_r)) if prev_r is not None else 0.0
        prev_r = r
        got = [s.stamp_one(None, r) for _ in range(n)] if one else s.stamp([None] * n, r)
        for x in got:
            excess += step
            assert x >= r - 2 * B
            assert x <= r + 2 * B + excess + 1e-9
            assert x > last
            last = x
            excess = min(excess, max(0.0, x - r - 2 * B) + step)  # inside the outer band: the excess starts over
        w.push(got, [[0.0]] * len(got))
    assert w.counters["out_of_order"] == 0 and w.counters["samples"] == sum(n for _, n in reads)


@pytest.mark.parametrize("true_rate", [500.0, 2000.0])
@settings(max_examples=10, deadline=None)
@given(batch=st.integers(1, 60), jitter=st.floats(0.0, 0.02))
def test_p3_an_off_rate_untimed_stream_is_flagged_within_seconds(true_rate, batch, jitter):
    s = Stamper(sample_rate=1000.0, resync_s=B)
    w = Windower(length=256, hop=128, channels=1, sample_rate=1000.0)
    k, flagged_at, r = 0, None, NOW
    while k / true_rate < 10.0:
        r = max(r, NOW + (k + batch - 1) / true_rate + jitter * ((k // batch) % 3) / 2)
        ts = s.stamp([None] * batch, r)
        w.push(ts, [[0.0]] * batch)
        k += batch
        if flagged_at is None and w.flagged == "rate":
            flagged_at = k / true_rate
    assert flagged_at is not None and flagged_at <= 8.0, (flagged_at, s.arrival_rate, w.estimated_rate)
    assert w.flagged == "rate" and abs(s.arrival_rate / true_rate - 1.0) < 0.1
    assert abs(s.spacing * true_rate - 1.0) < 0.1  # stamps now follow the measured rate


def test_given_times_pass_through_and_untimed_samples_continue_after_them():
    s = Stamper(sample_rate=10.0)
    assert s.stamp([NOW, None, NOW - 5.0, None], received=NOW + 0.05) == [NOW, NOW + 0.1, NOW - 5.0, NOW + 0.2]


def test_a_pause_restarts_the_line_at_the_receive_time():
    s = Stamper(sample_rate=1000.0, resync_s=1.0)
    s.stamp([None] * 10, NOW)
    assert s.stamp_one(None, NOW + 60.0) == pytest.approx(NOW + 60.0, abs=1e-6)
    assert s.stamp_one(None, NOW + 60.0) == pytest.approx(NOW + 60.001, abs=1e-6)


def test_a_burst_is_spread_without_losing_order():
    s = Stamper(sample_rate=1000.0, resync_s=1.0)
    ts = s.stamp([None] * 5000, NOW)  # five seconds of samples in one read
    assert all(b > a for a, b in zip(ts, ts[1:])) and ts[-1] - NOW < 2.0 + 5000 * 0.004
    assert s.ahead > 0


# -- the windower's side of the policy ------------------------------------------------------------

def test_a_timestamped_500hz_stream_into_a_1khz_windower_is_flagged():
    w = Windower(length=256, hop=128, channels=1, sample_rate=1000.0)
    w.push([NOW + i * 0.002 for i in range(5000)], [[0.0]] * 5000)
    assert w.counters["filled"] == 4999
    assert w.flagged == "rate" and not w.rate_ok and w.counters["rate_mismatch"] == 1
    assert 450 < w.estimated_rate < 550
    assert not w.fill_ok and w.counters["fill_mismatch"] == 1 and w.fill_share > 0.4


def test_steady_filling_within_the_rate_tolerance_is_flagged_as_fill():
    w = Windower(length=64, hop=64, channels=1, sample_rate=1000.0)
    ts = [NOW + i * 0.001 for i in range(24_000) if i % 12 != 11]  # one sample in 12 missing: 917 Hz
    w.push(ts, [[0.0]] * len(ts))
    assert w.rate_ok and w.flagged == "fill" and w.counters["fill_mismatch"] == 1
    assert 0.06 < w.fill_share < 0.11


def test_outages_restart_windows_but_leave_the_rate_estimate_alone():
    w = Windower(length=64, hop=64, channels=1, sample_rate=1000.0, max_fill=2)
    ts = [NOW + i * 0.001 + (i // 500) * 0.5 for i in range(5000)]  # 0.5 s hole every 500 samples
    w.push(ts, [[0.0]] * len(ts))
    assert w.counters["gaps"] == 9 and w.flagged is None
    assert abs(w.estimated_rate - 1000.0) < 1.0


def _reference_dt_estimate(ts, dt, max_fill):
    """The policy as written: every spacing feeds the EWMA unless it is out of order or an outage."""
    est, last = dt, None
    for t in ts:
        if last is not None:
            d = t - last
            if d <= 0:
                continue
            if not (d > 1.5 * dt and int(round(d / dt)) - 1 > max_fill):
                est += 0.01 * (d - est)
        last = t
    return est


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.sampled_from([1.0, 1.0, 1.0, 1.05, 0.9, 2.0, 3.0, 4.0, 9.0, 0.0, -1.0]), max_size=600),
       max_fill=st.integers(0, 3), split=st.integers(1, 50))
def test_the_rate_estimate_is_fed_by_every_spacing_but_outages(steps, max_fill, split):
    dt = 0.001
    ts, t = [], NOW
    for x in steps:
        t += x * dt
        ts.append(t)
    w = Windower(length=16, hop=8, channels=1, sample_rate=1000.0, max_fill=max_fill)
    for k in range(0, len(ts), split):
        w.push(ts[k:k + split], [[0.0]] * len(ts[k:k + split]))
    assert w._dt_est == pytest.approx(_reference_dt_estimate(ts, dt, max_fill), rel=1e-9)
    assert w.flagged in (None, "rate", "fill")
    assert (w.flagged == "rate") == (not w.rate_ok)
    assert (w.flagged == "fill") == (w.rate_ok and not w.fill_ok)
    c = w.counters
    assert c["samples"] == len(ts) and c["rate_mismatch"] <= 1 + len(ts) // 32


# -- finding 4: samples without a time are not lost ------------------------------------------------

def test_a_hundred_untimed_messages_in_one_read_are_all_windowed():
    from edge.ingest.payload import decode_sample

    s, w = Stamper(sample_rate=1000.0), Windower(length=32, hop=32, channels=3, sample_rate=1000.0)
    windows = 0
    for _ in range(100):  # one socket read: one receive time for all of them
        t, row = decode_sample(b'{"v":[1,2,3]}', channels=3, now=NOW)
        windows += len(w.push_one(s.stamp_one(t, NOW), row))
    assert w.counters["out_of_order"] == 0 and w.counters["samples"] == 100 and windows == 3


def test_untimed_csv_lines_paced_at_1khz_lose_nothing():
    import random

    from edge.ingest.payload import decode_payload

    rng = random.Random(4)
    s, w = Stamper(sample_rate=1000.0), Windower(length=100, hop=100, channels=3, sample_rate=1000.0)
    r, windows = NOW, 0
    for i in range(1200):
        r = max(r, NOW + i * 0.001 + rng.uniform(0.0, 0.005))  # each line its own read, with jitter
        ts, rows = decode_payload(b"%d,2,3\n" % i, channels=3, now=r)
        windows += len(w.push(s.stamp(ts, r), rows))
    c = w.counters
    assert c["samples"] == 1200 and c["out_of_order"] == 0 and c["filled"] == 0 and c["gaps"] == 0
    assert windows == 12 and w.flagged is None


@settings(max_examples=200, deadline=None)
@given(msgs=st.lists(st.tuples(st.floats(0.0, 3.0), st.lists(st.none() | st.floats(-2.0, 5.0), max_size=20)),
                     max_size=30))
def test_stamp_of_a_list_is_stamp_one_of_each(msgs):
    a, b = Stamper(sample_rate=100.0), Stamper(sample_rate=100.0)
    r = NOW
    for dr, ts in msgs:
        r += dr
        ts = [None if t is None else NOW + t for t in ts]
        assert a.stamp(list(ts), r) == [b.stamp_one(t, r) for t in ts]
    assert (a._last, a._anchor, a._k, a.counters) == (b._last, b._anchor, b._k, b.counters)


# ---- NodeClock: the receive clock under wall-clock steps (issue 19) ----------------------------
from edge.errors import DecodeError  # noqa: E402
from edge.ingest.clock import NodeClock  # noqa: E402

_steps = st.lists(st.tuples(st.floats(0.001, 5.0), st.floats(-10 * 365 * 86400.0, 10 * 365 * 86400.0) | st.just(0.0),
                            st.floats(0.0, 0.05)), min_size=1, max_size=60)


@settings(max_examples=200, deadline=None)
@given(_steps, st.floats(-3 * 365 * 86400.0, 3 * 365 * 86400.0), st.integers(1, 4))
def test_with_a_timed_source_receive_times_follow_its_clock_whatever_the_wall_clock_does(steps, error, streams):
    """Hypothesis: the wall clock starts ``error`` off and is stepped by anything at any time
    (the monotonic clock runs on); timed sensors on true time, with up to 50 ms of transport
    delay. After the first timed sample every receive time is within the delay of true
    time, no sample is refused as absurd_time, and every step is counted."""
    c = NodeClock(max_skew_s=86400.0)
    mono, wall_err, true0, n_steps = 10.0, error, NOW, 0
    seen = wall_err  # the wall clock's error as the clock last took it (small moves add up to a step)
    for k, (dt, step, delay) in enumerate(steps):
        mono += dt
        if step and k:
            wall_err += step
            if abs(wall_err - seen) > c.step_s:
                n_steps, seen = n_steps + 1, wall_err
        r = c.receive_time(true0 + mono + wall_err - delay, wall=true0 + mono + wall_err, mono=mono)
        if k:
            assert abs(r - (true0 + mono - delay)) <= 0.05 + 1e-6 * abs(true0), (k, r - (true0 + mono))
        for s in range(streams):
            c.check(f"s{s}", true0 + mono - delay, r)  # never raises
    assert c.steps == n_steps and c.basis == "sources"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=9), st.floats(-1e9, 1e9))
def test_absurd_time_is_a_stream_off_the_median_of_the_sources_not_off_this_node(offsets, wall_error):
    """Hypothesis: streams whose clocks are ``offsets`` off true time, this node ``wall_error``
    off: the consensus is one of the streams' own clocks (a median), and a stream is refused
    exactly when it is more than max_skew_s from it, however far off this node is."""
    skew = 3600.0
    c = NodeClock(max_skew_s=skew)
    r = c.receive_time(NOW + wall_error, wall=NOW + wall_error, mono=5.0)
    for i, o in enumerate(offsets):
        try:
            c.check(i, NOW + o, r)
        except DecodeError:
            pass
    med = c.source_offset + 5.0  # the consensus as a time at mono 0 + 5 (t - mono = NOW + o - 5)
    assert min(abs(o - (med - NOW)) for o in offsets) < 1e-6  # it is one of the streams' own clocks
    med = NOW + min(offsets, key=lambda o: abs(o - (med - NOW)))
    for i, o in enumerate(offsets):
        refused = False
        try:
            c.check(i, NOW + o, r)
        except DecodeError as e:
            refused = e.kind == "absurd_time"
        assert refused == (abs(o - (med - NOW)) > skew)
    assert abs(c.skew - (med - NOW - wall_error)) < 1e-3 * max(1.0, abs(wall_error))


def test_an_untimed_line_left_ahead_by_a_step_back_restarts_at_the_receive_time():
    s = Stamper(sample_rate=100.0)
    ts = s.stamp([None] * 50, NOW)
    assert not s.leads(NOW + 0.5)
    assert s.leads(NOW - 3600.0)
    s.restart()
    back = s.stamp([None] * 3, NOW - 3600.0)
    assert back[0] == NOW - 3600.0 and back == sorted(back) and s.restarts == 1 and s.ahead == 0
    assert ts[-1] > back[-1]  # one step back, which the caller starts the windows anew for


def test_a_burst_of_late_samples_moves_no_stamp_but_a_sensor_clock_gone_back_is_followed():
    """A backlog (samples minutes late for a few seconds) leaves the consensus where it was;
    a sensor whose clock went back 100 s is followed once that has held for LOWER_S."""
    from edge.ingest.clock import LOWER_S

    c = NodeClock(max_skew_s=86400.0)
    mono = 0.0

    def sample(late: float) -> float:
        r = c.receive_time(NOW + mono, wall=NOW + mono, mono=mono)
        c.check("s", NOW + mono - late, r)
        return r

    for _ in range(10):
        mono += 0.1
        sample(0.0)
    for _ in range(50):  # 5 s of a backlog, 120 s late
        mono += 0.1
        assert abs(sample(120.0) - (NOW + mono)) < 1e-6
    mono += 0.1
    sample(0.0)
    while mono < 100.0:  # its clock went back 100 s and stays there
        mono += 0.5
        r = sample(100.0)
    assert abs(r - (NOW + mono - 100.0)) < 1.0 and c.skew == pytest.approx(-100.0, abs=0.01)
    assert [k for k, _ in c.events].count("clock_sources_step") == 1 and LOWER_S < 100.0
