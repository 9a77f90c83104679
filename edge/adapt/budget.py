"""Training budget: keeps the learner from taking the CPU the serving path needs.

Two leaky buckets, both filled by the clock: one in steps (at most ``steps_per_s``) and
one in CPU seconds (at most ``cpu_share`` of a core). A step runs only when both hold
enough; otherwise it is skipped and counted, never queued, so a burst of labels can
never build a training backlog that later starves inference.
"""
from __future__ import annotations

import time


class TrainingBudget:
    """Leaky-bucket limits on training steps per second and on the share of one core.

    >>> t = [0.0]
    >>> b = TrainingBudget(steps_per_s=2, cpu_share=1.0, clock=lambda: t[0])
    >>> [b.allow() for _ in range(3)]
    [True, True, False]
    >>> t[0] = 0.5; b.allow()
    True
    """

    def __init__(self, *, steps_per_s: float, cpu_share: float = 1.0, clock=time.monotonic):
        self.rate = float(steps_per_s)
        self.share = float(cpu_share)
        self.clock = clock
        self.burst = max(1.0, self.rate)  # one second's worth of steps
        self.tokens = self.burst
        self.cpu_credit = self.share  # one second's worth of CPU time
        self.last = clock()
        self.skipped = 0

    def _refill(self) -> None:
        now = self.clock()
        dt = max(0.0, now - self.last)
        self.last = now
        self.tokens = min(self.burst, self.tokens + dt * self.rate)
        self.cpu_credit = min(self.share, self.cpu_credit + dt * self.share)

    def allow(self) -> bool:
        """Take one step's token if the budget has one; count a skip otherwise."""
        return self.take(1) == 1

    def take(self, items: int, cost: int = 1) -> int:
        """How many of ``items`` (each ``cost`` steps: a label's steps) the budget pays for now,
        first ones first; the others are counted as skipped. An item is paid while a token is
        left (its cost may go into debt, which the refill pays back, so an item dearer than
        the burst still runs now and then); one rule for a label and for a batch of them.

        >>> t = [0.0]
        >>> b = TrainingBudget(steps_per_s=4, clock=lambda: t[0])
        >>> b.take(5, cost=2), b.skipped
        (2, 3)
        """
        self._refill()
        n = 0
        if self.tokens >= 1.0 and self.cpu_credit > 0.0 and items > 0:
            n = min(int(items), int((self.tokens - 1.0) // cost) + 1)
            self.tokens -= n * cost
        self.skipped += int(items) - n
        return n

    def charge(self, seconds: float) -> None:
        """Account CPU time spent training (may go into debt; the refill pays it back)."""
        self.cpu_credit -= seconds
