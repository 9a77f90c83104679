"""Text mode for the simplest firmware: one reading per line, values separated by commas
or tabs (``Serial.print(ax); Serial.print(','); ... Serial.println(az);``), as "data
forwarder" tools expect. An optional first line of names (``ax,ay,az``) names the
channels. The sample rate is given, or estimated from arrival times.

Pure: ``parse_lines`` takes bytes; ``TextStream.feed(data, arrival)`` takes the arrival
time from its caller.

>>> parse_lines([b"1,2,3", b"4\\t5\\t6"])
(array([[1., 2., 3.],
       [4., 5., 6.]], dtype=float32), [])
"""
from __future__ import annotations

import numpy as np

from firmware_bridge.session import DeviceClock

MAX_LINE = 1024


def _split(line: bytes) -> list[bytes]:
    line = line.replace(b"\t", b",")
    return line.split(b",") if b"," in line else line.split()


def parse_lines(lines: list[bytes], channels: int | None = None) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Numeric lines -> (rows [k, C] float32, errors [(kind, detail)]). Blank lines are skipped;
    a line with another column count than ``channels`` (or the first line's) is an error."""
    lines = [ln.strip() for ln in lines]
    lines = [ln for ln in lines if ln]
    if not lines:
        return np.zeros((0, channels or 0), np.float32), []
    c = channels or len(_split(lines[0]))
    try:  # fast path: every line has c comma/tab-separated numbers
        joined = b",".join(lines).replace(b"\t", b",")
        if joined.count(b",") == len(lines) * (c - 1) and all(ln.count(b",") + ln.count(b"\t") == c - 1 for ln in lines):
            arr = np.array(joined.split(b","), dtype=np.bytes_).astype(np.float32).reshape(len(lines), c)
            return arr, []
    except ValueError:
        pass
    rows, errors = [], []
    for ln in lines:
        parts = _split(ln)
        if len(parts) != c:
            errors.append(("columns", f"{len(parts)} values; expected {c}: {ln[:40]!r}"))
            continue
        try:
            rows.append([float(p) for p in parts])
        except ValueError:
            errors.append(("text_parse", f"not numbers: {ln[:40]!r}"))
    return np.array(rows, np.float32).reshape(len(rows), c), errors


def _header(line: bytes) -> tuple[str, ...] | None:
    try:
        parts = [p.strip().decode("ascii") for p in _split(line.strip())]
    except UnicodeDecodeError:
        return None
    if parts and all(p and (p[0].isalpha() or p[0] == "_") and p.replace("_", "").isalnum() for p in parts):
        return tuple(parts)
    return None


class TextStream:
    """Byte stream of text readings -> timestamped sample blocks.

    ``feed(data, arrival) -> [(t [n] float64, v [n, C] float32)]``. With ``sample_rate``
    None, readings are held until ``min_seconds`` of arrivals and ``min_lines`` readings
    give an estimate: rate = readings after the first chunk / time since the first chunk.
    Sample k is then at offset + k / rate, the offset mapped as in ``DeviceClock``.
    """

    def __init__(self, *, sample_rate: float | None = None, channels: int | None = None,
                 min_seconds: float = 1.0, min_lines: int = 20, tolerance: float = 0.5):
        self.sample_rate = sample_rate
        self.channels = channels
        self.names: tuple[str, ...] | None = None
        self.clock = DeviceClock(tolerance=tolerance)
        self.counters = dict.fromkeys(("lines", "samples", "columns", "text_parse", "overlong"), 0)
        self.min_seconds, self.min_lines = min_seconds, min_lines
        self._rest = b""
        self._k = 0                      # index of the next sample on the device time line
        self._pending: list[np.ndarray] = []
        self._first: tuple[float, int] | None = None  # (arrival, readings) of the first chunk

    def restart(self) -> None:
        """The device went away or rebooted: drop partial lines and re-anchor time."""
        self._rest = b""
        self.clock.reset()
        self._k = 0

    def feed(self, data: bytes, arrival: float) -> list[tuple[np.ndarray, np.ndarray]]:
        lines = (self._rest + data).split(b"\n")
        self._rest = lines.pop()
        if len(self._rest) > MAX_LINE:
            self.counters["overlong"] += 1
            self._rest = b""
        if self.names is None and self.channels is None and lines and self._k == 0 and not self._pending:
            while lines and not lines[0].strip():
                lines.pop(0)
            if lines and (names := _header(lines[0])) is not None:
                self.names = names
                self.channels = len(names)
                lines.pop(0)
        rows, errors = parse_lines(lines, self.channels)
        for kind, _ in errors:
            self.counters[kind] += 1
        if not rows.shape[0]:
            return []
        if self.channels is None:
            self.channels = rows.shape[1]
        self.counters["lines"] += rows.shape[0]
        if self.sample_rate is None:
            return self._estimate(rows, arrival)
        return [self._stamp(rows, arrival)]

    def _estimate(self, rows: np.ndarray, arrival: float) -> list:
        self._pending.append(rows)
        held = sum(r.shape[0] for r in self._pending)
        if self._first is None:
            self._first = (arrival, held)
            return []
        span = arrival - self._first[0]
        after = held - self._first[1]
        if span < self.min_seconds or after < self.min_lines:
            return []
        self.sample_rate = after / span
        block = np.concatenate(self._pending)
        self._pending = []
        return [self._stamp(block, arrival)]

    def _stamp(self, rows: np.ndarray, arrival: float) -> tuple[np.ndarray, np.ndarray]:
        n = rows.shape[0]
        dev = (self._k + np.arange(n)) / self.sample_rate
        self._k += n
        offset = self.clock.offset_for(float(dev[-1]), arrival, period=1.0 / self.sample_rate)
        self.counters["samples"] += n
        return dev + offset, rows
