"""Matching labels to the windows they belong to, by time, from a cache of recent features.

Labels arrive on their own channel (MQTT ``edge/<node>/labels``, serial LABEL frames)
as ``{t, label}`` or ``{t, y}``, late, out of order, or even before the window they
describe has been cut. The pipeline caches each served window's features ``z`` (and
what it predicted), so a label trains the head without re-running the backbone.

Matching rule (the documented tolerance): a label at time ``t`` belongs to the cached
window with ``t_start - tolerance_s <= t <= t_end + tolerance_s``; among overlapping
windows, the one whose centre is nearest ``t``. A label with a stream key matches that
stream; a label without one (a node-wide label) matches every stream with such a
window. A label after the end of the newest cached window, by at most ``max_future_s``,
waits (bounded, ``max_pending``) for the window that contains it, and is matched within
the tolerance only once the stream has gone past it; each window is labelled at most once.
The waiting labels are indexed by what they wait for (``edge/adapt/label_pending.py``), so a
window settles only the labels it can change: a window costs the same with 0 or 256 waiting.
A label for a stream with no window cached yet (a labeller quicker than the stream's first
window) waits the same way, until that stream's windows come or until the other streams
have gone ``max_future_s`` past it: then it is ``unknown_stream``.

Memory: each stream keeps its newest ``max_windows`` windows, and all streams together
at most ``max_bytes`` (the features plus about 320 bytes a window): beyond that the
oldest window of all streams is evicted and counted (``windows_evicted_total``), so
that many streams (stray topics up to the pipeline's ``max_streams``) cannot grow the
cache without bound.

Time going back: a stream's windows are cached in time order, by start and by end. A
window that ends before (or when) the stream's newest cached one does, or starts before it
started (its clock went back: a sensor restarted with an earlier clock, or this node's
receive clock stepped back for a stream without times) starts the stream's time line
anew: the cached windows not wholly before it, stamped on the old line, are
dropped and counted (``windows_superseded_total``), so they never stand in front of the
new ones (a label for a new window is never ``too_old`` or ``future`` because of them).

Rejected labels are counted per reason: ``bad_time`` (non-finite t), ``unknown_class``,
``non_finite`` / ``bad_shape`` (regression targets), ``unknown_stream``, ``too_old``
(its window has left the cache), ``future`` (beyond ``max_future_s``), ``duplicate``
(window already labelled), ``unmatched`` (falls in a gap between windows), and
``pending_overflow``.
"""
from __future__ import annotations

import bisect
import collections
import logging
import math
from dataclasses import dataclass, field

import numpy as np

from edge.adapt.label_pending import PendingIndex

log = logging.getLogger("edge.adapt")

@dataclass
class CachedWindow:
    key: object
    t_start: float
    t_end: float
    z: np.ndarray
    served: object = None
    labelled: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class Match:
    """A label paired with its window: train with ``learner.learn_one(window.z, target)``."""

    key: object
    window: CachedWindow
    target: object
    t: float


class LabelMatcher:
    """Per-stream caches of recent windows and the label-to-window matching rule.

    >>> m = LabelMatcher(classes=["ok", "bad"], tolerance_s=0.1)
    >>> _ = m.add_window("s1", 0.0, 1.0, np.zeros(4, np.float32))
    >>> [(x.key, x.target) for x in m.match(None, 0.5, "bad")]
    [('s1', 1)]
    >>> m.match(None, 0.5, "bad"), m.match("s1", 0.2, "weird"), dict(m.rejected)
    ([], [], {'duplicate': 1, 'unknown_class': 1})
    """

    def __init__(self, *, classes=None, outputs: int | None = None, max_windows: int = 512,
                 tolerance_s: float = 0.25, max_future_s: float = 10.0, max_pending: int = 256,
                 max_bytes: int | None = None):
        self.classes = tuple(classes) if classes is not None else None
        self._index = {str(c): i for i, c in enumerate(self.classes or ())}
        self.outputs = outputs
        self.max_windows, self.tolerance_s, self.max_future_s, self.max_pending = max_windows, tolerance_s, max_future_s, max_pending
        self.max_bytes = max_bytes
        self.windows: dict[object, collections.deque] = {}
        self._ends: dict[object, collections.deque] = {}
        # every cached window's stream, in the order the windows came: the byte bound evicts
        # the oldest window of all streams; _stale counts entries of windows already gone
        # (cut by the per-stream bound), which are always the first of their stream here, and
        # they are compacted away once they are half of the entries (_compact_order)
        self._order: collections.deque = collections.deque()
        self._stale: collections.Counter = collections.Counter()
        self._n_stale = 0
        self._gone: list = []     # streams that left the cache since the last window's resolve
        self.nbytes = 0
        self.evicted = 0
        self.superseded = 0       # windows dropped because their stream's time went back before them
        self.restore_dropped = collections.Counter()  # streams / pending labels a restore could not take
        self._waiting = PendingIndex()  # the labels waiting for a window, indexed by what they wait for
        self._restored = False          # a restore came: the next window settles every waiting label
        self.rejected = collections.Counter()
        self.accepted = 0

    @property
    def pending(self) -> list[tuple[float, object, object, set]]:
        """The waiting labels, oldest first, as ``(t, key or None, target, keys done)`` (a copy)."""
        return [(r.t, r.key, r.target, r.done) for r in self._waiting.records()]

    def _reject(self, reason: str) -> list:
        self.rejected[reason] += 1
        return []

    def _target(self, label):
        """``(target, None)`` or ``(None, reason)``: a class index or a float vector."""
        if self.classes is not None:
            if isinstance(label, (int, np.integer)) and not isinstance(label, bool) and 0 <= int(label) < len(self.classes):
                return int(label), None
            c = self._index.get(str(label)) if isinstance(label, str) else None
            return (c, None) if c is not None else (None, "unknown_class")
        try:
            y = np.asarray(label, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            return None, "bad_shape"
        if self.outputs is not None and y.size != self.outputs:
            return None, "bad_shape"
        return (y, None) if np.isfinite(y).all() else (None, "non_finite")

    def add_window(self, key, t_start: float, t_end: float, z, served=None) -> list[Match]:
        """Cache a served window (in time order per stream); returns pending labels it resolves."""
        w = CachedWindow(key, float(t_start), float(t_end), np.asarray(z, np.float32), served)
        created, superseded = key not in self.windows, self.superseded
        self._append(key, w)
        return self._resolve_pending(key, created or self.superseded != superseded)

    def _append(self, key, w: CachedWindow) -> None:
        """Cache ``w`` last in its stream; then the per-stream and the byte bounds, oldest first."""
        dq = self.windows.get(key)
        if dq is None:
            dq = self.windows[key] = collections.deque()
            self._ends[key] = collections.deque()
        elif w.t_end <= dq[-1].t_end or w.t_start < dq[-1].t_start:
            # on one time line both ends move forward (hop > 0; windows may overlap): either
            # going back means the clock went back
            self._supersede(key, w.t_start, w.t_end)
        dq.append(w)
        self._ends[key].append(w.t_end)
        self._order.append(key)
        self.nbytes += _cost(w)
        if len(dq) > self.max_windows:
            self._drop_first(key)
            self._stale[key] += 1
            self._n_stale += 1
        while self.max_bytes is not None and self.nbytes > self.max_bytes and self._order:
            k = self._order.popleft()
            if self._stale[k]:
                self._stale[k] -= 1
                self._n_stale -= 1
                if not self._stale[k]:
                    del self._stale[k]
                continue
            self._drop_first(k)
            self.evicted += 1
        if self._n_stale > len(self._order) // 2 + 32:
            self._compact_order()

    def _compact_order(self) -> None:
        """Drop the stale entries of the order once they are half of it (amortised O(1) a
        window), so that it holds about as many entries as windows are cached (issue 18: it
        gained one per window forever). The entries dropped are each stream's first ones, the
        ones the byte bound would skip: what it evicts next is unchanged."""
        skip, keep = self._stale, collections.deque()
        for k in self._order:
            if skip[k]:
                skip[k] -= 1
            else:
                keep.append(k)
        self._order, self._stale, self._n_stale = keep, collections.Counter(), 0

    def _supersede(self, key, t_start: float, t_end: float) -> None:
        """The stream's time went back to a window ``[t_start, t_end]``: drop its cached
        windows that do not lie wholly before it on the new line (starting at or after
        ``t_start``, or ending at or after ``t_end``), newest first, so that both ends stay in
        order (their order entries become stale, as for the per-stream bound)."""
        dq, ends = self.windows[key], self._ends[key]
        n = 0
        while dq and (ends[-1] >= t_end or dq[-1].t_start >= t_start):
            self.nbytes -= _cost(dq.pop())
            ends.pop()
            n += 1
        self._stale[key] += n
        self._n_stale += n
        self.superseded += n

    def _drop_first(self, key) -> None:
        dq = self.windows[key]
        self.nbytes -= _cost(dq.popleft())
        self._ends[key].popleft()
        if not dq:  # a stream with nothing cached is forgotten (its labels are then unknown_stream)
            del self.windows[key], self._ends[key]
            self._gone.append(key)

    def _find(self, key, t: float):
        """The window of ``key`` for time ``t``, or the reason there is none."""
        dq, ends = self.windows[key], self._ends[key]
        tol = self.tolerance_s
        if t < dq[0].t_start - tol:
            return None, "too_old"
        if t > dq[-1].t_end:
            # the window that contains t may not have been cut yet: wait for it rather
            # than give the label to a neighbour within the tolerance
            return None, "later"
        i = bisect.bisect_left(ends, t - tol)  # first window that ends at or after t - tol
        best, dist = None, math.inf
        for j in range(i, len(dq)):  # by index: a deque's item near either end is O(1); no copy
            w = dq[j]
            if w.t_start - tol > t:
                break
            d = abs((w.t_start + w.t_end) / 2 - t)
            if d < dist:
                best, dist = w, d
        return (best, None) if best is not None else (None, "unmatched")

    def _gone_past(self, t: float) -> bool:
        """Whether the streams cached have gone ``max_future_s`` past ``t`` (a label for a
        stream that has not come by then is not waiting for its first window any more)."""
        return any(dq[-1].t_end > t + self.max_future_s for dq in self.windows.values() if dq)

    def _take(self, key, w: CachedWindow, target, t: float) -> list[Match]:
        if w.labelled:
            return self._reject("duplicate")
        w.labelled = True
        self.accepted += 1
        return [Match(key, w, target, t)]

    def match(self, key, t, label) -> list[Match]:
        """Match one label now; ``[]`` when rejected (counted) or pending its window."""
        try:
            t = float(t)
        except (TypeError, ValueError):
            return self._reject("bad_time")
        if not math.isfinite(t):
            return self._reject("bad_time")
        target, why = self._target(label)
        if why:
            return self._reject(why)
        if key is not None and key not in self.windows:
            # its stream's first window may not have been cut yet: wait for it (bounded), as
            # for a label ahead of its stream's newest window
            if self._gone_past(t):
                return self._reject("unknown_stream")
            if len(self._waiting) >= self.max_pending:
                return self._reject("pending_overflow")
            self._wait(t, key, target, set(), later=set(), unknown=True)
            return []
        keys = [key] if key is not None else list(self.windows)
        newest = max((self.windows[k][-1].t_end for k in keys), default=-math.inf)
        if keys and t > newest + self.max_future_s:
            return self._reject("future")
        out, reasons, done, later = [], [], set(), set()
        n_rejected = sum(self.rejected.values())
        for k in keys:
            w, why = self._find(k, t)
            if w is not None:
                out += self._take(k, w, target, t)
                done.add(k)
            elif why == "later":
                later.add(k)
            reasons.append(why)
        if later or not keys:
            if len(self._waiting) >= self.max_pending:
                return out + self._reject("pending_overflow")
            self._wait(t, key, target, done, later=later, unknown=False)
            return out
        if not out and sum(self.rejected.values()) == n_rejected:  # not yet counted as a duplicate
            self._reject(next((r for r in reasons if r), "unmatched"))
        return out

    def _wait(self, t: float, key, target, done: set, *, later: set, unknown: bool) -> None:
        self._waiting.file(self._waiting.add(t, key, target, done), later=later, unknown=unknown)

    def _resolve_pending(self, key, changed: bool) -> list[Match]:
        """Settle the waiting labels that the window just cached on ``key`` can change, in the
        order they came: those ahead of ``key`` that its newest window reached; those for a
        stream not seen yet that it has gone ``max_future_s`` past; when ``key`` is new or its
        time went back (``changed``), those waiting for it and the node-wide ones; those ahead
        of a stream that left the cache. Any other waiting label would settle as before the
        window (still waiting, nothing matched): a stream's cached windows change for a label
        behind its newest window only when its time line starts anew. After a restore, all."""
        waiting = self._waiting
        if not waiting:
            if self._gone:
                self._gone = []
            self._restored = False
            return []
        gone, self._gone = self._gone, []
        if self._restored:
            self._restored = False
            waiting.unfile_all()
            due = waiting.records()
        else:
            found = {}
            for g in gone:
                for r in waiting.drop_stream(g):
                    found[r.seq] = r
            dq = self.windows.get(key)
            if dq:
                newest = dq[-1].t_end
                for r in waiting.due_later(key, newest) + waiting.due_unknown(newest, self.max_future_s):
                    found[r.seq] = r
            if changed:
                for r in waiting.unknown_of(key) + waiting.nodewide():
                    if r.key is not None or key not in r.done:
                        found[r.seq] = r
            if not found:
                return []
            due = [found[s] for s in sorted(found)]
        out = []
        for rec in due:
            out += self._settle(rec)
        return out

    def _settle(self, rec) -> list[Match]:
        """One waiting label against the cache as it is now: matched on each of its streams
        that has its window; waiting on while it is ahead of one of them, or its stream has not
        come and the others have not gone ``max_future_s`` past it; else refused unless matched."""
        keys = [rec.key] if rec.key is not None else list(self.windows)
        out, later, unknown = [], set(), False
        for k in keys:
            if k in rec.done:
                continue
            if k not in self.windows:  # a stream not seen yet: wait while the others have not gone past it
                unknown = unknown or not self._gone_past(rec.t)
                continue
            w, why = self._find(k, rec.t)
            if w is not None:
                out += self._take(k, w, rec.target, rec.t)
                rec.done.add(k)
            elif why == "later":
                later.add(k)
        if later or unknown:
            self._waiting.file(rec, later=later, unknown=unknown)
            return out
        self._waiting.remove(rec)
        if not rec.done:
            self._reject("unknown_stream" if rec.key is not None and rec.key not in self.windows else "unmatched")
        return out

    # -- state: the cache outlives a restart, so that late labels still find their windows --

    def state_dict(self) -> dict:
        """The cached windows (times and labelled flags; features only of the windows not
        yet labelled, the only ones a label can still train; not the served scores) and the
        pending labels; the counters are not state. Tuple keys are stored as lists."""
        streams = []
        for key, dq in self.windows.items():
            if not dq:
                continue
            ws = list(dq)
            open_ = [w.z for w in ws if not w.labelled]
            streams.append({"key": _enc(key), "t_start": np.array([w.t_start for w in ws], np.float64),
                            "t_end": np.array([w.t_end for w in ws], np.float64),
                            "z": np.stack(open_).astype(np.float32, copy=False) if open_ else np.zeros((0, ws[0].z.size), np.float32),
                            "labelled": np.array([w.labelled for w in ws], np.bool_)})
        pending = [{"t": t, "key": _enc(key), "target": target if isinstance(target, int) else np.asarray(target, np.float32),
                    "done": [_enc(k) for k in done]} for t, key, target, done in self.pending]
        return {"format": 1, "streams": streams, "pending": pending}

    def load_state_dict(self, s: dict, *, make_key=tuple, feature_size: int | None = None) -> int:
        """Restore what ``state_dict`` saved; list keys come back through ``make_key``.
        Per stream: a stream whose windows do not fit (other features, times not finite or not
        in order) is dropped alone, and so is a pending label that does not fit (other
        targets or classes): counted in ``restore_dropped`` and logged; the others are kept.
        ``ValueError`` (nothing changed) only when the state as a whole is not one. Keeps the
        newest ``max_windows`` per stream and ``max_pending`` labels. Returns the number of
        windows restored."""
        if not isinstance(s, dict) or s.get("format") != 1:
            raise ValueError(f"label cache state has format {s.get('format') if isinstance(s, dict) else type(s).__name__!r}, expected 1")
        try:
            streams, pendings = list(s["streams"]), list(s["pending"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"label cache state has no list of streams and pending labels ({e})") from None
        dec = (lambda k: make_key(k) if isinstance(k, list) else k)
        restored, dropped = [], collections.Counter()
        for st in streams:
            try:
                restored += self._restore_stream(st, dec, feature_size)
            except (ValueError, TypeError, KeyError, IndexError) as e:
                dropped["streams"] += 1
                log.warning("the label cache of one stream was not restored (%s); the other streams' are", str(e)[:200])
        pending = []
        for p in pendings[-self.max_pending:]:
            try:
                target = p["target"]
                target, why = self._target(int(target) if self.classes is not None and isinstance(target, (int, np.integer)) else target)
                if why or not math.isfinite(float(p["t"])):
                    raise ValueError(f"pending label at {p['t']!r} does not fit this model ({why or 'bad_time'})")
                pending.append((float(p["t"]), dec(p["key"]), target, {dec(k) for k in p["done"]}))
            except (ValueError, TypeError, KeyError) as e:
                dropped["pending"] += 1
                log.warning("a pending label was not restored (%s)", str(e)[:200])
        self.restore_dropped.update(dropped)
        self.windows, self._ends, self._waiting = {}, {}, PendingIndex()
        for t, key, target, done in pending:
            self._waiting.add(t, key, target, done)  # filed by the next window, which settles them all
        self._restored = True
        self._order.clear()
        self._stale.clear()
        self._n_stale = 0
        self.nbytes = 0
        restored.sort(key=lambda r: (r[0], r[1]))  # the streams merged in time order: the byte bound keeps the newest
        for _, _, w in restored:
            self._append(w.key, w)
        self._gone = []
        return sum(len(d) for d in self.windows.values())

    def _restore_stream(self, st: dict, dec, feature_size: int | None) -> list:
        """One stream's saved windows as ``(t_end, i, CachedWindow)``; ``ValueError`` when they do not fit."""
        key = dec(st["key"])
        t0, t1 = np.asarray(st["t_start"], np.float64).reshape(-1), np.asarray(st["t_end"], np.float64).reshape(-1)
        z, done = np.asarray(st["z"], np.float32), np.asarray(st["labelled"], np.bool_).reshape(-1)
        n = len(t0)
        if z.ndim != 2 or len(t1) != n or len(done) != n or len(z) != n - int(done.sum()) \
                or (feature_size is not None and len(z) and z.shape[1] != feature_size):
            raise ValueError(f"label cache of {str(key)[:80]} has {n} times, {len(done)} flags and features {z.shape} "
                             "for its unlabelled windows" + (f"; this model has {feature_size} features" if feature_size is not None else ""))
        if not (np.isfinite(t0).all() and np.isfinite(t1).all() and (t1 >= t0).all() and (np.diff(t1) >= 0).all()):
            raise ValueError(f"label cache of {str(key)[:80]} has times that are not finite or not in order")
        row = np.cumsum(~done) - 1  # window i's row in z, when it is not labelled
        return [(float(t1[i]), j, CachedWindow(key, float(t0[i]), float(t1[i]), _LABELLED if done[i] else z[row[i]].copy(),
                                               None, bool(done[i])))
                for j, i in enumerate(range(max(0, n - self.max_windows), n))]

    def metrics(self) -> dict:
        """Counters and sizes. Not safe beside a thread that matches or adds windows (it
        iterates the per-stream dict): the learner thread owns the matcher, and other threads
        read it through ``AdaptWorker.metrics()``, under the worker's lock."""
        return {"labels_matched_total": self.accepted, "labels_rejected": dict(self.rejected),
                "labels_pending": len(self._waiting), "windows_cached": sum(len(d) for d in self.windows.values()),
                "cache_bytes": self.nbytes, "windows_evicted_total": self.evicted,
                "windows_superseded_total": self.superseded, "restore_dropped": dict(self.restore_dropped)}


_WINDOW_BYTES = 320  # a cached window beside its features: the record, its floats, the deque and order slots


def _cost(w: CachedWindow) -> int:
    return _WINDOW_BYTES + w.z.nbytes


_LABELLED = np.zeros(0, np.float32)  # a restored window already labelled: its features can train nothing more
_LABELLED.flags.writeable = False


def _enc(key):
    """A stream key as the checkpoint holds it: tuples (``StreamKey``) as lists."""
    return list(key) if isinstance(key, tuple) else key
