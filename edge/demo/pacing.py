"""Lockstep pacing: the demo's story the same on every run for a seed.

The learner is deterministic for a sequence of labels, but a real-time demo feeds it
from threads: which stream's label comes first, and which window a freshly promoted head
serves first, would vary with the machine's load. So the demo paces its operator and its
MQTT machines by sequence, not by the wall clock:

* **rounds of labels**: window ``k`` of every stream is labelled in one round, in the
  streams' sorted order, once every stream's window ``k + lead`` was predicted (so each
  labelled window is already in the learner's lane: the node hands a window to the
  learner before it publishes the next one);
* **a gated feed**: a machine publishes the samples that complete its window
  ``k + lead + 1`` only after the learner handled round ``k``; so window ``w`` is always
  served by the head the labels of rounds ``0 .. w - lead - 1`` made, whatever the load.

When the machine keeps up (the usual case) the gate never waits and the demo runs in real
time. A node that stops answering (a stream that never predicts, labels lost) would hold the
feed forever, so after ``timeout_s`` of waiting the pacing lets go: labels are sent as the
windows come and the feed follows the wall clock; the report says so (``fell_back_at``),
since the run's figures may then differ from another run's.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable


def windows_in(samples: int, *, length: int, hop: int) -> int:
    """How many windows ``samples`` samples of one stream complete.

    >>> [windows_in(n, length=256, hop=256) for n in (0, 255, 256, 511, 512)]
    [0, 0, 1, 1, 2]
    >>> windows_in(300, length=256, hop=32)
    2
    """
    return 0 if samples < length else (samples - length) // hop + 1


class Lockstep:
    """Label rounds in one order, and the gate the MQTT feed asks before each batch.

    ``send(prediction)`` publishes the label of one predicted window (the operator's);
    ``handled()`` is how many labels the node's learner has handled (matched or rejected).
    Thread-safe: predictions come on the view's MQTT thread, the gate is asked on the feed's.
    """

    def __init__(self, streams: list[str], *, send: Callable[[dict], None], handled: Callable[[], int],
                 length: int, hop: int, lead: int = 1, timeout_s: float = 10.0, clock=time.monotonic):
        self.streams = sorted(streams)
        self.send, self.handled = send, handled
        self.length, self.hop, self.lead, self.timeout_s, self.clock = length, hop, lead, timeout_s, clock
        self._lock = threading.Lock()
        self._waiting: dict[str, deque] = {s: deque() for s in self.streams}
        self._seen = dict.fromkeys(self.streams, 0)
        self._through: list[int] = []  # labels sent once round k was out, k = index
        self._sent = 0
        self._rounds_done = 0  # rounds the learner is known to have handled
        self._held_since: float | None = None
        self.free = False  # the pacing let go (timeout)
        self.fell_back_at: float | None = None
        self.held_s = 0.0  # total time the feed waited for the learner

    def on_prediction(self, key: str, p: dict) -> None:
        """A prediction of stream ``key``: label it when its round is due (or now, once free)."""
        with self._lock:
            if key not in self._waiting or self.free:
                due = [p]
            else:
                self._waiting[key].append(p)
                self._seen[key] += 1
                due = self._due_rounds()
        for q in due:
            self.send(q)

    def _due_rounds(self) -> list[dict]:
        """The labels of every round whose windows ``k + lead`` were all predicted (lock held)."""
        out = []
        k = len(self._through)
        while min(self._seen.values()) >= k + self.lead + 1:
            out += [self._waiting[s].popleft() for s in self.streams]
            self._sent += len(self.streams)
            self._through.append(self._sent)
            k += 1
        return out

    def may_publish(self, samples_after: int) -> bool:
        """Whether a machine may publish up to its ``samples_after``-th sample now."""
        need = windows_in(samples_after, length=self.length, hop=self.hop) - self.lead - 1  # rounds handled first
        with self._lock:
            if self.free or need <= self._rounds_done:
                return True
            sent = len(self._through) >= need  # the rounds it waits for are out
        if sent:
            done = self.handled()
            with self._lock:
                while self._rounds_done < len(self._through) and self._through[self._rounds_done] <= done:
                    self._rounds_done += 1
                if need <= self._rounds_done:
                    self._stop_holding()
                    return True
        return self._hold()

    def _hold(self) -> bool:
        """Wait a little longer, or let go of the pacing after ``timeout_s`` (see the module)."""
        now = self.clock()
        flush: list[dict] = []
        with self._lock:
            if self._held_since is None:
                self._held_since = now
            if now - self._held_since < self.timeout_s:
                return False
            self.free, self.fell_back_at = True, now
            for s in self.streams:
                flush += list(self._waiting[s])
                self._waiting[s].clear()
            self._stop_holding()
        for q in flush:
            self.send(q)
        return True

    def _stop_holding(self) -> None:
        if self._held_since is not None:
            self.held_s += self.clock() - self._held_since
            self._held_since = None

    def summary(self, t0_mono: float) -> dict:
        """For the report: whether the run stayed in lockstep, and how long the feed waited."""
        return {"lockstep": not self.free, "lead_windows": self.lead, "rounds": len(self._through),
                "feed_waited_s": round(self.held_s, 2),
                "fell_back_at": None if self.fell_back_at is None else round(self.fell_back_at - t0_mono, 1)}
