"""Serving (the model, its backend and the serving head) as a part of the daemon
(``edge.parts.Part``): what runs, why it was chosen, and the backbone's latency."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from edge.observe import Registry, hist_series
from edge.parts import Part

log = logging.getLogger("edge.daemon")


@dataclass(frozen=True)
class Serving:
    """What ``load_serving`` loaded: the model folder, its warmed-up engine, why that backend
    and precision were chosen, and the shipped head."""

    model: Any
    engine: Any
    backend_reason: str
    global_head: Any


def load_serving(cfg, folder) -> Serving:
    """Load the backbone of model ``folder`` as ``[model]`` asks, warm it up, and read the
    shipped head (numpy: the ONNX Runtime path needs no torch)."""
    from edge.adapt.heads import HeadSnapshot
    from edge.serve import load_backbone
    from edge.serve.engine import Engine

    m = folder.manifest
    precision = None if cfg.model.precision == "auto" else cfg.model.precision
    t0 = time.monotonic()
    backend, reason = load_backbone(folder, backend=cfg.model.backend, precision=precision,
                                    cache_dir=cfg.model.cache_dir or None, threads=cfg.model.threads)
    engine = Engine(backend, max_batch=cfg.model.max_batch)
    engine.warm_up()
    d = backend.describe()  # the choice's reason was logged once where it was made (edge.serve)
    log.info("model %s %s on %s %s; ready to serve in %.2f s", m.name, m.version, d.get("backend", backend.key),
             d.get("precision", ""), time.monotonic() - t0)
    _, head_sd = folder.arrays()
    head = HeadSnapshot.from_arrays(dict(head_sd), kind="linear", task=m.task, version=f"{m.version}+shipped")
    return Serving(model=folder, engine=engine, backend_reason=reason, global_head=head)


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
