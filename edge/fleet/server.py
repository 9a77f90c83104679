"""`edge fleet-server`: the MQTT shell around ``Aggregator``.

Threads: paho's network loop receives deltas on ``<prefix>/<fleet>/<model>/delta/+``
(``$share/<group>/...`` when a group is set, so several instances split the stream)
and only appends them to a bounded queue; ``fleet-aggregator`` validates and stores them
in batches, commits a version when the buffer is due, and publishes the latest version,
signed and retained (QoS 1), whenever it is newer than what this instance last
published (so a version another instance committed, or a rollback, goes out too).
QoS 1 deliveries are acknowledged only after the batch is in the store (paho's manual
acks): a delta the broker has handed over is either stored or will be delivered again.
"""
from __future__ import annotations

import collections
import logging
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

from edge.fleet.aggregator import Aggregator
from edge.fleet.config import ServerConfig
from edge.fleet.heads import delta_topic, global_topic, initial_arrays
from edge.fleet.keys import load_private, load_trusted
from edge.fleet.store import open_store
from edge.fleet.validate import Expected
from edge.observe import MetricsServer, Registry

log = logging.getLogger("edge.fleet")


def expected_for(cfg: ServerConfig, model) -> Expected:
    s = cfg.server
    arrays = initial_arrays(model, kind=s.head, rank=s.head_rank, hidden=s.head_hidden)
    return Expected(fleet=s.fleet, model=model.manifest.name, model_hash=model.content_hash, head_kind=s.head,
                    shapes={k: tuple(v.shape) for k, v in arrays.items()}), arrays


def build_aggregator(cfg: ServerConfig, *, store=None) -> Aggregator:
    """The aggregator a server config describes (model resolved, key loaded, store opened)."""
    from edge.errors import ConfigError
    from edge.zoo import resolve_model

    s = cfg.server
    if not s.key_file:
        raise ConfigError("[server] key_file is required: the server signs every global head (edge keys create NAME --role server)")
    model = resolve_model(s.model)
    expected, arrays = expected_for(cfg, model)
    return Aggregator(store=store or open_store(s.store), expected=expected, key=load_private(s.key_file),
                      trusted=lambda: load_trusted(s.devices_dir) if s.devices_dir else {}, name=s.name, k=s.k, t_s=s.t_s,
                      rule=s.rule, clip_norm=s.clip_norm, trim=s.trim, max_norm=s.max_norm,
                      staleness_exponent=s.staleness_exponent, server_lr=s.server_lr, commit_pause_s=s.commit_pause_s,
                      initial=arrays, max_samples=s.max_samples, samples_ratio=s.samples_ratio,
                      reference_growth=s.reference_growth)


class FleetServer:
    """One server instance: ``start()`` connects and runs; ``stop()`` undoes it."""

    def __init__(self, cfg: ServerConfig, *, aggregator: Aggregator | None = None):
        self.cfg = cfg
        s = cfg.server
        self.agg = aggregator or build_aggregator(cfg)
        model = self.agg.expected.model
        self.delta_filter = delta_topic(s.topic_prefix, s.fleet, model, "+")
        if s.group:
            self.delta_filter = f"$share/{s.group}/{self.delta_filter}"
        self.global_topic = global_topic(s.topic_prefix, s.fleet, model)
        self.queue: collections.deque = collections.deque(maxlen=s.queue)
        self.counters = collections.Counter()
        self.published = -1
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fleet-aggregator", daemon=True)
        m = cfg.mqtt
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=m.client_id or s.name, protocol=mqtt.MQTTv5)
        if m.username:
            c.username_pw_set(m.username, m.password or None)
        if m.tls:
            c.tls_set(ca_certs=m.ca_file or None, certfile=m.cert_file or None, keyfile=m.key_file or None)
        c.reconnect_delay_set(m.reconnect_min_s, m.reconnect_max_s)
        c.manual_ack_set(True)
        c.on_connect, c.on_disconnect, c.on_message = self._on_connect, self._on_disconnect, self._on_message
        self.client = c
        self.metrics_server: MetricsServer | None = None

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        m = self.cfg.mqtt
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600  # deltas sent while this instance restarts wait for it at the broker
        self.client.connect_async(m.host, m.port, keepalive=m.keepalive_s, clean_start=False, properties=props)
        self.client.loop_start()
        self.thread.start()
        if self.cfg.metrics.port:
            self.metrics_server = MetricsServer(self.cfg.metrics.host, self.cfg.metrics.port, self.registry(), self.health)
            self.metrics_server.start()
            log.info("fleet server metrics on http://%s:%d/metrics", self.cfg.metrics.host, self.metrics_server.port)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.thread.join(10)
        self.client.disconnect()
        self.client.loop_stop()
        if self.metrics_server:
            self.metrics_server.stop()

    def run(self) -> int:
        import signal

        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        self.start()
        while not stop.wait(1.0):
            if not self.thread.is_alive():
                log.error("the aggregator thread died; exiting so that the supervisor restarts the server")
                self.stop()
                return 1
        self.stop()
        return 0

    # ---- paho callbacks (network thread) ----------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            log.warning("broker refused the fleet server: %s", reason_code)
            return
        client.subscribe(self.delta_filter, qos=1)
        self.counters["connects"] += 1
        self.connected.set()
        self.published = -1  # (re)publish the latest version after every connect
        self._wake.set()
        log.info("fleet server %s subscribed to %s", self.cfg.server.name, self.delta_filter)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:
        self.connected.clear()

    def _on_message(self, client, userdata, msg) -> None:
        # The broker sends at most its in-flight window (mosquitto: max_inflight_messages)
        # of unacknowledged QoS 1 deliveries, so the queue stays short; what overflows it
        # (a QoS 0 flood) is dropped, counted, and acknowledged so the stream never stalls.
        q = self.queue
        if len(msg.payload) > self.cfg.mqtt.max_payload_bytes:
            self.counters["too_large"] += 1
            self._ack(msg.mid, msg.qos)
            return
        if len(q) == q.maxlen:
            _, _, mid, qos = q.popleft()
            self.counters["dropped"] += 1
            self._ack(mid, qos)
        q.append((msg.topic, msg.payload, msg.mid, msg.qos))
        self._wake.set()

    def _ack(self, mid: int, qos: int) -> None:
        if qos:
            self.client.ack(mid, qos)

    # ---- the aggregator thread --------------------------------------------------------------
    def _run(self) -> None:
        last_check = 0.0
        while not self._stop.is_set():
            self._wake.wait(0.2)
            self._wake.clear()
            try:
                self._drain()
                now = time.monotonic()
                if now - last_check >= 0.2:
                    last_check = now
                    self.agg.maybe_commit()
                    self._publish_latest()
            except Exception as e:  # a store hiccup must not end the server; health shows it
                self.counters["errors"] += 1
                log.exception("fleet aggregator: %s", str(e)[:200])
                self._stop.wait(1.0)

    def _drain(self) -> None:
        q = self.queue
        while q:
            batch = []
            while q and len(batch) < 512:
                batch.append(q.popleft())
            self.agg.ingest([(t, p) for t, p, _, _ in batch])
            self.counters["received"] += len(batch)
            for _, _, mid, qos in batch:
                self._ack(mid, qos)  # only now: the batch is in the store
            if self.agg.maybe_commit() is not None:
                self._publish_latest()

    def _publish_latest(self) -> None:
        if not self.connected.is_set():
            return
        latest = self.agg.store.latest()
        if latest is not None and latest.version > self.published:
            info = self.client.publish(self.global_topic, latest.message, qos=1, retain=True)
            if info.rc == mqtt.MQTT_ERR_SUCCESS:
                self.published = latest.version
                self.counters["published"] += 1

    # ---- introspection ----------------------------------------------------------------------
    def health(self) -> tuple[bool, dict]:
        ok = self.thread.is_alive() and self.connected.is_set()
        return ok, {"ready": ok, "broker_connected": self.connected.is_set(), "version": self.agg.current,
                    "queue": len(self.queue)}

    def registry(self) -> Registry:
        reg = Registry()
        a = self.agg
        reg.add("edge_fleet_deltas_accepted_total", "counter", "deltas accepted and stored", lambda: a.counters["accepted"])
        reg.add("edge_fleet_deltas_rejected_total", "counter", "deltas rejected, by reason",
                lambda: [({"reason": r}, n) for r, n in a.rejected.items()])
        reg.add("edge_fleet_deltas_applied_total", "counter", "deltas applied into a version", lambda: a.counters["applied"])
        reg.add("edge_fleet_versions_total", "counter", "versions committed by this instance", lambda: a.counters["versions"])
        reg.add("edge_fleet_version", "gauge", "latest global version known to this instance", lambda: a.current)
        reg.add("edge_fleet_queue_depth", "gauge", "received deltas waiting for validation", lambda: len(self.queue))
        reg.add("edge_fleet_server", "counter", "server counters, by name",
                lambda: [({"name": k}, v) for k, v in self.counters.items()])
        reg.add("edge_fleet_mqtt_connected", "gauge", "1 while connected to the broker", lambda: float(self.connected.is_set()))
        return reg
