"""The publisher port: where predictions leave the pipeline, and an honest count of how.

The port is one callable, ``send(topic, payload) -> bool`` (the node's MQTT link in the
daemon, a list in tests). A send that returns False, or raises, is counted as failed,
never as published: the pipeline does not retry (a late prediction is worth less than
the next one), but it says how many it could not hand over.

>>> sent = []
>>> p = Publisher(lambda t, b: sent.append(t) or len(sent) < 2)
>>> p.publish("a", b"1"), p.publish("b", b"2"), p.counters
(True, False, {'published': 1, 'publish_failed': 1, 'publish_errors': 0})
"""
from __future__ import annotations

import logging
from typing import Callable

from edge.observe import RateLimitedLog

log = logging.getLogger("edge.pipeline")


class Publisher:
    """Counts what ``send`` accepted (``published``), refused (``publish_failed``) or raised on."""

    def __init__(self, send: Callable[[str, bytes], bool | None]):
        self.send = send
        self.counters = {"published": 0, "publish_failed": 0, "publish_errors": 0}
        self._badlog = RateLimitedLog(log)

    def publish(self, topic: str, payload: bytes) -> bool:
        try:
            ok = self.send(topic, payload) is not False
        except Exception as e:  # a transport bug must not stop serving; it is counted instead
            self.counters["publish_errors"] += 1
            self._badlog.warn("publish_error", "publishing a prediction raised %s; counted as failed", type(e).__name__)
            return False
        self.counters["published" if ok else "publish_failed"] += 1
        return ok
