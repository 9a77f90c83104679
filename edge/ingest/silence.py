"""Which connected sources went silent: pure bookkeeping for readiness (issue 19).

A broker can stop forwarding to a subscriber while answering its pings (mosquitto 2.0 did,
to an MQTT 5 subscriber, after one maximum-length PUBLISH from a 3.1.1 client): the
connection is up, nothing arrives, and nothing else notices. ``SilenceWatch`` is fed each
source's running count of what it received (messages, frames) with a monotonic time; a
source that has received something ("was flowing") and then gets nothing for
``silent_after_s`` while connected is silent until its count moves again. Time spent
disconnected does not count (the connection's own state says that), and a source that
never sent anything is not judged: it may have nothing to say yet.

>>> w = SilenceWatch(10.0)
>>> w.observe("mqtt", 0, now=0.0, connected=True)        # nothing yet: not judged
>>> w.observe("mqtt", 5, now=1.0, connected=True)        # flowing
>>> w.observe("mqtt", 5, now=11.5, connected=True)       # 10.5 s without a message
'silent'
>>> w.silent(now=12.0)
{'mqtt': 11.0}
>>> w.observe("mqtt", 6, now=13.0, connected=True)
'resumed'
>>> w.silent(now=13.0)
{}
"""
from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass
class _Flow:
    count: int
    since: float  # when the count last moved, or the connection last came up
    flowing: bool = False
    silent: bool = False


class SilenceWatch:
    """Per-source silence; ``observe`` may be called from any thread (one lock)."""

    def __init__(self, silent_after_s: float):
        self.after = float(silent_after_s)  # 0: never silent
        self._flows: dict[str, _Flow] = {}
        self._lock = threading.Lock()

    def observe(self, name: str, count: int, *, now: float, connected: bool) -> str | None:
        """Take ``name``'s received count at ``now``; ``"silent"`` or ``"resumed"`` on a change, else None."""
        with self._lock:
            f = self._flows.get(name)
            if f is None:
                self._flows[name] = _Flow(count, now)
                return None
            if count != f.count:
                f.count, f.since = count, now
                f.flowing = True
                if f.silent:
                    f.silent = False
                    return "resumed"
                return None
            if not connected:  # a disconnection is the connection's to report; the silence clock restarts
                f.since = now
                return None
            if self.after and f.flowing and not f.silent and now - f.since >= self.after:
                f.silent = True
                return "silent"
            return None

    def silent(self, now: float) -> dict[str, float]:
        """The sources silent now, each with the seconds since it last received something."""
        with self._lock:
            return {n: round(now - f.since, 1) for n, f in self._flows.items() if f.silent}


def received_count(stats: dict) -> int:
    """A source's running count of what it received: MQTT messages, serial frames.

    >>> received_count({"messages": 3}), received_count({"frames": 7, "bytes": 90}), received_count({})
    (3, 7, 0)
    """
    return int(stats.get("messages", stats.get("frames", 0)) or 0)
