"""The daemon: wires model, backend, sources, pipeline, learner and MQTT; owns the threads.

Threads (each named, each owning its input lanes): ``mqtt-ingest`` reads the sensor
subscriptions on their own raw-socket connection (``FastSubscriber``, client id
``<client_id>-ingest``) and puts every read's messages into the pipeline's sensor lane;
paho's network loop owns the node's own connection (status and last will, labels in,
predictions and events out) and puts labels into the label lane; one ``serial:<name>``
reader per serial source puts sample blocks and labels into the same lanes; ``pipeline``
windows, serves and publishes; ``learner`` trains the head and swaps it; ``metrics``
answers scrapes.

Every one of them is watched by one ``Supervisor``: a failure of one item is counted and
skipped; a thread that dies makes ``/healthz`` fail, stops the watchdog pings and makes
``Daemon.run`` return 1, so that systemd restarts the daemon. ``Daemon.run`` blocks until
SIGTERM/SIGINT (or a death), then stops the sources first, lets the pipeline serve and the
learner learn what is queued (bounded in time), and checkpoints last.

The daemon only wires. Each part (serving, learner, fleet sync, pipeline, supervisor, the
node's MQTT link, the sources) brings its threads, stop phases, status fields and metric
families next to its own code, and is hooked in by one ``self.parts.add`` in ``_build``:
the interface is ``edge.parts.Part`` (docs/INTERNALS.md, "Parts of the daemon").
"""
from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
from typing import Any

import orjson

from edge.config import Config
from edge.daemon_status import Endpoints, metrics_registry, sd_notify, write_status_file
from edge.errors import brief
from edge.ha import announcer
from edge.ingest.mqtt import MqttLink
from edge.ingest.part import LinkPart, SourcesPart, build_label_gate
from edge.ingest.sources import SourceContext, build_sources
from edge.observe import Registry
from edge.parts import Parts
from edge.pipeline import ModelShape, Pipeline, Ports, Routes, build_pipeline
from edge.pipeline.part import PipelinePart, flag_fields
from edge.pipeline.publisher import RetainLatest
from edge.serve.part import ServingPart
from edge.supervise import Supervisor, SupervisorPart

log = logging.getLogger("edge.daemon")


class Daemon:
    """One edge node. ``start()`` returns when it serves; ``stop()`` undoes it."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._stop_requested = threading.Event()
        self._started_mono = time.monotonic()  # uptime: a step of the wall clock must not move it
        self.link: MqttLink | None = None
        self.sources: list[Any] = []
        self.pipeline: Pipeline | None = None
        self.adapt = None
        self.sync = None  # fleet sync (issue 9)
        self.deploy = None  # model releases (issue 20)
        self._restart_why = ""  # set by a release switch or rollback: run() then execs this command again
        self.endpoints = Endpoints()  # the metrics server and the status socket (edge.daemon_status)
        self.backend_reason = ""
        self.parts = Parts()  # the one place each part hooks in (edge.parts)
        self._link_part: LinkPart | None = None
        self._sources_part: SourcesPart | None = None
        # every long-lived thread is watched: a death fails health and ends `edge run` non-zero
        self.supervisor = Supervisor(on_death=self._thread_died)

    # ---- building --------------------------------------------------------------------
    def _load_model(self, folder=None):
        """Serve ``folder``: the one ``check_startup`` verified (checked now when not given), so
        that the bytes the pin was checked over are the ones that run."""
        from edge.check import check_startup
        from edge.serve.part import load_serving

        s = load_serving(self.cfg, folder if folder is not None else check_startup(self.cfg).model)
        self.model, self.engine, self.backend_reason = s.model, s.engine, s.backend_reason
        self.global_head = self._head = s.global_head

    def head(self):
        """The serving head (an immutable snapshot; the learner replaces the reference)."""
        return self.adapt.champion if self.adapt is not None else self._head

    def _build(self) -> None:
        """Build every part and add it, consumers before producers: ``Parts`` starts them in
        this order and stops them in the reverse one (sources first, the learner's checkpoint last)."""
        cfg, m, sup = self.cfg, self.model.manifest, self.supervisor
        gate = build_label_gate(cfg)
        self.parts.add(ServingPart(model=self.model, engine=self.engine, backend_reason=self.backend_reason,
                                   head=self.head))
        if cfg.adapt.enabled:
            self._build_learner(gate)
        client_id = cfg.mqtt.client_id or f"edge-{cfg.node.name}"
        routes = Routes.of(cfg)
        self.link = MqttLink(cfg.mqtt, client_id=client_id, status_topic=f"{cfg.topic_base}/status",
                             subscriptions=[(routes.label_route.subscription, 1)], on_message=self._on_link_message,
                             max_queued=cfg.queues.publish)
        a = self.adapt
        features, on_window, on_label = self.engine.features, a.offer_window if a else None, a.offer_label if a else None
        if cfg.deploy.enabled:  # model releases (issue 20): the shadow test taps the serving path
            from edge.deploy.part import DeployPart

            self.deploy = DeployPart(cfg=cfg, model=self.model, features=features, on_window=on_window,
                                     on_label=on_label, request_restart=self._restart_for)
            self.deploy.attach(self.engine.backend)
            self.parts.add(self.deploy)
            features, on_window, on_label = self.deploy.tap.features, self.deploy.tap.on_window, self.deploy.tap.on_label
        ports = Ports(features=features, head_ref=self.head,
                      send=RetainLatest(self.link.publish, every_s=cfg.mqtt.retain_latest_s, qos=cfg.mqtt.qos),
                      on_window=on_window, on_label=on_label,
                      on_samples=a.offer_samples if a and m.task == "forecast" else None,
                      on_flag=lambda key, old, new: self.event("stream_flag", **flag_fields(self.pipeline, key, old, new)),
                      on_stream=announcer(cfg, m, self.link.publish) if cfg.mqtt.ha_discovery else None,
                      on_clock=self.event)
        self.pipeline = build_pipeline(window=cfg.window, queues=cfg.queues, model=cfg.model, mqtt=cfg.mqtt,
                                       shape=ModelShape.of(m), routes=routes, ports=ports, supervisor=sup,
                                       label_gate=gate)
        self.parts.add(PipelinePart(self.pipeline))
        self.parts.add(SupervisorPart(sup))
        self._link_part = self.parts.add(LinkPart(self.link, hold_at_stop=cfg.mqtt.session_expiry_s > 0,
                                                  ingest=lambda: self.ingest))
        self.sources = build_sources(SourceContext(cfg=cfg, inbox=self.pipeline.inbox, client_id=client_id,
                                                   supervisor=sup))
        self._sources_part = self.parts.add(SourcesPart(self.sources, silent_after_s=cfg.metrics.source_silent_s,
                                                        event=self.event))

    def _build_learner(self, gate) -> None:
        """The learner, and fleet sync on it (its own thread and MQTT connection)."""
        from edge.adapt.part import AdaptPart
        from edge.adapt.worker import AdaptWorker
        from edge.state import learner_store

        cfg = self.cfg
        self.adapt = AdaptWorker(cfg=cfg, model=self.model, global_head=self.global_head, publish_event=self.event,
                                 store=learner_store(cfg, self.model), supervisor=self.supervisor)
        if gate is not None:  # the label replay window is checkpointed with what the labels taught
            self.adapt.attach_state("label_gate", gate)
        self.parts.add(AdaptPart(self.adapt, drain_s=cfg.queues.shutdown_drain_s))
        if cfg.fleet_sync:
            from edge.fleet.device import DeviceSync
            from edge.fleet.part import SyncPart

            self.sync = DeviceSync(cfg=cfg, worker=self.adapt, model=self.model, on_event=self.event)
            self.parts.add(SyncPart(self.sync))

    def _on_link_message(self, topic: str, payload: bytes, received: float) -> None:
        # paho's network thread: an exception escaping a callback would end paho's loop
        try:
            self.supervisor.fault_point("mqtt-link")
            self.pipeline.offer_message(topic, payload, received)
        except Exception as e:
            self.supervisor.item_failed("mqtt-link", e, where=brief(topic))

    # ---- lifecycle -------------------------------------------------------------------
    def start(self, *, connect_timeout: float = 0.0) -> None:
        """Load, warm up, connect and start every thread; ready once the first connect succeeds
        (or immediately when ``connect_timeout`` is 0: the daemon keeps retrying in the background)."""
        from edge.check import check_startup

        startup = check_startup(self.cfg)  # the same checks as `edge run --check`, before any model code runs
        self._prepare_state_dir()
        from edge.deploy.active import active_model

        self._load_model(active_model(self.cfg) or startup.model)  # a switched release serves instead (issue 20)
        self._build()
        self._threads_started = True  # from here on, a failed start still needs stop()
        self.parts.start(self.supervisor)
        self.endpoints.start(self.cfg, self.registry, self.supervisor, health=self.health,
                             readiness=self.readiness, status=self.status)
        if connect_timeout and not self._wait_connected(connect_timeout):
            log.warning("broker %s:%d not reachable yet; retrying in the background", self.cfg.mqtt.host, self.cfg.mqtt.port)
        # Everything loaded so far (torch, onnxruntime, the model) lives as long as the
        # daemon: freezing it keeps the cyclic GC from rescanning it, which otherwise
        # stalls the serving thread for tens of milliseconds now and then.
        gc.collect()
        gc.freeze()
        self.ready.set()
        sd_notify("READY=1\nSTATUS=serving")

    def _prepare_state_dir(self) -> None:
        """The node's state folder, private to the daemon's user (0700), made or fixed at start:
        every folder made for it (``[node] state_dir`` and its missing parents too) is 0700."""
        from edge.state import node_state_dir, private_dir

        d = node_state_dir(self.cfg)
        try:
            private_dir(d)
        except OSError as e:
            log.warning("cannot make %s private: %s", d, e)

    def stop(self) -> None:
        """The parts' stop phases (``Parts.stop``: no new input, drain and checkpoint, close),
        then the metrics server and the status socket."""
        if self._stop.is_set():
            return
        self._stop.set()
        self.supervisor.stopping()
        sd_notify("STOPPING=1")
        log.info("stopping")
        try:
            self.parts.stop()
        finally:
            self.endpoints.stop()
        log.info("stopped")

    def _thread_died(self, name: str, why: str) -> None:
        self._stop_requested.set()  # `edge run` then exits non-zero so that systemd restarts it

    def _wait_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        ok = self.link.wait_connected(timeout)
        return self._sources_part.wait_connected(deadline) and ok

    @property
    def ingest(self):
        """The MQTT sensor subscriber, when there are MQTT sources."""
        return self._sources_part.ingest if self._sources_part is not None else None

    def broker_connected(self) -> bool:
        """Both connections up: the node's own (paho) and, with MQTT sources, the ingest one."""
        return self._link_part is not None and self._link_part.connected()

    def run(self) -> int:
        """Start, then block until SIGTERM/SIGINT or a thread's death; ping the systemd watchdog
        meanwhile, only while every supervised thread lives. Returns the exit code."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop_requested.set())
        code, started = 0, False
        try:
            self.start(connect_timeout=5.0)
            started = True
            wd = int(os.environ.get("WATCHDOG_USEC", "0")) / 1e6
            last_status = 0.0
            while not self._stop_requested.wait(min(wd / 2, 1.0) if wd else 1.0):
                if wd and not self.supervisor.dead():
                    sd_notify("WATCHDOG=1")
                self.check_sources()  # a silent source's event comes without a /readyz scrape
                if time.monotonic() - last_status >= 5.0:
                    last_status = time.monotonic()
                    self.write_status()
            dead = self.supervisor.dead()
            if dead:
                log.critical("exiting non-zero: thread(s) died: %s", "; ".join(f"{k}: {v}" for k, v in dead.items()))
                code = 1
        except Exception:  # noqa: BLE001 - the loop's own failure ends the daemon, never skips the stop below
            if not started:
                raise  # a failed start (a bad model, key or config): the CLI maps it to its exit code
            log.critical("the main loop failed; stopping (drain, final checkpoint, offline status)", exc_info=True)
            code = 1
        finally:
            # whatever ended the loop (a signal, a death, an error, even KeyboardInterrupt), what is
            # queued is served and learned, the learner checkpoints and the broker hears "offline";
            # a start that failed before any thread ran has nothing to stop
            steps = (self.stop, self.write_status) if started else \
                (self.stop,) if getattr(self, "_threads_started", False) else ()
            for step in steps:
                try:
                    step()
                except Exception:  # noqa: BLE001 - one failed step must not skip the next
                    log.critical("%s failed at shutdown", step.__name__, exc_info=True)
                    code = 1
        if self._restart_why and code == 0:
            from edge.deploy.active import restart_process

            restart_process(self._restart_why)  # the start that serves the switched (or restored) model
        return code

    def _restart_for(self, why: str) -> None:
        """A release switched or rolled back (edge.deploy): stop cleanly, then start again on it."""
        self._restart_why = why
        self._stop_requested.set()

    def write_status(self) -> None:
        """``status.json`` in the runtime folder (``edge.daemon_status.write_status_file``)."""
        write_status_file(self.cfg, self.status())

    # ---- outputs ---------------------------------------------------------------------
    def event(self, kind: str, **fields) -> None:
        """Publish an event on ``<prefix>/<node>/events`` and log it."""
        # the event's own time is Unix time, whatever the fields carry (a learner's clock is monotonic)
        fields.pop("t", None)
        msg = {"type": kind, "t": time.time(), "node": self.cfg.node.name, **fields}
        log.debug("event %s %s", kind, fields)
        if self.link is not None:
            self.link.publish(f"{self.cfg.topic_base}/events", orjson.dumps(msg, option=orjson.OPT_SERIALIZE_NUMPY), qos=1)

    # ---- introspection ---------------------------------------------------------------
    def health(self) -> tuple[bool, dict]:
        """Liveness: started, and no supervised thread has died."""
        dead = self.supervisor.dead()
        ok = self.ready.is_set() and self.pipeline is not None and not dead
        return ok, {"ready": ok, "dead_threads": dead, "broker_connected": self.broker_connected(),
                    "uptime_s": round(time.monotonic() - self._started_mono, 1)}

    def readiness(self) -> tuple[bool, dict]:
        """Readiness: live, the model loaded and warmed up, every connection up, and no
        connected source that was flowing silent for ``[metrics] source_silent_s``."""
        live, info = self.health()
        sources = self._sources_part.connected() if self._sources_part is not None else {}
        link = bool(self.link and self.link.connected.is_set())
        silent = self.check_sources()
        ok = live and self.engine.ready and link and all(sources.values()) and not silent
        return ok, {"ready": ok, "live": live, "model_loaded": bool(self.engine.ready), "node_connection": link,
                    "sources": sources, "silent_sources": silent, "dead_threads": info["dead_threads"]}

    def check_sources(self) -> dict[str, float]:
        """The sources silent now (an event when one goes silent or resumes: ``SourcesPart.check_silence``)."""
        return self._sources_part.check_silence(time.monotonic()) if self._sources_part is not None else {}

    def status(self) -> dict[str, Any]:
        """Everything `edge status` shows: the node, then every part's fields (``Parts.status``:
        each read through its snapshot, taken under its owner's lock), then health."""
        return {"node": self.cfg.node.name, **self.parts.status(), "health": self.health()[1]}

    def registry(self) -> Registry:
        """The node's metric families: every part's, one snapshot per part per scrape."""
        return metrics_registry(self.parts)
