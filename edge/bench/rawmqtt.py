"""A minimal MQTT 3.1.1 QoS 0 publisher on a raw socket: the load generator of the benchmarks.

paho spends tens of microseconds per publish; a load generator that slow would measure
itself. This one frames PUBLISH packets by hand and writes them in large chunks, so the
broker and the system under test are the bottleneck.
"""
from __future__ import annotations

import socket


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: bytes) -> bytes:
    return len(s).to_bytes(2, "big") + s


def publish_packet(topic: bytes, payload: bytes) -> bytes:
    """One QoS 0 PUBLISH packet."""
    body = _str(topic) + payload
    return b"\x30" + _varint(len(body)) + body


class RawPublisher:
    """Connects (clean session, no keepalive) and sends pre-framed packets."""

    def __init__(self, host: str, port: int, client_id: str = "edge-bench-pub"):
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        vh = _str(b"MQTT") + bytes([4, 0x02]) + (0).to_bytes(2, "big")
        body = vh + _str(client_id.encode())
        self.sock.sendall(b"\x10" + _varint(len(body)) + body)
        ack = self.sock.recv(4)
        if len(ack) < 4 or ack[0] != 0x20 or ack[3] != 0:
            raise ConnectionError(f"broker refused the connection: {ack!r}")

    def send(self, packets: bytes) -> None:
        self.sock.sendall(packets)

    def close(self) -> None:
        try:
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT
        finally:
            self.sock.close()
