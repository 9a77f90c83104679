"""Topic -> stream key -> samples. Pure: values in, values out, ``DecodeError`` on bad input.

The router maps a received topic to what it is (sensor data of one stream, or a label)
through the configured routes, remembers the answer for topics it has seen (a bounded
cache, so stray topics cannot grow it without bound), and decodes payloads into samples
or labels. Names taken from topics and label payloads are checked by the topic routes and
the label decoder (``edge.ingest.names``), so every topic later built from a key is valid.

>>> r = Router(sources=[(TopicRoute("s/{device}/{stream}"), "auto")], label_route=TopicRoute("edge/n/labels/#"))
>>> r.route("s/m1/accel")
Route(kind='sensor', key=StreamKey(device='m1', stream='accel'), fmt='auto')
>>> r.route("edge/n/labels/m1/accel").key
StreamKey(device='m1', stream='accel')
>>> r.decode_label(r.route("edge/n/labels"), b'{"t": 5.0, "label": "normal", "device": "m2"}', 5.0)
LabelIn(key=StreamKey(device='m2', stream=''), t=5.0, value='normal', by='')
"""
from __future__ import annotations

from dataclasses import dataclass

from edge.errors import DecodeError, brief
from edge.ingest.names import check_name
from edge.ingest.payload import decode_label, decode_payload
from edge.ingest.topics import TopicRoute
from edge.ingest.types import StreamKey
from edge.pipeline.records import LabelIn

SENSOR, LABEL = "sensor", "label"


def check_times(clock, key, ts: list, received: float) -> None:
    """The given times of one message against the sources' clock (``NodeClock``): the last
    one moves the consensus, the earliest and latest must fit it (``DecodeError`` absurd_time)."""
    if ts[-1] is not None:
        clock.check(key, ts[-1], received)
    if len(ts) > 1:
        given = [t for t in ts if t is not None] if None in ts else ts
        if given:
            clock.refuse(min(given), received)
            clock.refuse(max(given), received)
_CACHE_MAX = 100_000


@dataclass(frozen=True, slots=True)
class Route:
    """What a topic carries: ``kind`` sensor or label, its stream (None: any) and payload format."""

    kind: str
    key: StreamKey | None
    fmt: str


class Router:
    """Routes topics and decodes payloads for the pipeline thread."""

    def __init__(self, *, sources: list[tuple[TopicRoute, str]], label_route: TopicRoute | None,
                 channels: int = 1, max_skew: float = 0.0, max_payload: int = 1 << 20, label_gate=None):
        self.sources, self.label_route = sources, label_route
        self.label_gate = label_gate  # edge.ingest.labelauth.LabelGate: signatures and rate limits
        self.channels, self.max_skew, self.max_payload = channels, max_skew, max_payload
        self._label_base = label_route.subscription.rstrip("#").rstrip("/") if label_route is not None else ""
        self._cache: dict[str, Route | DecodeError] = {}
        # the pipeline's NodeClock (set by Pipeline): when set, given times are checked against
        # the sources' clock, not this node's, and labels against their windows only
        self.clock = None

    def route(self, topic: str) -> Route:
        """The route of ``topic``; ``DecodeError`` (unknown_topic, bad_name) when it has none."""
        r = self._cache.get(topic)
        if r is None:
            try:
                r = self._resolve(topic)
            except DecodeError as e:
                r = e
            if len(self._cache) < _CACHE_MAX:
                self._cache[topic] = r
        if isinstance(r, DecodeError):
            raise r
        return r

    def _resolve(self, topic: str) -> Route:
        if self.label_route is not None and self.label_route.match(topic) is not None:
            tail = topic[len(self._label_base):].strip("/")
            parts = tail.split("/") if tail else []
            if len(parts) > 2:
                raise DecodeError("bad_name", f"label topic {brief(topic)} has more levels than labels/<device>/<stream>")
            key = None
            if parts:
                key = StreamKey(check_name(parts[0], what="device"),
                                check_name(parts[1], what="stream") if len(parts) > 1 else "")
            return Route(LABEL, key, "")
        for route, fmt in self.sources:
            key = route.match(topic)
            if key is not None:
                return Route(SENSOR, key, fmt)
        raise DecodeError("unknown_topic", f"no source subscribes to {brief(topic)}")

    def decode_samples(self, route: Route, payload: bytes, received: float) -> tuple[list, list]:
        """(times, rows) of a sensor payload; a time is None for a sample that carries none."""
        clock = self.clock
        ts, rows = decode_payload(payload, channels=self.channels, now=received, fmt=route.fmt,
                                  max_skew=self.max_skew if clock is None else 0.0, max_bytes=self.max_payload)
        if clock is not None and ts:
            check_times(clock, route.key, ts, received)
        return ts, rows

    def decode_label(self, route: Route, payload: bytes, received: float, topic: str = "") -> LabelIn:
        """A label message (opened, bound to ``route``'s stream and rate-limited by the label
        gate, if any); its device/stream fields narrow a topic without them."""
        if len(payload) > self.max_payload:
            raise DecodeError("oversized", f"label of {len(payload)} bytes exceeds max_payload_bytes")
        by = ""
        clock = self.clock
        if self.label_gate is not None:  # a signed label must name the stream this topic names
            steady = clock.steady(received) if clock is not None else None  # the monotonic receive time
            payload, by = self.label_gate.open(payload, target=route.key, now=received, steady=steady)
        # with a clock, a label's time is judged by the windows it is matched to (LabelMatcher)
        t, value, dev, stm = decode_label(payload, now=received, max_skew=self.max_skew if clock is None else 0.0)
        key = route.key
        if key is None and dev:
            key = StreamKey(dev, stm)
        return LabelIn(key, t, value, by)
