"""When a device asks for chunks, and asks again (pure: times are handed in).

A late answer is not a lost one. Chunk requests and answers travel over QoS 1, so they are
lost only around a reconnect or a server restart; what a timeout mostly sees is a slow path
(a server busy with a queue of requests, a broker or a device starved of CPU). Asking again
then doubles the bytes on the wire: the benchmark once measured 8.4% overhead over the
bundle, one device's 4 chunks sent twice. So:

* an ask is due ``timeout_s`` after it was made; every new chunk that comes pushes the
  others' due times out by a timeout (the path works), up to four timeouts after the ask;
* the first time asks fall due, only one of them (the lowest) is asked again: a **probe**;
  the others wait on it. If the probe's answer comes, the path works: whatever is still
  missing one probe round trip later was lost, and is asked again all at once. If the
  originals were only late, they come within that round trip and nothing else is asked;
* if the probe itself falls due (nothing comes at all), everything due is asked again and
  the timeout doubles, up to 8 times; a new chunk sets it back.

>>> a = Asks(timeout_s=5.0, in_flight=4)
>>> a.next_asks([0, 1, 2, 3], now=0.0)
[0, 1, 2, 3]
>>> a.next_asks([0, 1, 2, 3], now=5.1)  # all due: one probe
[0]
>>> a.arrived(0, now=6.0)  # the probe's answer, 0.9 s after it was asked
>>> a.next_asks([1, 2, 3], now=6.5)  # the others may still be on their way
[]
>>> a.next_asks([1, 2, 3], now=7.0)  # one probe round trip later: lost, all asked again
[1, 2, 3]
"""
from __future__ import annotations


class Asks:
    """The chunks in flight (``asked``), their due times and the probe; ``reasked`` counts asks made again."""

    def __init__(self, *, timeout_s: float, in_flight: int):
        self.timeout_s, self.in_flight = float(timeout_s), int(in_flight)
        self.asked: dict[int, float] = {}  # index -> when it was last asked
        self.due: dict[int, float] = {}  # index -> when it is asked again
        self.backoff = 1
        self.probe: tuple[int, float] | None = None  # (index, when asked) of the one chunk asked again
        self.waiting: set[int] = set()  # the asks due with the probe, waiting on its answer
        self.lost: set[int] = set()  # of those: the probe came back, so still missing at due means lost
        self.reasked = 0
        self.requested = 0

    def _timeout(self) -> float:
        return self.timeout_s * self.backoff

    def next_asks(self, missing, *, now: float) -> list[int]:
        """The indices to ask for now, sorted: missing chunks not in flight (up to ``in_flight`` in
        flight in all) and those asked again by the rules above. ``missing``: sorted, not held."""
        missing = list(missing)
        held = set(self.asked) - set(missing)
        for i in held:
            self._forget(i)
        due = sorted(i for i in self.asked if now > self.due[i])
        again = self._again(due, now) if due else []
        room = self.in_flight - len(self.asked)
        fresh = [i for i in missing if i not in self.asked][:max(0, room)]
        for i in fresh:
            self.asked[i], self.due[i] = now, now + self._timeout()
        self.requested += len(fresh) + len(again)
        return sorted(again + fresh)

    def _again(self, due: list[int], now: float) -> list[int]:
        lost = [i for i in due if i in self.lost]
        if lost:  # the probe came back and these did not follow it: lost on the way
            again = lost
        elif self.probe is not None and self.probe[0] in due:  # nothing comes at all
            self.backoff = min(8, self.backoff * 2)
            again = sorted(set(due) | (self.waiting & set(self.asked)))
            self.probe, self.waiting = None, set()
        elif self.probe is None:  # the first timeout: one probe, the others wait on it
            again = due[:1]
            self.probe = (due[0], now)
            self.waiting = set(due[1:])
            for i in due[1:]:
                self.due[i] = now + self._timeout()  # the probe's own due time: they go together
        else:
            again = []
            for i in due:  # due while a probe is out: they wait on it too, and go with it
                self.waiting.add(i)
                self.due[i] = self.due[self.probe[0]]
        for i in again:
            self.asked[i], self.due[i] = now, now + self._timeout()
            self.waiting.discard(i)
            self.lost.discard(i)
        self.reasked += len(again)
        return again

    def arrived(self, index: int, *, now: float) -> None:
        """A new chunk came (not a duplicate)."""
        probe = self.probe
        self._forget(index)
        self.backoff = 1
        if probe is not None and probe[0] == index:
            rtt = max(0.05, now - probe[1])  # one round trip of the path as it is now
            for i in self.waiting & set(self.due):
                self.due[i] = min(self.due[i], now + rtt)
                self.lost.add(i)
            self.waiting = set()
            return
        t = self._timeout()
        for i, at in self.asked.items():  # the path works: the others stay alive (to four timeouts)
            if i not in self.lost:
                self.due[i] = max(self.due[i], min(now + t, at + 4 * t))

    def _forget(self, index: int) -> None:
        self.asked.pop(index, None)
        self.due.pop(index, None)
        self.waiting.discard(index)
        self.lost.discard(index)
        if self.probe is not None and self.probe[0] == index:
            self.probe = None
