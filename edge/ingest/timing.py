"""Time stamps for samples that carry none: one ``Stamper`` per stream. Pure.

The decoders give ``None`` as the time of a sample without its own (JSON without ``t``,
CSV without a time column). All a receiver knows then is when the message arrived, and
one socket read may hold many messages, so several samples share one receive time: as
times they would be duplicates, and the windower would drop all but the first as out
of order. The stamper turns them into a regular time line instead:

* **Given times pass through** unchanged. A given time later than every stamp so far
  also becomes the point the next untimed sample continues from.
* **Untimed samples are spread at the stream's spacing**, ``1 / sample_rate``, from the
  previous stamp: ``s = anchor + k * spacing`` (no rounding error accumulates). The
  first untimed sample of a stream, and the first after a pause (no read for more than
  ``B = resync_s`` seconds), is stamped with its receive time ``r``.
* **Two bands around the receive clock** keep the line honest. Inside the inner band
  ``[r - B, r + B]`` the spacing is exact. Between the inner and the outer band
  (``2B``) the spacing is nudged by half the rate tolerance (longer when the line lags,
  shorter when it leads), so a stream that is off by less than that is pulled back
  without the windower seeing a rate outside its tolerance. A stamp that would lag
  beyond ``r - 2B`` restarts the line at ``r`` (the windower sees a gap); one that would
  lead beyond ``r + 2B`` is placed at ``max(r + 2B, previous + spacing / 4)``: stamps
  cannot go back, so a read with more samples than its time can hold is spread as
  tightly as that. Every moved stamp is counted (``behind``, ``ahead``); stamps stay
  strictly increasing in every case, so none is lost as out of order.
* **Arrival rate.** Between reads less than ``B`` apart, the stamper counts untimed
  samples per second of receive time over spans of ``rate_window_s`` (``arrival_rate``;
  its error is about the receive jitter divided by ``rate_window_s``). When a span's
  rate is outside ``sample_rate * (1 +- rate_tolerance)`` *and* a band moved a stamp
  since the previous span, the spacing becomes the measured ``1 / arrival_rate``
  (within 1/16x..16x of nominal), so the windower sees the stream's real rate and
  flags it; a span back within tolerance restores the nominal spacing. A nominal stream
  never leaves the inner band (P1), so its spacing never changes.

Bounds, each checked by a property test (tests/test_ingest_timing.py):

* **P1 (nominal stream, any batching):** if every read's span ``n / sample_rate``
  (``n`` samples in one read) plus the receive-time jitter stays below ``B``, the stamps
  of a stream sent at its nominal rate are exactly ``1 / sample_rate`` apart (to float
  rounding): the windower sees no out_of_order, no gap and no fill. With the default
  ``B = 1 s`` at 1 kHz: reads of up to 500 samples (as tested) with 0.3 s of jitter.
* **P2 (any arrival pattern, receive times not going back):** every stamp of an untimed
  sample received at ``r`` is at least ``r - 2B`` and at most ``r + 2B + E``, where the
  excess ``E`` grows by at most ``spacing / 4 <= 4 / sample_rate`` per sample stamped
  beyond ``r + 2B`` and shrinks one for one as the receive clock advances (a single read
  of ``m`` samples ends at most ``m * 4 / sample_rate`` past ``r + 2B``); stamps are
  strictly increasing. A receive clock stepped back by ``x`` adds ``x`` to the upper
  bound until it has caught up.
* **P3 (off-rate stream):** an untimed stream arriving at twice or half its nominal rate
  (2 kHz or 500 Hz into a 1 kHz stamper), in reads of 1..60 samples with up to 20 ms of
  jitter, makes the windower's rate flag fire within 8 s of stream time (measured: 2-6 s;
  15 % off takes up to about 10 s), and the stamper then follows the measured rate.

>>> s = Stamper(sample_rate=100.0)
>>> [round(x, 3) for x in s.stamp([None, None, None], received=50.0)]
[50.0, 50.01, 50.02]
>>> round(s.stamp_one(None, 50.0), 3), s.stamp_one(7.5, 50.0)
(50.03, 7.5)
"""
from __future__ import annotations

import math

_nextafter = math.nextafter
_INF = math.inf
_SQUEEZE = 0.25  # the tightest spacing, as a share of the current one: the backstop that bounds stamps


class Stamper:
    """Stamps for one stream's samples: ``stamp(ts, received)`` / ``stamp_one(t, received)``."""

    __slots__ = ("sample_rate", "resync_s", "rate_tolerance", "rate_window_s", "_dt", "_spacing", "_anchor",
                 "_k", "_last", "_r", "_mark", "_n", "_moved", "_nudge", "arrival_rate", "stamped", "behind",
                 "ahead", "restarts")

    def __init__(self, *, sample_rate: float, resync_s: float = 1.0, rate_tolerance: float = 0.1,
                 rate_window_s: float = 2.0):
        if not (sample_rate > 0 and math.isfinite(sample_rate)):
            raise ValueError(f"sample_rate must be a positive number, got {sample_rate}")
        if not (resync_s > 0 and rate_window_s > 0 and rate_tolerance >= 0):
            raise ValueError("resync_s and rate_window_s must be positive, rate_tolerance not negative")
        self.sample_rate, self.resync_s = float(sample_rate), float(resync_s)
        self.rate_tolerance, self.rate_window_s = float(rate_tolerance), float(rate_window_s)
        self._dt = 1.0 / self.sample_rate
        self._spacing = self._dt
        # between the inner and the outer band the spacing is nudged by half the tolerance, so
        # that a read of nudged samples still looks in tolerance to the windower
        self._nudge = max(self.rate_tolerance / 2, 0.01)
        self._anchor: float | None = None  # stamp k = anchor + k * spacing
        self._k = 0
        self._last = -_INF                 # the newest time handed out (given or stamped)
        self._r: float | None = None       # receive time of the current read
        self._mark = 0.0                   # start of the current arrival-rate span
        self._n = 0                        # untimed samples in that span
        self._moved = False                # the band moved a stamp since the last span
        self.arrival_rate: float | None = None
        self.stamped = self.behind = self.ahead = self.restarts = 0

    @property
    def spacing(self) -> float:
        """The spacing (s) untimed samples get now: ``1 / sample_rate`` unless measured."""
        return self._spacing

    @property
    def counters(self) -> dict[str, int]:
        """stamped (untimed samples), behind / ahead (stamps the band moved)."""
        return {"stamped": self.stamped, "behind": self.behind, "ahead": self.ahead}

    def reset(self) -> None:
        """Forget the time line's anchor and rate span (e.g. after the source reconnects);
        stamps stay increasing."""
        self._anchor, self._r, self._n, self._moved = None, None, 0, False

    def leads(self, received: float) -> bool:
        """True when the last stamp is beyond the outer band ahead of ``received``: the
        receive clock went back (a step) and squeezing would take long to catch up."""
        return self._last > received + 2 * self.resync_s

    def restart(self) -> None:
        """The receive clock stepped back: a new time line from the next receive time. Stamps
        go back once, so the caller starts the stream's windows anew (``Windower.reset``)
        instead of squeezing stamps for as long as the step was."""
        self.reset()
        self._last = -_INF
        self.restarts += 1

    def stamp(self, ts: list[float | None], received: float) -> list[float]:
        """Times for one message's samples: given ones unchanged, ``None`` ones stamped.

        The same as ``[stamp_one(t, received) for t in ts]``; a list with no ``None`` (a
        batch with its own times) is returned as it is, without a call per sample.
        """
        if None not in ts:
            if ts:
                m = max(ts)
                if m > self._last:
                    self._last = self._anchor = m
                    self._k = 0
            return ts
        one = self.stamp_one
        return [one(t, received) for t in ts]

    def stamp_one(self, t: float | None, received: float) -> float:
        """The time for one sample (``t`` given, or None) of a message received at ``received``."""
        if t is not None:
            if t > self._last:
                self._last = self._anchor = t
                self._k = 0
            return t
        if received != self._r:
            self._new_read(received)
        self._k += 1
        s = self._anchor + self._k * self._spacing
        b = self.resync_s
        if s < received - b or s > received + b or s <= self._last:
            s = self._move(s, received)
        self._last = s
        self._n += 1
        self.stamped += 1
        return s

    def _new_read(self, received: float) -> None:
        prev, self._r = self._r, received
        if self._anchor is None:
            self._anchor, self._k = received - self._spacing, 0  # the first stamp is the receive time
        if prev is None or received - prev > self.resync_s or received < self._mark:
            self._mark, self._n = received, 0  # no rate across a pause or a clock step back
            if prev is not None and received - prev > self.resync_s and received - self._spacing > self._last:
                self._anchor, self._k = received - self._spacing, 0  # after a pause: restart at the receive time
            return
        span = received - self._mark
        if span >= self.rate_window_s:
            rate = self._n / span
            self.arrival_rate = rate
            self._mark, self._n = received, 0
            self._adjust(rate)

    def _adjust(self, rate: float) -> None:
        dt = self._dt
        if abs(rate * dt - 1.0) <= self.rate_tolerance:
            spacing = dt
        elif self._moved or self._spacing != dt:
            spacing = min(max(1.0 / rate if rate > 0 else _INF, dt / 16), dt * 16)
        else:
            spacing = dt  # off only by the count, not confirmed by the band: jitter or batching
        self._moved = False
        if spacing != self._spacing:
            self._spacing = spacing
            if self._last > -_INF:
                self._anchor, self._k = self._last, 0

    def _move(self, s: float, received: float) -> float:
        """Bring a stamp that left the inner band back towards the receive clock, after the last one."""
        b, last, sp = self.resync_s, self._last, self._spacing
        if s < received - b:
            self.behind += 1
            self._moved = True
            s = last + sp * (1.0 + self._nudge)
            if s < received - 2 * b:  # too far behind to catch up: restart at the receive time
                s = received
        elif s > received + b:
            self.ahead += 1
            self._moved = True
            s = last + sp * (1.0 - self._nudge)
            if s > received + 2 * b:  # stamps cannot go back: spread as tightly as allowed
                s = max(received + 2 * b, last + sp * _SQUEEZE)
        if s <= last:
            s = _nextafter(last, _INF)
        self._anchor, self._k = s, 0
        return s

