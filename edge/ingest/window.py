"""Cut one stream's samples into fixed-length windows. No I/O; one instance per stream.

The policy, in the order it is applied to each sample (each outcome has a counter):

* **Order**: a sample whose time is not after the previous one is dropped
  (``out_of_order``); duplicates are out of order too.
* **Gaps**: the expected spacing is ``1 / sample_rate``. A spacing above 1.5x that means
  samples are missing. Up to ``max_fill`` missing samples are filled by linear
  interpolation (``filled``); a longer gap discards the partial window and starts a new
  one at the sample after the gap (``gaps``, ``discarded``), because a window that
  straddles a hole would show the model a signal that never existed.
* **Rate**: every spacing between consecutive samples, filled or not, feeds an EWMA of
  the spacing (weight 0.01 per sample); only a gap longer than ``max_fill`` does not,
  because an outage says nothing about the rate the sensor samples at (it restarts the
  window instead, and is counted). After 100 spacings, and then every 32, the estimate
  is checked: outside ``sample_rate * (1 +- rate_tolerance)`` the stream is flagged
  ``"rate"`` (``rate_ok`` False; ``rate_mismatch`` counts each transition into it). A
  500 Hz stream fed to a 1 kHz windower is thus flagged although its holes are filled.
* **Fill share**: at the same checks, the share of filled samples among the samples of
  the last 32 spacings updates an EWMA (weight 1/8, so it remembers about 250 samples);
  above ``max_fill_share`` the stream is flagged ``"fill"`` (``fill_mismatch`` counts
  transitions): a stream that needs steady interpolation shows the model a smoothed
  signal. ``flagged`` is None, ``"rate"`` or ``"fill"`` (rate first). Windows are still
  served in both cases: a speed change is a drift the adapter can learn, and silence
  would hide it; the flags make it visible.
* **Windows**: every ``hop`` samples once ``length`` samples are buffered, a window
  ``[channels, length]`` float32 is emitted with the times of its first and last sample.

>>> w = Windower(length=4, hop=2, channels=1, sample_rate=10.0)
>>> [(round(a, 2), round(b, 2), x.ravel().tolist()) for a, b, x in w.push([0.0, 0.1, 0.2, 0.3, 0.4, 0.5], [[0], [1], [2], [3], [4], [5]])]
[(0.0, 0.3, [0.0, 1.0, 2.0, 3.0]), (0.2, 0.5, [2.0, 3.0, 4.0, 5.0])]
"""
from __future__ import annotations

import numpy as np

#: what a window's values become (the model's input dtype); a sample value must be finite in
#: it, not only as a Python float: 1e39 is finite in float64 and infinite in float32 (payload.py)
WINDOW_DTYPE = np.float32

_WARMUP = 100  # spacings before the first check of the flags
_EVERY = 32    # spacings between checks


class Windower:
    """Windows for one stream; ``push`` returns ``[(t_start, t_end, window[C, L])]``."""

    __slots__ = ("length", "hop", "channels", "sample_rate", "rate_tolerance", "max_fill", "max_fill_share",
                 "_ts", "_rows", "_skip", "_last_t", "_dt_est", "_n_dt", "rate_ok", "fill_ok", "counters", "_dt",
                 "_gap_at", "_check_at", "_filled_at", "_fill_share")

    def __init__(self, *, length: int, hop: int, channels: int, sample_rate: float,
                 rate_tolerance: float = 0.1, max_fill: int = 2, max_fill_share: float = 0.05):
        if length < 1 or hop < 1 or channels < 1 or sample_rate <= 0:
            raise ValueError("length, hop, channels and sample_rate must be positive")
        if not 0.0 <= max_fill_share <= 1.0:
            raise ValueError("max_fill_share must be within 0..1")
        self.length, self.hop, self.channels = length, hop, channels
        self.sample_rate, self.rate_tolerance, self.max_fill = sample_rate, rate_tolerance, max_fill
        self.max_fill_share = max_fill_share
        self._dt = 1.0 / sample_rate
        self._gap_at = 1.5 * self._dt
        self._ts: list[float] = []
        self._rows: list[list[float]] = []
        self._skip = 0  # samples still to drop when hop > length
        self._last_t: float | None = None
        self._dt_est = self._dt
        self._n_dt = 0
        self._check_at = _WARMUP  # spacing count at which the flags are next checked
        self._filled_at = 0       # counters["filled"] at the last check
        self._fill_share = 0.0
        self.rate_ok = True
        self.fill_ok = True
        self.counters = {"samples": 0, "windows": 0, "out_of_order": 0, "filled": 0, "gaps": 0,
                         "discarded": 0, "rate_mismatch": 0, "fill_mismatch": 0}

    @property
    def estimated_rate(self) -> float:
        """The stream's measured sample rate (Hz), from the EWMA of sample spacing."""
        return 1.0 / self._dt_est

    @property
    def fill_share(self) -> float:
        """The recent share of filled samples among all samples (EWMA, see the module doc)."""
        return self._fill_share

    @property
    def flagged(self) -> str | None:
        """Why the stream is flagged now: ``"rate"``, ``"fill"``, or None when it is fine."""
        if not self.rate_ok:
            return "rate"
        return None if self.fill_ok else "fill"

    def reset(self) -> None:
        """Forget the partial window (e.g. after the source reconnects)."""
        self.counters["discarded"] += len(self._rows)
        self._ts.clear()
        self._rows.clear()
        self._skip = 0
        self._last_t = None

    def push(self, ts: list[float], rows: list[list[float]]) -> list[tuple[float, float, np.ndarray]]:
        """Add samples (times and rows of ``channels`` values); return the windows completed."""
        out: list[tuple[float, float, np.ndarray]] = []
        c = self.counters
        dt = self._dt
        gap_at = 1.5 * dt
        bts, brows = self._ts, self._rows
        last = self._last_t
        for t, row in zip(ts, rows):
            if last is not None:
                d = t - last
                if d <= 0.0:
                    c["out_of_order"] += 1
                    continue
                if d > gap_at:
                    missing = int(round(d / dt)) - 1
                    if missing > self.max_fill:  # an outage: restart, and leave the rate estimate alone
                        c["gaps"] += 1
                        c["discarded"] += len(brows)
                        bts.clear()
                        brows.clear()
                        self._skip = 0
                    else:
                        if missing > 0 and brows:
                            prev = brows[-1]
                            for k in range(1, missing + 1):
                                a = k / (missing + 1)
                                self._append(last + a * d, [p + a * (x - p) for p, x in zip(prev, row)], out)
                            c["filled"] += missing
                        self._track_rate(d)
                else:
                    self._track_rate(d)
            last = t
            self._append(t, row, out)
        self._last_t = last
        c["samples"] += len(ts)
        return out

    def push_one(self, t: float, row: list[float]) -> list[tuple[float, float, np.ndarray]] | tuple[()]:
        """``push([t], [row])`` without the lists: the per-message hot path.

        The common case (in order, no gap, no hop skip) is done inline; anything else
        goes through ``push``. Returns the windows completed (usually an empty tuple).
        """
        last = self._last_t
        if last is None or self._skip:
            return self.push([t], [row])
        d = t - last
        if not 0.0 < d <= self._gap_at:
            return self.push([t], [row])
        self._track_rate(d)
        self._last_t = t
        self.counters["samples"] += 1
        rows = self._rows
        self._ts.append(t)
        rows.append(row)
        if len(rows) < self.length:
            return ()
        out: list[tuple[float, float, np.ndarray]] = []
        self._emit(out)
        return out

    def _track_rate(self, d: float) -> None:
        self._dt_est += 0.01 * (d - self._dt_est)
        self._n_dt += 1
        if self._n_dt >= self._check_at:
            self._check()

    def _check(self) -> None:
        """Update both flags; runs every ``_EVERY`` spacings so the per-sample path stays cheap."""
        self._check_at = self._n_dt + _EVERY
        c = self.counters
        ok = abs(self._dt / self._dt_est - 1.0) <= self.rate_tolerance
        if self.rate_ok and not ok:
            c["rate_mismatch"] += 1
        self.rate_ok = ok
        filled = c["filled"] - self._filled_at
        self._filled_at = c["filled"]
        self._fill_share += 0.125 * (filled / (filled + _EVERY) - self._fill_share)
        ok = self._fill_share <= self.max_fill_share
        if self.fill_ok and not ok:
            c["fill_mismatch"] += 1
        self.fill_ok = ok

    def _append(self, t: float, row: list[float], out: list) -> None:
        if self._skip:
            self._skip -= 1
            return
        self._ts.append(t)
        self._rows.append(row)
        if len(self._rows) >= self.length:
            self._emit(out)

    def _emit(self, out: list) -> None:
        """Cut the window that just filled, then move on by ``hop``."""
        L, H = self.length, self.hop
        win = np.asarray(self._rows[:L], dtype=WINDOW_DTYPE).T.copy()
        out.append((self._ts[0], self._ts[L - 1], win))
        self.counters["windows"] += 1
        drop = min(H, L)
        del self._rows[:drop]
        del self._ts[:drop]
        self._skip = H - drop
