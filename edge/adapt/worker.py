"""The learner thread: the one owner of the learner, the label matcher and the checkpoints.

Inputs. The pipeline thread offers it served windows (features and the scores served)
and, for a forecast model, the streams' samples; the pipeline and serial sources offer
labels. They cross through two byte-bounded ``Lane``\\ s (drop oldest, counted):

* ``learner`` (``[queues] learner_bytes``): windows and forecast samples, in one lane
  because ``ForecastTargets`` needs them in the windower's order;
* ``labels`` (``[queues] labels_bytes``): labels only, so a flood of windows never sheds
  a label.

Fleet sync's work on the learner thread (prepare a delta, rebase on a global head,
handle receipts, checkpoint) goes through a third lane, ``fleet`` (``CallLane``), which
never drops: it is bounded by construction instead, holding at most one pending call of
each kind (a call offered again while pending is coalesced into it), so a burst of
labels can no longer push a delta or a rebase out of the drop-oldest labels lane.

The loop handles items in the order they were offered (a sequence number merges the two
lanes), because a label needs the windows offered before it: taking labels ahead of
queued windows would reject them as "future" after a backlog. Labels are matched to cached windows (or, for a forecast model, windows are paired with
the stream's own future samples), ``learn_one`` is called for each match, the learner's
events are published, and the state is checkpointed on an interval. The serving thread
only ever reads ``champion``: one reference.

Supervision. Each item's work is guarded: an exception is handed to
``supervisor.item_failed("learner", exc, where)`` and the item skipped;
``supervisor.fault_point("learner")`` runs at each item (``EDGE_FAULTS``); the thread is
started by ``supervisor.spawn("learner", ...)`` so that its death is seen.

State. The checkpoint holds the learner's state and the label matcher's (its cached
windows and pending labels), so that labels arriving after a restart still find the
windows served before it. The worker is handed its ``CheckpointStore``, bound to the model
(``ModelIdentity``). A checkpoint of another model is not applied: the store moves it
aside, the worker starts from the shipped head and emits ``checkpoint_mismatch``. A
failed save is counted (``checkpoint_errors``), logged rate-limited, and the next
interval simply tries again.

Shutdown. ``stop(timeout_s)`` (the daemon passes ``[queues] shutdown_drain_s``) ends
the loop, learns what is still queued (in the same order: each label against the
cached windows and the queued windows before it; only label matches cost a training
step, windows are cheap) until ``timeout_s`` is spent, checkpoints, and counts what it
could not handle as ``shutdown_dropped``.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from edge.adapt.forecast import ForecastTargets
from edge.adapt.heads import HeadSnapshot
from edge.adapt.labels import LabelMatcher
from edge.adapt.learner import Learner
from edge.errors import StateError, brief
from edge.ingest.types import StreamKey
from edge.lanes import Lane
from edge.observe import RateLimitedLog
from edge.state import CheckpointStore
from edge.supervise import Supervisor

log = logging.getLogger("edge.adapt")

THREAD = "learner"
_OVERHEAD = 256  # bytes of the record, its floats and the lane's entry around an item
_ARRAY = 112  # an ndarray's header, beside its data
_PER_ROUND = 256  # items between looks at the checkpoint clock


@dataclass(frozen=True, slots=True)
class WindowItem:
    """A served window: its span, features ``z [D]`` and the scores served for it."""

    key: Any
    t0: float
    t1: float
    z: np.ndarray
    scores: Any
    seq: int = 0  # offer order across both lanes


@dataclass(frozen=True, slots=True)
class LabelItem:
    """A label (class name or target values) for the window of ``key`` around ``t``."""

    key: Any
    t: float
    value: Any
    seq: int = 0


@dataclass(frozen=True, slots=True)
class SamplesItem:
    """Samples of ``key`` (``ts [n]``, ``rows [n, C]``): the future of a forecast model's windows."""

    key: Any
    ts: np.ndarray
    rows: np.ndarray
    seq: int = 0


@dataclass(frozen=True, slots=True)
class CallItem:
    """Work to run on the learner thread in order with the labels (fleet sync's delta and rebase)."""

    fn: Callable[[Any], None]
    seq: int = 0
    key: Any = "call"


class CallLane:
    """Calls for the learner thread that are never dropped: at most one pending per kind.

    A call offered while one of its kind is pending replaces that one's callable and keeps
    its place in the order (``coalesced``): the callers' work is idempotent (prepare the
    next delta, apply the newest global head, handle the receipts received so far), so
    running it once covers every offer. More than ``max_kinds`` kinds pending is a bug
    of the caller: refused and counted, never a silent drop.

    >>> lane = CallLane("fleet", max_kinds=2)
    >>> lane.put("delta", print, 1), lane.put("rebase", print, 2), lane.put("delta", repr, 3)
    (True, True, True)
    >>> [(i.seq, i.fn.__name__) for i in (lane.take(), lane.take())], lane.take(), lane.counters["coalesced"]
    ([(1, 'repr'), (2, 'print')], None, 1)
    """

    def __init__(self, name: str, *, max_kinds: int = 64, wake: threading.Event | None = None):
        self.name, self.max_kinds, self.wake = name, max_kinds, wake
        self._q: dict = {}  # kind -> CallItem
        self._lock = threading.Lock()
        self.counters = {"offered": 0, "taken": 0, "coalesced": 0, "refused": 0, "dropped": 0}

    def put(self, kind, fn: Callable, seq: int) -> bool:
        with self._lock:
            self.counters["offered"] += 1
            old = self._q.get(kind)
            if old is not None:
                self._q[kind] = CallItem(fn, old.seq)
                self.counters["coalesced"] += 1
            elif len(self._q) >= self.max_kinds:
                self.counters["refused"] += 1
                return False
            else:
                self._q[kind] = CallItem(fn, seq)
        if self.wake is not None:
            self.wake.set()
        return True

    def take(self) -> CallItem | None:
        """The pending call offered first (by sequence number), or None."""
        with self._lock:
            if not self._q:
                return None
            kind = min(self._q, key=lambda k: self._q[k].seq)
            self.counters["taken"] += 1
            return self._q.pop(kind)

    def drain(self) -> list:
        out = []
        while (item := self.take()) is not None:
            out.append(item)
        return out

    def __len__(self) -> int:
        return len(self._q)

    def stats(self) -> dict[str, int]:
        return {**self.counters, "depth": len(self._q)}


def _stream_key(k: list):
    """A checkpointed stream key (a list) back as the pipeline's ``StreamKey``."""
    return StreamKey(*k) if len(k) == 2 else tuple(k)


def _value_bytes(value) -> int:
    """What a label or a scores value adds to an item's cost in its lane, Python headers
    included (measured with tracemalloc: a window item is about 480 bytes plus its arrays).

    >>> _value_bytes("worn"), _value_bytes(np.zeros(8, np.float32)), _value_bytes([1.0, 2.0]), _value_bytes(3)
    (53, 144, 120, 32)
    """
    if isinstance(value, (str, bytes)):
        return 49 + len(value)
    if isinstance(value, np.ndarray):
        return _ARRAY + value.nbytes
    if isinstance(value, (list, tuple)):
        return 56 + 32 * len(value)  # pointers and the float objects they point to
    return 32


class AdaptWorker:
    """Runs online adaptation for one daemon on the supervised thread named ``learner``.

    ``store`` must be bound to the model (``CheckpointStore(..., identity=ModelIdentity.of(
    model, head=cfg.adapt.head))``). ``supervisor`` is the daemon's; without one the worker
    keeps a private one (unit tests), whose ``stopping()`` it calls itself at ``stop``.
    """

    def __init__(self, *, cfg, model, global_head: HeadSnapshot, publish_event: Callable[..., None],
                 store: CheckpointStore, supervisor: Supervisor | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if store.identity is None:
            raise ValueError("the learner's CheckpointStore must be bound to its model (identity=ModelIdentity.of(...))")
        m = model.manifest
        a = cfg.adapt
        self.task = m.task
        self.publish_event = publish_event
        self.clock = clock
        self._learner_kw = dict(task=m.task, feature_size=m.feature_size,
                                classes=m.classes if m.task == "classification" else None,
                                outputs=None if m.task == "classification" else m.outputs,
                                global_version=global_head.version, config=a, on_event=self._on_event)
        self._global_arrays = dict(global_head.arrays)
        self.learner = self._new_learner()
        if m.task == "classification":
            self.matcher = LabelMatcher(classes=m.classes, max_windows=a.label_cache_windows, max_bytes=a.label_cache_bytes,
                                        tolerance_s=a.label_tolerance_s, max_future_s=a.label_max_future_s)
            self.forecast = None
        else:
            self.matcher = LabelMatcher(outputs=m.outputs, max_windows=a.label_cache_windows, max_bytes=a.label_cache_bytes,
                                        tolerance_s=a.label_tolerance_s, max_future_s=a.label_max_future_s)
            horizon = max(1, m.outputs // max(1, m.channels))
            self.forecast = ForecastTargets(horizon=horizon)
        self.interval = a.checkpoint_interval_s
        self.store = store
        q = cfg.queues
        self._wake = threading.Event()  # set by every put and by stop: the idle loop blocks on it
        self.data = Lane("learner", max_bytes=q.learner_bytes, clock=clock, wake=self._wake)
        self.labels = Lane("labels", max_bytes=q.labels_bytes, clock=clock, wake=self._wake)
        self.calls = CallLane("fleet", wake=self._wake)  # never dropped (CallLane)
        self.counters = {"learned": 0, "checkpoints": 0, "checkpoint_errors": 0, "self_supervised": 0,
                         "item_errors": 0, "checkpoint_mismatches": 0, "shutdown_drained": 0, "shutdown_dropped": 0}
        self._own_supervisor = supervisor is None
        self.supervisor = supervisor if supervisor is not None else Supervisor(faults="")
        self._errlog = RateLimitedLog(log)
        # the owner's lock (STYLE 19): the learner thread holds it while it handles one item,
        # readers on other threads (status, scrapes) take it for their snapshot (``metrics``),
        # so they never iterate the matcher's or the learner's dicts in the middle of a change;
        # reentrant, because an item's callbacks (events, fleet calls) may read the metrics
        self._lock = threading.RLock()
        self._seq = itertools.count()  # next() is atomic in CPython: producers need no lock
        self._ahead: list = [None, None, None]  # the item taken from each lane (labels, data, calls) and not yet handled
        self._stop = threading.Event()
        self._last_ckpt = clock()
        self._pending_events: list[tuple[str, dict]] = []
        self.extras: dict = {}  # name -> object with state_dict/load_state_dict, checkpointed with the learner (fleet sync)
        self._restored: dict = {}
        self.thread = self.supervisor.spawn(THREAD, self._run)
        self._restore()
        self._restore_label_cache()
        self._remember()

    @property
    def champion(self) -> HeadSnapshot:
        """The head the serving thread predicts with (read without a lock)."""
        return self.learner.champion

    # ---- producers (other threads) ---------------------------------------------------------
    def offer_window(self, key, t0: float, t1: float, z, scores) -> None:
        z = np.array(z, dtype=np.float32)
        self.data.put(WindowItem(key, float(t0), float(t1), z, scores, next(self._seq)), _OVERHEAD + _ARRAY + z.nbytes + _value_bytes(scores))

    def offer_label(self, key, t: float, value) -> None:
        self.labels.put(LabelItem(key, float(t), value, next(self._seq)), _OVERHEAD + _value_bytes(value))

    def offer_samples(self, key, ts, rows) -> None:
        ts = np.asarray(ts, np.float64).reshape(-1)
        rows = np.asarray(rows, np.float32).reshape(len(ts), -1)
        self.data.put(SamplesItem(key, ts, rows, next(self._seq)), _OVERHEAD + 2 * _ARRAY + ts.nbytes + rows.nbytes)

    # ---- lifecycle ---------------------------------------------------------------------------
    def _restore(self) -> None:
        r = self.store.restore()
        if r.mismatch is not None:
            self.counters["checkpoint_mismatches"] += 1
            self._pending_events.append(("checkpoint_mismatch", {
                "why": r.mismatch, "checkpoint": r.path.name if r.path else None,
                "moved_to": str(r.moved_to) if r.moved_to else None, "saved": r.saved_identity,
                "model": self.store.identity.to_dict()}))
            return
        if r.state is None:
            log.info("no checkpoint in %s; starting from the shipped head", self.store.dir)
            return
        try:
            self.learner.load_state_dict(r.state)
        except Exception as e:  # noqa: BLE001 - torch raises RuntimeError on a shape mismatch
            # Same model, but a state this learner cannot take (other head options such as
            # [adapt] head_rank, an older learner's layout): never half-applied; set aside
            # like another model's, and start fresh rather than fail the daemon's start.
            why = f"the learner cannot take this checkpoint: {type(e).__name__}: {str(e)[:200]}"
            try:
                moved = self.store.set_aside(why, self.store.identity.to_dict())
            except OSError as e2:
                log.error("could not move checkpoint %s aside: %s", r.path, e2)
                moved = None
            self.learner = self._new_learner()  # load_state_dict may have changed part of it
            log.warning("checkpoint %s not applied (%s); moved to %s; starting from the shipped head", r.path, why, moved)
            self.counters["checkpoint_mismatches"] += 1
            self._pending_events.append(("checkpoint_mismatch", {
                "why": why, "checkpoint": r.path.name if r.path else None, "moved_to": str(moved) if moved else None,
                "saved": self.store.identity.to_dict(), "model": self.store.identity.to_dict()}))
            return
        self._restored = r.state
        log.info("restored the learner from %s (serving head %s)", r.path, self.champion.version)

    def _restore_label_cache(self) -> None:
        """The cached windows of the restored checkpoint, so that labels that arrive after a
        restart (late, or held by the broker while the daemon was down) still find them."""
        s = self._restored.get("label_cache")
        if s is None:
            return
        try:
            n = self.matcher.load_state_dict(s, make_key=_stream_key, feature_size=self._learner_kw["feature_size"])
        except (ValueError, TypeError, KeyError) as e:
            log.warning("the checkpoint's label cache was not restored (%s: %s); labels for windows served before "
                        "the restart will be rejected", type(e).__name__, str(e)[:200])
            return
        log.info("restored %d cached windows and %d pending labels for late labels", n, len(self.matcher.pending))

    def _new_learner(self) -> Learner:
        """A learner starting from the shipped (or fleet's global) head."""
        return Learner(global_head={k: np.array(v) for k, v in self._global_arrays.items()}, **self._learner_kw)

    def start(self) -> None:
        for kind, fields in self._pending_events:  # restore ran before the daemon could publish
            self.publish_event(kind, **fields)
        self._pending_events.clear()
        self.thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """End the loop, learn what is queued within ``timeout_s`` (the daemon passes
        ``[queues] shutdown_drain_s``), checkpoint, count the rest."""
        deadline = self.clock() + timeout_s
        self._stop.set()
        self._wake.set()
        if self._own_supervisor:
            self.supervisor.stopping()
        if self.thread.ident is not None:
            self.thread.join(max(0.1, timeout_s))
        if self.thread.is_alive():  # stuck in one item: do not touch the learner beside it
            left = len(self.labels) + len(self.data) + len(self.calls) + sum(x is not None for x in self._ahead)
            self.counters["shutdown_dropped"] += left
            log.error("the learner thread did not stop within %.1f s; %d queued items dropped, no final checkpoint",
                      timeout_s, left)
            return
        pending = sorted([x for x in self._ahead if x is not None] + self.labels.drain() + self.data.drain()
                         + self.calls.drain(), key=lambda x: x.seq)  # the loop's order (module docstring)
        self._ahead = [None, None, None]
        done = 0
        for item in pending:
            if self.clock() >= deadline:
                break
            self._guarded(item, fault=False)
            done += 1
        self.counters["shutdown_drained"] += done
        self.counters["shutdown_dropped"] += len(pending) - done
        if pending:
            log.info("shutdown: learned from %d queued items, dropped %d past the %.1f s budget",
                     done, len(pending) - done, timeout_s)
        self.checkpoint()
        late = len(self.labels) + len(self.data) + len(self.calls)  # offered after the drain
        self.counters["shutdown_dropped"] += late

    def attach_state(self, name: str, obj) -> None:
        """Checkpoint ``obj.state_dict()`` under ``name`` with the learner's, atomically in one
        file, and hand it back what the restored checkpoint held for it (fleet sync)."""
        self.extras[name] = obj
        if name in self._restored:
            obj.load_state_dict(self._restored[name])
        self._remember()

    def offer_call(self, fn: Callable[["AdaptWorker"], None], *, kind=None) -> bool:
        """Run ``fn(self)`` on the learner thread, in order with labels and windows (fleet
        sync's delta, rebase, receipts). Never dropped; one pending call per ``kind``
        (default: ``fn`` itself, so a bound method offered again while pending runs once).
        False only when ``CallLane.max_kinds`` kinds are already pending (counted)."""
        ok = self.calls.put(fn if kind is None else kind, fn, next(self._seq))
        if not ok:
            self._errlog.warn("calls", "learner-thread call refused: %d kinds already pending", len(self.calls))
        return ok

    def checkpoint(self) -> bool:
        """Save the learner's state now; True when it is on disk. A state byte-identical to
        the last checkpoint is not written again (an idle learner's: flash wears per write;
        counted as the store's ``unchanged``); ``checkpoints`` counts the files written. A
        failure is counted, logged rate-limited, and not sticky: the next call tries again."""
        self._last_ckpt = self.clock()
        written = self.store.counters["unchanged"]
        try:
            self.store.save(self._state(), skip_unchanged=True)
        except (OSError, StateError) as e:
            self.counters["checkpoint_errors"] += 1
            self._errlog.warn("checkpoint", "checkpoint failed (%d failures so far; the next interval tries again): %s",
                              self.counters["checkpoint_errors"], str(e)[:300])
            return False
        if self.store.counters["unchanged"] == written:
            self.counters["checkpoints"] += 1
        return True

    def _state(self) -> dict:
        """What a checkpoint holds: the learner, the label cache, the attached extras."""
        return {**self.learner.state_dict(), "label_cache": self.matcher.state_dict(),
                **{k: o.state_dict() for k, o in self.extras.items()}}

    def _remember(self) -> None:
        """After a restore: the state as applied is what the checkpoint holds (no write until it changes)."""
        if self._restored:
            try:
                self.store.remember(self._state())
            except StateError as e:  # cannot encode: the next checkpoint says so; nothing is lost by writing once
                log.debug("restored state not remembered: %s", e)

    # ---- the loop ----------------------------------------------------------------------------
    def _next(self):
        """The oldest offered item across the lanes, or None when all are empty."""
        ahead = self._ahead
        for i, lane in enumerate((self.labels, self.data, self.calls)):
            if ahead[i] is None:
                ahead[i] = lane.take()
        live = [i for i, x in enumerate(ahead) if x is not None]
        if not live:
            return None
        i = min(live, key=lambda j: ahead[j].seq)
        item, ahead[i] = ahead[i], None
        return item

    def _run(self) -> None:
        while not self._stop.is_set():
            busy = False
            for _ in range(_PER_ROUND):
                item = self._next()
                if item is None:
                    break
                busy = True
                self._guarded(item, fault=True)
                if self._stop.is_set():
                    return  # the rest is stop()'s to drain and count
            if self.clock() - self._last_ckpt >= self.interval:
                try:
                    self.checkpoint()
                except Exception as e:  # noqa: BLE001 - e.g. a state the codec cannot encode
                    self.supervisor.item_failed(THREAD, e, where="checkpoint")
            if not busy:
                self._wake.wait(0.25)
                self._wake.clear()

    def _guarded(self, item, *, fault: bool) -> None:
        """One item's work; an exception is counted and the item skipped (ThreadKill is not caught)."""
        try:
            if fault:
                self.supervisor.fault_point(THREAD)
            with self._lock:
                self._handle(item)
        except Exception as e:  # noqa: BLE001 - the item boundary of a supervised loop
            self.counters["item_errors"] += 1
            self.supervisor.item_failed(THREAD, e, where=f"{type(item).__name__} of {str(item.key)[:80]}")

    def _handle(self, item) -> None:
        if isinstance(item, WindowItem):
            matches = self.matcher.add_window(item.key, item.t0, item.t1, item.z, item.scores)
            if self.forecast is not None:
                self.forecast.add_window(item.key, t_end=item.t1, z=item.z, served=item.scores)
        elif isinstance(item, CallItem):
            item.fn(self)
            return
        elif isinstance(item, LabelItem):
            before = dict(self.matcher.rejected)
            matches = self.matcher.match(item.key, item.t, item.value)
            if self.matcher.rejected != before:  # every rejected label is logged (rate-limited per reason)
                why = next(r for r, n in self.matcher.rejected.items() if n != before.get(r, 0))
                self._errlog.warn(f"label:{why}", "label %s for %s at t=%.3f rejected (%s)", brief(item.value, 40),
                                  brief(str(item.key), 80), item.t, why)
        else:
            if self.forecast is None:
                return
            for _, z, target in self.forecast.add_samples(item.key, item.ts, item.rows):
                self.counters["self_supervised"] += 1
                self._learn(z, target)
            return
        for m in matches:
            self._learn(m.window.z, m.target)

    def _learn(self, z, target) -> None:
        r = self.learner.learn_one(z, target)
        if r.get("accepted"):
            self.counters["learned"] += 1
        else:
            self._errlog.warn(f"learn:{r.get('reason')}", "labelled window rejected by the learner (%s)", r.get("reason"))

    def _on_event(self, event: dict) -> None:
        fields = {k: v for k, v in event.items() if k != "type"}
        self.publish_event(event.get("type", "adapt"), **fields)

    def metrics(self) -> dict:
        """A snapshot of every counter and gauge (taken under the owner's lock: safe from any thread)."""
        with self._lock:
            return self._metrics()

    def _metrics(self) -> dict:
        out = {f"worker_{k}": v for k, v in self.counters.items()}
        out.update({f"learner_{k}": v for k, v in self.learner.metrics().items()})
        out.update({f"matcher_{k}": v for k, v in self.matcher.metrics().items()})
        if self.forecast is not None:
            out["forecast_pending"] = self.forecast.pending()
            out["forecast_dropped"] = self.forecast.dropped  # windows whose future never came
        for lane in (self.data, self.labels, self.calls):
            for k, v in lane.stats().items():
                out[f"lane_{lane.name}_{k}"] = v
        out.update({f"store_{k}": v for k, v in self.store.counters.items()})
        out["queue_depth"] = len(self.data) + len(self.labels)
        return out
