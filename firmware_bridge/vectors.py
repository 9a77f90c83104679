"""Shared test vectors: the same messages are built by c/tools/vectors.c, and both sides
must produce and accept the same bytes. PROTOCOL.md lists their encodings
(``python3 -m firmware_bridge.vectors`` prints them)."""
from __future__ import annotations

import numpy as np

from firmware_bridge import messages as m
from firmware_bridge.codec import encode_frame

VECTORS: list[tuple[str, m.Message]] = [
    ("hello", m.Hello("accel-01", "1.2.0", 100.0, m.FORMAT_INT16, ("ax", "ay", "az"), ("g", "g", "g"),
                      scale=1 / 4096, boot_id=0x1234, t_us=1000)),
    ("samples_i16", m.Samples(7, 123456, 100.0, np.array([[1, -2, 3], [0, 256, -32768]], np.int16))),
    ("samples_f32", m.Samples(65535, 0xFFFFFFF0, 50.0, np.array([[0.5, -1.25]], np.float32))),
    ("samples_long", m.Samples(0x0101, 0x01010101, 100.0, np.full((100, 3), 0x1111, np.int16))),
    ("label_int", m.Label(5000, 3)),
    ("label_float", m.Label(6000, 0.75)),
    ("label_text", m.Label(7000, "imbalance")),
    ("heartbeat", m.Heartbeat(8000, 1)),
    ("pong", m.Pong(42, 9000)),
    ("ping", m.Ping(42)),
    ("set_rate", m.SetRate(200.0)),
    ("start", m.Start()),
    ("stop", m.Stop()),
    ("get_hello", m.GetHello()),
]


def encoded_vectors() -> list[tuple[str, bytes]]:
    return [(name, encode_frame(msg)) for name, msg in VECTORS]


if __name__ == "__main__":
    for name, frame in encoded_vectors():
        print(f"{name:12s} {frame.hex(' ')}")
