"""The serving path, in named parts (see DESIGN.md, "The data path").

* ``inbox``: the lanes sources put into (sensor, labels, control), bounded in bytes;
* ``router``: topic -> stream key -> samples or label (pure);
* ``bank``: one windower (and time stamper) per stream;
* ``server``: batch of windows -> features -> head -> prediction payloads;
* ``publisher``: the port predictions leave by, counting what it could not hand over;
* ``loop``: the ``pipeline`` thread that drives them.

``build_pipeline`` wires them from plain settings, as the daemon and the tests do.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from edge.ingest.topics import TopicRoute
from edge.pipeline.bank import WindowerBank
from edge.pipeline.inbox import Inbox
from edge.pipeline.loop import Pipeline
from edge.pipeline.publisher import Publisher
from edge.pipeline.records import LabelIn, SampleBlock, SensorBatch, Served, StreamReset, Window
from edge.pipeline.router import Route, Router
from edge.pipeline.server import Server
from edge.supervise import Supervisor

__all__ = ["Inbox", "LabelIn", "Pipeline", "Publisher", "Route", "Router", "SampleBlock", "SensorBatch", "Served",
           "Server", "StreamReset", "Window", "WindowerBank", "build_pipeline"]


def build_pipeline(*, sources: list[tuple[TopicRoute, str]], label_route: TopicRoute | None, channels: int,
                   window_kw: dict[str, Any], features: Callable[[np.ndarray], np.ndarray], head_ref: Callable[[], Any],
                   classes: tuple[str, ...], send: Callable[[str, bytes], Any], topic_base: str, model_id: str,
                   sensor_bytes: int = 64 << 20, labels_bytes: int = 8 << 20, control_bytes: int = 1 << 20,
                   max_lag_s: float = 0.0, max_batch: int = 32, max_wait_ms: float = 0.0, max_skew: float = 0.0,
                   max_payload: int = 1 << 20, max_streams: int = 10_000, stamp_kw: dict[str, Any] | None = None,
                   drain_s: float = 2.0, supervisor: Supervisor | None = None, label_gate=None, **callbacks) -> Pipeline:
    """A ``Pipeline`` with its parts built from plain settings."""
    inbox = Inbox(sensor_bytes=sensor_bytes, labels_bytes=labels_bytes, control_bytes=control_bytes,
                  max_lag_s=max_lag_s, label_route=label_route)
    router = Router(sources=sources, label_route=label_route, channels=channels, max_skew=max_skew,
                    max_payload=max_payload, label_gate=label_gate)
    bank = WindowerBank(channels=channels, window_kw=window_kw, max_streams=max_streams, stamp_kw=stamp_kw)
    server = Server(features=features, head_ref=head_ref, classes=classes, model_id=model_id)
    return Pipeline(inbox=inbox, router=router, bank=bank, server=server, publisher=Publisher(send),
                    topic_base=topic_base, max_batch=max_batch, max_wait_ms=max_wait_ms, drain_s=drain_s,
                    supervisor=supervisor, **callbacks)
