"""The records that cross the pipeline's parts (frozen, slotted dataclasses).

The only positional tuples on the hot path are the raw MQTT messages of one socket read,
``(topic, payload)``: the ingest thread builds millions of them, and a dataclass per
message costs more than the rest of its decoding. Everything after decoding is a record.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edge.ingest.types import StreamKey

# one raw MQTT message of a read: (topic, payload)
RawMessage = tuple[str, bytes]


@dataclass(frozen=True, slots=True)
class SensorBatch:
    """Raw MQTT messages read together by the ingest connection, with their receive time."""

    msgs: list[RawMessage]
    received: float


@dataclass(frozen=True, slots=True)
class RawMessageIn:
    """One raw MQTT message from the node's own connection (labels, usually)."""

    topic: str
    payload: bytes
    received: float


@dataclass(frozen=True, slots=True)
class SampleBlock:
    """Decoded samples from a non-MQTT source (a serial link): times [n], rows [n][C]."""

    key: StreamKey
    ts: list
    rows: list
    received: float


@dataclass(frozen=True, slots=True)
class LabelIn:
    """A decoded label from a non-MQTT source; ``key`` None matches any stream."""

    key: StreamKey | None
    t: float
    value: Any
    by: str = ""  # the labeller whose signature verified ("" when labels are unsigned)


@dataclass(frozen=True, slots=True)
class StreamReset:
    """A control record: the source of ``key`` restarted; forget its partial window.

    ``after`` is the sensor lane's count of items offered when the reset was made: it is
    applied once every one of them has left the lane, so that it cuts the stream where
    its source did, although control is taken before sensor data."""

    key: StreamKey
    why: str
    after: int = 0


@dataclass(frozen=True, slots=True)
class Window:
    """One window cut from a stream, ready to serve."""

    key: StreamKey
    t_start: float
    t_end: float
    x: np.ndarray  # [C, L] float32
    received: float  # receive time of the message that completed it (latency origin)


@dataclass(frozen=True, slots=True)
class Served:
    """What one backbone + head call gave for a batch of windows."""

    windows: list
    z: np.ndarray  # [B, D]
    scores: np.ndarray  # [B, K]
    head_version: str
