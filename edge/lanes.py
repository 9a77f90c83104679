"""Lanes: queues between threads, bounded in bytes, that say what they drop.

Every hand-over between two threads of the daemon goes through a ``Lane``. A lane has a
byte budget (``max_bytes``): a producer's ``put`` makes room by dropping the oldest
items (drop-oldest: under overload the freshest data is worth most) and counts each
drop. An item larger than the whole budget is refused and counted as ``oversized``.
A lane may also have a latency budget (``max_lag_s``): items that waited longer are
shed by the consumer (``stale``), so that after an overload fresh data is served at
once instead of behind a backlog of seconds.

Sizes are what the producer says an item costs (payload bytes plus a fixed overhead
for the Python objects around it), so the bound holds for big and small items alike,
which a bound in items cannot do.

Every item that leaves a lane unprocessed (dropped, shed as stale, refused as oversized)
is also counted in what a user thinks in: the MQTT messages it carried (the producer says
how many at ``put``) and the samples (``samples_of(item)``, asked only for items lost,
outside the lock), beside items and bytes.

One consumer thread takes from a lane; any number of producers put into it.

>>> lane = Lane("demo", max_bytes=100)
>>> lane.put("a", 60), lane.put("b", 60)   # b makes room by dropping a
(True, True)
>>> lane.take(), lane.take(), lane.counters["dropped"]
('b', None, 1)
>>> lane.put("huge", 101), lane.counters["oversized"]
(False, 1)
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable


class Lane:
    """A byte-bounded, drop-oldest FIFO between producers and one consumer thread."""

    def __init__(self, name: str, *, max_bytes: int, max_lag_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic, wake: threading.Event | None = None,
                 samples_of: Callable[[Any], int] | None = None):
        if max_bytes < 1:
            raise ValueError(f"lane {name!r}: max_bytes must be positive")
        self.name = name
        self.max_bytes = int(max_bytes)
        self.max_lag_s = float(max_lag_s)
        self.clock = clock
        self.wake = wake  # set on every put, so that an idle consumer can block instead of polling
        self.samples_of = samples_of
        self._q: deque = deque()  # (enqueued_at, nbytes, item, messages)
        self._lock = threading.Lock()
        self._in_bytes = self._out_bytes = 0
        self.counters = {"offered": 0, "taken": 0, "dropped": 0, "dropped_bytes": 0, "oversized": 0,
                         "stale": 0, "stale_bytes": 0, "offered_messages": 0, "dropped_messages": 0,
                         "stale_messages": 0, "oversized_messages": 0, "dropped_samples": 0, "stale_samples": 0,
                         "oversized_samples": 0, "oversized_bytes": 0}

    # ---- producers -------------------------------------------------------------------
    def put(self, item: Any, nbytes: int, messages: int = 0) -> bool:
        """Append ``item`` costing ``nbytes`` and carrying ``messages`` MQTT messages; drop
        the oldest to make room. False if refused (oversized)."""
        c = self.counters
        if nbytes > self.max_bytes:
            with self._lock:
                c["oversized"] += 1
                c["oversized_bytes"] += nbytes
                c["oversized_messages"] += messages
            self._count_samples("oversized_samples", (item,))
            return False
        q = self._q
        lost = []
        with self._lock:
            c["offered"] += 1
            c["offered_messages"] += messages
            over = self._in_bytes - self._out_bytes + nbytes - self.max_bytes
            while over > 0:
                try:
                    _, n, old, m = q.popleft()
                except IndexError:  # the consumer took the rest meanwhile
                    break
                self._out_bytes += n
                c["dropped"] += 1
                c["dropped_bytes"] += n
                c["dropped_messages"] += m
                lost.append(old)
                over -= n
            self._in_bytes += nbytes
            q.append((self.clock(), nbytes, item, messages))
        if lost:
            self._count_samples("dropped_samples", lost)
        if self.wake is not None:
            self.wake.set()
        return True

    def _count_samples(self, counter: str, items) -> None:
        """Add the samples of lost ``items`` to ``counter``, measured outside the lock (a
        payload is parsed to count them) and added under it."""
        if self.samples_of is None:
            return
        n = sum(self.samples_of(x) for x in items)
        with self._lock:
            self.counters[counter] += n

    # ---- the consumer ----------------------------------------------------------------
    def take(self) -> Any:
        """The oldest item, or None when empty; sheds items older than ``max_lag_s`` first."""
        q = self._q
        while True:
            # popped under the lock: a put between a pop and its _out_bytes would see the
            # item still in the lane's bytes and drop another one to make room for it
            with self._lock:
                try:
                    at, n, item, m = q.popleft()
                except IndexError:
                    return None
                self._out_bytes += n
                stale = bool(self.max_lag_s and self.clock() - at > self.max_lag_s)
                if stale:
                    self.counters["stale"] += 1
                    self.counters["stale_bytes"] += n
                    self.counters["stale_messages"] += m
                else:
                    self.counters["taken"] += 1
            if stale:
                self._count_samples("stale_samples", (item,))
                continue
            return item

    def drain(self) -> list[Any]:
        """Everything queued now, oldest first, without the lag check (shutdown)."""
        out = []
        q = self._q
        while True:
            with self._lock:  # as in take
                try:
                    _, n, item, _ = q.popleft()
                except IndexError:
                    return out
                self._out_bytes += n
                self.counters["taken"] += 1
            out.append(item)

    def mark(self) -> int:
        """How many items were offered so far: a point in the lane's order (``passed``)."""
        with self._lock:
            return self.counters["offered"]

    def passed(self, mark: int) -> bool:
        """Every item offered before ``mark`` has left the lane (taken, dropped or shed)."""
        c = self.counters
        with self._lock:
            return c["taken"] + c["dropped"] + c["stale"] >= mark

    def __bool__(self) -> bool:
        return bool(self._q)

    def __len__(self) -> int:
        return len(self._q)

    @property
    def depth_bytes(self) -> int:
        """Bytes waiting (as the producers sized them)."""
        with self._lock:
            return self._in_bytes - self._out_bytes

    def stats(self) -> dict[str, int]:
        """Counters plus the current depth, for metrics and `edge status`: a snapshot taken
        under the lane's lock, so every count in it is of the same moment."""
        with self._lock:
            return {**self.counters, "depth": len(self._q), "depth_bytes": self._in_bytes - self._out_bytes,
                    "max_bytes": self.max_bytes}
