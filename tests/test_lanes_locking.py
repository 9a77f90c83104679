"""``Lane``: the consumer pops under the lane's lock, so a producer never counts a taken
item as still queued (and drops another to make room for it). A threaded test hit that
window too rarely to be a test (the GIL switches every 5 ms); the pops are watched instead."""
from __future__ import annotations

from collections import deque

import pytest

from edge.lanes import Lane

pytestmark = pytest.mark.timeout(60)


class _WatchedDeque(deque):
    """A deque that records, at every pop, whether the lane's lock was held (one thread here)."""

    def __init__(self, lock):
        super().__init__()
        self.lock, self.pops = lock, []

    def popleft(self):
        self.pops.append(self.lock.locked())
        return super().popleft()


def test_take_and_drain_pop_under_the_lanes_lock():
    lane = Lane("t", max_bytes=1000)
    lane._q = _WatchedDeque(lane._lock)
    for i in range(5):
        lane.put(i, 10)

    got = [lane.take(), lane.take(), lane.take()] + lane.drain() + [lane.take()]

    assert got == [0, 1, 2, 3, 4, None] and lane._q.pops and all(lane._q.pops)
