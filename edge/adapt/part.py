"""The learner (``AdaptWorker``) as a part of the daemon (``edge.parts.Part``).

One ``AdaptWorker.metrics()`` snapshot (taken under the worker's locks) is read per scrape
(source ``adapt``) and per status; the learner's lanes are cut from it for the
``edge_lane_*`` families (``edge.families.adapt_lanes``)."""
from __future__ import annotations

from typing import Any

from edge.families import adapt_lanes, add_adapt_families
from edge.observe import Registry
from edge.parts import Part


class AdaptPart(Part):
    """The ``learner`` thread: at stop it learns what is queued (up to ``drain_s``), then checkpoints."""

    name = "adapt"
    lanes = ("adapt", adapt_lanes)

    def __init__(self, worker, *, drain_s: float):
        self.worker, self.drain_s = worker, drain_s

    def start(self) -> None:
        self.worker.start()

    def threads(self) -> dict:
        return {"learner": self.worker.thread}

    def drain(self) -> None:
        self.worker.stop(timeout_s=max(1.0, self.drain_s))  # learns what is queued, then checkpoints

    def status(self) -> dict[str, Any]:
        return {"adapt": self.worker.metrics()}

    def families(self, reg: Registry) -> None:
        reg.source("adapt", self.worker.metrics)
        add_adapt_families(reg, "adapt")
