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
import time
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


class RetainLatest:
    """A ``send`` that publishes each topic's prediction retained at most once per ``every_s``
    (0: never), so a new subscriber sees a stream's latest at once.

    Retaining every prediction costs the broker a store per message (it showed in the
    pipeline's p99); one retained per stream per ``every_s`` keeps "the latest" for new
    subscribers at a fraction of that. Called on the pipeline thread only.

    >>> sent, now = [], [0.0]
    >>> send = RetainLatest(lambda t, b, *, qos, retain: sent.append(retain) or True, every_s=1.0, qos=0,
    ...                     clock=lambda: now[0])
    >>> send("a", b""), send("a", b""), send("b", b"")
    (True, True, True)
    >>> now[0] = 1.0; _ = send("a", b""); sent
    [True, False, True, True]
    """

    def __init__(self, publish: Callable[..., bool], *, every_s: float, qos: int,
                 clock: Callable[[], float] = time.monotonic):
        self.publish, self.every_s, self.qos, self.clock = publish, every_s, qos, clock
        self._retained: dict[str, float] = {}  # topic -> when it was last published retained

    def __call__(self, topic: str, payload: bytes) -> bool:
        retain = False
        if self.every_s:
            now = self.clock()
            if now - self._retained.get(topic, -1e18) >= self.every_s:
                self._retained[topic] = now
                retain = True
        return self.publish(topic, payload, qos=self.qos, retain=retain)
