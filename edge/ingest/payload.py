"""Sensor payloads -> samples. Pure: bytes in, values out, ``DecodeError`` on bad input.

Accepted payloads (``format = "auto"`` tells them apart by their first byte):

* JSON, one sample: ``{"t": 1732.5, "v": [ax, ay, az]}``; ``t`` (Unix seconds) is optional.
* JSON, a batch: ``{"t0": 1732.5, "dt": 0.001, "v": [[ax, ay, az], ...]}``; sample ``i``
  is at ``t0 + i * dt``. Without ``t0`` the samples carry no time (``dt`` must still be
  a positive number).
* JSON, a list of single samples: ``[{"t": ..., "v": [...]}, ...]``.
* CSV, one line: ``t,ax,ay,az`` or ``ax,ay,az``; a line with ``channels + 1`` fields has
  a time first, one with ``channels`` has none.
* A firmware_bridge SAMPLES frame (binary, COBS-delimited), so Wi-Fi firmware can
  publish what it would write to a UART.

A sample that carries no time of its own gets ``None`` as its time: the stream's
``edge.ingest.timing.Stamper`` stamps it from the receive time (docs/TIME_AND_NAMES.md).
Every sample must have the expected channel count and values that are finite in the
model's dtype (``WINDOW_DTYPE``, float32: 1e39 is a finite Python float but becomes
infinity in a float32 window, and would be served and learned); a given timestamp
must be finite and, unless ``max_skew`` is 0, within ``max_skew`` seconds of the receive
time ``now``.

Any input either decodes or raises ``DecodeError``; messages show untrusted values only
through ``edge.errors.brief`` (bounded, safe for any nesting depth).

>>> decode_payload(b'{"t": 10.0, "v": [1, 2, 3]}', channels=3, now=10.0)
([10.0], [[1.0, 2.0, 3.0]])
>>> decode_payload(b'0.5,0.25,0.125', channels=3, now=7.0)
([None], [[0.5, 0.25, 0.125]])
>>> decode_payload(b'{"v": [1e39, 0, 0]}', channels=3, now=7.0)
Traceback (most recent call last):
...
edge.errors.DecodeError: value 1e+39 is not finite as float32
"""
from __future__ import annotations

import math

import numpy as np
import orjson

from edge.errors import DecodeError, brief
from edge.ingest.names import check_name
from edge.ingest.window import WINDOW_DTYPE

# the largest magnitude finite in the windows' dtype; a NaN fails every comparison with it
_VMAX = float(np.finfo(WINDOW_DTYPE).max)

_isfinite = math.isfinite
_loads = orjson.loads
_JSONDecodeError = orjson.JSONDecodeError


def _row(v, channels: int) -> list[float]:
    if type(v) is not list:
        raise DecodeError("bad_shape", f"sample values must be a list, got {type(v).__name__}")
    if len(v) != channels:
        raise DecodeError("wrong_channels", f"expected {channels} channel values, got {len(v)}")
    out = []
    for x in v:
        tx = type(x)
        if tx is float:
            if not -_VMAX <= x <= _VMAX:
                raise DecodeError("non_finite", f"value {brief(x)} is not finite as float32")
            out.append(x)
        elif tx is int:
            out.append(float(x))
        else:
            # orjson rejects NaN/Infinity tokens already; null or strings land here
            raise DecodeError("bad_value", f"sample value {brief(x)} is not a number")
    return out


def _time(t, now: float, max_skew: float) -> float:
    if type(t) is not float:
        if type(t) is int:
            t = float(t)
        else:
            raise DecodeError("bad_time", f"timestamp {brief(t)} is not a number")
    if not _isfinite(t):
        raise DecodeError("bad_time", f"timestamp {brief(t)} is not finite")
    if max_skew and abs(t - now) > max_skew:
        raise DecodeError("absurd_time", f"timestamp {t!r} is {t - now:+.4g} s from the receive time (max_clock_skew_s = {max_skew:g})")
    return t


def _decode_json_obj(d, channels: int, now: float, max_skew: float, ts: list, rows: list) -> None:
    if type(d) is not dict:
        raise DecodeError("bad_shape", f"expected a JSON object, got {type(d).__name__}")
    v = d.get("v")
    if v is None:
        raise DecodeError("bad_shape", "JSON sample has no 'v'")
    if "t0" in d or (type(v) is list and v and type(v[0]) is list):
        t0 = _time(d["t0"], now, max_skew) if "t0" in d else None
        dt = d.get("dt")
        if type(dt) not in (int, float) or not _isfinite(dt) or dt <= 0:
            raise DecodeError("bad_time", f"batch needs a positive 'dt', got {brief(dt)}")
        if type(v) is not list:
            raise DecodeError("bad_shape", "batch 'v' must be a list of samples")
        for r in v:
            rows.append(_row(r, channels))
        if t0 is None:
            ts.extend([None] * len(v))
            return
        ts.extend([t0 + i * dt for i in range(len(v))])
        if v and not _isfinite(ts[-1]):
            raise DecodeError("bad_time", "batch ends at a time that is not finite")
        if max_skew and v and abs(ts[-1] - now) > max_skew:
            raise DecodeError("absurd_time", f"batch ends {ts[-1] - now:+.4g} s from the receive time")
        return
    rows.append(_row(v, channels))
    ts.append(_time(d["t"], now, max_skew) if "t" in d else None)


def decode_json(payload: bytes, *, channels: int, now: float,
                max_skew: float = 0.0) -> tuple[list[float | None], list[list[float]]]:
    """Decode a JSON sample, batch or list of samples into (times, rows); None: no time given."""
    try:
        d = orjson.loads(payload)
    except orjson.JSONDecodeError as e:
        raise DecodeError("bad_json", f"invalid JSON: {brief(str(e), 120)}") from None
    ts: list[float | None] = []
    rows: list[list[float]] = []
    if type(d) is list:
        for item in d:
            _decode_json_obj(item, channels, now, max_skew, ts, rows)
    else:
        _decode_json_obj(d, channels, now, max_skew, ts, rows)
    return ts, rows


def decode_sample(payload: bytes, *, channels: int, now: float,
                  max_skew: float = 0.0) -> tuple[float | None, list[float]] | None:
    """The hot path for the common single-sample JSON object: ``(t, row)``, or None.

    ``t`` is None when the sample carries no time (the stream's ``Stamper`` gives it one).
    It never raises.

    None means "not a plain valid single sample": the caller then runs
    ``decode_payload``, which handles every other form and raises the right
    ``DecodeError``. Whenever this returns a value, ``decode_payload`` (format auto or
    json) returns ``([t], [row])`` for the same payload; it skips the general decoder's
    per-message lists. The size limit is the caller's to check first.

    >>> decode_sample(b'{"t": 10.0, "v": [1, 2.5, 3]}', channels=3, now=10.0)
    (10.0, [1.0, 2.5, 3.0])
    >>> decode_sample(b'{"v": [1, 2, 3]}', channels=3, now=10.0)
    (None, [1.0, 2.0, 3.0])
    >>> decode_sample(b'{"t0": 10.0, "dt": 0.1, "v": [[1, 2, 3]]}', channels=3, now=10.0) is None
    True
    """
    if payload[:1] != b"{":
        return None
    try:
        d = _loads(payload)
    except _JSONDecodeError:
        return None
    v = d.get("v")  # a payload that starts with "{" and parses is a dict
    if type(v) is not list or len(v) != channels or "t0" in d:
        return None
    for x in v:
        if type(x) is not float:
            try:
                v = _row(v, channels)
            except DecodeError:
                return None
            break
    else:
        if not (max(v) <= _VMAX and min(v) >= -_VMAX):  # not finite as float32: the slow path says why
            return None
    if "t" not in d:
        return None, v
    t = d["t"]
    if type(t) is not float:
        if type(t) is not int:
            return None
        t = float(t)
    if not _isfinite(t) or (max_skew and abs(t - now) > max_skew):
        return None
    return t, v


def decode_csv(payload: bytes, *, channels: int, now: float,
               max_skew: float = 0.0) -> tuple[list[float | None], list[list[float]]]:
    """Decode CSV lines (comma, semicolon or tab separated) into (times, rows); None: no time given."""
    try:
        text = payload.decode("ascii")
    except UnicodeDecodeError:
        raise DecodeError("bad_csv", "CSV payload is not ASCII") from None
    ts: list[float | None] = []
    rows: list[list[float]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        parts = line.replace("\t", ",").replace(";", ",").split(",")
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            raise DecodeError("bad_csv", f"CSV line {brief(line, 60)} has a non-numeric field") from None
        if len(vals) == channels + 1:
            t = _time(vals[0], now, max_skew)
            vals = vals[1:]
        elif len(vals) == channels:
            t = None
        else:
            raise DecodeError("wrong_channels", f"CSV line has {len(vals)} fields; expected {channels} or {channels + 1} (time first)")
        for x in vals:
            if not -_VMAX <= x <= _VMAX:
                raise DecodeError("non_finite", f"value {brief(x)} is not finite as float32")
        ts.append(t)
        rows.append(vals)
    if not rows:
        raise DecodeError("empty", "empty CSV payload")
    return ts, rows


def decode_frame(payload: bytes, *, channels: int, now: float, max_skew: float = 0.0) -> tuple[list[float], list[list[float]]]:
    """Decode firmware_bridge SAMPLES frames in an MQTT payload into (times, rows)."""
    from firmware_bridge.codec import decode_payload_frames

    ts: list[float] = []
    rows: list[list[float]] = []
    for t, v in decode_payload_frames(payload, now=now):
        if v.shape[1] != channels:
            raise DecodeError("wrong_channels", f"frame has {v.shape[1]} channels; expected {channels}")
        if not np.isfinite(np.asarray(v, dtype=WINDOW_DTYPE)).all():
            raise DecodeError("non_finite", "frame has a value that is not finite as float32")
        tl = t.tolist()
        if tl:
            _time(tl[0], now, max_skew)
            _time(tl[-1], now, max_skew)
        ts.extend(tl)
        rows.extend(v.tolist())
    if not rows:
        raise DecodeError("empty", "payload holds no SAMPLES frame")
    return ts, rows


_DECODERS = {"json": decode_json, "csv": decode_csv, "frame": decode_frame}


def decode_payload(payload: bytes, *, channels: int, now: float, fmt: str = "auto", max_skew: float = 0.0,
                   max_bytes: int = 1 << 20) -> tuple[list[float | None], list[list[float]]]:
    """Decode one MQTT payload into (times, rows); ``fmt`` is auto, json, csv or frame.

    A time is None for a sample that carries none (JSON without ``t``/``t0``, CSV
    without a time column); frames always carry times. Raises only ``DecodeError``.
    """
    if len(payload) > max_bytes:
        raise DecodeError("oversized", f"payload of {len(payload)} bytes exceeds max_payload_bytes = {max_bytes}")
    if not payload:
        raise DecodeError("empty", "empty payload")
    if fmt == "auto":
        first = payload[:1]
        if first in (b" ", b"\t", b"\r", b"\n"):
            first = payload.lstrip()[:1]
        if first in (b"{", b"[", b"\""):
            fmt = "json"
        elif b"\x00" in payload:
            fmt = "frame"
        else:
            fmt = "csv"
    return _DECODERS[fmt](payload, channels=channels, now=now, max_skew=max_skew)


def decode_label(payload: bytes, *, now: float, max_skew: float = 0.0) -> tuple[float, str | float, str, str]:
    """Decode a label message into (t, label_or_y, device, stream).

    ``{"t": 1732.5, "label": "imbalance"}`` for a class, ``{"t": ..., "y": 0.7}`` (or a
    list) for a regression target. A label without ``t`` is at the receive time ``now``.
    ``device`` and ``stream`` are optional and narrow the match to one stream ("" matches
    any stream); when given they must fit the name rule (``edge.ingest.names``), else
    ``DecodeError("bad_name")``. Raises only ``DecodeError``.

    >>> decode_label(b'{"t": 5.0, "label": "normal", "device": "m1"}', now=5.0)
    (5.0, 'normal', 'm1', '')
    """
    try:
        d = orjson.loads(payload)
    except orjson.JSONDecodeError as e:
        raise DecodeError("bad_label", f"label is not valid JSON: {brief(str(e), 120)}") from None
    if type(d) is not dict:
        raise DecodeError("bad_label", "a label must be a JSON object {t, label} or {t, y}")
    t = _time(d.get("t", now), now, max_skew)
    if "label" in d:
        value = d["label"]
        if type(value) not in (str, int):
            raise DecodeError("bad_label", f"label {brief(value)} must be a class name or index")
    elif "y" in d:
        value = d["y"]
        if type(value) in (int, float):
            value = float(value)
            if not -_VMAX <= value <= _VMAX:  # the head learns in float32 too
                raise DecodeError("bad_label", "y is not finite as float32")
        elif type(value) is list and value and all(type(x) in (int, float) and -_VMAX <= x <= _VMAX for x in value):
            value = [float(x) for x in value]
        else:
            raise DecodeError("bad_label", f"y = {brief(value)} must be a finite number or a list of them")
    else:
        raise DecodeError("bad_label", "a label needs 'label' (a class) or 'y' (a value)")
    dev, stm = d.get("device", ""), d.get("stream", "")
    if type(dev) is not str or type(stm) is not str:
        raise DecodeError("bad_label", "device and stream must be strings")
    if dev:
        check_name(dev, what="label device")
    if stm:
        check_name(stm, what="label stream")
    return t, value, dev, stm
