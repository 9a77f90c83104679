"""The demo's lockstep pacing (edge.demo.pacing): the labels go out in one order whatever the
order the predictions arrive in, and the feed waits for the learner, so a seed's story is
the same on every run (issue 21: the post-drift figure varied from 48% to 74%)."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from edge.demo.pacing import Lockstep

L = H = 256


def _pace(streams, *, handled=lambda: 0, clock=lambda: 0.0, timeout_s=10.0):
    sent: list[tuple[str, int]] = []
    pace = Lockstep(streams, send=lambda p: sent.append((p["key"], p["k"])), handled=handled, length=L, hop=H,
                    timeout_s=timeout_s, clock=clock)
    return pace, sent


@settings(max_examples=60, deadline=None)
@given(order=st.permutations([s for s in ("m-0", "m-1", "serial-0") for _ in range(6)]))
def test_labels_go_out_in_rounds_in_one_order_whatever_order_the_predictions_come_in(order):
    pace, sent = _pace(["serial-0", "m-1", "m-0"])
    seen = {"m-0": 0, "m-1": 0, "serial-0": 0}
    for key in order:  # each stream's own predictions stay in order, as one MQTT subscription keeps them
        pace.on_prediction(key, {"key": key, "k": seen[key]})
        seen[key] += 1
    # window k is labelled once every stream predicted window k + 1: rounds 0..4 of 6 windows
    assert sent == [(s, k) for k in range(5) for s in ("m-0", "m-1", "serial-0")]


def test_the_feed_waits_for_the_learner_before_the_window_after_the_next():
    done = [0]
    pace, sent = _pace(["a", "b"], handled=lambda: done[0])
    assert pace.may_publish(2 * L)  # windows 0 and 1 need no round
    assert not pace.may_publish(3 * L)  # window 2 needs round 0, not labelled yet
    for k in range(2):
        for s in ("a", "b"):
            pace.on_prediction(s, {"key": s, "k": k})
    assert sent == [("a", 0), ("b", 0)]
    assert not pace.may_publish(3 * L)  # round 0 labelled, not yet learned
    done[0] = 1
    assert not pace.may_publish(3 * L)  # half of round 0 learned
    done[0] = 2
    assert pace.may_publish(3 * L) and not pace.may_publish(4 * L)
    assert pace.summary(0.0)["lockstep"]


def test_a_node_that_stops_answering_releases_the_pacing_after_its_timeout_and_says_so():
    now = [0.0]
    pace, sent = _pace(["a", "b"], clock=lambda: now[0], timeout_s=5.0)
    pace.on_prediction("a", {"key": "a", "k": 0})  # b never predicts
    assert not pace.may_publish(3 * L)
    now[0] = 4.9
    assert not pace.may_publish(3 * L) and sent == []
    now[0] = 5.0
    assert pace.may_publish(3 * L)
    assert sent == [("a", 0)]  # what was held is labelled, and later windows right away
    pace.on_prediction("b", {"key": "b", "k": 0})
    assert sent == [("a", 0), ("b", 0)]
    s = pace.summary(0.0)
    assert s["lockstep"] is False and s["fell_back_at"] == 5.0 and s["feed_waited_s"] == 5.0
