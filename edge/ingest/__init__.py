"""Sources (MQTT, serial), payload decoding and windowing."""
from edge.ingest.types import StreamKey

__all__ = ["StreamKey"]
