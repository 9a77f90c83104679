"""The learner thread: the one owner of the learner, the label matcher and the checkpoints.

The pipeline thread offers it served windows (features and the scores served) and
labels; serial sources offer labels too. Everything crosses through one bounded queue
(oldest dropped and counted when full). The thread matches labels to cached windows
(or, for a forecast model, pairs windows with the stream's own future samples), calls
``learn_one`` for each match, publishes the learner's events, and checkpoints on an
interval and at stop. The serving thread only ever reads ``champion``: one reference.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable

import numpy as np

from edge.adapt.forecast import ForecastTargets
from edge.adapt.heads import HeadSnapshot
from edge.adapt.labels import LabelMatcher
from edge.adapt.learner import Learner
from edge.errors import StateError
from edge.state import CheckpointStore

log = logging.getLogger("edge.adapt")

_WINDOW, _LABEL, _SAMPLES, _CALL = 0, 1, 2, 3


class AdaptWorker:
    """Runs online adaptation for one daemon on the thread named ``learner``."""

    def __init__(self, *, cfg, model, global_head: HeadSnapshot, publish_event: Callable[..., None],
                 state_path=None, queue_size: int | None = None):
        from edge.daemon import state_dir

        m = model.manifest
        a = cfg.adapt
        self.task = m.task
        self.publish_event = publish_event
        self.learner = Learner(task=m.task, feature_size=m.feature_size,
                               classes=m.classes if m.task == "classification" else None,
                               outputs=None if m.task == "classification" else m.outputs,
                               global_head={k: np.array(v) for k, v in global_head.arrays.items()},
                               global_version=global_head.version, config=a,
                               on_event=self._on_event)
        if m.task == "classification":
            self.matcher = LabelMatcher(classes=m.classes, max_windows=a.label_cache_windows,
                                        tolerance_s=a.label_tolerance_s, max_future_s=a.label_max_future_s)
            self.forecast = None
        else:
            self.matcher = LabelMatcher(outputs=m.outputs, max_windows=a.label_cache_windows,
                                        tolerance_s=a.label_tolerance_s, max_future_s=a.label_max_future_s)
            horizon = max(1, m.outputs // max(1, m.channels))
            self.forecast = ForecastTargets(horizon=horizon)
        self.interval = a.checkpoint_interval_s
        self.store = CheckpointStore(state_path or state_dir(cfg) / "adapt", keep=3)
        self.queue: deque = deque(maxlen=queue_size or cfg.queues.labels)
        self.counters = {"dropped": 0, "learned": 0, "checkpoints": 0, "checkpoint_errors": 0, "self_supervised": 0}
        self._stop = threading.Event()
        self._last_ckpt = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="learner", daemon=True)
        self.extras: dict = {}  # name -> object with state_dict/load_state_dict, checkpointed with the learner (fleet sync)
        self._restored: dict = {}
        self._restore()

    @property
    def champion(self) -> HeadSnapshot:
        """The head the serving thread predicts with (read without a lock)."""
        return self.learner.champion

    # ---- producers (other threads) ---------------------------------------------------------
    def _offer(self, item) -> None:
        q = self.queue
        if len(q) == q.maxlen:
            self.counters["dropped"] += 1
        q.append(item)

    def offer_window(self, key, t0: float, t1: float, z, scores) -> None:
        self._offer((_WINDOW, key, t0, t1, np.array(z, dtype=np.float32), scores))

    def offer_label(self, key, t: float, value) -> None:
        self._offer((_LABEL, key, t, value))

    def offer_samples(self, key, ts, rows) -> None:
        self._offer((_SAMPLES, key, ts, rows))

    # ---- lifecycle ---------------------------------------------------------------------------
    def _restore(self) -> None:
        try:
            state = self.store.load_latest()
        except StateError as e:
            log.warning("no usable checkpoint (%s); starting from the shipped head", e)
            return
        if state is None:
            log.info("no checkpoint in %s; starting from the shipped head", self.store.dir)
            return
        try:
            self.learner.load_state_dict(state)
            self._restored = state
            log.info("restored the learner from %s (serving head %s)", self.store.loaded_path, self.champion.version)
        except StateError as e:
            log.warning("checkpoint %s does not fit this model (%s); starting from the shipped head", self.store.loaded_path, e)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)
        self.checkpoint()

    def attach_state(self, name: str, obj) -> None:
        """Checkpoint ``obj.state_dict()`` under ``name`` with the learner's, atomically in one
        file, and hand it back what the restored checkpoint held for it (fleet sync)."""
        self.extras[name] = obj
        if name in self._restored:
            obj.load_state_dict(self._restored[name])

    def offer_call(self, fn: Callable[["AdaptWorker"], None]) -> None:
        """Run ``fn(self)`` on the learner thread, in order with labels (fleet sync's delta and rebase)."""
        self._offer((_CALL, fn))

    def checkpoint(self) -> None:
        try:
            self.store.save({**self.learner.state_dict(), **{k: o.state_dict() for k, o in self.extras.items()}})
            self.counters["checkpoints"] += 1
        except (OSError, StateError) as e:
            self.counters["checkpoint_errors"] += 1
            log.error("checkpoint failed: %s", e)
        self._last_ckpt = time.monotonic()

    # ---- the loop ----------------------------------------------------------------------------
    def _run(self) -> None:
        q = self.queue
        while not self._stop.is_set():
            if not q:
                self._stop.wait(0.005)
            while q and not self._stop.is_set():
                self._handle(q.popleft())
            if time.monotonic() - self._last_ckpt >= self.interval:
                self.checkpoint()

    def _handle(self, item) -> None:
        kind = item[0]
        if kind == _WINDOW:
            _, key, t0, t1, z, scores = item
            matches = self.matcher.add_window(key, t0, t1, z, scores)
            if self.forecast is not None:
                self.forecast.add_window(key, t_end=t1, z=z, served=scores)
        elif kind == _CALL:
            item[1](self)
            return
        elif kind == _LABEL:
            _, key, t, value = item
            matches = self.matcher.match(key, t, value)
        else:
            _, key, ts, rows = item
            for _, z, target in self.forecast.add_samples(key, ts, rows):
                self.counters["self_supervised"] += 1
                self._learn(z, target)
            return
        for m in matches:
            self._learn(m.window.z, m.target)

    def _learn(self, z, target) -> None:
        r = self.learner.learn_one(z, target)
        if r.get("accepted"):
            self.counters["learned"] += 1

    def _on_event(self, event: dict) -> None:
        fields = {k: v for k, v in event.items() if k != "type"}
        self.publish_event(event.get("type", "adapt"), **fields)

    def metrics(self) -> dict:
        out = {f"worker_{k}": v for k, v in self.counters.items()}
        out.update({f"learner_{k}": v for k, v in self.learner.metrics().items()})
        out.update({f"matcher_{k}": v for k, v in self.matcher.metrics().items()})
        if self.forecast is not None:
            out["forecast_pending"] = self.forecast.pending()
            out["forecast_dropped"] = self.forecast.dropped  # windows whose future never came
        out["queue_depth"] = len(self.queue)
        return out
