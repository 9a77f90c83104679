"""Serving (the model, its backend and the serving head) as a part of the daemon
(``edge.parts.Part``): what runs, why it was chosen, and the backbone's latency."""
from __future__ import annotations

from typing import Any, Callable

from edge.observe import Registry, hist_series
from edge.parts import Part


class ServingPart(Part):
    """The loaded model and engine; ``head()`` is the serving head (the learner's champion
    or the shipped one: an atomic reference, read once)."""

    name = "serving"

    def __init__(self, *, model, engine, backend_reason: str, head: Callable[[], Any]):
        self.model, self.engine, self.backend_reason, self.head = model, engine, backend_reason, head

    def status(self) -> dict[str, Any]:
        m = self.model.manifest
        return {"model": f"{m.name}@{m.version}", "backend": self.engine.backend.describe(),
                "backend_reason": self.backend_reason, "head": self.head().version}

    def families(self, reg: Registry) -> None:
        engine = self.engine
        reg.add_histogram("edge_backend_latency_seconds", "backbone latency per batch, by backend and precision",
                          lambda: [hist_series({"backend": label}, snap)
                                   for label, snap in engine.latency_snapshot().items()])
