"""Batch of windows -> backbone features -> serving head -> prediction payloads.

``serve`` runs one backbone call for the whole batch and the head the learner last
swapped in (read once per batch through ``head_ref``: an atomic reference, never a
lock). ``prediction`` builds one window's JSON payload; times in it are the window's
sample times (Unix time for live streams).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import orjson

from edge.pipeline.records import Served, Window


class Server:
    """Serves batches of ``Window`` records."""

    def __init__(self, *, features: Callable[[np.ndarray], np.ndarray], head_ref: Callable[[], Any],
                 classes: tuple[str, ...], model_id: str):
        self.features, self.head_ref = features, head_ref
        self.classes, self.model_id = tuple(classes), model_id

    def serve(self, windows: list[Window]) -> Served:
        """Features and scores of ``windows``; raises whatever the backend or head raised."""
        x = np.stack([w.x for w in windows])
        z = self.features(x)
        head = self.head_ref()
        scores = head.predict(z)
        return Served(windows, z, scores, head.version)

    def prediction(self, w: Window, s: np.ndarray, head_version: str, clock: str | None = None) -> bytes:
        """The JSON payload of one window's prediction; ``clock`` says whose clock its times are
        on (``sensor``: the samples' own; ``sources`` / ``node``: receive times on the sources'
        consensus / this node's wall clock)."""
        msg: dict[str, Any] = {"t": w.t_end, "t_start": w.t_start, "device": w.key.device, "stream": w.key.stream,
                               "model": self.model_id, "head": head_version}
        if clock is not None:
            msg["clock"] = clock
        if self.classes:
            k = int(np.argmax(s))
            msg["prediction"] = self.classes[k]
            msg["confidence"] = round(float(s[k]), 4)
            msg["scores"] = {c: round(float(p), 4) for c, p in zip(self.classes, s)}
        else:
            msg["prediction"] = [round(float(v), 6) for v in np.atleast_1d(s)]
        return orjson.dumps(msg)
