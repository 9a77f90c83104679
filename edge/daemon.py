"""The daemon: wires model, backend, sources, pipeline, learner and MQTT; owns the threads.

Threads (each named, each owning its input): ``mqtt-ingest`` reads the sensor
subscriptions on their own raw-socket connection (``FastSubscriber``, client id
``<client_id>-ingest``) and enqueues every read's messages as one batch; paho's network
loop (``paho-mqtt-client-*``) owns the node's own connection (status and last will,
labels in, predictions and events out) and enqueues labels; one ``serial:<name>`` reader
per serial source enqueues sample blocks; ``pipeline`` windows, serves and publishes; ``learner`` trains the head and swaps
it; ``metrics`` answers scrapes. ``Daemon.run`` blocks until SIGTERM/SIGINT and then
stops them in reverse order, checkpointing the learner last.
"""
from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from edge.config import Config
from edge.ingest.fastmqtt import FastSubscriber
from edge.ingest.mqtt import MqttLink
from edge.ingest.topics import TopicRoute
from edge.observe import MetricsServer, Registry
from edge.pipeline import Pipeline
from edge.zoo import resolve_model

log = logging.getLogger("edge.daemon")


def sd_notify(message: str) -> bool:
    """Tell systemd (Type=notify) about readiness/watchdog; a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(message.encode(), addr)
        return True
    except OSError as e:
        log.warning("systemd notify failed: %s", e)
        return False


class Daemon:
    """One edge node. ``start()`` returns when it serves; ``stop()`` undoes it."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.ready = threading.Event()
        self._stop = threading.Event()
        self.started_at = time.time()
        self.link: MqttLink | None = None
        self.ingest: FastSubscriber | None = None
        self.pipeline: Pipeline | None = None
        self.adapt = None
        self.sync = None  # fleet sync (issue 9)
        self.serial: list[Any] = []
        self.metrics_server: MetricsServer | None = None
        self.backend_reason = ""

    # ---- building --------------------------------------------------------------------
    def _load_model(self):
        from edge.adapt.heads import HeadSnapshot
        from edge.serve import load_backbone
        from edge.serve.engine import Engine

        cfg = self.cfg
        self.model = resolve_model(cfg.model.path)
        m = self.model.manifest
        precision = None if cfg.model.precision == "auto" else cfg.model.precision
        t0 = time.monotonic()
        backend, self.backend_reason = load_backbone(self.model, backend=cfg.model.backend, precision=precision,
                                                     cache_dir=cfg.model.cache_dir or None, threads=cfg.model.threads)
        self.engine = Engine(backend, max_batch=cfg.model.max_batch)
        self.engine.warm_up()
        log.info("model %s %s on %s (%s); ready to serve in %.2f s", m.name, m.version, backend.describe().get("name", backend.key),
                 self.backend_reason, time.monotonic() - t0)
        _, head_sd = self.model.state_dicts()
        self.global_head = HeadSnapshot.from_arrays({k: v.numpy() for k, v in head_sd.items()}, kind="linear",
                                                     task=m.task, version=f"{m.version}+shipped")
        self._head = self.global_head

    def head(self):
        """The serving head (an immutable snapshot; the learner replaces the reference)."""
        return self.adapt.champion if self.adapt is not None else self._head

    def _build(self) -> None:
        cfg = self.cfg
        m = self.model.manifest
        base = cfg.topic_base
        sources = [(TopicRoute(s.topic, device=s.device, stream=s.stream), s.format)
                   for s in cfg.sources if s.type == "mqtt"]
        label_route = TopicRoute(f"{base}/labels/#")
        window_kw = dict(length=cfg.window.length or m.window, hop=cfg.window.hop or cfg.window.length or m.window,
                         sample_rate=cfg.window.sample_rate or m.sample_rate,
                         rate_tolerance=cfg.window.rate_tolerance, max_fill=cfg.window.max_fill)
        if cfg.adapt.enabled:
            from edge.adapt.worker import AdaptWorker

            self.adapt = AdaptWorker(cfg=cfg, model=self.model, global_head=self.global_head, publish_event=self.event)
            if cfg.fleet.enabled:  # fleet sync (issue 9): its own thread and MQTT connection
                from edge.fleet.device import DeviceSync

                self.sync = DeviceSync(cfg=cfg, worker=self.adapt, model=self.model, on_event=self.event)
        self.pipeline = Pipeline(
            sources=sources, label_route=label_route, channels=m.channels, window_kw=window_kw,
            features=self.engine.features, head_ref=self.head, classes=m.classes if m.task == "classification" else (),
            publish=self._publish, topic_base=base, model_id=f"{m.name}@{m.version}", queue_size=cfg.queues.ingest,
            max_batch=cfg.model.max_batch, max_wait_ms=cfg.model.max_wait_ms, max_skew=cfg.window.max_clock_skew_s,
            max_streams=cfg.window.max_streams, max_payload=cfg.mqtt.max_payload_bytes,
            on_window=self.adapt.offer_window if self.adapt else None,
            on_label=self.adapt.offer_label if self.adapt else None,
            on_samples=self.adapt.offer_samples if self.adapt and m.task == "forecast" else None)
        client_id = cfg.mqtt.client_id or f"edge-{cfg.node.name}"
        sensor_subs = [(r.subscription, cfg.mqtt.qos) for r, _ in sources]
        if sensor_subs:
            self.ingest = FastSubscriber(cfg.mqtt, client_id=f"{client_id}-ingest", subscriptions=sensor_subs,
                                         on_batch=self.pipeline.offer_batch)
        self.link = MqttLink(cfg.mqtt, client_id=client_id, status_topic=f"{base}/status",
                             subscriptions=[(label_route.subscription, 1)], on_message=self.pipeline.offer_message)
        for i, s in enumerate(cfg.sources):
            if s.type == "serial":
                from edge.ingest.serial import SerialSource

                self.serial.append(SerialSource(
                    name=f"serial{i}", port=s.port, baud=s.baud, protocol=s.protocol, device=s.device or None,
                    stream=s.stream or None, channels=list(s.channels) or None, sample_rate=s.sample_rate or None,
                    sink=self.pipeline))

    # ---- lifecycle -------------------------------------------------------------------
    def start(self, *, connect_timeout: float = 0.0) -> None:
        """Load, warm up, connect and start every thread; ready once the first connect succeeds
        (or immediately when ``connect_timeout`` is 0: the daemon keeps retrying in the background)."""
        self._load_model()
        self._build()
        self.pipeline.start()
        if self.adapt is not None:
            self.adapt.start()
        if self.sync is not None:
            self.sync.start()
        self.link.start()
        if self.ingest is not None:
            self.ingest.start()
        for s in self.serial:
            s.start()
        if self.cfg.metrics.port:
            self.metrics_server = MetricsServer(self.cfg.metrics.host, self.cfg.metrics.port, self.registry(), self.health)
            self.metrics_server.start()
            log.info("metrics on http://%s:%d/metrics", self.cfg.metrics.host, self.metrics_server.port)
        if connect_timeout and not self._wait_connected(connect_timeout):
            log.warning("broker %s:%d not reachable yet; retrying in the background", self.cfg.mqtt.host, self.cfg.mqtt.port)
        # Everything loaded so far (torch, onnxruntime, the model) lives as long as the
        # daemon: freezing it keeps the cyclic GC from rescanning it, which otherwise
        # stalls the serving thread for tens of milliseconds now and then.
        gc.collect()
        gc.freeze()
        self.ready.set()
        sd_notify("READY=1\nSTATUS=serving")

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        sd_notify("STOPPING=1")
        log.info("stopping")
        if self.ingest is not None:
            self.ingest.stop()
        for s in self.serial:
            s.stop()
        if self.pipeline:
            self.pipeline.stop()
        if self.sync is not None:
            self.sync.stop()
        if self.adapt is not None:
            self.adapt.stop()  # checkpoints
        if self.link:
            self.link.stop()
        if self.metrics_server:
            self.metrics_server.stop()
        log.info("stopped")

    def _wait_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        ok = self.link.wait_connected(timeout)
        if self.ingest is not None:
            ok = self.ingest.wait_connected(max(0.0, deadline - time.monotonic())) and ok
        return ok

    def broker_connected(self) -> bool:
        """Both connections up: the node's own (paho) and, with MQTT sources, the ingest one."""
        return bool(self.link and self.link.connected.is_set()) and (
            self.ingest is None or self.ingest.connected.is_set())

    def run(self) -> int:
        """Start, then block until SIGTERM/SIGINT; ping the systemd watchdog meanwhile."""
        self._stop_requested = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop_requested.set())
        self.start(connect_timeout=5.0)
        wd = int(os.environ.get("WATCHDOG_USEC", "0")) / 1e6
        last_status = 0.0
        while not self._stop_requested.wait(min(wd / 2, 1.0) if wd else 1.0):
            if wd and self.pipeline.thread.is_alive():
                sd_notify("WATCHDOG=1")  # only while the serving thread lives
            if time.monotonic() - last_status >= 5.0:
                last_status = time.monotonic()
                self.write_status()
        self.stop()
        self.write_status()
        return 0

    def write_status(self) -> None:
        """Write ``status.json`` (atomically) for `edge status`."""
        d = state_dir(self.cfg)
        try:
            d.mkdir(parents=True, exist_ok=True)
            tmp = d / "status.json.tmp"
            tmp.write_bytes(orjson.dumps({"written": time.time(), **self.status()}, default=str,
                                         option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY))
            os.replace(tmp, d / "status.json")
        except (OSError, TypeError) as e:
            log.warning("cannot write %s: %s", d / "status.json", e)

    # ---- outputs ---------------------------------------------------------------------
    def _publish(self, topic: str, payload: bytes) -> None:
        self.link.publish(topic, payload, qos=self.cfg.mqtt.qos)

    def event(self, kind: str, **fields) -> None:
        """Publish an event on ``<prefix>/<node>/events`` and log it."""
        msg = {"type": kind, "t": time.time(), "node": self.cfg.node.name, **fields}
        log.debug("event %s %s", kind, fields)
        if self.link is not None:
            self.link.publish(f"{self.cfg.topic_base}/events", orjson.dumps(msg, option=orjson.OPT_SERIALIZE_NUMPY), qos=1)

    # ---- introspection ---------------------------------------------------------------
    def health(self) -> tuple[bool, dict]:
        ok = self.ready.is_set() and self.pipeline is not None and self.pipeline.thread.is_alive()
        return ok, {"ready": ok, "broker_connected": self.broker_connected(), "uptime_s": round(time.time() - self.started_at, 1)}

    def status(self) -> dict[str, Any]:
        """Everything `edge status` shows: backend choice, streams, counters, head version."""
        p = self.pipeline
        st: dict[str, Any] = {"node": self.cfg.node.name, "model": f"{self.model.manifest.name}@{self.model.manifest.version}",
                              "backend": self.engine.backend.describe(), "backend_reason": self.backend_reason,
                              "head": self.head().version, "health": self.health()[1]}
        if p:
            st["pipeline"] = dict(p.counters)
            st["bad_input"] = dict(p.bad)
            st["streams"] = {str(k): {**w.counters, "rate_hz": round(w.estimated_rate, 2), "rate_ok": w.rate_ok}
                             for k, w in list(p.windowers.items())}
        if self.link:
            st["mqtt"] = dict(self.link.counters)
        if self.ingest is not None:
            st["mqtt_ingest"] = dict(self.ingest.counters)
        if self.adapt is not None:
            st["adapt"] = self.adapt.metrics()
        if self.sync is not None:
            st["fleet"] = self.sync.metrics()
        for s in self.serial:
            st.setdefault("serial", {})[s.name] = s.stats()
        return st

    def registry(self) -> Registry:
        reg = Registry()
        p = self.pipeline
        reg.add("edge_messages_total", "counter", "MQTT messages received", lambda: p.counters["messages"])
        reg.add("edge_dropped_total", "counter", "items dropped because the ingest queue was full", lambda: p.counters["dropped"])
        reg.add("edge_windows_served_total", "counter", "windows served", lambda: p.counters["windows_served"])
        reg.add("edge_bad_input_total", "counter", "inputs skipped, by kind", lambda: [({"kind": k}, v) for k, v in p.bad.items()])
        reg.add("edge_stream_samples_total", "counter", "samples per stream",
                lambda: [({"stream": str(k)}, w.counters["samples"]) for k, w in list(p.windowers.items())])
        reg.add("edge_stream_gaps_total", "counter", "gaps that restarted a window, per stream",
                lambda: [({"stream": str(k)}, w.counters["gaps"]) for k, w in list(p.windowers.items())])
        reg.add_histogram("edge_pipeline_latency_seconds", "receive-to-publish latency of each window",
                          lambda: [({}, p.latency_buckets(), p.latency_sum, p.latency_buckets()[-1][1])])
        reg.add_histogram("edge_backend_latency_seconds", "backbone latency per batch, by backend and precision",
                          lambda: [({"backend": label}, snap["buckets"], snap["sum_s"], snap["count"])
                                   for label, snap in self.engine.latency_snapshot().items()])
        reg.add("edge_queue_depth", "gauge", "messages waiting in the ingest queue", p.depth)
        reg.add("edge_mqtt_connected", "gauge", "1 while connected to the broker (every connection)",
                lambda: float(self.broker_connected()))
        if self.ingest is not None:
            ing = self.ingest
            reg.add("edge_mqtt_ingest_total", "counter", "the sensor ingest connection's counters, by name",
                    lambda: [({"name": k}, v) for k, v in ing.counters.items()])
        if self.adapt is not None:
            reg.add("edge_adapt", "gauge", "learner counters and prequential metrics (rejections by reason)",
                    lambda: _flatten(self.adapt.metrics()))
        if self.sync is not None:
            reg.add("edge_fleet_sync", "gauge", "fleet sync counters (refused global heads by reason)",
                    lambda: _flatten(self.sync.metrics()))
        return reg


def _flatten(metrics: dict) -> list[tuple[dict[str, str], float]]:
    out: list[tuple[dict[str, str], float]] = []
    for k, v in metrics.items():
        if isinstance(v, dict):
            out += [({"name": k, "reason": str(r)}, float(n)) for r, n in v.items()]
        elif isinstance(v, (int, float)) and v == v:  # skips NaN and None
            out.append(({"name": k}, float(v)))
    return out


def state_dir(cfg: Config) -> Path:
    return Path(cfg.node.state_dir).expanduser() / cfg.node.name
