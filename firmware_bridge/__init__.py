"""firmware_bridge: the serial protocol between microcontroller firmware and the host.

Pure parts: ``cobs``, ``crc``, ``messages``, ``codec`` (binary frames), ``text`` (line
mode), ``session`` (sequence, reset and clock tracking). I/O shells: ``link``
(SerialLink on pyserial) and ``sim`` (FirmwareSim on a pty). This package never
imports ``edge``: firmware tools use it alone. PROTOCOL.md is the specification.
"""
from firmware_bridge.codec import FrameDecoder, FrameError, decode_frames, decode_payload_frames, encode_frame
from firmware_bridge.messages import (
    GetHello, Heartbeat, Hello, Label, Ping, Pong, Samples, SetRate, Start, Stop,
)

__all__ = [
    "FrameDecoder", "FrameError", "decode_frames", "decode_payload_frames", "encode_frame",
    "GetHello", "Heartbeat", "Hello", "Label", "Ping", "Pong", "Samples", "SetRate", "Start", "Stop",
]
