"""The label matcher's bookkeeping is bounded and its waiting labels are indexed (issue 18),
with the matching rule unchanged: held to the matcher as it was (tests/labels_oracle.py)."""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edge.adapt.labels import _WINDOW_BYTES, LabelMatcher
from tests import labels_oracle

CLASSES = ["normal", "imbalance"]
D = 2

_WINDOW = st.tuples(st.just("w"), st.sampled_from(["a", "b", "c"]), st.floats(0.1, 2.0),
                    st.sampled_from([0.0, 0.0, 0.0, 0.5, 3.0, -0.3, -1.5, -40.0]))  # gap after (or step back from) the last end
_LABEL = st.tuples(st.just("l"), st.sampled_from(["a", "b", "c", "d", None]),  # after (or before) its stream's last end
                   st.one_of(st.floats(-6.0, 14.0), st.sampled_from([-2.5, -1.0, -0.05, 0.05, 0.3, 0.7, 1.2, 2.5, 11.0])),
                   st.sampled_from([0, 1, "imbalance", "x"]))
_EVENTS = st.lists(st.one_of(_WINDOW, _WINDOW, _LABEL, _LABEL, _LABEL, st.just(("r",))), max_size=90)
_PARAMS = st.fixed_dictionaries({
    "max_windows": st.integers(1, 6), "max_pending": st.integers(1, 8), "tolerance_s": st.sampled_from([0.0, 0.1, 0.6]),
    "max_future_s": st.sampled_from([0.5, 3.0, 10.0]), "max_bytes": st.sampled_from([None, 3, 7])})


def _view(m) -> dict:
    """Everything a matcher's user can see."""
    return {"windows": {k: [(w.t_start, w.t_end, w.labelled) for w in dq] for k, dq in m.windows.items()},
            "pending": [(t, k, tg if isinstance(tg, int) else tuple(tg), sorted(d, key=str)) for t, k, tg, d in m.pending],
            "rejected": {k: v for k, v in m.rejected.items() if v}, "nbytes": m.nbytes, "evicted": m.evicted,
            "superseded": m.superseded, "accepted": m.accepted}


def _step(m, cls, e, ends):
    if e[0] == "r":
        fresh = cls(**m._kw)
        fresh._kw = m._kw
        fresh.load_state_dict(m.state_dict())
        fresh.rejected, fresh.accepted, fresh.evicted, fresh.superseded = m.rejected, m.accepted, m.evicted, m.superseded
        return fresh, []
    if e[0] == "w":
        _, k, d, jump = e
        t0 = ends.get(k, 100.0) + jump
        ends[k] = t0 + d
        got = m.add_window(k, t0, t0 + d, np.full(D, t0, np.float32), served=None)
    else:
        _, k, dt, label = e
        base = max(ends.values(), default=100.0) if k is None or k not in ends else ends[k]
        got = m.match(k, base + dt, label)
    return m, [(g.key, g.window.t_start, g.window.t_end, g.target, g.t) for g in got]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_EVENTS, _PARAMS)
@example([("l", "c", 0.0, 1), ("w", "a", 1.0, 0.0), ("w", "c", 1.0, -100.0), ("w", "a", 1.0, 0.0)],
         {"max_windows": 4, "max_pending": 4, "tolerance_s": 0.1, "max_future_s": 3.0, "max_bytes": None})
@example([("w", "a", 1.0, 0.0), ("l", None, 2.0, 1), ("w", "b", 1.0, 0.0), ("w", "a", 1.0, -1.5), ("w", "a", 2.0, 0.0)],
         {"max_windows": 2, "max_pending": 4, "tolerance_s": 0.0, "max_future_s": 10.0, "max_bytes": 3})
@example([("w", "b", 1.0, 0.0), ("l", "b", 0.5, 1), ("w", "a", 1.0, 0.0), ("w", "a", 1.0, 0.0), ("w", "a", 1.0, 0.0),
          ("w", "a", 1.0, 0.0), ("w", "a", 1.0, 0.0)],  # the stream a label is ahead of leaves the cache
         {"max_windows": 6, "max_pending": 4, "tolerance_s": 0.1, "max_future_s": 3.0, "max_bytes": 3})
@example([("w", "a", 1.0, 0.0), ("w", "b", 1.0, 0.0), ("w", "b", 1.0, 3.0), ("l", None, -2.5, 1), ("w", "b", 1.0, -3.0)],
         {"max_windows": 6, "max_pending": 4, "tolerance_s": 0.1, "max_future_s": 10.0, "max_bytes": None})  # time back into a gap
@example([("w", "a", 1.0, 0.0), ("l", "a", 0.7, 1), ("l", "a", 0.3, 0), ("w", "a", 1.0, 0.0)],
         {"max_windows": 6, "max_pending": 4, "tolerance_s": 0.1, "max_future_s": 10.0, "max_bytes": None})  # arrival order
def test_matches_and_refusals_are_those_of_the_matcher_before_the_index(events, params):
    """Hypothesis: windows of three streams (gaps, overlaps, clocks stepping back by less or
    more than a window), labels ahead, inside, behind, for streams not seen yet and node-wide,
    restores anywhere, under every bound: each step gives the same matches in the same order,
    the same refusals, the same waiting labels and the same cache as the old matcher."""
    kw = dict(params, classes=CLASSES)
    if kw["max_bytes"] is not None:
        kw["max_bytes"] *= _WINDOW_BYTES + 4 * D
    new, old = LabelMatcher(**kw), labels_oracle.LabelMatcher(**kw)
    new._kw = old._kw = kw
    ends_new, ends_old = {}, {}
    for e in events:
        new, got = _step(new, LabelMatcher, e, ends_new)
        old, expect = _step(old, labels_oracle.LabelMatcher, e, ends_old)
        assert [g[:4] for g in got] == [x[:4] for x in expect] and [g[4] for g in got] == [x[4] for x in expect], e
        assert _view(new) == _view(old), e


def _count_finds(m) -> list:
    calls = [0]
    find = m._find

    def counted(key, t):
        calls[0] += 1
        return find(key, t)
    m._find = counted
    return calls


def test_a_window_does_not_look_at_the_labels_it_cannot_resolve():
    """256 labels waiting ahead of a stream (or for one not seen yet, or node-wide): a window
    that reaches none of them looks at none of them (before: each window tried all 256,
    200x slower), and the one that reaches a label resolves exactly it."""
    m = LabelMatcher(classes=CLASSES, tolerance_s=0.0, max_future_s=1e6, max_pending=300, max_windows=8)
    m.add_window("a", 0.0, 1.0, np.zeros(D, np.float32))
    for i in range(100):
        assert m.match("a", 5000.0 + i, 1) == []
        assert m.match("later", 5000.0 + i, 1) == []
    for i in range(56):
        assert m.match(None, 7000.0 + i, 0) == []
    assert len(m.pending) == 256
    calls = _count_finds(m)
    for i in range(1, 200):
        assert m.add_window("a", float(i), i + 1.0, np.zeros(D, np.float32)) == []
    assert calls[0] == 0
    got = m.add_window("a", 5000.0, 5000.5, np.zeros(D, np.float32))
    assert [(g.key, g.t) for g in got] == [("a", 5000.0)] and calls[0] == 1 and len(m.pending) == 255


def test_the_order_of_windows_is_bounded_by_the_cache():
    """200,000 windows through a cache of 8 a stream: the arrival order the byte bound evicts
    by holds about as many entries as windows are cached (before: one per window ever)."""
    for max_bytes in (None, 20 * (_WINDOW_BYTES + 4 * D)):
        m = LabelMatcher(classes=CLASSES, max_windows=8, max_bytes=max_bytes)
        for i in range(100_000):
            for k in ("a", "b"):
                m.add_window(k, float(i), i + 1.0, np.zeros(D, np.float32))
        cached = sum(len(dq) for dq in m.windows.values())
        assert cached == 16 and len(m._order) <= 2 * cached + 64, len(m._order)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "new", None]), st.floats(-3.0, 6.0)), max_size=200),
       st.integers(1, 12))
def test_the_index_of_waiting_labels_stays_bounded(labels, max_pending):
    """Labels that wait and resolve, over and over: no structure of the index grows beyond a
    bound set by max_pending (stale heap entries are rebuilt away)."""
    m = LabelMatcher(classes=CLASSES, tolerance_s=0.1, max_future_s=4.0, max_pending=max_pending, max_windows=4)
    end = 0.0
    for i, (k, dt) in enumerate(labels):
        m.match(k, end + dt, 1)
        m.add_window("a" if i % 3 else "b", end, end + 0.5, np.zeros(D, np.float32))
        end += 0.5
        sizes = m._waiting.sizes()
        assert sizes["labels"] <= max_pending
        assert sizes["later"] <= 2 * (2 * max_pending + 65)  # a heap per stream with windows ("a", "b")
        assert sizes["unknown"] <= 2 * max_pending + 65 and sizes["nodewide"] <= max_pending
