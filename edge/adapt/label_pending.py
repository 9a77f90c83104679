"""The labels that wait for a window, indexed by what each waits for. Pure (no I/O).

``LabelMatcher`` (``edge/adapt/labels.py``) owns the matching rule; this index only tells it
which waiting labels a new window can change, so that a window costs a heap pop per label
it resolves, not a scan of every waiting label (issue 18: 256 labels waiting made every
window 200x slower). A label waits for one of two things:

* **a later window** of a stream it is ahead of (``rec.later``): it is filed in that
  stream's heap by time, and is due once the stream's newest window ends at or after it;
* **a stream not seen yet** (``rec.unknown``, a label naming a stream with no window
  cached): it is filed by time in one heap, due once any stream's newest window ends more
  than ``max_future_s`` after it, and by its stream, due when that stream's first window
  comes.

Heap entries are checked when popped (the record still waits, and for that reason), so a
record that stops waiting leaves entries behind; each heap is rebuilt when its stale
entries outnumber the live ones, which keeps every structure bounded by ``max_pending``.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field


@dataclass(eq=False)
class PendingLabel:
    """One waiting label; ``done`` holds the streams it has already been matched on."""

    seq: int
    t: float
    key: object
    target: object
    done: set
    later: set = field(default_factory=set)
    unknown: bool = False


class PendingIndex:
    """Waiting labels in arrival order (``seq``), with the heaps that say which are due.

    >>> p = PendingIndex()
    >>> r = p.add(5.0, "a", 1, set())
    >>> p.file(r, later={"a"}, unknown=False)
    >>> p.due_later("a", 4.0), [x.seq for x in p.due_later("a", 5.0)]
    ([], [0])
    """

    def __init__(self):
        self._recs: dict[int, PendingLabel] = {}   # seq -> record; insertion order is arrival order
        self._seq = 0
        self._later: dict[object, list] = {}       # stream -> heap of (t, seq) of labels ahead of it
        self._unknown: list = []                   # heap of (t, seq) of labels for a stream not seen yet
        self._unknown_by_key: dict[object, set] = {}
        self._nodewide: dict[int, PendingLabel] = {}  # labels without a stream key (they wait on every stream)

    def __len__(self) -> int:
        return len(self._recs)

    def records(self) -> list[PendingLabel]:
        """Every waiting label, oldest first (a copy: the caller may settle them)."""
        return list(self._recs.values())

    def add(self, t: float, key, target, done: set) -> PendingLabel:
        rec = PendingLabel(self._seq, t, key, target, done)
        self._seq += 1
        self._recs[rec.seq] = rec
        if key is None:
            self._nodewide[rec.seq] = rec
        return rec

    def file(self, rec: PendingLabel, *, later: set, unknown: bool) -> None:
        """Record what ``rec`` waits for now: the streams it is ahead of, or its unseen stream."""
        new, rec.later = later - rec.later, set(later)
        for k in new:
            heap = self._later.setdefault(k, [])
            heapq.heappush(heap, (rec.t, rec.seq))
            if len(heap) > 2 * len(self._recs) + 64:
                self._later[k] = self._rebuilt(heap, lambda r, k=k: k in r.later)
        if unknown and not rec.unknown:
            rec.unknown = True
            heapq.heappush(self._unknown, (rec.t, rec.seq))
            self._unknown_by_key.setdefault(rec.key, set()).add(rec.seq)
            if len(self._unknown) > 2 * len(self._recs) + 64:
                self._unknown = self._rebuilt(self._unknown, lambda r: r.unknown)
        elif not unknown and rec.unknown:
            self._forget_unknown(rec)
            rec.unknown = False

    def remove(self, rec: PendingLabel) -> None:
        """``rec`` waits no more (matched, or refused): its heap entries go stale."""
        if rec.unknown:
            self._forget_unknown(rec)
        rec.later, rec.unknown = set(), False
        del self._recs[rec.seq]
        self._nodewide.pop(rec.seq, None)
        if not self._recs:  # nothing waits: no entry left behind can matter
            self.unfile_all()

    def due_later(self, key, newest: float) -> list[PendingLabel]:
        """The labels ahead of ``key`` that its newest window, ending at ``newest``, reached."""
        heap, out = self._later.get(key), []
        while heap and heap[0][0] <= newest:
            rec = self._recs.get(heapq.heappop(heap)[1])
            if rec is not None and key in rec.later:
                rec.later.discard(key)
                out.append(rec)
        if heap is not None and not heap:
            del self._later[key]
        return out

    def due_unknown(self, newest: float, future_s: float) -> list[PendingLabel]:
        """The labels for an unseen stream that a window ending at ``newest`` has gone
        ``future_s`` past (the same comparison as the matcher's, ``t + future_s < newest``)."""
        out = []
        while self._unknown and self._unknown[0][0] + future_s < newest:
            rec = self._recs.get(heapq.heappop(self._unknown)[1])
            if rec is not None and rec.unknown:
                out.append(rec)
        return out

    def unknown_of(self, key) -> list[PendingLabel]:
        """The labels waiting for ``key``'s first window."""
        return [self._recs[s] for s in self._unknown_by_key.get(key, ())]

    def nodewide(self) -> list[PendingLabel]:
        return list(self._nodewide.values())

    def drop_stream(self, key) -> list[PendingLabel]:
        """``key`` left the cache: the labels that were ahead of it (they wait on it no more)."""
        out = []
        for _, seq in self._later.pop(key, ()):
            rec = self._recs.get(seq)
            if rec is not None and key in rec.later:
                rec.later.discard(key)
                out.append(rec)
        return out

    def unfile_all(self) -> None:
        """Forget what every label waits for (the caller settles them all again)."""
        self._later.clear()
        self._unknown.clear()
        self._unknown_by_key.clear()
        for rec in self._recs.values():
            rec.later, rec.unknown = set(), False

    def sizes(self) -> dict:
        """Entries held per structure (tests check that they stay bounded)."""
        return {"labels": len(self._recs), "later": sum(len(h) for h in self._later.values()),
                "later_streams": len(self._later), "unknown": len(self._unknown),
                "unknown_keys": len(self._unknown_by_key), "nodewide": len(self._nodewide)}

    def _forget_unknown(self, rec: PendingLabel) -> None:
        seqs = self._unknown_by_key.get(rec.key)
        if seqs is not None:
            seqs.discard(rec.seq)
            if not seqs:
                del self._unknown_by_key[rec.key]

    def _rebuilt(self, heap: list, live) -> list:
        keep = [e for e in heap if (r := self._recs.get(e[1])) is not None and live(r)]
        heapq.heapify(keep)
        return keep
