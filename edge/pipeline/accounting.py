"""How many samples a lane item holds: what a drop costs, counted in samples.

A lane that drops or sheds raw MQTT messages never decodes them (under overload that
would cost what serving them costs), but an operator asks how much sensor data was lost,
in samples. ``payload_samples`` counts the samples ``decode_payload`` would give for a
payload from its structure alone (JSON parsed without converting a value, CSV lines,
frame headers), and is asked only for items lost; a test holds it to ``decode_payload``.
"""
from __future__ import annotations

import orjson

from edge.pipeline.records import RawMessageIn, SampleBlock, SensorBatch


def payload_samples(payload: bytes) -> int:
    """The samples in one sensor payload (format auto, as ``decode_payload``); 0 for what would not decode.

    >>> payload_samples(b'{"t": 1.0, "v": [1, 2, 3]}'), payload_samples(b'{"t0": 1.0, "dt": 0.1, "v": [[1], [2]]}')
    (1, 2)
    >>> payload_samples(b'[{"v": [1]}, {"v": [2]}]'), payload_samples(b"1,2\\n3,4\\n\\n"), payload_samples(b"{bad")
    (2, 2, 0)
    """
    first = payload.lstrip()[:1]
    if not first:
        return 0
    if first in (b"{", b"[", b'"'):
        try:
            d = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return 0
        return sum(_json_samples(x) for x in d) if type(d) is list else _json_samples(d)
    if b"\x00" in payload:
        return _frame_samples(payload)
    return sum(1 for line in payload.splitlines() if line.strip())


def _json_samples(d) -> int:
    if type(d) is not dict or "v" not in d:
        return 0
    v = d["v"]
    if "t0" in d or (type(v) is list and v and type(v[0]) is list):
        return len(v) if type(v) is list else 0
    return 1


def _frame_samples(payload: bytes) -> int:
    from firmware_bridge.codec import decode_payload_frames

    try:
        return sum(len(t) for t, _ in decode_payload_frames(payload, now=0.0))
    except Exception:  # noqa: BLE001 - a payload that would not decode holds no samples to lose
        return 0


def item_samples(item) -> int:
    """The samples in one sensor-lane item (a read's messages, one message, or a decoded block)."""
    if type(item) is SensorBatch:
        return sum(payload_samples(p) for _, p in item.msgs)
    if type(item) is RawMessageIn:
        return payload_samples(item.payload)
    if type(item) is SampleBlock:
        return len(item.ts)
    return 0


def item_messages(item) -> int:
    """The MQTT messages in one lane item (a serial block or label is none)."""
    if type(item) is SensorBatch:
        return len(item.msgs)
    return 1 if type(item) is RawMessageIn else 0
