"""The serving thread: inbox lanes -> router -> windower bank -> server -> publisher.

One named thread (``pipeline``) owns every part after the inbox. Each pass takes the
control and label lanes first (small, never shed behind sensor data), then up to a
budget of sensor messages; every window that became ready in a pass, plus those that
complete within ``[model] max_wait_ms``, is served as one batch. It never waits on
training: the head is read through ``head_ref()``, an atomic reference the learner swaps.

Each message is one item: a ``DecodeError`` is bad input (counted per kind, logged
rate-limited, skipped); any other exception is an internal error, handed to the
``Supervisor`` (counted per thread and kind, logged, skipped). A failing backend costs
the batch it was serving, not the thread. At stop, what is still queued is served for up
to ``drain_s`` seconds, and what is left after that is counted (``shutdown_dropped``).
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable

from edge.errors import DecodeError, brief
from edge.ingest.payload import decode_sample
from edge.ingest.clock import NodeClock
from edge.observe import RateLimitedLog
from edge.pipeline.accounting import item_samples
from edge.pipeline.bank import Stream, WindowerBank
from edge.pipeline.inbox import Inbox
from edge.pipeline.publisher import Publisher
from edge.pipeline.records import LabelIn, RawMessageIn, SampleBlock, SensorBatch, StreamReset, Window
from edge.pipeline.router import LABEL, SENSOR, Router, check_times as _check_times
from edge.pipeline.server import Server
from edge.serve.latency import LatencyHistogram
from edge.supervise import Supervisor

log = logging.getLogger("edge.pipeline")
THREAD = "pipeline"
_SINKS_MAX = 100_000
_MAX_PENDING_RESETS = 1024  # resets waiting for the sensor items offered before them


class Pipeline:
    """Decode -> window -> serve -> publish, on one supervised thread."""

    def __init__(self, *, inbox: Inbox, router: Router, bank: WindowerBank, server: Server, publisher: Publisher,
                 topic_base: str, max_batch: int = 32, max_wait_ms: float = 0.0, drain_s: float = 2.0,
                 supervisor: Supervisor | None = None,
                 on_window: Callable[..., None] | None = None, on_label: Callable[..., None] | None = None,
                 on_samples: Callable[..., None] | None = None,
                 on_flag: Callable[[Any, str | None, str | None], None] | None = None,
                 on_stream: Callable[[Any], None] | None = None):
        self.inbox, self.router, self.bank, self.server, self.publisher = inbox, router, bank, server, publisher
        self.topic_base = topic_base
        self.max_batch, self.max_wait, self.drain_s = max_batch, max_wait_ms / 1e3, drain_s
        self.sup = supervisor or Supervisor()
        self.on_window, self.on_label, self.on_samples, self.on_flag = on_window, on_label, on_samples, on_flag
        self.on_stream = on_stream
        self.latency = LatencyHistogram()
        # receive times on the monotonic clock, placed on the sources' time line (or the wall
        # clock's): a step of the wall clock moves no stamp, latency or age (docs/TIME_AND_NAMES.md)
        self.clock = NodeClock(max_skew_s=router.max_skew)
        router.clock = self.clock
        self.wall_clock, self.mono_clock = time.time, time.monotonic  # handed in by tests that step the wall clock
        self.on_clock: Callable[..., None] | None = None  # (kind, **fields): a clock step or skew to report
        self.counters = {"messages": 0, "windows_served": 0, "serve_errors": 0, "batches": 0, "labels": 0,
                         "stream_resets": 0, "shutdown_dropped": 0, "shutdown_dropped_samples": 0}
        self.bad: dict[str, int] = {}
        self._lock = threading.Lock()  # the owner's lock: new keys of ``bad``, and readers' snapshots
        self._resets: collections.deque[StreamReset] = collections.deque()  # taken, waiting for the sensor items before them
        self._sinks: dict[str, tuple[Stream, bool]] = {}  # topic -> (its stream, single-sample fast path ok)
        self._badlog = RateLimitedLog(log)
        self._stop = threading.Event()
        self.thread = self.sup.spawn(THREAD, self._run)

    # ---- producers: the inbox's entry points, for the sources ------------------------
    @property
    def offer_batch(self):
        return self.inbox.offer_batch

    @property
    def offer_message(self):
        return self.inbox.offer_message

    @property
    def push_samples(self):
        return self.inbox.push_samples

    @property
    def push_label(self):
        return self.inbox.push_label

    @property
    def reset_stream(self):
        return self.inbox.reset_stream

    @property
    def windowers(self) -> dict:
        """Each stream's ``Windower`` (read-only view for status and metrics)."""
        return {k: s.windower for k, s in self.bank.snapshot()}

    def depth(self) -> int:
        return self.inbox.depth()

    def snapshot(self) -> dict[str, Any]:
        """The pipeline's counters, bad input by kind and its lanes, copied under the owners'
        locks: what a reader on another thread (status, a scrape) may iterate."""
        with self._lock:
            counters, bad = {**self.counters, **self.publisher.counters}, dict(self.bad)
        return {"counters": counters, "bad": bad, "lanes": self.inbox.stats()}

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Serve what is queued (up to ``drain_s``), count the rest, end the thread."""
        self._stop.set()
        self.inbox.wake.set()
        if self.thread.ident is not None:
            self.thread.join(self.drain_s + 5.0 if timeout is None else timeout)

    def bad_input(self, kind: str, where: str, msg: str) -> None:
        with self._lock:
            self.bad[kind] = self.bad.get(kind, 0) + 1
        self._badlog.warn(kind, "skipped bad input from %s (%s): %s", brief(where), kind, msg)

    # ---- the loop --------------------------------------------------------------------
    def _run(self) -> None:
        idle = 0
        inbox = self.inbox
        while not self._stop.is_set():
            ready: list[Window] = []
            if not self._drain(ready):
                idle += 1
                if idle < 50:  # a burst's next read is usually moments away: poll briefly
                    time.sleep(0.0002)
                else:  # then block until a producer puts something (an idle device sleeps)
                    inbox.wake.wait(0.1)
                    inbox.wake.clear()
                continue
            idle = 0
            if ready and len(ready) < self.max_batch and self.max_wait > 0:
                # micro-batching: windows of other streams often complete moments later;
                # wait at most max_wait for them so one backbone call serves them all
                deadline = time.perf_counter() + self.max_wait
                while len(ready) < self.max_batch and time.perf_counter() < deadline:
                    if inbox.sensor or inbox.labels or inbox.control:
                        self._drain(ready)
                    else:
                        time.sleep(0.0002)
            if ready:
                self._serve(ready)
        self._shutdown_drain()

    def _shutdown_drain(self) -> None:
        deadline = time.monotonic() + self.drain_s
        ready: list[Window] = []
        while time.monotonic() < deadline and self._drain(ready, budget=1024):
            if ready:
                self._serve(ready)
                ready = []
        if ready:
            self._serve(ready)
        self.count_left()

    def count_left(self) -> int:
        """Empty the lanes into ``shutdown_dropped``: at stop, and again once the producers
        have stopped (labels still arrive on the node's connection while the pipeline drains)."""
        left = samples = 0
        for lane in self.inbox.lanes:
            for item in lane.drain():
                left += len(item.msgs) if isinstance(item, SensorBatch) else 1
                samples += item_samples(item)
        if left:
            self.counters["shutdown_dropped"] += left
            self.counters["shutdown_dropped_samples"] += samples
            log.warning("pipeline stopped with %d queued items unprocessed (shutdown_dropped)", left)
        return left

    def _drain(self, ready: list[Window], budget: int = 8192) -> bool:
        """Take control and labels, then up to ``budget`` sensor messages; True when anything was taken."""
        inbox = self.inbox
        took = False
        for lane in (inbox.control, inbox.labels):
            while lane:
                item = lane.take()
                if item is None:
                    break
                took = True
                self._handle_one(item, ready)
        sensor = inbox.sensor
        if self._resets:
            self._apply_resets()
        while budget > 0 and sensor:
            item = sensor.take()
            if item is None:
                break
            took = True
            if type(item) is SensorBatch:
                budget -= len(item.msgs)
                self._handle_batch(item.msgs, self._now(item.received), ready)
                if self.clock.events:  # the consensus of the sources' clocks moved
                    self._clock_events()
            else:
                budget -= 1
                self._handle_one(item, ready)
            if self._resets:
                self._apply_resets()
            if len(ready) >= self.max_batch:
                self._serve(ready)
                ready.clear()
        self._report_flags()
        return took

    def _handle_one(self, item, ready: list[Window]) -> None:
        where = ""
        try:
            self.sup.fault_point(THREAD)
            if type(item) is RawMessageIn:
                where = item.topic
                self.counters["messages"] += 1
                self._handle_message(item.topic, item.payload, self._now(item.received), ready)
            elif type(item) is SampleBlock:
                where = str(item.key)
                received = self._now(item.received)
                s = self.bank.stream(item.key, received)
                ts = self.bank.push(s, self._checked(item.key, item.ts, received), item.rows, received, ready)
                if self.on_samples is not None:
                    self.on_samples(s.key, ts, item.rows)
            elif type(item) is LabelIn:
                self._label(item)
            elif type(item) is StreamReset:
                self._resets.append(item)
                if len(self._resets) > _MAX_PENDING_RESETS:  # a HELLO storm: bounded, applied early
                    self._reset(self._resets.popleft())
                self._apply_resets()
        except DecodeError as e:
            self.bad_input(e.kind, where, str(e))
        except Exception as e:
            self.sup.item_failed(THREAD, e, where=brief(where))
        if self.clock.events:
            self._clock_events()

    def _now(self, received_wall: float) -> float:
        """An item's receive time on the pipeline's clock (``NodeClock``)."""
        r = self.clock.receive_time(received_wall, wall=self.wall_clock(), mono=self.mono_clock())
        if self.clock.events:  # a step: restart what it left ahead before stamping anything new
            self._clock_events()
        return r

    def _checked(self, key, ts: list, received: float) -> list:
        """``ts`` once its given times fit the sources' clock (``DecodeError`` absurd_time)."""
        _check_times(self.clock, key, ts, received)
        return ts

    def _clock_events(self) -> None:
        """Report the clock's steps and skew; restart the time line of each untimed stream
        whose stamps now lead the receive clock (it went back), instead of squeezing stamps
        until it catches up: the windower starts anew there (partial window discarded)."""
        events, self.clock.events = self.clock.events, []
        r = self.mono_clock() + self.clock.offset
        restarted = 0
        for s in list(self.bank.streams.values()):
            st = s._stamper
            if st is not None and st.leads(r):
                st.restart()
                s.windower.reset()
                restarted += 1
        for kind, fields in events:
            if restarted:
                fields = {**fields, "streams_restarted": restarted}
                restarted = 0
            self._badlog.warn(kind, "clock: %s %s", kind, fields)
            if self.on_clock is not None:
                try:
                    self.on_clock(kind, **fields)
                except Exception as e:
                    self.sup.item_failed(THREAD, e, where=f"clock event {kind}")

    def _apply_resets(self) -> None:
        """Apply the resets whose sensor items before them have all left the lane, in order."""
        sensor, resets = self.inbox.sensor, self._resets
        while resets and sensor.passed(resets[0].after):
            self._reset(resets.popleft())

    def _reset(self, item: StreamReset) -> None:
        if self.bank.reset(item.key):
            self.counters["stream_resets"] += 1

    def _handle_batch(self, msgs: list[tuple[str, bytes]], received: float, ready: list[Window]) -> None:
        """Every message of one read; a single-sample JSON object on a known stream takes
        the fast path (``decode_sample`` + ``Windower.push_one``), anything else the general
        one (``_handle_message``), with the same results and counters."""
        self.counters["messages"] += len(msgs)
        sinks, max_batch = self._sinks, self.max_batch
        router, bank, sup = self.router, self.bank, self.sup
        channels, max_payload, clock = router.channels, router.max_payload, self.clock
        # NodeClock.check, skipped where it would neither move the consensus nor refuse (a
        # sample of a known stream near its clock's offset): it costs a call per sample else
        check, offsets, step, skew, base = clock.check, clock._src, clock.step_s, clock.max_skew_s, received - clock._at
        on_samples, faults = self.on_samples, sup.faults_enabled
        for topic, payload in msgs:
            try:
                if faults:
                    sup.fault_point(THREAD)
                sink = sinks.get(topic)
                if sink is not None and sink[1] and len(payload) <= max_payload:
                    r = decode_sample(payload, channels=channels, now=received, max_skew=0.0)
                    if r is not None:
                        t, row = r
                        s = sink[0]
                        if t is not None:  # the sources' clock, not this node's, says what is absurd
                            o, prev = t - base, offsets.get(s.key)
                            if prev is None or abs(o - prev) > step or (skew and abs(o - clock.source_offset) > skew):
                                check(s.key, t, received)
                        if t is None or s._stamper is not None:
                            t = s.stamper.stamp_one(t, received)
                        out = s.windower.push_one(t, row)
                        s.last = received
                        if out:
                            key = s.key
                            for t0, t1, x in out:
                                ready.append(Window(key, t0, t1, x, received))
                            bank.check_flag(s)  # once a window, not once a sample: flags move slowly
                            if len(ready) >= max_batch:
                                self._serve(ready)
                                ready.clear()
                        if on_samples is not None:
                            on_samples(s.key, [t], [row])
                        continue
                self._handle_message(topic, payload, received, ready)
                if sink is None and len(sinks) < _SINKS_MAX:
                    route = router.route(topic)
                    s = bank.streams.get(route.key) if route.kind == SENSOR else None
                    if s is not None:
                        sinks[topic] = (s, route.fmt in ("auto", "json"))
            except DecodeError as e:
                self.bad_input(e.kind, topic, str(e))
            except Exception as e:
                sup.item_failed(THREAD, e, where=brief(topic))
            if len(ready) >= max_batch:
                self._serve(ready)
                ready.clear()

    def _handle_message(self, topic: str, payload: bytes, received: float, ready: list[Window]) -> None:
        route = self.router.route(topic)
        if route.kind == SENSOR:
            ts, rows = self.router.decode_samples(route, payload, received)
            s = self.bank.stream(route.key, received)
            ts = self.bank.push(s, ts, rows, received, ready)
            if self.on_samples is not None:
                self.on_samples(s.key, ts, rows)
        elif route.kind == LABEL:
            self._label(self.router.decode_label(route, payload, received, topic))

    def _label(self, label: LabelIn) -> None:
        self.counters["labels"] += 1
        if self.on_label is not None:
            self.on_label(label.key, label.t, label.value)

    def _report_flags(self) -> None:
        if self.bank.new_streams:
            new, self.bank.new_streams = self.bank.new_streams, []
            if self.on_stream is not None:
                for key in new:
                    try:
                        self.on_stream(key)
                    except Exception as e:
                        self.sup.item_failed(THREAD, e, where=f"announcing {key}")
        changes = self.bank.flag_changes
        if not changes:
            return
        self.bank.flag_changes = []
        for key, old, new in changes:
            if new is not None:
                w = self.bank.streams[key].windower
                self._badlog.warn(f"flag:{key}", "stream %s flagged (%s): %.1f Hz measured, the model expects %.1f Hz; "
                                  "filled %d of %d samples", key, new, w.estimated_rate, w.sample_rate,
                                  w.counters["filled"], w.counters["samples"])
            else:
                log.info("stream %s is back within its rate and fill tolerance", key)
            if self.on_flag is not None:
                try:
                    self.on_flag(key, old, new)
                except Exception as e:
                    self.sup.item_failed(THREAD, e, where=f"flag event of {key}")

    def _serve(self, ready: list[Window]) -> None:
        try:
            served = self.server.serve(ready)
        except Exception as e:  # a failing backend must not take the serving thread down
            self.counters["serve_errors"] += 1
            if self._badlog.warn("serve_error", "serving %d windows failed, they are skipped: %s: %s",
                                 len(ready), type(e).__name__, brief(str(e), 200)):
                log.debug("serve failure", exc_info=True)
            return
        self.counters["batches"] += 1
        self.counters["windows_served"] += len(ready)
        scores, z, version = served.scores, served.z, served.head_version
        base = f"{self.topic_base}/predictions/"
        server, publisher, hist, on_window = self.server, self.publisher, self.latency, self.on_window
        now, basis, streams = self.mono_clock() + self.clock.offset, self.clock.basis, self.bank.streams
        for i, w in enumerate(ready):
            try:
                s = streams.get(w.key)
                # which clock the window's times are on: its samples' own, or a receive clock's
                clock = basis if s is not None and s._stamper is not None else "sensor"
                publisher.publish(f"{base}{w.key.device}/{w.key.stream}", server.prediction(w, scores[i], version, clock))
                hist.observe(now - w.received)
                if on_window is not None:
                    on_window(w.key, w.t_start, w.t_end, z[i], scores[i])
            except Exception as e:
                self.sup.item_failed(THREAD, e, where=f"prediction of {w.key}")
