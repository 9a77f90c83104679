"""Issue 19, clock steps and a wrong clock, with handed-in clocks (no sleeping, no real time).

The pipeline runs with a wall clock that a test steps (as NTP does, the monotonic clock
untouched) or sets wrong, while the sensors and the labeller keep true time; samples come
with ``t`` and without it. Labels still find their windows, nothing is refused as
``absurd_time`` or ``future``, latency comes from the monotonic clock, and predictions say
which clock their times are on. The end-to-end runs with libfaketime are in
tests/test_faults_time.py.
"""
from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.adapt.labels import LabelMatcher
from edge.errors import DecodeError
from edge.ingest.labelauth import LabelGate, sign_label
from edge.ingest.topics import TopicRoute
from edge.config import ModelConfig, MqttConfig, QueueConfig, WindowConfig
from edge.pipeline import ModelShape, Ports, Routes, build_pipeline

TRUE0 = 1_765_000_000.0  # the true time at monotonic 0
RATE = 100.0
LEN = 50                 # samples a window: 0.5 s


class _Head:
    version = "h"

    def predict(self, z):
        import numpy as np

        return np.tile([0.6, 0.4], (len(z), 1))


class Rig:
    """A pipeline fed by a sensor with ``t``, one without and a labeller, all on true time,
    while its own wall clock is ``true + wall_error`` (a test changes ``wall_error``)."""

    def __init__(self, wall_error: float = 0.0):
        self.mono, self.wall_error = 100.0, wall_error
        self.published: list[tuple[str, bytes]] = []
        self.matcher = LabelMatcher(classes=["a", "b"], tolerance_s=0.0, max_windows=10_000)
        self.matches: list = []
        self.windows: list = []
        p = build_pipeline(window=WindowConfig(length=LEN, hop=LEN, sample_rate=RATE, max_clock_skew_s=86400.0),
                           queues=QueueConfig(max_lag_s=0.0), model=ModelConfig(max_wait_ms=0.0), mqtt=MqttConfig(),
                           shape=ModelShape(channels=1, window=LEN, sample_rate=RATE, classes=("a", "b"), model_id="m"),
                           routes=Routes(((TopicRoute("s/{device}/{stream}"), "auto"),),
                                         TopicRoute("edge/n/labels/#"), "edge/n"),
                           ports=Ports(features=lambda x: x.mean(axis=2), head_ref=_Head,
                                       send=lambda t, b: self.published.append((t, b)), on_window=self._window,
                                       on_label=self._label))
        p.wall_clock, p.mono_clock = self.wall, lambda: self.mono
        self.p = p
        self.k = 0  # samples sent per stream

    def true(self) -> float:
        return TRUE0 + self.mono

    def wall(self) -> float:
        return self.true() + self.wall_error

    def _window(self, key, t0, t1, z, scores):
        self.windows.append((key.stream, t0, t1))
        self.matches += self.matcher.add_window(key, t0, t1, z)

    def _label(self, key, t, value):
        self.matches += self.matcher.match(key, t, value)

    def send(self, seconds: float, *, timed: bool = True) -> None:
        """``seconds`` of both streams, 10 samples a read, and the pipeline drains them."""
        for _ in range(int(seconds * RATE / 10)):
            self.mono += 10 / RATE
            t_last = self.true()
            msgs = [("s/m1/untimed", b'{"v": [%d]}' % (self.k + i)) for i in range(10)]
            if timed:
                msgs += [("s/m1/timed", b'{"t": %r, "v": [%d]}' % (t_last - (9 - i) / RATE, self.k + i)) for i in range(10)]
            self.k += 10
            self.p.offer_batch(msgs, self.wall())
            self.drain()

    def label(self, stream: str, t: float, value: str = "b") -> None:
        self.p.offer_message(f"edge/n/labels/m1/{stream}", orjson.dumps({"t": t, "label": value}), self.wall())
        self.drain()

    def drain(self) -> None:
        ready: list = []
        while self.p._drain(ready):
            pass
        if ready:
            self.p._serve(ready)

    def label_every_window(self, since: int) -> tuple[int, int]:
        """Label the middle of every window cut since index ``since``, in true time: (labels, matched)."""
        before = len(self.matches)
        todo = self.windows[since:]
        for stream, t0, t1 in todo:
            self.label(stream, (t0 + t1) / 2)
        return len(todo), len(self.matches) - before


@pytest.mark.parametrize("error", [86400.0, 23 * 3600.0, -3600.0, -3 * 365 * 86400.0])
def test_a_wrong_node_clock_still_matches_true_time_labels(error):
    """A day ahead (every label was absurd_time), 23 h ahead (the untimed stream's labels
    went unmatched), an hour behind (labels were future) and three years behind."""
    rig = Rig(wall_error=error)
    rig.send(5.0)
    n, matched = rig.label_every_window(0)
    assert n >= 18 and matched == n, (n, matched, dict(rig.matcher.rejected))
    assert rig.p.bad == {} and not rig.matcher.rejected
    assert {s for s, _, _ in rig.windows} == {"timed", "untimed"}
    for _, t0, t1 in rig.windows:  # every window on true time, whatever this node's clock says
        assert abs(t1 - rig.true()) < 6.0
    assert rig.p.clock.basis == "sources" and abs(rig.p.clock.skew - (-error)) < 1.0


@pytest.mark.parametrize("step", [3 * 365 * 86400.0, -3600.0, 600.5 * 3])
def test_a_wall_clock_step_moves_no_stamp_and_no_latency(step):
    """NTP steps the wall clock years forward or an hour back in mid-stream: no window is
    lost or moved, labels keep matching, latency stays small and positive (it was -18 s and
    94,608,051 s), and the step is reported."""
    rig = Rig()
    events: list = []
    rig.p.on_clock = lambda kind, **f: events.append((kind, f))
    rig.send(3.0)
    cut = len(rig.windows)
    rig.wall_error += step
    rig.send(3.0)
    n, matched = rig.label_every_window(0)
    assert matched == n and rig.p.bad == {} and not rig.matcher.rejected
    for st_ in ("timed", "untimed"):
        ends = [t1 for s, _, t1 in rig.windows if s == st_]
        assert ends == sorted(ends) and len(ends) == 12  # 6 s of 0.5 s windows, none lost
    assert rig.windows[cut:]
    snap = rig.p.latency.snapshot()
    assert snap["count"] > 0 and 0.0 <= snap["sum_s"] < 0.01 * snap["count"] and 0.0 <= snap["p99_ms"] < 10.0, snap
    assert ("clock_step", {"step_s": round(step, 3), "basis": "sources"}) in events
    assert any(k == "clock_skew" for k, _ in events)
    w = rig.p.windowers
    assert all(x.counters["out_of_order"] == 0 and x.counters["gaps"] == 0 for x in w.values())


def test_predictions_say_which_clock_their_times_are_on():
    rig = Rig()
    rig.send(1.0, timed=False)
    clocks = {orjson.loads(b)["stream"]: orjson.loads(b)["clock"] for _, b in rig.published}
    assert clocks == {"untimed": "node"}
    rig.send(1.0)
    clocks = {orjson.loads(b)["stream"]: orjson.loads(b)["clock"] for _, b in rig.published[-4:]}
    assert clocks == {"untimed": "sources", "timed": "sensor"}


def test_without_a_timed_source_a_step_back_restarts_the_untimed_line_at_once():
    """An hour back with only untimed samples: the wall clock is the only reference, so the
    stamps follow it at once (a new time line, the partial window discarded) instead of
    advancing at a quarter of their spacing for 80 minutes; labels then match the new line."""
    rig = Rig()
    rig.send(2.0, timed=False)
    rig.wall_error -= 3600.0
    cut = len(rig.windows)
    rig.send(2.0, timed=False)
    new = rig.windows[cut:]
    assert new and all(abs(t1 - rig.wall()) < 3.0 for _, _, t1 in new)
    st_ = rig.p.bank.streams[next(iter(rig.p.bank.streams))]
    assert st_.stamper.restarts == 1 and st_.stamper.ahead == 0
    n, matched = rig.label_every_window(cut)
    assert n and matched == n


def test_an_absurd_sensor_among_agreeing_ones_is_refused_alone():
    rig = Rig(wall_error=5 * 86400.0)  # this node's clock is off by more than max_clock_skew_s: no matter
    rig.send(1.0)
    rig.p.offer_batch([("s/m2/wrong", b'{"t": %r, "v": [1]}' % (rig.true() + 2 * 86400.0))], rig.wall())
    rig.p.offer_batch([("s/m3/right", b'{"t": %r, "v": [1]}' % rig.true())], rig.wall())
    rig.drain()
    assert rig.p.bad == {"absurd_time": 1}


KEY = b"k" * 32


def _signed(t: float, i: int = 0) -> bytes:
    return sign_label(KEY, "op", {"t": t, "label": "a", "i": i}, node="n")


@settings(max_examples=60, deadline=None)
@given(st.floats(-3600.0, 10 * 365 * 86400.0).filter(lambda x: abs(x) > 601.0), st.integers(1, 30))
def test_signed_labels_pass_a_node_clock_step_beyond_max_age(step, n):
    """After a step of this node's clock by more than max_age_s (600 s) either way, signed
    labels on the labeller's time line still pass (judged by the labellers' line advanced by
    the steady clock); replays are still refused."""
    gate = LabelGate(keys={"op": KEY}, node="n", max_age_s=600.0)
    steady, true = 50.0, TRUE0
    gate.open(_signed(true), now=true, steady=steady)
    for i in range(1, n + 1):
        steady += 1.0
        true += 1.0
        gate.open(_signed(true, i), now=true + step, steady=steady)
    with pytest.raises(DecodeError) as e:
        gate.open(_signed(true, n), now=true + step, steady=steady)
    assert e.value.kind == "label_replay"
    with pytest.raises(DecodeError) as e:  # still too old on both clocks
        gate.open(_signed(true - 700.0, 99), now=true + step, steady=steady)
    assert e.value.kind in ("label_replay", "label_time")


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-3 * 365 * 86400.0, 3 * 365 * 86400.0), min_size=1, max_size=6), st.integers(1, 3))
def test_the_newest_checkpoint_is_loaded_whatever_the_clock_said_when_each_was_written(offsets, keep):
    """A device booting years in the past, then stepped (either way), between checkpoints: file
    names are sequence numbers, so the last one saved is the one restored (never by mtime)."""
    import os
    import tempfile

    import numpy as np

    from edge.state import CheckpointStore

    with tempfile.TemporaryDirectory() as d:
        for i, off in enumerate(offsets):
            store = CheckpointStore(d, keep=keep, clock=lambda off=off: TRUE0 + off)  # a restart per save
            p = store.save({"step": i, "w": np.full(2, i, np.float32)})
            os.utime(p, (TRUE0 + off, TRUE0 + off))  # the file's time is whatever the clock said
        got = CheckpointStore(d, keep=keep).restore()
        assert got.state["step"] == len(offsets) - 1
