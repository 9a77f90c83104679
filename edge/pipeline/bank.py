"""The bank of windowers: one ``Windower`` (and, for samples without times, one
``Stamper``) per stream, created on first sight and bounded in number.

A new stream's names are checked once, when it is created (``edge.ingest.names``), so
every source (MQTT, serial, replay) gets the same rule; ``max_streams`` bounds memory
against a flood of stray stream names. The bank reports each stream's flag changes (rate
off, too much filling) so the pipeline can log them and emit an event.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

from edge.errors import DecodeError
from edge.ingest.names import check_name
from edge.ingest.types import StreamKey
from edge.ingest.window import Windower
from edge.pipeline.records import Window

log = logging.getLogger("edge.pipeline")


class Stream:
    """One stream's windower, stamper and receive statistics (owned by the pipeline thread)."""

    __slots__ = ("key", "windower", "_stamper", "_stamp_kw", "first", "last", "flag")

    def __init__(self, key: StreamKey, windower: Windower, received: float, stamp_kw: dict):
        self.key, self.windower = key, windower
        self._stamper = None
        self._stamp_kw = stamp_kw
        self.first = self.last = received
        self.flag: str | None = None

    @property
    def stamper(self):
        """The stream's ``Stamper``, made when its first sample without a time arrives."""
        if self._stamper is None:
            from edge.ingest.timing import Stamper

            self._stamper = Stamper(sample_rate=self.windower.sample_rate, **self._stamp_kw)
        return self._stamper

    def stats(self) -> dict[str, Any]:
        w = self.windower
        out = {**w.counters, "rate_hz": round(w.estimated_rate, 2), "rate_ok": w.rate_ok,
               "flag": w.flagged, "first_seen": self.first, "last_seen": self.last}
        st = self._stamper
        if st is not None:  # samples without times: how the stamps were placed
            out.update(stamped=st.stamped, stamps_behind=st.behind, stamps_ahead=st.ahead, stamp_restarts=st.restarts,
                       arrival_rate_hz=round(st.arrival_rate, 2) if st.arrival_rate else None)
        return out


class WindowerBank:
    """Streams by key; ``push`` stamps, windows and returns the windows completed."""

    def __init__(self, *, channels: int, window_kw: dict[str, Any], max_streams: int = 10_000,
                 stamp_kw: dict[str, Any] | None = None):
        self.channels, self.window_kw, self.max_streams = channels, window_kw, max_streams
        self._stamp_kw = dict(stamp_kw or {})  # Stamper options: resync_s, rate_tolerance, rate_window_s
        self.streams: dict[StreamKey, Stream] = {}
        # the owner's lock (STYLE 19): the pipeline thread takes it only to add a stream, readers
        # on other threads (status, scrapes) for their snapshot; the per-sample path never does
        self._lock = threading.Lock()
        self.flag_changes: list[tuple[StreamKey, str | None, str | None]] = []
        self.new_streams: list[StreamKey] = []  # created since the pipeline last looked

    def stream(self, key: StreamKey, received: float) -> Stream:
        """The stream of ``key``, created (names checked, bound enforced) on first sight."""
        s = self.streams.get(key)
        if s is None:
            if len(self.streams) >= self.max_streams:
                raise DecodeError("too_many_streams", f"a new stream would exceed max_streams = {self.max_streams}")
            key = StreamKey(check_name(key.device, what="device"), check_name(key.stream, what="stream"))
            w = Windower(channels=self.channels, **self.window_kw)
            s = Stream(key, w, received, self._stamp_kw)
            with self._lock:
                self.streams[key] = s
            self.new_streams.append(key)
            log.info("new stream %s", key)
        return s

    def snapshot(self) -> list[tuple[StreamKey, Stream]]:
        """Every stream now, as a list taken under the bank's lock (for readers on other threads).

        >>> bank = WindowerBank(channels=1, window_kw=dict(length=4, hop=4, sample_rate=10.0))
        >>> _ = bank.stream(StreamKey("m1", "a"), 0.0)
        >>> [str(k) for k, _ in bank.snapshot()]
        ['m1/a']
        """
        with self._lock:
            return list(self.streams.items())

    def push(self, s: Stream, ts: list, rows: list, received: float, out: list) -> list:
        """Add samples to stream ``s`` (a None time is stamped); append completed windows to ``out``.

        Returns the sample times used (the stamped ones where a time was None)."""
        if s._stamper is not None or None in ts:  # a stream that ever lacked times: its stamper sees every time
            ts = s.stamper.stamp(ts, received)
        key = s.key
        for t0, t1, x in s.windower.push(ts, rows):
            out.append(Window(key, t0, t1, x, received))
        s.last = received
        self.check_flag(s)
        return ts

    def check_flag(self, s: Stream) -> None:
        f = s.windower.flagged
        if f != s.flag:
            self.flag_changes.append((s.key, s.flag, f))
            s.flag = f

    def reset(self, key: StreamKey) -> bool:
        s = self.streams.get(key)
        if s is None:
            return False
        s.windower.reset()
        return True
