"""Sources as plug-ins, registered by type key like the serving backends.

A source plug-in is a factory ``build(configs, ctx) -> list[Source]`` given every
``[[sources]]`` block of its type (the MQTT plug-in puts all sensor subscriptions on one
connection of their own). A ``Source`` starts and stops, says whether it is connected,
reports its counters, and names the threads it runs so that the daemon's supervisor
watches them. It hands what it reads to the pipeline's inbox, never further.

``mqtt`` and ``serial`` are built in; another kind (``replay`` of a recording, say)
registers with ``@register_source("replay")``.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from edge.config import Config, SourceConfig
from edge.errors import ConfigError
from edge.ingest.topics import TopicRoute


class Source(Protocol):
    name: str

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def connected(self) -> bool: ...
    def stats(self) -> dict[str, Any]: ...
    def threads(self) -> dict[str, threading.Thread | None]: ...


@dataclass(frozen=True)
class SourceContext:
    """What a plug-in is handed: the config, the inbox to feed, and the node's client id."""

    cfg: Config
    inbox: Any  # edge.pipeline.Inbox (not imported: ingest does not depend on the pipeline)
    client_id: str
    supervisor: Any = None  # edge.supervise.Supervisor: counts hand-off failures, injects faults


SourceFactory = Callable[[list[SourceConfig], SourceContext], list[Source]]
SOURCES: dict[str, SourceFactory] = {}


def register_source(key: str) -> Callable[[SourceFactory], SourceFactory]:
    def deco(f: SourceFactory) -> SourceFactory:
        SOURCES[key] = f
        return f
    return deco


def mqtt_routes(cfg: Config) -> list[tuple[TopicRoute, str]]:
    """The topic routes of the MQTT sources, in config order: ``[(route, payload format)]``."""
    return [(TopicRoute(s.topic, device=s.device, stream=s.stream), s.format) for s in cfg.sources if s.type == "mqtt"]


def build_sources(ctx: SourceContext) -> list[Source]:
    """Every configured source, built by its plug-in."""
    by_type: dict[str, list[SourceConfig]] = {}
    for s in ctx.cfg.sources:
        by_type.setdefault(s.type, []).append(s)
    out: list[Source] = []
    for kind, configs in by_type.items():
        factory = SOURCES.get(kind)
        if factory is None:
            raise ConfigError(f"[[sources]] type = {kind!r} has no plug-in; known: {', '.join(sorted(SOURCES))}")
        out += factory(configs, ctx)
    return out


class MqttSource:
    """Every MQTT sensor subscription on one raw-socket connection (thread ``mqtt-ingest``)."""

    def __init__(self, ctx: SourceContext):
        from edge.ingest.fastmqtt import FastSubscriber

        cfg = ctx.cfg
        self.name = "mqtt"
        subs = [(r.subscription, cfg.mqtt.qos) for r, _ in mqtt_routes(cfg)]
        offer, sup = ctx.inbox.offer_batch, ctx.supervisor

        def on_batch(msgs: list[tuple[str, bytes]], received: float) -> None:
            # an exception here means "not taken": the subscriber leaves the QoS 1 messages
            # unacknowledged for redelivery (fastmqtt's acknowledgement policy); count it too
            try:
                if sup is not None:
                    sup.fault_point("mqtt-ingest")
                offer(msgs, received)
            except Exception as e:
                if sup is not None:
                    sup.item_failed("mqtt-ingest", e, where=f"a read of {len(msgs)} messages")
                raise

        self.sub = FastSubscriber(cfg.mqtt, client_id=f"{ctx.client_id}-ingest", subscriptions=subs, on_batch=on_batch)

    def start(self) -> None:
        self.sub.start()

    def stop(self) -> None:
        self.sub.stop()

    def connected(self) -> bool:
        return self.sub.connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self.sub.wait_connected(timeout)

    def stats(self) -> dict[str, Any]:
        return dict(self.sub.counters)

    def threads(self) -> dict[str, threading.Thread | None]:
        return {"mqtt-ingest": self.sub.thread}


class SerialPort:
    """One serial device (thread ``serial:<name>``), through firmware_bridge."""

    def __init__(self, name: str, s: SourceConfig, ctx: SourceContext):
        from edge.ingest.serial import SerialSource

        self.name = name
        self.src = SerialSource(name=name, port=s.port, baud=s.baud, protocol=s.protocol, device=s.device or None,
                                stream=s.stream or None, channels=list(s.channels) or None,
                                sample_rate=s.sample_rate or None, sink=ctx.inbox, supervisor=ctx.supervisor,
                                thread=f"serial:{name}")

    def start(self) -> None:
        self.src.start()

    def stop(self) -> None:
        self.src.stop()

    def connected(self) -> bool:
        return self.src.link.connected

    def stats(self) -> dict[str, Any]:
        return self.src.stats()

    def threads(self) -> dict[str, threading.Thread | None]:
        return {f"serial:{self.name}": self.src.link.thread}


@register_source("mqtt")
def _build_mqtt(configs: list[SourceConfig], ctx: SourceContext) -> list[Source]:
    return [MqttSource(ctx)]


@register_source("serial")
def _build_serial(configs: list[SourceConfig], ctx: SourceContext) -> list[Source]:
    serial_index = [i for i, s in enumerate(ctx.cfg.sources) if s.type == "serial"]
    return [SerialPort(f"serial{i}", s, ctx) for i, s in zip(serial_index, configs)]
