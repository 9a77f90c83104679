"""The node's receive clock: the monotonic clock placed on the sources' time line. Pure.

A device's wall clock is stepped by NTP after boot, or is wrong, while its sensors and
labellers keep their own time; the policy (docs/TIME_AND_NAMES.md, "Clock steps and a
wrong clock") is to report the disagreement, never to refuse the world for it. The
pipeline takes every receive time from ``NodeClock`` (``edge/pipeline/loop.py``); the
untimed samples' stamps (``edge.ingest.timing.Stamper``) are then on the same line.
"""
from __future__ import annotations

from edge.errors import DecodeError

STEP_S = 1.0         # a change of the wall clock's offset from the monotonic clock beyond this is a step
SKEW_REPORT_S = 2.0  # the node's wall clock further than this from its sources' is reported (event, metric)
MAX_AGE_S = 600.0    # an item older than this when handled is taken as this old (a step came between)
_SOURCES_MAX = 256   # the streams whose clock offsets the consensus is taken over (the first seen; more are checked only)
LOWER_S = 30.0       # a stream's clock offset that fell (a delay, a backlog drained, or its clock went back) is
                     # taken once it has stayed lower this long: a burst of late samples moves no stamp


class NodeClock:
    """The pipeline's receive time: the monotonic clock placed on the sources' time line.

    The wall clock can be stepped (NTP after boot) or simply wrong, while sensors and
    labellers keep their own time. So a receive time is ``monotonic + offset``, where
    ``offset`` is the consensus of the sources' clocks (each timed message's last ``t`` minus
    its monotonic receive time; the median over the first 256 timed streams, on a tie the
    one in use, else the one nearer the wall clock; a stream's offset that falls counts only
    after ``LOWER_S``) once a stream with its own times has been seen, and the wall clock's
    (``wall - monotonic``) before that. A step of the wall clock then moves no receive time
    while a source gives the time line, and the node's error is reported as ``skew``
    (sources' minus the wall clock's offset) instead of refusing what its sources send.
    A sample is refused (``absurd_time``) only when its stream's clock is more than
    ``max_skew_s`` from that consensus: with one timed stream, never. Pure: the caller
    hands in the wall and monotonic readings; ``events`` collects (kind, fields) to report.

    >>> c = NodeClock(max_skew_s=86400)
    >>> c.receive_time(1000.0, wall=1000.0, mono=10.0)      # no source yet: the wall clock
    1000.0
    >>> c.check("s1", 90000.0, 1000.0)                     # a sensor a day ahead of this node
    >>> c.basis, c.skew
    ('sources', 89000.0)
    >>> c.receive_time(5000.5, wall=5000.5, mono=11.0)     # NTP steps the wall clock: no jump
    90001.0
    >>> c.steps, [k for k, _ in c.events]
    (1, ['clock_skew', 'clock_step', 'clock_skew'])
    """

    __slots__ = ("max_skew_s", "step_s", "wall_offset", "source_offset", "steps", "last_step", "events",
                 "_src", "_reported", "_at", "_low")

    def __init__(self, *, max_skew_s: float = 86400.0, step_s: float = STEP_S):
        self.max_skew_s, self.step_s = float(max_skew_s), float(step_s)
        self.wall_offset: float | None = None    # wall - monotonic, as last seen
        self.source_offset: float | None = None  # the sources' consensus of t - monotonic receive time
        self.steps, self.last_step = 0, 0.0
        self.events: list[tuple[str, dict]] = []
        self._src: dict = {}                     # stream -> its clock's offset (insertion order: last changed last)
        self._reported = 0.0
        self._at = 0.0  # the offset the last receive time was given with (the consensus may move after it)
        self._low: dict = {}  # stream -> [monotonic time its offset first fell, last time it was seen low]

    @property
    def offset(self) -> float:
        """Receive time minus the monotonic clock."""
        return self.source_offset if self.source_offset is not None else (self.wall_offset or 0.0)

    @property
    def basis(self) -> str:
        """Which clock receive times follow: ``sources`` (their consensus) or ``node`` (this node's wall clock)."""
        return "sources" if self.source_offset is not None else "node"

    @property
    def skew(self) -> float:
        """How far this node's wall clock is behind its sources' (s; 0 without a timed source)."""
        if self.source_offset is None or self.wall_offset is None:
            return 0.0
        return self.source_offset - self.wall_offset

    def receive_time(self, received_wall: float, *, wall: float, mono: float) -> float:
        """The receive time of an item stamped ``received_wall`` by the wall clock, handled now
        (``wall``, ``mono``): its age by the wall clock (0..MAX_AGE_S: a step may come
        between), placed on this clock's time line. Detects steps of the wall clock."""
        off = wall - mono
        if self.wall_offset is None:
            self.wall_offset = off
        elif abs(off - self.wall_offset) > self.step_s:
            d = off - self.wall_offset
            self.steps += 1
            self.last_step = d
            self.wall_offset = off
            self.events.append(("clock_step", {"step_s": round(d, 3), "basis": self.basis}))
            self._report_skew()
        age = wall - received_wall
        age = 0.0 if age < 0.0 else (MAX_AGE_S if age > MAX_AGE_S else age)
        self._at = at = self.offset
        return mono - age + at

    def steady(self, received: float) -> float:
        """The monotonic time of ``received`` (the last ``receive_time``)."""
        return received - self._at

    def check(self, key, t: float, received: float) -> None:
        """Take a sample time ``t`` of stream ``key`` received at ``received`` (the last
        ``receive_time``): it updates the consensus; ``DecodeError`` (absurd_time) when it is
        further than ``max_skew_s`` from the consensus of the sources' clocks."""
        m = received - self._at
        o = t - m
        prev = self._src.get(key)
        if prev is None:
            if len(self._src) < _SOURCES_MAX:  # bounded: beyond it a stream is checked, not counted
                self._take(key, o)
        elif o > prev + self.step_s:  # a delay only lowers an offset: a higher one is taken at once
            self._take(key, o)
        elif o < prev - self.step_s:
            low = self._low.get(key)
            if low is None or m - low[1] > 5.0:  # not lower without a break: a new spell
                self._low[key] = [m, m]
                if len(self._low) > _SOURCES_MAX:
                    del self._low[next(iter(self._low))]
            elif m - low[0] >= LOWER_S:
                self._take(key, o)
            else:
                low[1] = m
        self.refuse(t, received)

    def refuse(self, t: float, received: float) -> None:
        """``DecodeError`` (absurd_time) when ``t`` received at ``received`` is further than
        ``max_skew_s`` from the consensus of the sources' clocks (which it does not move)."""
        c = self.source_offset
        o = t - (received - self._at)
        if self.max_skew_s and c is not None and abs(o - c) > self.max_skew_s:
            raise DecodeError("absurd_time", f"timestamp {t!r} is {o - c:+.4g} s from the clock of this node's other "
                                             f"sources (max_clock_skew_s = {self.max_skew_s:g})")

    def _take(self, key, o: float) -> None:
        self._low.pop(key, None)
        self._src[key] = o
        self._consensus()

    def _consensus(self) -> None:
        v = sorted(self._src.values())
        n = len(v)
        c = v[n // 2]
        if n % 2 == 0:  # a tie: the consensus so far if it is one of the two (a newcomer cannot
            # flip it), else the one nearer this node's own clock
            a, w, old = v[n // 2 - 1], self.wall_offset if self.wall_offset is not None else c, self.source_offset
            if old is not None and (old == a or old == c):
                c = old
            else:
                c = a if abs(a - w) <= abs(c - w) else c
        old, self.source_offset = self.source_offset, c
        if old is not None and abs(c - old) > self.step_s:
            self.events.append(("clock_sources_step", {"step_s": round(c - old, 3)}))
        self._report_skew()

    def _report_skew(self) -> None:
        s = self.skew
        if abs(s - self._reported) > SKEW_REPORT_S:
            self._reported = s
            self.events.append(("clock_skew", {"skew_s": round(s, 3), "basis": self.basis}))

    def snapshot(self) -> dict:
        """For status and metrics: basis, skew_s, steps, last_step_s, sources."""
        return {"basis": self.basis, "skew_s": round(self.skew, 3), "steps": self.steps,
                "last_step_s": round(self.last_step, 3), "sources": len(self._src)}
