"""A minimal MQTT 3.1.1 QoS 0 publisher on a raw socket: the load generator of the benchmarks.

paho spends tens of microseconds per publish; a load generator that slow would measure
itself. This one frames PUBLISH packets with ``edge.ingest.mqttwire`` and writes them in
large chunks, so the broker and the system under test are the bottleneck.
"""
from __future__ import annotations

import socket

from edge.ingest.mqttwire import DISCONNECT_PACKET, encode_connect, encode_publish


def publish_packet(topic: bytes, payload: bytes) -> bytes:
    """One QoS 0 PUBLISH packet (MQTT 3.1.1)."""
    return encode_publish(topic, payload)


class RawPublisher:
    """Connects (clean session, no keepalive) and sends pre-framed packets."""

    def __init__(self, host: str, port: int, client_id: str = "edge-bench-pub"):
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(encode_connect(client_id, protocol="3.1.1", keepalive=0))
        ack = self.sock.recv(4)
        if len(ack) < 4 or ack[0] != 0x20 or ack[3] != 0:
            raise ConnectionError(f"broker refused the connection: {ack!r}")

    def send(self, packets: bytes) -> None:
        self.sock.sendall(packets)

    def close(self) -> None:
        try:
            self.sock.sendall(DISCONNECT_PACKET)
        finally:
            self.sock.close()
