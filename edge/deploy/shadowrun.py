"""The shadow run: the candidate model serves a bounded share of live windows on a thread of
its own (``deploy-shadow``), its predictions never published, and labels feed ``ShadowTest``.

CPU: at most ``share`` of the windows are taken (a deterministic credit counter, not a
coin), at most ``MAX_QUEUED`` wait, and a full queue drops the window (counted), so the
serving thread never waits for the candidate. Each taken window is served by the
candidate's backbone and head, and by the reference: the current backbone's features of
that window (the ones the pipeline served, so the current backbone never runs twice)
through the current model's shipped head (``edge.deploy.shadow``, why not the adapted
one). Their scores, and the scores the device published, are kept per stream (the last
``KEEP`` windows) until a label for its time arrives; then each is scored on that label
and the pair (reference, candidate) goes into the sequential test.
"""
from __future__ import annotations

import collections
import logging
import threading

import numpy as np

from edge.deploy.shadow import ShadowTest, class_loss

log = logging.getLogger("edge.deploy")
MAX_QUEUED, KEEP, BATCH = 64, 256, 16


class Shadow:
    """One candidate (``engine``: an ``edge.serve.Engine``; ``head``: a ``HeadSnapshot``) under test
    against ``reference``, the current model's shipped head (a ``HeadSnapshot``) on the served features."""

    def __init__(self, *, engine, head, reference, classes, test: ShadowTest, share: float, on_decision):
        self.engine, self.head, self.classes, self.test = engine, head, tuple(classes), test
        self.reference = reference
        self.share, self.on_decision = float(share), on_decision
        self._index = {str(c): i for i, c in enumerate(self.classes)}
        self._credit = 0.0
        self._windows: collections.deque = collections.deque()
        self._labels: collections.deque = collections.deque(maxlen=1024)
        self._seen: dict = {}  # stream key -> deque of (t0, t1, current scores, candidate scores)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.counters = collections.Counter(windows_offered=0, windows_taken=0, windows_dropped=0,
                                            labels_matched=0, labels_unmatched=0, errors=0)
        self.decided: str | None = None
        self.thread = threading.Thread(target=self._run, name="deploy-shadow", daemon=True)

    # ---- the pipeline thread (through ShadowTap) -------------------------------------
    def offer_window(self, key, t0, t1, x, z, scores) -> None:
        """A served window: its samples ``x``, the current backbone's features ``z``, the published ``scores``."""
        self.counters["windows_offered"] += 1
        self._credit += self.share
        if self._credit < 1.0:
            return
        self._credit -= 1.0
        if len(self._windows) >= MAX_QUEUED:
            self.counters["windows_dropped"] += 1
            return
        self._windows.append((key, t0, t1, np.array(x, copy=True), np.array(z, copy=True), np.array(scores, copy=True)))
        self._wake.set()

    def offer_label(self, key, t, value) -> None:
        self._labels.append((key, float(t), value))
        self._wake.set()

    # ---- the shadow thread -----------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout=5.0)

    def _run(self) -> None:
        while not self._stop.is_set() and self.decided is None:
            self._wake.wait(0.5)
            self._wake.clear()
            try:
                self._serve_queued()
                self._match_labels()
            except Exception as e:  # noqa: BLE001  one bad batch must not end the test
                self.counters["errors"] += 1
                log.warning("shadow test: %s: %s", type(e).__name__, str(e)[:200])
            d = self.test.decision()
            if d is not None:
                self.decided = d
                self.on_decision(d, self.test.evidence())

    def _serve_queued(self) -> None:
        while self._windows:
            batch = [self._windows.popleft() for _ in range(min(BATCH, len(self._windows)))]
            cand = self.head.predict(self.engine.features(np.stack([b[3] for b in batch])))
            ref = self.reference.predict(np.stack([b[4] for b in batch]))
            for (key, t0, t1, _, _, served), r, s in zip(batch, ref, cand):
                self.test.add_window(r, s)
                self._seen.setdefault(key, collections.deque(maxlen=KEEP)).append((t0, t1, r, s, served))
                self.counters["windows_taken"] += 1

    def _match_labels(self) -> None:
        while self._labels:
            key, t, value = self._labels.popleft()
            k = self._class(value)
            hit = self._find(key, t) if k is not None else None
            if hit is None:
                self.counters["labels_unmatched"] += 1
                continue
            ref, cand, served = hit
            self.test.add_pair(current_loss=class_loss(ref, k), candidate_loss=class_loss(cand, k),
                               served_loss=class_loss(served, k))
            self.counters["labels_matched"] += 1

    def _class(self, value) -> int | None:
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= int(value) < len(self.classes):
            return int(value)
        return self._index.get(str(value)) if isinstance(value, str) else None

    def _find(self, key, t):
        streams = [self._seen.get(key, ())] if key is not None else list(self._seen.values())
        for seen in streams:
            for t0, t1, ref, cand, served in reversed(seen):
                if t0 <= t <= t1:
                    return ref, cand, served
        return None
