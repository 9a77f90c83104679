"""Binary frames <-> messages. Pure: bytes in, values out, no I/O.

A frame on the wire is ``COBS(version, type, body..., crc16_le) 0x00`` (PROTOCOL.md).

>>> from firmware_bridge.messages import Ping
>>> frame = encode_frame(Ping(token=7))
>>> frame.hex()
'0401810703896700'
>>> decode_frames(b"garbage\\x00" + frame)
([Ping(token=7)], b'', [FrameError(kind='cobs', detail='code 0x67 at offset 0 runs past the end')])
"""
from __future__ import annotations

import reprlib
import struct
from dataclasses import dataclass

import numpy as np

from firmware_bridge import messages as m
from firmware_bridge.cobs import CobsError, cobs_decode, cobs_encode
from firmware_bridge.crc import crc16

MAX_PAYLOAD = 1024  # version + type + body, without CRC
MAX_ENCODED = MAX_PAYLOAD + 2 + (MAX_PAYLOAD + 2) // 254 + 1

_U16, _U32, _F32 = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<f")
_HELLO = struct.Struct("<HIfBfB")      # boot_id, t_us, rate, format, scale, n_channels
_SAMPLES = struct.Struct("<HIfBBB")    # seq, t_us, rate, format, channels, count
_PONG = struct.Struct("<HI")
_HEARTBEAT = struct.Struct("<IB")
_LABEL_INT, _LABEL_FLOAT, _LABEL_TEXT = 0, 1, 2


@dataclass(frozen=True)
class FrameError:
    """One rejected frame: ``kind`` is a short counter key (cobs, short, crc, version,
    type, malformed, oversize), ``detail`` says why."""

    kind: str
    detail: str


class _Malformed(Exception):
    pass


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 4, 60, 60


def short_repr(value: object, limit: int = 80) -> str:
    """A bounded repr for messages about values from a device or a caller: never raises,
    safe for any nesting depth (``reprlib`` stops at 4 levels), at most ``limit`` characters.

    >>> short_repr("x" * 1000)[:10], len(short_repr("x" * 1000)) <= 80
    ("'xxxxxxxxx", True)
    """
    try:
        text = _REPR.repr(value)
    except Exception:  # e.g. str() of a huge int raises; say only what it is
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _str8(s: str) -> bytes:
    raw = s.encode("utf-8")
    if len(raw) > 255:
        raise ValueError(f"string {s[:20]!r}... is {len(raw)} bytes UTF-8; the limit is 255")
    return bytes([len(raw)]) + raw


def _read_str8(body: bytes, i: int) -> tuple[str, int]:
    if i >= len(body):
        raise _Malformed("string runs past the end")
    n = body[i]
    if i + 1 + n > len(body):
        raise _Malformed("string runs past the end")
    try:
        return body[i + 1:i + 1 + n].decode("utf-8"), i + 1 + n
    except UnicodeDecodeError as e:
        raise _Malformed(f"string is not UTF-8: {e}") from None


def encode_body(msg: m.Message) -> tuple[int, bytes]:
    """(type code, body bytes) of one message."""
    if isinstance(msg, m.Samples):
        v = np.asarray(msg.values)
        if v.ndim != 2 or v.dtype not in (np.int16, np.float32) or v.shape[0] > 255 or v.shape[1] > 255:
            raise ValueError("Samples.values must be int16 or float32 [n <= 255, C <= 255]")
        fmt = msg.sample_format
        head = _SAMPLES.pack(msg.seq, msg.t_us, msg.sample_rate, fmt, v.shape[1], v.shape[0])
        return m.SAMPLES, head + v.astype(m.DTYPES[fmt], copy=False).tobytes()
    if isinstance(msg, m.Hello):
        if len(msg.channels) != len(msg.units) or len(msg.channels) > 255:
            raise ValueError("Hello needs one unit per channel, at most 255 channels")
        out = [_HELLO.pack(msg.boot_id, msg.t_us, msg.sample_rate, msg.sample_format, msg.scale, len(msg.channels)),
               _str8(msg.device_id), _str8(msg.firmware)]
        for name, unit in zip(msg.channels, msg.units):
            out += [_str8(name), _str8(unit)]
        return m.HELLO, b"".join(out)
    if isinstance(msg, m.Label):
        lab = msg.label
        if isinstance(lab, str):
            return m.LABEL, _U32.pack(msg.t_us) + bytes([_LABEL_TEXT]) + _str8(lab)
        if isinstance(lab, (int, np.integer)) and not isinstance(lab, bool):
            return m.LABEL, _U32.pack(msg.t_us) + bytes([_LABEL_INT]) + struct.pack("<i", lab)
        return m.LABEL, _U32.pack(msg.t_us) + bytes([_LABEL_FLOAT]) + _F32.pack(lab)
    if isinstance(msg, m.Heartbeat):
        return m.HEARTBEAT, _HEARTBEAT.pack(msg.t_us, msg.flags)
    if isinstance(msg, m.Pong):
        return m.PONG, _PONG.pack(msg.token, msg.t_us)
    if isinstance(msg, m.Ping):
        return m.PING, _U16.pack(msg.token)
    if isinstance(msg, m.SetRate):
        return m.SET_RATE, _F32.pack(msg.sample_rate)
    if isinstance(msg, m.Start):
        return m.START, b""
    if isinstance(msg, m.Stop):
        return m.STOP, b""
    if isinstance(msg, m.GetHello):
        return m.GET_HELLO, b""
    raise TypeError(f"not a protocol message: {short_repr(msg)}")


def encode_frame(msg: m.Message) -> bytes:
    """The bytes to write on the wire for one message, 0x00 delimiter included."""
    typ, body = encode_body(msg)
    payload = bytes([m.VERSION, typ]) + body
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"frame payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return cobs_encode(payload + _U16.pack(crc16(payload))) + b"\x00"


def decode_body(typ: int, body: bytes) -> m.Message:
    """Parse one body of type ``typ``; raises ``_Malformed`` (internal) or KeyError."""
    try:
        if typ == m.SAMPLES:
            seq, t_us, rate, fmt, ch, count = _SAMPLES.unpack_from(body)
            dtype = m.DTYPES.get(fmt)
            if dtype is None:
                raise _Malformed(f"unknown sample format {fmt}")
            if len(body) != _SAMPLES.size + ch * count * dtype.itemsize:
                raise _Malformed(f"{len(body) - _SAMPLES.size} data bytes for {count} x {ch} {dtype.name}")
            v = np.frombuffer(body, dtype=dtype, offset=_SAMPLES.size).reshape(count, ch)
            return m.Samples(seq=seq, t_us=t_us, sample_rate=rate, values=v.astype(dtype.newbyteorder("=")))
        if typ == m.HELLO:
            boot_id, t_us, rate, fmt, scale, n = _HELLO.unpack_from(body)
            if fmt not in m.DTYPES:
                raise _Malformed(f"unknown sample format {fmt}")
            dev, i = _read_str8(body, _HELLO.size)
            fw, i = _read_str8(body, i)
            names, units = [], []
            for _ in range(n):
                name, i = _read_str8(body, i)
                unit, i = _read_str8(body, i)
                names.append(name)
                units.append(unit)
            if i != len(body):
                raise _Malformed("trailing bytes after HELLO")
            return m.Hello(dev, fw, rate, fmt, tuple(names), tuple(units), scale, boot_id, t_us)
        if typ == m.LABEL:
            t_us, kind = struct.unpack_from("<IB", body)
            if kind == _LABEL_TEXT:
                text, i = _read_str8(body, 5)
                if i != len(body):
                    raise _Malformed("trailing bytes after LABEL")
                return m.Label(t_us, text)
            if len(body) != 9 or kind not in (_LABEL_INT, _LABEL_FLOAT):
                raise _Malformed(f"LABEL kind {kind} with {len(body)} bytes")
            return m.Label(t_us, struct.unpack_from("<i" if kind == _LABEL_INT else "<f", body, 5)[0])
        fixed = {m.HEARTBEAT: (_HEARTBEAT, m.Heartbeat), m.PONG: (_PONG, m.Pong), m.PING: (_U16, m.Ping),
                 m.SET_RATE: (_F32, m.SetRate)}
        if typ in fixed:
            st, cls = fixed[typ]
            if len(body) != st.size:
                raise _Malformed(f"body of {len(body)} bytes; expected {st.size}")
            return cls(*st.unpack(body))
        empty = {m.START: m.Start, m.STOP: m.Stop, m.GET_HELLO: m.GetHello}
        if typ in empty:
            if body:
                raise _Malformed("command takes no body")
            return empty[typ]()
    except struct.error as e:
        raise _Malformed(str(e)) from None
    raise KeyError(typ)


def decode_block(block: bytes) -> m.Message | FrameError:
    """One delimiter-free block -> its message, or the FrameError saying why not."""
    if len(block) > MAX_ENCODED:
        return FrameError("oversize", f"{len(block)} bytes without a delimiter")
    try:
        payload = cobs_decode(block)
    except CobsError as e:
        return FrameError("cobs", str(e))
    if len(payload) < 4:
        return FrameError("short", f"{len(payload)} bytes")
    if crc16(payload[:-2]) != _U16.unpack_from(payload, len(payload) - 2)[0]:
        return FrameError("crc", "CRC mismatch")
    if payload[0] != m.VERSION:
        return FrameError("version", f"version {payload[0]}; this host speaks {m.VERSION}")
    try:
        return decode_body(payload[1], payload[2:-2])
    except _Malformed as e:
        return FrameError("malformed", f"type 0x{payload[1]:02x}: {e}")
    except KeyError:
        return FrameError("type", f"unknown message type 0x{payload[1]:02x}")


def decode_frames(buf: bytes) -> tuple[list[m.Message], bytes, list[FrameError]]:
    """Split ``buf`` at 0x00 delimiters and decode every complete frame.

    Returns (messages, rest, errors): ``rest`` is the incomplete tail to prepend to the
    next bytes (at most MAX_ENCODED bytes: a longer tail is garbage and is dropped with an
    ``oversize`` error). Never raises on any input; empty blocks (0x00 0x00) are skipped.
    """
    parts = bytes(buf).split(b"\x00")
    rest = parts.pop()
    msgs: list[m.Message] = []
    errors: list[FrameError] = []
    for block in parts:
        if block:
            out = decode_block(block)
            (errors if isinstance(out, FrameError) else msgs).append(out)
    if len(rest) > MAX_ENCODED:
        errors.append(FrameError("oversize", f"{len(rest)} bytes without a delimiter"))
        rest = b""
    return msgs, rest, errors


class FrameDecoder:
    """Stateful wrapper over ``decode_frames`` for a byte stream: ``feed(bytes) -> messages``.

    Errors accumulate in ``errors`` (kind -> count); ``last_errors`` holds the latest
    feed's FrameErrors.
    """

    def __init__(self) -> None:
        self._rest = b""
        self.errors: dict[str, int] = {}
        self.last_errors: list[FrameError] = []

    def feed(self, data: bytes) -> list[m.Message]:
        msgs, self._rest, errs = decode_frames(self._rest + data if self._rest else data)
        self.last_errors = errs
        for e in errs:
            self.errors[e.kind] = self.errors.get(e.kind, 0) + 1
        return msgs

    def reset(self) -> None:
        """Forget a partial frame (after a reconnect)."""
        self._rest = b""


def decode_payload_frames(payload: bytes, *, now: float, hello: m.Hello | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """SAMPLES frames of one MQTT payload -> [(t [n] float64 seconds, v [n, C] float32)].

    The last sample of the last frame is placed at ``now`` (the receive time); the other
    samples keep their device-clock spacing. A HELLO in the payload (or ``hello``) gives
    the int16 scale; without one, int16 values are raw counts. Frames that fail their
    CRC, and messages other than SAMPLES and HELLO, are skipped.
    """
    msgs, _, _ = decode_frames(payload if payload.endswith(b"\x00") else payload + b"\x00")
    blocks = []
    for msg in msgs:
        if isinstance(msg, m.Hello):
            hello = msg
        elif isinstance(msg, m.Samples) and msg.values.shape[0] and msg.sample_rate > 0:
            scale = hello.scale if hello is not None and msg.values.dtype == np.int16 else 1.0
            blocks.append((msg, (msg.values.astype(np.float32) * np.float32(scale))))
    if not blocks:
        return []
    last = blocks[-1][0]
    t_last_row = now - (last.values.shape[0] - 1) / last.sample_rate  # host time of last.t_us
    out = []
    for msg, v in blocks:
        back = (last.t_us - msg.t_us) % (1 << 32)  # device microseconds before the last frame
        if back >= (1 << 31):
            back = 0  # device clock went backwards (reset inside the payload): no spacing known
        out.append((t_last_row - back / 1e6 + np.arange(v.shape[0]) / msg.sample_rate, v))
    return out
