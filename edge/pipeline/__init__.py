"""The serving path, in named parts (see DESIGN.md, "The data path").

* ``inbox``: the lanes sources put into (sensor, labels, control), bounded in bytes;
* ``router``: topic -> stream key -> samples or label (pure);
* ``bank``: one windower (and time stamper) per stream;
* ``server``: batch of windows -> features -> head -> prediction payloads;
* ``publisher``: the port predictions leave by, counting what it could not hand over;
* ``loop``: the ``pipeline`` thread that drives them.

``build_pipeline`` wires them from the config's sections (``[window]``, ``[queues]``,
``[model]``, ``[mqtt]``), what the model fixes (``ModelShape``), the topics (``Routes``)
and the callables it is handed (``Ports``), as the daemon and the tests do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from edge.config import ModelConfig, MqttConfig, QueueConfig, WindowConfig
from edge.ingest.topics import TopicRoute
from edge.pipeline.bank import WindowerBank
from edge.pipeline.inbox import Inbox
from edge.pipeline.loop import Pipeline
from edge.pipeline.publisher import Publisher
from edge.pipeline.records import LabelIn, SampleBlock, SensorBatch, Served, StreamReset, Window
from edge.pipeline.router import Route, Router
from edge.pipeline.server import Server
from edge.supervise import Supervisor

__all__ = ["Inbox", "LabelIn", "ModelShape", "Pipeline", "Ports", "Publisher", "Route", "Router", "Routes",
           "SampleBlock", "SensorBatch", "Served", "Server", "StreamReset", "Window", "WindowerBank", "build_pipeline",
           "stamp_settings", "window_settings"]


@dataclass(frozen=True)
class ModelShape:
    """What the model fixes about the pipeline: channels in, its window and sample rate (which
    ``[window]``'s zeros take), the classes out (empty for a forecast) and its id in predictions."""

    channels: int
    window: int
    sample_rate: float
    classes: tuple[str, ...] = ()
    model_id: str = ""

    @classmethod
    def of(cls, manifest) -> "ModelShape":
        """The shape of a model folder's ``manifest``."""
        return cls(channels=manifest.channels, window=manifest.window, sample_rate=manifest.sample_rate,
                   classes=tuple(manifest.classes) if manifest.task == "classification" else (),
                   model_id=f"{manifest.name}@{manifest.version}")


@dataclass(frozen=True)
class Routes:
    """The topics: the MQTT sources' routes with their payload formats, the label route, and
    the node's topic base (predictions go to ``<base>/predictions/<device>/<stream>``)."""

    sources: tuple[tuple[TopicRoute, str], ...]
    label_route: TopicRoute | None
    topic_base: str

    @classmethod
    def of(cls, cfg) -> "Routes":
        """The routes of a ``Config``: its MQTT sources and ``<topic_base>/labels/#``."""
        from edge.ingest.sources import mqtt_routes

        return cls(tuple(mqtt_routes(cfg)), TopicRoute(f"{cfg.topic_base}/labels/#"), cfg.topic_base)


@dataclass(frozen=True)
class Ports:
    """The callables a pipeline is handed: the backbone (``features``), the serving head's
    reference, where predictions go (``send``), and the optional hooks of the learner
    (``on_window``, ``on_label``, ``on_samples``), of events (``on_flag``, ``on_clock``) and
    of new streams (``on_stream``)."""

    features: Callable[[np.ndarray], np.ndarray]
    head_ref: Callable[[], Any]
    send: Callable[[str, bytes], Any]
    on_window: Callable[..., None] | None = None
    on_label: Callable[..., None] | None = None
    on_samples: Callable[..., None] | None = None
    on_flag: Callable[[Any, str | None, str | None], None] | None = None
    on_stream: Callable[[Any], None] | None = None
    on_clock: Callable[..., None] | None = None


def window_settings(window: WindowConfig, shape: ModelShape) -> dict[str, Any]:
    """The windower's settings: ``[window]``, its zeros taken from the model.

    >>> window_settings(WindowConfig(), ModelShape(channels=3, window=256, sample_rate=1000.0))["hop"]
    256
    >>> window_settings(WindowConfig(length=64, hop=16), ModelShape(channels=3, window=256, sample_rate=1000.0))["hop"]
    16
    """
    length = window.length or shape.window
    return dict(length=length, hop=window.hop or length, sample_rate=window.sample_rate or shape.sample_rate,
                rate_tolerance=window.rate_tolerance, max_fill=window.max_fill, max_fill_share=window.max_fill_share)


def stamp_settings(window: WindowConfig) -> dict[str, Any]:
    """The time stamper's settings (samples without ``t``), from ``[window]``."""
    return dict(resync_s=window.resync_s, rate_tolerance=window.rate_tolerance, rate_window_s=window.rate_window_s)


def build_pipeline(*, window: WindowConfig, queues: QueueConfig, model: ModelConfig, mqtt: MqttConfig,
                   shape: ModelShape, routes: Routes, ports: Ports, supervisor: Supervisor | None = None,
                   label_gate=None) -> Pipeline:
    """A ``Pipeline`` with its parts built from the config's sections."""
    inbox = Inbox(sensor_bytes=queues.ingest_bytes, labels_bytes=queues.labels_bytes,
                  control_bytes=queues.control_bytes, max_lag_s=queues.max_lag_s, label_route=routes.label_route)
    router = Router(sources=list(routes.sources), label_route=routes.label_route, channels=shape.channels,
                    max_skew=window.max_clock_skew_s, max_payload=mqtt.max_payload_bytes, label_gate=label_gate)
    bank = WindowerBank(channels=shape.channels, window_kw=window_settings(window, shape),
                        max_streams=window.max_streams, stamp_kw=stamp_settings(window))
    server = Server(features=ports.features, head_ref=ports.head_ref, classes=shape.classes, model_id=shape.model_id)
    p = Pipeline(inbox=inbox, router=router, bank=bank, server=server, publisher=Publisher(ports.send),
                 topic_base=routes.topic_base, max_batch=model.max_batch, max_wait_ms=model.max_wait_ms,
                 drain_s=queues.shutdown_drain_s, supervisor=supervisor, on_window=ports.on_window,
                 on_label=ports.on_label, on_samples=ports.on_samples, on_flag=ports.on_flag, on_stream=ports.on_stream)
    p.on_clock = ports.on_clock  # clock_step, clock_skew, clock_sources_step (docs/TIME_AND_NAMES.md)
    return p
