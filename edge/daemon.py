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
from edge.errors import brief
from edge.ingest.mqtt import MqttLink
from edge.ingest.sources import SourceContext, build_sources, mqtt_routes
from edge.ingest.topics import TopicRoute
from edge.observe import MetricsServer, Registry, add_sync_families
from edge.pipeline import Pipeline, build_pipeline
from edge.supervise import Supervisor

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
        self._stop_requested = threading.Event()
        self.started_at = time.time()
        self._started_mono = time.monotonic()  # uptime: a step of the wall clock must not move it
        self.link: MqttLink | None = None
        self.sources: list[Any] = []
        self.pipeline: Pipeline | None = None
        self.adapt = None
        self.sync = None  # fleet sync (issue 9)
        self._retained: dict[str, float] = {}  # prediction topic -> when it was last published retained
        self.metrics_server: MetricsServer | None = None
        self.status_socket = None
        self.backend_reason = ""
        # every long-lived thread is watched: a death fails health and ends `edge run` non-zero
        self.supervisor = Supervisor(on_death=self._thread_died)
        from edge.ingest.silence import SilenceWatch

        self.silence = SilenceWatch(cfg.metrics.source_silent_s)  # a connected source that stopped receiving

    # ---- building --------------------------------------------------------------------
    def _load_model(self, folder=None):
        """Serve ``folder``: the one ``check_startup`` verified (checked now when not given), so
        that the bytes the pin was checked over are the ones that run."""
        from edge.adapt.heads import HeadSnapshot
        from edge.check import check_startup
        from edge.serve import load_backbone
        from edge.serve.engine import Engine

        cfg = self.cfg
        self.model = folder if folder is not None else check_startup(cfg).model
        m = self.model.manifest
        precision = None if cfg.model.precision == "auto" else cfg.model.precision
        t0 = time.monotonic()
        backend, self.backend_reason = load_backbone(self.model, backend=cfg.model.backend, precision=precision,
                                                     cache_dir=cfg.model.cache_dir or None, threads=cfg.model.threads)
        self.engine = Engine(backend, max_batch=cfg.model.max_batch)
        self.engine.warm_up()
        d = backend.describe()  # the choice's reason was logged once where it was made (edge.serve)
        log.info("model %s %s on %s %s; ready to serve in %.2f s", m.name, m.version, d.get("backend", backend.key),
                 d.get("precision", ""), time.monotonic() - t0)
        _, head_sd = self.model.arrays()  # numpy: the ONNX Runtime path needs no torch
        self.global_head = HeadSnapshot.from_arrays(dict(head_sd), kind="linear",
                                                     task=m.task, version=f"{m.version}+shipped")
        self._head = self.global_head

    def head(self):
        """The serving head (an immutable snapshot; the learner replaces the reference)."""
        return self.adapt.champion if self.adapt is not None else self._head

    def _build(self) -> None:
        cfg = self.cfg
        m = self.model.manifest
        base = cfg.topic_base
        q = cfg.queues
        label_route = TopicRoute(f"{base}/labels/#")
        window_kw = dict(length=cfg.window.length or m.window, hop=cfg.window.hop or cfg.window.length or m.window,
                         sample_rate=cfg.window.sample_rate or m.sample_rate,
                         rate_tolerance=cfg.window.rate_tolerance, max_fill=cfg.window.max_fill,
                         max_fill_share=cfg.window.max_fill_share)
        stamp_kw = dict(resync_s=cfg.window.resync_s, rate_tolerance=cfg.window.rate_tolerance,
                        rate_window_s=cfg.window.rate_window_s)
        gate = None
        if cfg.labels.keys_dir or cfg.labels.max_per_s:
            from edge.ingest.labelauth import LabelGate, load_label_keys

            keys = load_label_keys(cfg.labels.keys_dir) if cfg.labels.keys_dir else None
            gate = LabelGate(keys=keys, node=cfg.node.name, max_per_s=cfg.labels.max_per_s, burst=cfg.labels.burst,
                             max_age_s=cfg.labels.max_age_s)
            log.info("labels: %s%s", f"signed by {len(keys)} labeller(s)" if keys else "unsigned",
                     f", at most {cfg.labels.max_per_s:g}/s each" if cfg.labels.max_per_s else "")
        elif cfg.adapt.enabled:
            log.warning("labels are unsigned: any client that may publish on %s/labels can retrain this device "
                        "(set [labels] keys_dir, and restrict the topic in the broker's ACL)", base)
        if cfg.adapt.enabled:
            from edge.adapt.worker import AdaptWorker
            from edge.state import learner_store

            self.adapt = AdaptWorker(cfg=cfg, model=self.model, global_head=self.global_head, publish_event=self.event,
                                     store=learner_store(cfg, self.model), supervisor=self.supervisor)
            if gate is not None:  # the label replay window is checkpointed with what the labels taught
                self.adapt.attach_state("label_gate", gate)
            if cfg.fleet_sync:  # fleet sync (issue 9): its own thread and MQTT connection
                from edge.fleet.device import DeviceSync

                self.sync = DeviceSync(cfg=cfg, worker=self.adapt, model=self.model, on_event=self.event)
        self.pipeline = build_pipeline(
            sources=mqtt_routes(cfg), label_route=label_route, channels=m.channels, window_kw=window_kw,
            features=self.engine.features, head_ref=self.head, classes=m.classes if m.task == "classification" else (),
            send=self._publish, topic_base=base, model_id=f"{m.name}@{m.version}",
            sensor_bytes=q.ingest_bytes, labels_bytes=q.labels_bytes, control_bytes=q.control_bytes,
            max_lag_s=q.max_lag_s, drain_s=q.shutdown_drain_s,
            max_batch=cfg.model.max_batch, max_wait_ms=cfg.model.max_wait_ms, max_skew=cfg.window.max_clock_skew_s,
            max_streams=cfg.window.max_streams, max_payload=cfg.mqtt.max_payload_bytes, supervisor=self.supervisor,
            label_gate=gate, stamp_kw=stamp_kw, on_stream=self._new_stream if cfg.mqtt.ha_discovery else None,
            on_window=self.adapt.offer_window if self.adapt else None,
            on_label=self.adapt.offer_label if self.adapt else None,
            on_samples=self.adapt.offer_samples if self.adapt and m.task == "forecast" else None,
            on_flag=self._stream_flag)
        self.pipeline.on_clock = self.event  # clock_step, clock_skew, clock_sources_step (docs/TIME_AND_NAMES.md)
        client_id = cfg.mqtt.client_id or f"edge-{cfg.node.name}"
        self.link = MqttLink(cfg.mqtt, client_id=client_id, status_topic=f"{base}/status",
                             subscriptions=[(label_route.subscription, 1)], on_message=self._on_link_message,
                             max_queued=cfg.queues.publish)
        self.sources = build_sources(SourceContext(cfg=cfg, inbox=self.pipeline.inbox, client_id=client_id,
                                                   supervisor=self.supervisor))

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
        self._load_model(startup.model)
        self._build()
        sup = self.supervisor
        self._threads_started = True  # from here on, a failed start still needs stop()
        self.pipeline.start()
        if self.adapt is not None:
            self.adapt.start()
            sup.adopt("learner", self.adapt.thread)
        if self.sync is not None:
            self.sync.start()
            sup.adopt("sync", self.sync.client.thread)
            sup.adopt("fleet-link", getattr(self.sync.link.client, "_thread", None))
        self.link.start()
        sup.adopt("mqtt-link", getattr(self.link.client, "_thread", None))  # paho's network loop
        for src in self.sources:
            src.start()
            for name, t in src.threads().items():
                sup.adopt(name, t)
        if self.cfg.metrics.port:
            # /status only when asked for: the port is open to every local user, the status socket is 0600
            self.metrics_server = MetricsServer(self.cfg.metrics.host, self.cfg.metrics.port, self.registry(), self.health,
                                                ready=self.readiness,
                                                status=self.status if self.cfg.metrics.status_endpoint else None)
            self.metrics_server.start()
            sup.adopt("metrics", self.metrics_server.thread)
            log.info("metrics on http://%s:%d/metrics", self.cfg.metrics.host, self.metrics_server.port)
        self._start_status_socket()
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
        from edge.state import private_dir

        d = state_dir(self.cfg)
        try:
            private_dir(d)
        except OSError as e:
            log.warning("cannot make %s private: %s", d, e)

    def _start_status_socket(self) -> None:
        from edge.control import StatusSocket

        from edge.state import private_dir, runtime_dir

        path = runtime_dir(self.cfg) / "edge.sock"  # a RAM folder: see write_status
        try:
            private_dir(path.parent)
            self.status_socket = StatusSocket(path, self.status)
        except OSError as e:  # e.g. a path longer than a Unix socket allows: `edge status` falls back to the file
            log.warning("no status socket at %s (%s); `edge status` will read status.json", path, e)
            return
        self.status_socket.start()
        self.supervisor.adopt("control", self.status_socket.thread)

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self.supervisor.stopping()
        sd_notify("STOPPING=1")
        log.info("stopping")
        for src in self.sources:  # no new input; what is queued is still served and learned
            src.stop()
        if self.link and self.cfg.mqtt.session_expiry_s > 0:
            # labels from now on stay with the broker (unacknowledged) and come again at the
            # next start, where the checkpointed label cache still has their windows; with
            # clean sessions they would be lost at the disconnect, so they are taken as before
            self.link.hold()
        if self.pipeline:
            self.pipeline.stop()
        if self.sync is not None:
            self.sync.stop()
        if self.adapt is not None:
            self.adapt.stop(timeout_s=max(1.0, self.cfg.queues.shutdown_drain_s))  # learns what is queued, then checkpoints
        if self.link:
            self.link.stop()
        if self.pipeline:
            self.pipeline.count_left()  # clean sessions: labels that arrived on the link after the pipeline's drain
        if self.metrics_server:
            self.metrics_server.stop()
        if self.status_socket is not None:
            self.status_socket.stop()
        log.info("stopped")

    def _thread_died(self, name: str, why: str) -> None:
        self._stop_requested.set()  # `edge run` then exits non-zero so that systemd restarts it

    def _wait_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        ok = self.link.wait_connected(timeout)
        for src in self.sources:
            if hasattr(src, "wait_connected"):
                ok = src.wait_connected(max(0.0, deadline - time.monotonic())) and ok
        return ok

    @property
    def ingest(self):
        """The MQTT sensor subscriber, when there are MQTT sources."""
        return next((src.sub for src in self.sources if src.name == "mqtt"), None)

    def broker_connected(self) -> bool:
        """Both connections up: the node's own (paho) and, with MQTT sources, the ingest one."""
        ing = self.ingest
        return bool(self.link and self.link.connected.is_set()) and (ing is None or ing.connected.is_set())

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
        return code

    def write_status(self) -> None:
        """Write ``status.json`` (atomically, mode 0600) for `edge status` when the socket is gone.

        Into the runtime folder (``edge.state.runtime_dir``: systemd's ``RuntimeDirectory``,
        a tmpfs), not the state folder: rewritten every 5 s, it cost 53 MB of flash a day."""
        from edge.state import private_dir, runtime_dir

        d = runtime_dir(self.cfg)
        try:
            private_dir(d)
            tmp = d / "status.json.tmp"
            data = orjson.dumps({"written": time.time(), **self.status()}, default=str,
                                option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o600)  # an older file may have had wider permissions
            os.replace(tmp, d / "status.json")
        except (OSError, TypeError) as e:
            log.warning("cannot write %s: %s", d / "status.json", e)

    # ---- outputs ---------------------------------------------------------------------
    def _publish(self, topic: str, payload: bytes) -> bool:
        # Retaining every prediction costs the broker a store per message (it showed in the
        # pipeline's p99); one retained per stream per retain_latest_s keeps "the latest"
        # for new subscribers at a fraction of that. Called on the pipeline thread only.
        every = self.cfg.mqtt.retain_latest_s
        retain = False
        if every:
            now = time.monotonic()
            if now - self._retained.get(topic, -1e18) >= every:
                self._retained[topic] = now
                retain = True
        return self.link.publish(topic, payload, qos=self.cfg.mqtt.qos, retain=retain)

    def _new_stream(self, key) -> None:
        """Announce a stream to Home Assistant (MQTT discovery), retained, as Zigbee2MQTT and ESPHome do."""
        from edge.ha import discovery_message

        topic, payload = discovery_message(self.cfg, self.model.manifest, key)
        self.link.publish(topic, payload, qos=1, retain=True)

    def event(self, kind: str, **fields) -> None:
        """Publish an event on ``<prefix>/<node>/events`` and log it."""
        # the event's own time is Unix time, whatever the fields carry (a learner's clock is monotonic)
        fields.pop("t", None)
        msg = {"type": kind, "t": time.time(), "node": self.cfg.node.name, **fields}
        log.debug("event %s %s", kind, fields)
        if self.link is not None:
            self.link.publish(f"{self.cfg.topic_base}/events", orjson.dumps(msg, option=orjson.OPT_SERIALIZE_NUMPY), qos=1)

    def _stream_flag(self, key, old: str | None, new: str | None) -> None:
        w = self.pipeline.bank.streams[key].windower
        self.event("stream_flag", device=key.device, stream=key.stream, flag=new, previous=old,
                   rate_hz=round(w.estimated_rate, 2), expected_hz=w.sample_rate,
                   filled=w.counters["filled"], samples=w.counters["samples"])

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
        sources = {src.name: src.connected() for src in self.sources}
        link = bool(self.link and self.link.connected.is_set())
        silent = self.check_sources()
        ok = live and self.engine.ready and link and all(sources.values()) and not silent
        return ok, {"ready": ok, "live": live, "model_loaded": bool(self.engine.ready), "node_connection": link,
                    "sources": sources, "silent_sources": silent, "dead_threads": info["dead_threads"]}

    def check_sources(self) -> dict[str, float]:
        """Feed each source's received count to the silence watch; an event and a log line when
        one goes silent or resumes. The sources silent now, with seconds since their last input."""
        now = time.monotonic()
        after = self.cfg.metrics.source_silent_s
        from edge.ingest.silence import received_count

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

    def status(self) -> dict[str, Any]:
        """Everything `edge status` shows: backend choice, streams, counters, head version.

        Each part is read through its snapshot, taken under its owner's lock (STYLE 19), so
        that a status request never iterates a dict another thread is changing."""
        p = self.pipeline
        st: dict[str, Any] = {"node": self.cfg.node.name, "model": f"{self.model.manifest.name}@{self.model.manifest.version}",
                              "backend": self.engine.backend.describe(), "backend_reason": self.backend_reason,
                              "head": self.head().version, "health": self.health()[1]}
        if p:
            snap = p.snapshot()
            st["pipeline"] = snap["counters"]
            st["lanes"] = snap["lanes"]
            st["bad_input"] = snap["bad"]
            st["internal_errors"] = {f"{lb['thread']}/{lb['kind']}": n for lb, n in self.supervisor.counters()}
            st["streams"] = {str(k): s.stats() for k, s in p.bank.snapshot()}
            st["clock"] = p.clock.snapshot()
        if self.link:
            st["mqtt"] = dict(self.link.counters)
        for src in self.sources:
            st.setdefault("sources", {})[src.name] = src.stats()
        if self.adapt is not None:
            st["adapt"] = self.adapt.metrics()
        if self.sync is not None:
            st["fleet"] = self.sync.metrics()
        return st

    def registry(self) -> Registry:
        """The node's metric families (README, "Metrics"): each part is read through one
        snapshot per scrape (``Registry.source``), taken under its owner's lock."""
        from edge.families import add_adapt_families, add_lane_families, adapt_lanes

        reg = Registry(build_info=build_info())
        p = self.pipeline
        sup = self.supervisor
        adapt = self.adapt
        reg.source("node", lambda: {"pipeline": p.snapshot(), "adapt": adapt.metrics() if adapt is not None else {}})
        reg.source("streams", p.bank.snapshot)

        def count(key: str):
            return lambda n: n["pipeline"]["counters"][key]

        def per_stream(counter: str):
            return lambda streams: [({"stream": str(k)}, s.windower.counters[counter]) for k, s in streams]

        reg.add("edge_messages_total", "counter", "MQTT messages the pipeline took in (served or bad input)",
                count("messages"), source="node")
        reg.add("edge_windows_served_total", "counter", "windows served", count("windows_served"), source="node")
        reg.add("edge_predictions_published_total", "counter", "predictions handed to the broker client",
                count("published"), source="node")
        reg.add("edge_predictions_failed_total", "counter", "predictions the broker client refused or failed on",
                lambda n: n["pipeline"]["counters"]["publish_failed"] + n["pipeline"]["counters"]["publish_errors"],
                source="node")
        reg.add("edge_shutdown_dropped_total", "counter", "queued messages and items left unprocessed at stop",
                count("shutdown_dropped"), source="node")
        reg.add("edge_shutdown_dropped_samples_total", "counter", "samples in what was left unprocessed at stop",
                count("shutdown_dropped_samples"), source="node")
        reg.add("edge_bad_input_total", "counter", "inputs skipped, by kind",
                lambda n: [({"kind": k}, v) for k, v in n["pipeline"]["bad"].items()], source="node")
        reg.add("edge_internal_errors_total", "counter", "items skipped after an internal error, by thread and kind",
                sup.counters)
        reg.add("edge_thread_alive", "gauge", "1 while a supervised thread runs",
                lambda: [({"thread": k}, float(v)) for k, v in sup.alive().items()])
        add_lane_families(reg, "node", lambda n: {**{("pipeline", k): v for k, v in n["pipeline"]["lanes"].items()},
                                                  **adapt_lanes(n["adapt"])})
        reg.add("edge_stream_samples_total", "counter", "samples per stream", per_stream("samples"), source="streams")
        reg.add("edge_stream_gaps_total", "counter", "gaps that restarted a window, per stream", per_stream("gaps"),
                source="streams")
        reg.add("edge_stream_out_of_order_total", "counter", "samples dropped as out of order, per stream",
                per_stream("out_of_order"), source="streams")
        reg.add("edge_stream_filled_total", "counter", "samples filled by interpolation, per stream", per_stream("filled"),
                source="streams")
        reg.add("edge_stream_rate_hz", "gauge", "measured sample rate, per stream",
                lambda streams: [({"stream": str(k)}, s.windower.estimated_rate) for k, s in streams], source="streams")
        reg.add("edge_stream_flagged", "gauge", "1 while a stream is off its rate or fills too much, by reason",
                lambda streams: [({"stream": str(k), "reason": s.flag}, 1.0) for k, s in streams if s.flag],
                source="streams")
        reg.add_histogram("edge_pipeline_latency_seconds", "receive-to-publish latency of each window",
                          lambda: [_hist_series({}, p.latency.snapshot())])
        reg.add("edge_clock_skew_seconds", "gauge", "how far this node's wall clock is behind its timed sources' clocks",
                lambda: p.clock.skew)
        reg.add("edge_clock_steps_total", "counter", "steps of this node's wall clock seen (monotonic clock as reference)",
                lambda: p.clock.steps)
        reg.add_histogram("edge_backend_latency_seconds", "backbone latency per batch, by backend and precision",
                          lambda: [_hist_series({"backend": label}, snap)
                                   for label, snap in self.engine.latency_snapshot().items()])
        reg.add("edge_mqtt_connected", "gauge", "1 while connected to the broker (every connection)",
                lambda: float(self.broker_connected()))
        reg.add("edge_publish_errors_total", "counter", "publishes the node's MQTT client refused, by reason",
                lambda: [({"reason": k}, v) for k, v in dict(self.link.publish_errors).items()])
        # one family per quantity of the MQTT connections (bytes and counts apart), the
        # connection a label: the node's own (link) and the sensor ingest one
        _connection_families(reg, {"link": self.link.counters,
                                   **({"ingest": self.ingest.counters} if self.ingest is not None else {})})
        if adapt is not None:
            add_adapt_families(reg, "node", pick=lambda n: n["adapt"])
        if self.sync is not None:
            add_sync_families(reg, self.sync.metrics)
        return reg


def _hist_series(labels: dict[str, str], snap: dict) -> tuple:
    return labels, snap["buckets"], snap["sum_s"], snap["count"]


def _connection_families(reg: Registry, connections: dict[str, dict]) -> None:
    """``edge_mqtt_<name>_total{connection}`` for each counter of the MQTT connections (read
    live: fixed keys, each value one read)."""
    names = list(dict.fromkeys(n for counters in connections.values() for n in list(counters)))
    for name in names:
        reg.add(f"edge_mqtt_{name}_total", "counter", f"MQTT connections: {name.replace('_', ' ')}, by connection",
                lambda n=name: [({"connection": c}, counters[n]) for c, counters in connections.items() if n in counters])


def build_info() -> dict[str, str]:
    """Labels of ``edge_build_info``: the package version, Python and the machine."""
    import platform
    from importlib import metadata

    try:
        version = metadata.version("edge-runtime")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {"version": version, "python": platform.python_version(), "machine": platform.machine()}


def state_dir(cfg: Config) -> Path:
    """The node's state folder (``edge.state.node_state_dir``)."""
    from edge.state import node_state_dir

    return node_state_dir(cfg)
