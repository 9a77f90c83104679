"""The serving thread: decode, window, micro-batch, serve, publish.

Sources hand it raw MQTT messages (``offer_batch``, called on the ingest thread with
every message of one socket read; ``offer_message``, called on paho's thread) and
decoded sample blocks (``push_samples``, called on a serial link's thread) through one
queue, bounded in messages, that drops the oldest items when full and counts them. The
thread drains the queue, cuts windows per stream, serves every window that became ready
in one drain as one batch through the backbone and the current serving head, and
publishes one prediction per window. It never waits on training: the head is read through
``head_ref()``, an atomic reference the learner swaps.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Callable

import numpy as np
import orjson

from edge.errors import DecodeError
from edge.ingest.payload import decode_label, decode_payload, decode_sample
from edge.ingest.topics import TopicRoute
from edge.ingest.types import StreamKey
from edge.ingest.window import Windower
from edge.observe import RateLimitedLog

log = logging.getLogger("edge.pipeline")

_MSG, _SAMPLES, _LABEL, _BATCH = 0, 1, 2, 3
_LATENCY_BOUNDS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, float("inf"))


class Pipeline:
    """Decode -> window -> serve -> publish, on one named thread."""

    def __init__(self, *, sources: list[tuple[TopicRoute, str]], label_route: TopicRoute | None,
                 channels: int, window_kw: dict[str, Any], features: Callable[[np.ndarray], np.ndarray],
                 head_ref: Callable[[], Any], classes: tuple[str, ...], publish: Callable[[str, bytes], Any],
                 topic_base: str, model_id: str, queue_size: int, max_batch: int = 32, max_wait_ms: float = 0.0,
                 max_skew: float = 0.0, max_payload: int = 1 << 20, max_streams: int = 10_000,
                 on_window: Callable[..., None] | None = None, on_label: Callable[..., None] | None = None,
                 on_samples: Callable[..., None] | None = None):
        self.sources, self.label_route = sources, label_route
        self.channels, self.window_kw = channels, window_kw
        self.features, self.head_ref, self.classes = features, head_ref, classes
        self.publish, self.topic_base, self.model_id = publish, topic_base, model_id
        self.max_batch, self.max_skew, self.max_payload = max_batch, max_skew, max_payload
        self.max_wait = max_wait_ms / 1e3
        self.max_streams = max_streams
        self.on_window, self.on_label, self.on_samples = on_window, on_label, on_samples
        # The bound is in messages (a batch item holds many): producers drop the oldest
        # items under _put_lock; messages taken by the pipeline thread are counted in _taken.
        self.queue: deque = deque()
        self.capacity = queue_size
        self._put_lock = threading.Lock()
        self._offered = self._shed = self._taken = 0
        self.windowers: dict[StreamKey, Windower] = {}
        self._routes: dict[str, tuple[int, StreamKey | None, str]] = {}
        self._sinks: dict[str, tuple[StreamKey, Windower, dict, bool]] = {}  # topic -> its stream, once seen
        self.counters = {"messages": 0, "dropped": 0, "unknown_topic": 0, "windows_served": 0, "serve_errors": 0,
                         "batches": 0, "labels": 0, "published": 0}
        self.bad: dict[str, int] = {}
        self.latency_counts = [0] * len(_LATENCY_BOUNDS)
        self.latency_sum = 0.0
        self.stream_stats: dict[StreamKey, dict[str, Any]] = {}
        self._badlog = RateLimitedLog(log)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pipeline", daemon=True)

    # ---- producers (other threads) -------------------------------------------------
    def offer_batch(self, msgs: list[tuple[str, bytes]], received: float) -> None:
        """Enqueue raw MQTT messages read together (the ingest thread) as one item.

        Each message counts against the queue's capacity; a batch is never split, so
        making room for it may drop up to one older batch more than strictly needed.
        """
        if msgs:
            self._put((_BATCH, msgs, received), len(msgs))

    def offer_message(self, topic: str, payload: bytes, received: float) -> None:
        """Enqueue a raw MQTT message (paho's thread); drops the oldest when full."""
        self._put((_MSG, topic, payload, received), 1)

    def push_samples(self, key: StreamKey, t, v) -> None:
        """Enqueue a decoded block (a serial link's thread): times [n], values [n, C]."""
        ts = t.tolist() if isinstance(t, np.ndarray) else list(t)
        rows = v.tolist() if isinstance(v, np.ndarray) else [list(r) for r in v]
        self._put((_SAMPLES, key, ts, rows, time.time()), 1)

    def push_label(self, key: StreamKey | None, t: float, label) -> None:
        """Enqueue a label from a non-MQTT source (a serial LABEL frame)."""
        self._put((_LABEL, key, float(t), label), 1)

    def depth(self) -> int:
        """Messages waiting in the queue."""
        return self._offered - self._shed - self._taken

    def _put(self, item: tuple, n: int) -> None:
        q = self.queue
        with self._put_lock:
            self._offered += n
            over = self._offered - self._shed - self._taken - self.capacity
            while over > 0:
                try:
                    old = q.popleft()
                except IndexError:  # the pipeline thread took the rest meanwhile
                    break
                k = len(old[1]) if old[0] == _BATCH else 1
                self._shed += k
                self.counters["dropped"] += k
                over -= k
            q.append(item)

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.thread.join(timeout)

    def bad_input(self, kind: str, where: str, msg: str) -> None:
        self.bad[kind] = self.bad.get(kind, 0) + 1
        self._badlog.warn(kind, "skipped bad input from %s (%s): %s", where, kind, msg)

    # ---- the loop --------------------------------------------------------------------
    def _run(self) -> None:
        idle = 0
        q = self.queue
        while not self._stop.is_set():
            if not q:
                idle += 1
                time.sleep(0.0002 if idle < 50 else 0.002)
                continue
            idle = 0
            ready: list = []
            self._drain(ready)
            if ready and len(ready) < self.max_batch and self.max_wait > 0:
                # micro-batching: windows of other streams often complete moments later;
                # wait at most max_wait for them so one backbone call serves them all
                deadline = time.perf_counter() + self.max_wait
                while len(ready) < self.max_batch and time.perf_counter() < deadline:
                    if q:
                        self._drain(ready)
                    else:
                        time.sleep(0.0002)
            if ready:
                self._serve(ready)
        if q:
            log.info("pipeline stopped with %d queued items unprocessed", len(q))

    def _drain(self, ready: list, budget: int = 8192) -> None:
        """Handle up to ``budget`` queued messages, serving whenever ``max_batch`` windows are ready."""
        q = self.queue
        while budget > 0:
            try:
                item = q.popleft()
            except IndexError:
                return
            if item[0] == _BATCH:
                n = len(item[1])
                self._taken += n
                budget -= n
                self._handle_batch(item[1], item[2], ready)
            else:
                self._taken += 1
                budget -= 1
                try:
                    self._handle(item, ready)
                except DecodeError as e:
                    self.bad_input(e.kind, str(item[1]), str(e))
            if len(ready) >= self.max_batch:
                self._serve(ready)
                ready.clear()

    def _route(self, topic: str) -> tuple[int, StreamKey | None, str]:
        r = self._routes.get(topic)
        if r is None:
            r = (-1, None, "")
            if self.label_route is not None and self.label_route.match(topic) is not None:
                tail = topic[len(self.label_route.subscription.rstrip("#").rstrip("/")):].strip("/")
                parts = tail.split("/") if tail else []
                key = StreamKey(parts[0], "/".join(parts[1:])) if parts else None
                r = (_LABEL, key, "")
            else:
                for route, fmt in self.sources:
                    key = route.match(topic)
                    if key is not None:
                        r = (_MSG, key, fmt)
                        break
            if len(self._routes) < 100_000:
                self._routes[topic] = r
        return r

    def _handle_batch(self, msgs: list[tuple[str, bytes]], received: float, ready: list) -> None:
        """Every message of one read; a single-sample JSON object on a known stream takes
        the fast path (``decode_sample`` + ``Windower.push_one``), anything else the general
        one (``_handle_message``), with the same results and counters."""
        self.counters["messages"] += len(msgs)
        sinks, max_payload, max_batch = self._sinks, self.max_payload, self.max_batch
        channels, max_skew, on_samples = self.channels, self.max_skew, self.on_samples
        for topic, payload in msgs:
            sink = sinks.get(topic)
            if sink is not None and sink[3] and len(payload) <= max_payload:
                r = decode_sample(payload, channels=channels, now=received, max_skew=max_skew)
                if r is not None:
                    key, w, st, _ = sink
                    was_ok = w.rate_ok
                    out = w.push_one(r[0], r[1])
                    if out:
                        for t0, t1, x in out:
                            ready.append((key, t0, t1, x, received))
                        if len(ready) >= max_batch:
                            self._serve(ready)
                            ready.clear()
                    st["last"] = received
                    st["samples"] += 1
                    if was_ok and not w.rate_ok:
                        self._rate_warning(key, w)
                    if on_samples is not None:
                        on_samples(key, [r[0]], [r[1]])
                    continue
            try:
                self._handle_message(topic, payload, received, ready)
            except DecodeError as e:
                self.bad_input(e.kind, topic, str(e))
            if sink is None and len(sinks) < 100_000:
                rkind, key, fmt = self._route(topic)
                if rkind == _MSG and key in self.windowers:
                    sinks[topic] = (key, self.windowers[key], self.stream_stats[key], fmt in ("auto", "json"))
            if len(ready) >= max_batch:
                self._serve(ready)
                ready.clear()

    def _handle(self, item: tuple, ready: list) -> None:
        kind = item[0]
        if kind == _MSG:
            _, topic, payload, received = item
            self.counters["messages"] += 1
            self._handle_message(topic, payload, received, ready)
        elif kind == _SAMPLES:
            _, key, ts, rows, received = item
            self._window(key, ts, rows, received, ready)
        else:
            _, key, t, value = item
            self._label(key, t, value)

    def _handle_message(self, topic: str, payload: bytes, received: float, ready: list) -> None:
        rkind, key, fmt = self._route(topic)
        if rkind == _MSG:
            ts, rows = decode_payload(payload, channels=self.channels, now=received, fmt=fmt,
                                      max_skew=self.max_skew, max_bytes=self.max_payload)
            self._window(key, ts, rows, received, ready)
        elif rkind == _LABEL:
            if len(payload) > self.max_payload:
                raise DecodeError("oversized", f"label of {len(payload)} bytes")
            t, value, dev, stm = decode_label(payload, now=received, max_skew=self.max_skew)
            if key is None and dev:
                key = StreamKey(dev, stm)
            self._label(key, t, value)
        else:
            raise DecodeError("unknown_topic", f"no source subscribes to {topic!r}")

    def _label(self, key, t, value) -> None:
        self.counters["labels"] += 1
        if self.on_label is not None:
            self.on_label(key, t, value)

    def _window(self, key: StreamKey, ts, rows, received: float, ready: list) -> None:
        w = self.windowers.get(key)
        if w is None:
            if len(self.windowers) >= self.max_streams:
                raise DecodeError("too_many_streams", f"stream {key} would exceed max_streams = {self.max_streams}")
            w = self.windowers[key] = Windower(channels=self.channels, **self.window_kw)
            self.stream_stats[key] = {"first": received, "last": received, "samples": 0}
            log.info("new stream %s", key)
        was_ok = w.rate_ok
        for t0, t1, x in w.push(ts, rows):
            ready.append((key, t0, t1, x, received))
        st = self.stream_stats[key]
        st["last"] = received
        st["samples"] += len(ts)
        if was_ok and not w.rate_ok:
            self._rate_warning(key, w)
        if self.on_samples is not None:
            self.on_samples(key, ts, rows)

    def _rate_warning(self, key: StreamKey, w: Windower) -> None:
        self._badlog.warn(f"rate:{key}", "stream %s runs at %.1f Hz; the model expects %.1f Hz",
                          key, w.estimated_rate, w.sample_rate)

    def _serve(self, ready: list) -> None:
        try:
            x = np.stack([r[3] for r in ready])
            z = self.features(x)
            head = self.head_ref()
            scores = head.predict(z)
        except Exception as e:  # a failing backend must not take the serving thread down
            self.counters["serve_errors"] += 1
            if self._badlog.warn("serve_error", "serving %d windows failed, they are skipped: %s: %s",
                                 len(ready), type(e).__name__, e):
                log.debug("serve failure", exc_info=True)
            return
        self.counters["batches"] += 1
        self.counters["windows_served"] += len(ready)
        now = time.time()
        for i, (key, t0, t1, _, received) in enumerate(ready):
            s = scores[i]
            msg: dict[str, Any] = {"t": t1, "t_start": t0, "device": key.device, "stream": key.stream,
                                   "model": self.model_id, "head": head.version}
            if self.classes:
                k = int(np.argmax(s))
                msg["prediction"] = self.classes[k]
                msg["confidence"] = round(float(s[k]), 4)
                msg["scores"] = {c: round(float(p), 4) for c, p in zip(self.classes, s)}
            else:
                msg["prediction"] = [round(float(v), 6) for v in np.atleast_1d(s)]
            self.publish(f"{self.topic_base}/predictions/{key.device}/{key.stream}", orjson.dumps(msg))
            self.counters["published"] += 1
            lat = now - received
            self.latency_sum += lat
            for j, b in enumerate(_LATENCY_BOUNDS):
                if lat <= b:
                    self.latency_counts[j] += 1
                    break
            if self.on_window is not None:
                self.on_window(key, t0, t1, z[i], s)

    def latency_buckets(self) -> list[tuple[float, int]]:
        """Cumulative (upper bound, count) of receive-to-publish latency."""
        out, acc = [], 0
        for b, n in zip(_LATENCY_BOUNDS, self.latency_counts):
            acc += n
            out.append((b, acc))
        return out
