"""The pipeline's inbox: three lanes, so that labels and control never wait behind sensor data.

* ``sensor``: raw MQTT reads and decoded sample blocks. Bounded by ``[queues]
  ingest_bytes``; under overload the oldest are dropped, and items that waited longer
  than ``[queues] max_lag_s`` are shed when taken, so fresh data is served promptly.
* ``labels``: label messages (MQTT on the node's connection, serial LABEL frames).
  Bounded by ``[queues] labels_bytes``; never shed for being old: a label is worth
  having late.
* ``control``: stream resets from sources. Small, bounded by ``[queues] control_bytes``.

Producers on other threads call the ``offer_*`` / ``push_*`` methods; the pipeline
thread takes from the lanes, labels and control first. Every drop is counted per lane, in
items, bytes, MQTT messages and samples (``edge.pipeline.accounting``).
"""
from __future__ import annotations

import threading
import time

import numpy as np

from edge.ingest.topics import TopicRoute, topic_matches
from edge.ingest.types import StreamKey
from edge.lanes import Lane
from edge.pipeline.accounting import item_samples
from edge.pipeline.records import LabelIn, RawMessageIn, SampleBlock, SensorBatch, StreamReset

# Python objects around each queued message (tuple, bytes and str headers, list slot):
# counted so that a flood of tiny messages is bounded as honestly as one of big ones.
MESSAGE_OVERHEAD = 160
_BLOCK_OVERHEAD = 200
_SAMPLE_OVERHEAD = 40  # per sample of a decoded block: a float and a list slot, plus per value below
_VALUE_BYTES = 32


class Inbox:
    """The three lanes and the producers' entry points."""

    def __init__(self, *, sensor_bytes: int, labels_bytes: int, control_bytes: int = 1 << 20,
                 max_lag_s: float = 0.0, label_route: TopicRoute | None = None):
        self.wake = threading.Event()  # set by every put: the idle pipeline thread blocks on it
        self.sensor = Lane("sensor", max_bytes=sensor_bytes, max_lag_s=max_lag_s, wake=self.wake, samples_of=item_samples)
        self.labels = Lane("labels", max_bytes=labels_bytes, wake=self.wake, samples_of=item_samples)
        self.control = Lane("control", max_bytes=control_bytes, wake=self.wake)
        self._label_filter = label_route.subscription.split("/") if label_route is not None else None

    @property
    def lanes(self) -> tuple[Lane, Lane, Lane]:
        return self.control, self.labels, self.sensor

    # ---- producers ---------------------------------------------------------------------
    def offer_batch(self, msgs: list[tuple[str, bytes]], received: float) -> bool:
        """Raw MQTT messages of one read (the ingest thread). False when refused (oversized)."""
        if not msgs:
            return True
        n = MESSAGE_OVERHEAD * len(msgs)
        for _, p in msgs:
            n += len(p)
        return self.sensor.put(SensorBatch(msgs, received), n, len(msgs))

    def offer_message(self, topic: str, payload: bytes, received: float) -> bool:
        """One raw MQTT message (paho's thread): the label lane when it is on a label topic."""
        item = RawMessageIn(topic, payload, received)
        n = MESSAGE_OVERHEAD + len(payload) + len(topic)
        if self._label_filter is not None and topic_matches(self._label_filter, topic.split("/")):
            return self.labels.put(item, n, 1)
        return self.sensor.put(item, n, 1)

    def push_samples(self, key: StreamKey, t, v) -> bool:
        """A decoded block (a serial link's thread): times [n], values [n, C]."""
        ts = t.tolist() if isinstance(t, np.ndarray) else list(t)
        rows = v.tolist() if isinstance(v, np.ndarray) else [list(r) for r in v]
        width = len(rows[0]) if rows else 0
        n = _BLOCK_OVERHEAD + len(ts) * (_SAMPLE_OVERHEAD + _VALUE_BYTES * (width + 1))
        return self.sensor.put(SampleBlock(key, ts, rows, time.time()), n)

    def push_label(self, key: StreamKey | None, t: float, label) -> bool:
        """A decoded label from a non-MQTT source (a serial LABEL frame)."""
        size = len(label) if isinstance(label, (str, bytes)) else 8
        return self.labels.put(LabelIn(key, float(t), label), _BLOCK_OVERHEAD + size)

    def reset_stream(self, key: StreamKey, why: str) -> bool:
        """A source restarted (a serial device said HELLO again): forget the partial window."""
        return self.control.put(StreamReset(key, why, after=self.sensor.mark()), _BLOCK_OVERHEAD)

    # ---- introspection -----------------------------------------------------------------
    def depth(self) -> int:
        return sum(len(lane) for lane in self.lanes)

    def stats(self) -> dict[str, dict[str, int]]:
        return {lane.name: lane.stats() for lane in self.lanes}
