"""The node's MQTT link and the sources as parts of the daemon (``edge.parts.Part``).

``LinkPart`` is the node's own connection (status and last will, labels in, predictions and
events out): it holds labels with the broker at stop and closes last among the producers.
``SourcesPart`` is every configured source (MQTT ingest, serial ports): the first to stop,
and the silence watch of each (``edge.ingest.silence``).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from edge.errors import brief
from edge.ingest.silence import SilenceWatch, received_count
from edge.observe import Registry
from edge.parts import Part

log = logging.getLogger("edge.daemon")


class SourcesPart(Part):
    """Every source; ``ingest`` is the MQTT sensor subscriber, when there are MQTT sources."""

    name = "sources"

    def __init__(self, sources: list, *, silent_after_s: float, event: Callable[..., None]):
        self.sources, self.event = sources, event
        self.silence = SilenceWatch(silent_after_s)  # a connected source that stopped receiving
        self.silent_after_s = silent_after_s

    @property
    def ingest(self):
        return next((src.sub for src in self.sources if src.name == "mqtt"), None)

    def start(self) -> None:
        for src in self.sources:
            src.start()

    def threads(self) -> dict:
        return {name: t for src in self.sources for name, t in src.threads().items()}

    def stop_input(self) -> None:
        for src in self.sources:  # no new input; what is queued is still served and learned
            src.stop()

    def status(self) -> dict[str, Any]:
        return {"sources": {src.name: src.stats() for src in self.sources}} if self.sources else {}

    def connected(self) -> dict[str, bool]:
        return {src.name: src.connected() for src in self.sources}

    def wait_connected(self, deadline: float) -> bool:
        """Wait for each source that connects somewhere, until ``deadline`` (monotonic)."""
        ok = True
        for src in self.sources:
            if hasattr(src, "wait_connected"):
                ok = src.wait_connected(max(0.0, deadline - time.monotonic())) and ok
        return ok

    def check_silence(self, now: float) -> dict[str, float]:
        """Feed each source's received count to the silence watch; an event and a log line when
        one goes silent or resumes. The sources silent now, with seconds since their last input."""
        after = self.silent_after_s
        for src in list(self.sources):
            try:
                change = self.silence.observe(src.name, received_count(src.stats()), now=now, connected=src.connected())
            except Exception as e:  # noqa: BLE001 - a source's stats must not fail readiness itself
                log.warning("cannot read source %s for the silence check: %s", src.name, brief(str(e), 200))
                continue
            if change == "silent":
                log.warning("source %s is connected but received nothing for %.0f s: not ready", src.name, after)
                self.event("source_silent", source=src.name, silent_s=after,
                           why=f"connected, but nothing received for {after:g} s ([metrics] source_silent_s)")
            elif change == "resumed":
                log.info("source %s receives again", src.name)
                self.event("source_resumed", source=src.name)
        return self.silence.silent(now)


class LinkPart(Part):
    """The node's own MQTT connection (``MqttLink``); its families cover every MQTT
    connection of the node (the ingest one too), one family per quantity."""

    name = "mqtt"

    def __init__(self, link, *, hold_at_stop: bool, ingest: Callable[[], Any]):
        self.link, self.hold_at_stop, self.ingest = link, hold_at_stop, ingest

    def start(self) -> None:
        self.link.start()

    def threads(self) -> dict:
        return {"mqtt-link": getattr(self.link.client, "_thread", None)}  # paho's network loop

    def stop_input(self) -> None:
        if self.hold_at_stop:
            # labels from now on stay with the broker (unacknowledged) and come again at the
            # next start, where the checkpointed label cache still has their windows; with
            # clean sessions they would be lost at the disconnect, so they are taken as before
            self.link.hold()

    def close(self) -> None:
        self.link.stop()

    def status(self) -> dict[str, Any]:
        return {"mqtt": dict(self.link.counters)}

    def connected(self) -> bool:
        """Both connections up: the node's own (paho) and, with MQTT sources, the ingest one."""
        ing = self.ingest()
        return self.link.connected.is_set() and (ing is None or ing.connected.is_set())

    def families(self, reg: Registry) -> None:
        link, ing = self.link, self.ingest()
        reg.add("edge_mqtt_connected", "gauge", "1 while connected to the broker (every connection)",
                lambda: float(self.connected()))
        reg.add("edge_publish_errors_total", "counter", "publishes the node's MQTT client refused, by reason",
                lambda: [({"reason": k}, v) for k, v in dict(link.publish_errors).items()])
        # one family per quantity of the MQTT connections (bytes and counts apart), the
        # connection a label: the node's own (link) and the sensor ingest one
        connection_families(reg, {"link": link.counters, **({"ingest": ing.counters} if ing is not None else {})})


def connection_families(reg: Registry, connections: dict[str, dict]) -> None:
    """``edge_mqtt_<name>_total{connection}`` for each counter of the MQTT connections (read
    live: fixed keys, each value one read)."""
    names = list(dict.fromkeys(n for counters in connections.values() for n in list(counters)))
    for name in names:
        reg.add(f"edge_mqtt_{name}_total", "counter", f"MQTT connections: {name.replace('_', ' ')}, by connection",
                lambda n=name: [({"connection": c}, counters[n]) for c, counters in connections.items() if n in counters])


def build_label_gate(cfg):
    """The label gate (signatures, rate, replays: ``edge.ingest.labelauth``) that ``[labels]``
    asks for, or None; unsigned labels that can retrain the device are warned about."""
    if cfg.labels.keys_dir or cfg.labels.max_per_s:
        from edge.ingest.labelauth import LabelGate, load_label_keys

        lb = cfg.labels
        keys = load_label_keys(lb.keys_dir) if lb.keys_dir else None
        log.info("labels: %s%s", f"signed by {len(keys)} labeller(s)" if keys else "unsigned",
                 f", at most {lb.max_per_s:g}/s each" if lb.max_per_s else "")
        return LabelGate(keys=keys, node=cfg.node.name, max_per_s=lb.max_per_s, burst=lb.burst, max_age_s=lb.max_age_s)
    if cfg.adapt.enabled:
        log.warning("labels are unsigned: any client that may publish on %s/labels can retrain this device "
                    "(set [labels] keys_dir, and restrict the topic in the broker's ACL)", cfg.topic_base)
    return None
