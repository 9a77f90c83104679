"""The protocol's messages as frozen dataclasses (values only; codec.py turns them into bytes).

Device -> host: Hello, Samples, Label, Heartbeat, Pong.
Host -> device: Ping, SetRate, Start, Stop, GetHello.
Type codes and byte layouts are specified in PROTOCOL.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np

VERSION = 1

HELLO, SAMPLES, LABEL, HEARTBEAT, PONG = 0x01, 0x02, 0x03, 0x04, 0x05
PING, SET_RATE, START, STOP, GET_HELLO = 0x81, 0x82, 0x83, 0x84, 0x85

FORMAT_INT16, FORMAT_FLOAT32 = 1, 2
FORMAT_NAMES = {"int16": FORMAT_INT16, "float32": FORMAT_FLOAT32}
DTYPES = {FORMAT_INT16: np.dtype("<i2"), FORMAT_FLOAT32: np.dtype("<f4")}


@dataclass(frozen=True)
class Hello:
    """What the device is: sent at boot and on GetHello. Configures the host's stream.

    ``scale`` converts int16 samples to physical units (value = raw * scale); it is 1.0
    for float32 devices. ``boot_id`` changes across boots (0 = unknown); ``t_us`` is the
    device clock when the HELLO was sent.
    """

    device_id: str
    firmware: str
    sample_rate: float
    sample_format: int
    channels: tuple[str, ...]
    units: tuple[str, ...]
    scale: float = 1.0
    boot_id: int = 0
    t_us: int = 0


@dataclass(frozen=True, eq=False)
class Samples:
    """A block of ``values`` [n, C] (int16 or float32) whose first row was taken at
    device time ``t_us`` (microseconds since boot, wrapping at 2**32), at ``sample_rate``
    Hz. ``seq`` counts SAMPLES frames modulo 2**16 so the host can count lost ones."""

    seq: int
    t_us: int
    sample_rate: float
    values: np.ndarray

    @property
    def sample_format(self) -> int:
        return FORMAT_INT16 if self.values.dtype == np.int16 else FORMAT_FLOAT32

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Samples):
            return NotImplemented
        return (self.seq, self.t_us, self.sample_rate, self.values.dtype) == (
            other.seq, other.t_us, other.sample_rate, other.values.dtype
        ) and np.array_equal(self.values, other.values, equal_nan=self.values.dtype.kind == "f")


@dataclass(frozen=True)
class Label:
    """Ground truth (button, operator) at device time ``t_us``: an int, a float or a string."""

    t_us: int
    label: Union[int, float, str]


@dataclass(frozen=True)
class Heartbeat:
    """Liveness while idle; ``flags`` bit 0 = streaming, bit 1 = device-side overrun."""

    t_us: int
    flags: int = 0


@dataclass(frozen=True)
class Pong:
    """Answer to Ping, echoing its token, with the device clock."""

    token: int
    t_us: int


@dataclass(frozen=True)
class Ping:
    token: int = 0


@dataclass(frozen=True)
class SetRate:
    sample_rate: float


@dataclass(frozen=True)
class Start:
    pass


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class GetHello:
    pass


DeviceMessage = Union[Hello, Samples, Label, Heartbeat, Pong]
Command = Union[Ping, SetRate, Start, Stop, GetHello]
Message = Union[DeviceMessage, Command]
