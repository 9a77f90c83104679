"""Labels find their windows by time; bad ones are counted per reason; forecasts label themselves."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from edge.adapt.forecast import ForecastTargets
from edge.adapt.labels import LabelMatcher

CLASSES = ["normal", "imbalance"]


def _matcher(**kw):
    m = LabelMatcher(classes=CLASSES, tolerance_s=0.1, max_windows=4, **kw)
    for i in range(4):  # windows [0,1], [1,2], [2,3], [3,4] of stream "a"
        m.add_window("a", float(i), float(i + 1), np.full(2, i, np.float32), served=[0.5, 0.5])
    return m


def test_label_matches_the_window_containing_its_time():
    m = _matcher()
    (hit,) = m.match("a", 2.4, "imbalance")
    assert hit.window.t_start == 2.0 and hit.target == 1 and hit.window.served == [0.5, 0.5]


def test_late_and_out_of_order_labels_are_accepted_while_cached():
    m = _matcher()
    got = [m.match("a", t, 0)[0].window.t_start for t in (3.5, 0.5, 2.5)]
    assert got == [3.0, 0.0, 2.0]


def test_tolerance_covers_a_slightly_early_timestamp():
    m = _matcher()
    assert m.match("a", -0.05, 0)[0].window.t_start == 0.0
    assert m.match("a", -0.5, 0) == [] and m.rejected["too_old"] == 1


@pytest.mark.parametrize("t,label,reason", [
    (1.5, "gearbox", "unknown_class"), (1.5, 7, "unknown_class"), (float("nan"), 0, "bad_time"),
    ("soon", 0, "bad_time"), (100.0, 0, "future"),
])
def test_bad_labels_are_rejected_with_a_reason(t, label, reason):
    m = _matcher()
    assert m.match("a", t, label) == []
    assert m.rejected[reason] == 1


def test_a_window_is_labelled_once_and_unknown_streams_are_rejected():
    m = _matcher()
    m.match("a", 1.5, 0)
    assert m.match("a", 1.6, 1) == [] and m.rejected["duplicate"] == 1
    # a stream not seen yet: the label waits for its first window while the others are near it ...
    assert m.match("b", 1.5, 0) == [] and m.rejected["unknown_stream"] == 0 and len(m.pending) == 1
    # ... and is unknown once they have gone max_future_s past it without "b" coming
    m.add_window("a", 4.0, 12.0, np.zeros(2, np.float32))
    assert m.rejected["unknown_stream"] == 1 and not m.pending
    assert m.match("c", 1.5, 0) == [] and m.rejected["unknown_stream"] == 2  # long gone: at once


def test_a_label_quicker_than_its_streams_first_window_waits_for_it():
    """A labeller that labels right after the data can be quicker than the pipeline: the
    stream's first window reaches the matcher after its label (a real daemon lost 7 of 12
    labels of a new stream to this as unknown_stream)."""
    m = _matcher()
    assert m.match("new", 5.5, 1) == []
    got = m.add_window("new", 5.0, 6.0, np.full(2, 7, np.float32))
    assert [(g.key, g.target) for g in got] == [("new", 1)] and m.rejected["unknown_stream"] == 0


def test_windows_leave_the_cache_and_then_their_labels_are_too_old():
    m = _matcher()
    m.add_window("a", 4.0, 5.0, np.zeros(2, np.float32))  # evicts [0, 1]
    assert m.match("a", 0.5, 0) == [] and m.rejected["too_old"] == 1


def test_label_ahead_of_its_window_waits_for_it():
    m = _matcher()
    assert m.match("a", 4.5, 1) == [] and m.metrics()["labels_pending"] == 1
    (hit,) = m.add_window("a", 4.0, 5.0, np.full(2, 9, np.float32))
    assert hit.window.z[0] == 9 and hit.target == 1 and not m.pending


def test_pending_label_in_a_gap_is_rejected_as_unmatched():
    m = _matcher()
    m.match("a", 5.5, 1)
    assert m.add_window("a", 7.0, 8.0, np.zeros(2, np.float32)) == []
    assert m.rejected["unmatched"] == 1


def test_node_wide_label_matches_every_stream():
    m = _matcher()
    m.add_window("b", 1.0, 2.0, np.zeros(2, np.float32))
    assert sorted(x.key for x in m.match(None, 1.5, "normal")) == ["a", "b"]


def test_regression_targets_must_be_finite_vectors_of_the_right_size():
    m = LabelMatcher(outputs=2)
    m.add_window("a", 0.0, 1.0, np.zeros(2, np.float32))
    assert m.match("a", 0.5, [1.0, float("inf")]) == [] and m.rejected["non_finite"] == 1
    assert m.match("a", 0.5, [1.0]) == [] and m.rejected["bad_shape"] == 1
    assert m.match("a", 0.5, [1.0, 2.0])[0].target.tolist() == [1.0, 2.0]


def test_forecast_targets_are_the_samples_after_the_window():
    ft = ForecastTargets(horizon=3)
    ft.add_window("s", t_end=0.9, z=np.zeros(2, np.float32))
    ft.add_window("s", t_end=1.9, z=np.ones(2, np.float32))
    t = np.arange(0, 40) / 10.0
    v = (t * 10).astype(np.float32)[:, None]
    done = ft.add_samples("s", t[:15], v[:15]) + ft.add_samples("s", t[15:], v[15:])
    assert [d[2].tolist() for d in done] == [[10.0, 11.0, 12.0], [20.0, 21.0, 22.0]]
    assert ft.pending() == 0


def test_forecast_cache_is_bounded():
    ft = ForecastTargets(horizon=5, max_windows=2)
    for i in range(5):
        ft.add_window("s", t_end=float(i), z=np.zeros(1, np.float32))
    assert ft.pending() == 2 and ft.dropped == 3


_EVENTS = st.lists(st.one_of(
    st.tuples(st.just("w"), st.sampled_from(["a", "b"]), st.floats(0.1, 2.0)),  # next window of a stream, this long
    st.tuples(st.just("l"), st.sampled_from(["a", "b", None]), st.floats(-2.0, 12.0), st.sampled_from([0, 1, "imbalance"])),
), max_size=80)


@settings(max_examples=100, deadline=None)
@given(_EVENTS, st.integers(0, 80), st.booleans())
@example([("w", "a", 1.0), ("w", "b", 1.0), ("l", None, 1.5, 1), ("w", "a", 1.0), ("l", "a", 1.2, 0), ("w", "b", 1.0)], 4, True)
def test_a_restored_label_cache_matches_as_if_there_had_been_no_restart(events, cut, stream_keys):
    """Cut a stream of windows and labels anywhere, checkpoint the matcher through the real
    checkpoint encoding and restore it into a fresh one: every later label is matched to
    the same window (or rejected for the same reason) as without the restart."""
    from edge.ingest.types import StreamKey
    from edge.state import decode_state, encode_state

    def key(k):
        return None if k is None else (StreamKey("dev", k) if stream_keys else k)

    def run(m, evs, ends):
        out = []
        for e in evs:
            if e[0] == "w":
                t0 = ends.get(e[1], 0.0)
                ends[e[1]] = t0 + e[2]
                got = m.add_window(key(e[1]), t0, t0 + e[2], np.full(3, t0, np.float32))
            else:
                got = m.match(key(e[1]), e[2], e[3])
            out.append(sorted((str(x.key), x.window.t_start, x.target) for x in got))
        return out

    cut %= len(events) + 1
    kw = dict(classes=CLASSES, tolerance_s=0.1, max_windows=6, max_pending=5)
    whole = LabelMatcher(**kw)
    expect = run(whole, events, {})
    first, ends = LabelMatcher(**kw), {}
    got = run(first, events[:cut], ends)
    rejected = first.rejected.copy()
    second = LabelMatcher(**kw)
    for _ in range(2):  # restarted twice over: a restored cache checkpoints again
        second.load_state_dict(decode_state(encode_state(first.state_dict())), make_key=lambda k: StreamKey(*k),
                               feature_size=3)
        first = second
    second.rejected = rejected  # counters are not state; carried here to compare them
    got += run(second, events[cut:], ends)
    assert got == expect
    assert dict(second.rejected) == dict(whole.rejected)


def _two_streams():
    m = _matcher()
    for i in range(3):
        m.add_window("b", 10.0 + i, 11.0 + i, np.full(2, i, np.float32))
    return m


def test_a_restore_drops_only_the_stream_that_does_not_fit():
    """Issue 19: one stream whose cached times were not in order made the whole restore fail,
    and every stream's windows and pending labels were lost; now that stream alone is dropped."""
    s = _two_streams().state_dict()
    s["streams"][1]["t_end"][1] = 99.0  # b's ends out of order
    s["pending"] = [{"t": 9.0, "key": "a", "target": 1, "done": []}]
    fresh = LabelMatcher(classes=CLASSES, tolerance_s=0.1, max_windows=4)
    assert fresh.load_state_dict(s) == 4
    assert set(fresh.windows) == {"a"} and len(fresh.pending) == 1 and fresh.restore_dropped == {"streams": 1}
    assert fresh.match("a", 2.5, 1)[0].window.t_start == 2.0
    s["streams"][0]["t_end"][1] = float("nan")
    assert LabelMatcher(classes=CLASSES, max_windows=4).load_state_dict(s) == 0
    fresh = LabelMatcher(classes=CLASSES, max_windows=4)
    assert fresh.load_state_dict(_two_streams().state_dict(), feature_size=5) == 0  # another model's features
    assert fresh.restore_dropped == {"streams": 2}
    other = LabelMatcher(classes=["x"], tolerance_s=0.1, max_windows=4)
    s = _matcher().state_dict()
    s["pending"] = [{"t": 9.0, "key": "a", "target": 1, "done": []}, {"t": 9.5, "key": "a", "target": "x", "done": []}]
    assert other.load_state_dict(s) == 4 and len(other.pending) == 1 and other.restore_dropped == {"pending": 1}
    with pytest.raises(ValueError, match="format"):
        other.load_state_dict({"format": 2})
    with pytest.raises(ValueError, match="streams"):
        other.load_state_dict({"format": 1})
    assert len(other.windows["a"]) == 4  # a refused state changed nothing


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.floats(0.1, 3.0)), min_size=1, max_size=60),
       st.sets(st.integers(0, 5)), st.sampled_from(["order", "nan", "shape"]))
def test_a_restore_keeps_every_stream_that_fits_whatever_the_others_hold(windows, broken, how):
    """Hypothesis: corrupt any set of streams in a checkpoint, any way: exactly those are
    dropped (counted), and every other stream matches its labels as before the restart."""
    kw = dict(classes=CLASSES, tolerance_s=0.0, max_windows=8)
    m, ends = LabelMatcher(**kw), {}
    for s, d in windows:
        t0 = ends.get(s, 100.0 * s)
        ends[s] = t0 + d
        m.add_window(f"s{s}", t0, t0 + d, np.full(2, t0, np.float32))
    state = m.state_dict()
    bad = set()
    for st_ in state["streams"]:
        k = int(st_["key"][1:])
        if k in broken and (how != "order" or len(st_["t_end"]) > 1):
            bad.add(st_["key"])
            if how == "order":
                st_["t_end"][0] = st_["t_end"][-1] + 1.0
                st_["t_start"][0] = st_["t_start"][-1] + 0.5
            elif how == "nan":
                st_["t_start"][-1] = float("nan")
            else:
                st_["z"] = st_["z"][:, :1] if len(st_["z"]) else np.zeros((1, 2), np.float32)
    r = LabelMatcher(**kw)
    r.load_state_dict(state, feature_size=None if how != "shape" else 2)
    assert set(r.windows) == set(m.windows) - bad
    assert r.restore_dropped.get("streams", 0) == len(bad)
    for k, dq in m.windows.items():
        for w in dq:
            mid = (w.t_start + w.t_end) / 2
            got = r.match(k, mid, 1)
            if k in bad:
                assert got == []
            else:
                assert [x.window.t_start for x in got] == [m.match(k, mid, 1)[0].window.t_start]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.floats(0.2, 2.0), st.floats(-200.0, 5.0)), min_size=1,
                max_size=80), st.integers(0, 80))
def test_time_going_back_never_blocks_new_windows(steps, cut):
    """Hypothesis: a stream's clock may go back at any window (a sensor restarted with an earlier
    clock, a receive clock stepped back), across a restart or not: the cache stays in time
    order per stream, and a label inside the newest window always matches it, never
    ``too_old`` or ``future`` (issue 19: restored later-stamped windows blocked new ones)."""
    kw = dict(classes=CLASSES, tolerance_s=0.05, max_windows=6)
    m, ends = LabelMatcher(**kw), {}
    for i, (k, d, jump) in enumerate(steps):
        if i == cut:
            m2 = LabelMatcher(**kw)
            m2.load_state_dict(m.state_dict())
            m = m2
        t0 = ends.get(k, 1000.0) + (jump if jump < 0 else 0.0)
        ends[k] = t0 + d
        m.add_window(k, t0, t0 + d, np.zeros(2, np.float32))
        for dq in m.windows.values():
            e = [w.t_end for w in dq]
            assert e == sorted(e) and len(e) <= 6
        (hit,) = m.match(k, t0 + d / 2, 1)
        assert hit.window.t_start == t0
    assert not m.rejected.get("too_old") and not m.rejected.get("future")


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=300), st.integers(1, 40), st.integers(1, 12),
       st.integers(0, 300))
def test_the_cache_is_bounded_in_bytes_and_keeps_the_newest_windows(streams, per_stream, budget_windows, cut):
    """However many streams send windows, the cache holds at most max_bytes: what stays is,
    of each stream's newest max_windows, the newest windows of all streams (a model of the
    rule checked against it, through a checkpoint and restore at ``cut``); labels for
    evicted windows are rejected, never matched to another window."""
    from edge.adapt.labels import _WINDOW_BYTES

    D = 4
    budget = budget_windows * (_WINDOW_BYTES + 4 * D)
    kw = dict(classes=CLASSES, tolerance_s=0.0, max_windows=per_stream, max_bytes=budget)
    m = LabelMatcher(**kw)
    t_end, arrived = {}, []
    for i, s in enumerate(streams):
        if i == cut:
            m2 = LabelMatcher(**kw)
            m2.load_state_dict(m.state_dict())
            m = m2
        t0 = t_end.get(s, 10.0 * s)
        t_end[s] = t0 + 1.0
        m.add_window(f"s{s}", t0, t0 + 1.0, np.full(D, i, np.float32))
        arrived.append((f"s{s}", t0))
        assert m.nbytes <= budget
    newest_per_stream = [(k, t) for j, (k, t) in enumerate(arrived)
                         if sum(1 for k2, _ in arrived[j + 1:] if k2 == k) < per_stream]
    # a restore merges the streams by time, not arrival: compare as sets of the kept windows' count and newest
    kept = {(k, w.t_start) for k, dq in m.windows.items() for w in dq}
    assert len(kept) == min(len(newest_per_stream), budget_windows)
    if cut >= len(streams):  # no restore: exactly the newest arrivals
        assert kept == set(newest_per_stream[len(newest_per_stream) - len(kept):])
    assert m.nbytes == sum(_WINDOW_BYTES + 4 * D for _ in kept)
    for k, t in set(arrived) - kept:  # an evicted window's label finds nothing else
        assert m.match(k, t + 0.5, 0) == []


def test_a_regression_label_cache_round_trips_with_its_pending_targets():
    from edge.state import decode_state, encode_state

    m = LabelMatcher(outputs=2, tolerance_s=0.0, max_windows=8)
    m.add_window("a", 0.0, 1.0, np.zeros(3, np.float32))
    assert m.match("a", 0.5, [1.0, 2.0]) and m.match("a", 3.0, [3.0, 4.0]) == [] and len(m.pending) == 1
    r = LabelMatcher(outputs=2, tolerance_s=0.0, max_windows=8)
    r.load_state_dict(decode_state(encode_state(m.state_dict())), feature_size=3)
    assert r.match("a", 0.5, [1.0, 2.0]) == [] and r.rejected["duplicate"] == 1
    (hit,) = r.add_window("a", 2.5, 3.5, np.ones(3, np.float32))
    assert hit.window.t_start == 2.5 and hit.target.tolist() == [3.0, 4.0]
    other = LabelMatcher(outputs=3, max_windows=8)  # another model's targets: the pending label alone is dropped
    assert other.load_state_dict(m.state_dict()) == 1 and other.pending == [] and other.restore_dropped == {"pending": 1}
