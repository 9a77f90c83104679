"""Host-side state of one binary stream: HELLO, sequence gaps, resets, device clock.

Pure (values in, values out; the caller passes arrival times), so the serial link and
the MQTT path share it, and it is tested without a port.

Time mapping: the device stamps each SAMPLES frame with its clock (``t_us``, µs since
boot, wrapping at 2**32; wraps are unwrapped with serial-number arithmetic). Host time
of a sample = device time + offset. Each SAMPLES frame implies an offset, ``arrival -
device time of the frame's last sample``, which is the true offset plus that frame's
transfer and queueing delay. The offset is set by the first frame after a HELLO, a reset
or a reconnect. A later frame that implies a smaller one (it travelled faster: a closer
bound) moves the offset toward it, by at most ``slew`` (a tenth) of a sample period per
frame, so that samples stay in order and evenly spaced within 10% while the stamps
converge to "no sample later than it arrived". A frame whose implied offset differs by
more than ``tolerance`` seconds re-anchors the clock to it at once (crystal drift, a
device pause, a clock jump). Re-anchors are counted.
"""
from __future__ import annotations

import numpy as np

from firmware_bridge import messages as m

_HALF32 = 1 << 31


class DeviceClock:
    """Maps device seconds to host seconds (see the module docstring): the first frame's
    offset, slewed down toward the smallest implied one, re-anchored beyond ``tolerance``.

    >>> c = DeviceClock(tolerance=0.5)
    >>> c.offset_for(1.0, 101.02, period=0.01)            # the first frame sets it
    100.02
    >>> round(c.offset_for(2.0, 102.005, period=0.01), 6)  # faster: one slew step (0.001)
    100.019
    >>> round(c.offset_for(3.0, 103.3, period=0.01), 6)    # slower, within tolerance: kept
    100.019
    >>> c.offset_for(4.0, 105.0, period=0.01), c.reanchors  # 0.98 s late: drift or a pause
    (101.0, 1)
    """

    def __init__(self, *, tolerance: float = 0.5, slew: float = 0.1):
        self.tolerance = tolerance
        self.slew = slew
        self.offset: float | None = None
        self.reanchors = 0

    def offset_for(self, dev_last: float, arrival: float, *, period: float) -> float:
        """Offset to add to device seconds, given the newest sample's device time, the
        arrival time and the stream's sample period (seconds)."""
        cand = arrival - dev_last
        if self.offset is None:
            self.offset = cand
        elif abs(cand - self.offset) > self.tolerance:
            self.offset = cand
            self.reanchors += 1
        elif cand < self.offset:  # this frame travelled faster: a closer bound on the offset
            self.offset -= min(self.offset - cand, self.slew * period)
        return self.offset

    def reset(self) -> None:
        self.offset = None


class BinarySession:
    """Feed decoded messages with their arrival time; get events back.

    ``on_message(msg, arrival)`` returns a list of events:
    ``("hello", Hello)``, ``("reset", Hello | None)``, ``("samples", t [n] float64, v [n, C] float32)``,
    ``("label", t, label)``, ``("pong", token, t)``, ``("need_hello",)``.
    ``counters``: frames, samples, lost_frames, resets, duplicates, no_hello,
    channel_mismatch, labels, heartbeats.
    """

    def __init__(self, *, tolerance: float = 0.5, max_backstep: float = 1.0):
        self.max_backstep = max_backstep
        self.hello: m.Hello | None = None
        self.clock = DeviceClock(tolerance=tolerance)
        self.counters = dict.fromkeys(
            ("frames", "samples", "lost_frames", "resets", "duplicates", "no_hello", "channel_mismatch",
             "labels", "heartbeats", "reanchors"), 0)
        self._last_seq: int | None = None
        self._last_raw: int | None = None
        self._ext_us = 0

    def reconnected(self) -> None:
        """The port was reopened: keep HELLO (the same device may be back) but re-anchor time."""
        self.clock.reset()

    def _new_session(self) -> None:
        self._last_seq = None
        self._last_raw = None
        self._ext_us = 0
        self.clock.reset()

    def _advance(self, raw: int) -> int | None:
        """Unwrap the device clock: extended µs, or None if it jumped back more than
        ``max_backstep`` (a reset). Small steps back are legal: a block is stamped with its
        first sample but sent after its last, so it may follow a newer HELLO or LABEL."""
        if self._last_raw is None:
            self._last_raw, self._ext_us = raw, raw
            return raw
        d = (raw - self._last_raw) % (1 << 32)
        if d < _HALF32:
            self._last_raw = raw
            self._ext_us += d
            return self._ext_us
        back = (1 << 32) - d
        return self._ext_us - back if back <= self.max_backstep * 1e6 else None

    def _reset(self, hello: m.Hello | None) -> list:
        self.counters["resets"] += 1
        self._new_session()
        return [("reset", hello)]

    def on_message(self, msg: m.Message, arrival: float) -> list:
        if isinstance(msg, m.Samples):
            return self._samples(msg, arrival)
        if isinstance(msg, m.Hello):
            return self._hello(msg)
        events: list = []
        if isinstance(msg, (m.Label, m.Heartbeat, m.Pong)):
            ext = self._advance(msg.t_us)
            if ext is None:
                events += self._reset(None)
                ext = self._advance(msg.t_us)
            offset = self.clock.offset if self.clock.offset is not None else arrival - ext / 1e6
            t = ext / 1e6 + offset
            if isinstance(msg, m.Label):
                self.counters["labels"] += 1
                events.append(("label", t, msg.label))
            elif isinstance(msg, m.Pong):
                events.append(("pong", msg.token, t))
            else:
                self.counters["heartbeats"] += 1
        return events

    def _hello(self, hello: m.Hello) -> list:
        events: list = []
        old = self.hello
        if old is not None:
            rebooted = hello.boot_id != old.boot_id or self._advance(hello.t_us) is None
            if rebooted:
                events += self._reset(hello)
                self._advance(hello.t_us)
        else:
            self._new_session()
            self._advance(hello.t_us)
        self.hello = hello
        events.append(("hello", hello))
        return events

    def _samples(self, msg: m.Samples, arrival: float) -> list:
        events: list = []
        hello = self.hello
        if hello is None:
            self.counters["no_hello"] += 1
            return [("need_hello",)]
        n, ch = msg.values.shape
        if ch != len(hello.channels):
            self.counters["channel_mismatch"] += 1
            return [("need_hello",)]
        before = self._ext_us
        ext = self._advance(msg.t_us)
        if ext is None or (msg.seq == 0 and self._last_seq not in (None, 65535) and ext < before):
            events += self._reset(None)  # clock far back, or sequence and clock both restarted
            ext = self._advance(msg.t_us)
        if self._last_seq is not None:
            d = (msg.seq - self._last_seq) % 65536
            if d == 0:
                self.counters["duplicates"] += 1
                return events
            if d < 32768:
                self.counters["lost_frames"] += d - 1
        self._last_seq = msg.seq
        rate = msg.sample_rate if msg.sample_rate > 0 else hello.sample_rate
        dev = ext / 1e6 + np.arange(n) / rate
        if n:
            offset = self.clock.offset_for(float(dev[-1]), arrival, period=1.0 / rate)
            self.counters["reanchors"] = self.clock.reanchors
        else:
            offset = 0.0
        v = msg.values.astype(np.float32)
        if msg.values.dtype == np.int16 and hello.scale != 1.0:
            v *= np.float32(hello.scale)
        self.counters["frames"] += 1
        self.counters["samples"] += n
        if n:
            events.append(("samples", dev + offset, v))
        return events
