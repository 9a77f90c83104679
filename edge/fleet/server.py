"""`edge fleet-server`: the MQTT shell around ``Aggregator``.

Threads: paho's network loop receives deltas on ``<prefix>/<fleet>/<model>/delta/+``
and head requests on ``.../request/+`` (``$share/<group>/...`` when a group is set, so
several instances split the stream) and only appends deltas to a bounded queue;
``fleet-aggregator`` validates and stores them in batches, answers each signature-verified
delta with a signed receipt on ``.../receipt/<node>``, commits a version when the buffer
is due, and publishes the latest version, signed and retained (QoS 1): whenever it is
newer than what this instance last published (a version another instance committed, a
rollback, a new epoch), when a device asks (at most once a second), and every
``[server] republish_s``.

Delivery: QoS 1 deliveries are acknowledged only after their batch is in the store
(paho's manual acks), so a delta the broker handed over is either stored or delivered
again. The queue holds ``[server] queue`` deliveries, which is also the MQTT 5 Receive
Maximum the server announces: the broker sends no more unacknowledged deliveries than
the queue holds (backpressure; ``backpressure`` counts the times it filled). One that
arrives to a full queue anyway (MQTT 3.1.1, a broker that ignores the limit) is left
unacknowledged (``held_unacked``), and once the queue drained the server reconnects its
persistent session so the broker sends it again; nothing is dropped or acknowledged
unstored. A store error (SQLite locked, a PostgreSQL blip) keeps the batch, is counted
(``store_errors``), retried with backoff (0.1 s doubling to 5 s), and ``/healthz``
answers 503 with the reason until a store succeeds again. Any other error is one message
the aggregator cannot handle: it is found by trying the batch one by one, counted
(``ingest_errors``) and taken, so that it cannot stall the stream.

Scale-out (``[server] group``): the instance's session ends with it (clean start), so a
killed, stopped or vanished instance strands no share of the group at the broker; what
was in flight to it is lost to it, and the devices send it again, because a device
counts a delta delivered only once a signed receipt says it is stored. ``stop()`` (SIGTERM,
a scale-down) first leaves the group and waits for the UNSUBACK, then stores and
acknowledges what it holds. A delivery left unacknowledged for a full queue (MQTT 3.1.1)
is dropped with the clean session at the reconnect too, and comes again from its device. The head is published by ``publish_head``: under the store's
publish lock, the newest committed version, the lock held until PUBACK.

Model releases (``edge.fleet.release``): messages on ``.../release/get/+`` and
``.../release/report/+`` go to the ``ReleaseService`` (thread ``fleet-release``, its own
queue and store connection), which serves chunks, keeps reports, applies the rollout rule
and publishes the current release manifest, retained, after every connect and change.
"""
from __future__ import annotations

import collections
import logging
import sqlite3
import threading
import time

from dataclasses import dataclass

import paho.mqtt.client as mqtt

from edge.errors import EdgeError
from edge.fleet.aggregator import Aggregator, receipted_node
from edge.fleet.config import ServerConfig
from edge.fleet.receipts import pack_receipt
from edge.fleet.heads import delta_topic, global_topic, request_topic
from edge.fleet.lanes import Lane, build_lanes, lane_aggregator
from edge.fleet.keys import load_private
from edge.fleet.publish import publish_head
from edge.fleet.store import open_store
from edge.fleet.trust import DeviceRegistry
from edge.mqttconn import make_client
from edge.observe import MetricsServer, RateLimitedLog, Registry

log = logging.getLogger("edge.fleet")


def _store_errors() -> tuple:
    errors = [sqlite3.Error, OSError, EdgeError]  # EdgeError: a PostgreSQL reconnect that failed
    try:
        import psycopg
    except ImportError:  # the PostgreSQL store is optional; without it, none of its errors can occur
        return tuple(errors)
    return tuple(errors + [psycopg.Error])


STORE_ERRORS = _store_errors()  # retried with the batch kept; anything else is one bad message


@dataclass(frozen=True)
class Delivery:
    """One received delta, kept until its batch is stored and it is acknowledged."""

    topic: str
    payload: bytes
    mid: int
    qos: int


def build_aggregator(cfg: ServerConfig, *, store=None) -> Aggregator:
    """The aggregator a server config describes (model resolved, key loaded, store opened)."""
    from edge.errors import ConfigError
    from edge.zoo import resolve_model

    s = cfg.server
    if not s.key_file:
        raise ConfigError("[server] key_file is required: the server signs every global head (edge keys create NAME --role server)")
    return lane_aggregator(cfg, resolve_model(s.model), store=store or open_store(s.store), key=load_private(s.key_file),
                           registry=DeviceRegistry(s.devices_dir or None))


class FleetServer:
    """One server instance: ``start()`` connects and runs; ``stop()`` undoes it."""

    def __init__(self, cfg: ServerConfig, *, aggregator: Aggregator | None = None):
        self.cfg = cfg
        s = cfg.server
        self.agg = aggregator or build_aggregator(cfg)
        model = self.agg.expected.model
        share = f"$share/{s.group}/" if s.group else ""
        self.delta_filter = share + delta_topic(s.topic_prefix, s.fleet, model, "+")
        self.request_filter = share + request_topic(s.topic_prefix, s.fleet, model, "+")
        self.lane_request_filter = share + request_topic(s.topic_prefix, s.fleet, model, "+", "+")
        self._request_prefix = request_topic(s.topic_prefix, s.fleet, model, "")
        self.global_topic = global_topic(s.topic_prefix, s.fleet, model)
        self.queue: collections.deque[Delivery] = collections.deque()
        self.capacity = s.queue
        self._batch: list[Delivery] = []  # taken from the queue, not yet stored: retried as is
        self.counters = collections.Counter()
        self.lanes = build_lanes(cfg, self.agg)
        self.lanes.refresh()  # a restarted server serves the stored releases' lanes from its first delta
        self.store_error = ""  # why the last store attempt failed; "" while storing works
        self._failures = 0
        self._redeliver = False  # deliveries were left unacknowledged: reconnect once drained
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._rl = RateLimitedLog(log)
        self.thread = threading.Thread(target=self._run, name="fleet-aggregator", daemon=True)
        # the daemon's connection factory: the resolved password_file, TLS policy, session and
        # manual acks; Receive Maximum = the queue, so the broker never sends more than it holds
        # In a group (scale-out) the session ends with the instance (clean start, expiry 0): a
        # stored session keeps its share of the group, and the broker routes deltas to it while
        # it is down (or for good). What was in flight to it then is not stranded: devices send
        # a delta again until a signed receipt says it is stored (edge.fleet.courier). Alone,
        # the session persists, and the broker keeps the deltas for its restart.
        self.conn = make_client(cfg.mqtt, client_id=cfg.mqtt.client_id or s.name, manual_ack=True,
                                receive_maximum=min(s.queue, 0xFFFF), session_expiry_s=0 if s.group else None)
        c = self.conn.client
        c.on_connect, c.on_disconnect, c.on_message = self._on_connect, self._on_disconnect, self._on_message
        c.on_unsubscribe = self._on_unsubscribe
        self._unsubacks, self._unsubacked = threading.Condition(), collections.deque(maxlen=16)
        self.client = c
        self.metrics_server: MetricsServer | None = None
        # model releases (edge.fleet.release): chunks, reports and the rollout, on its own thread
        from edge.fleet.release import ReleaseService

        self.releases = ReleaseService(cfg, client=c, registry=self.agg.trust, model=model, share=share)

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self.conn.connect_async(self.cfg.mqtt)
        self.client.loop_start()
        self.thread.start()
        self.releases.start()
        if self.cfg.metrics.port:
            self.metrics_server = MetricsServer(self.cfg.metrics.host, self.cfg.metrics.port, self.registry(), self.health)
            self.metrics_server.start()
            log.info("fleet server metrics on http://%s:%d/metrics", self.cfg.metrics.host, self.metrics_server.port)

    def stop(self, *, drain_s: float = 10.0) -> None:
        if self.cfg.server.group:
            self._hand_back(drain_s)
        self._stop.set()
        self._wake.set()
        self.thread.join(10)
        self.releases.stop()
        if not self.thread.is_alive():  # the lanes' stores are the aggregator thread's
            for lane in self.lanes.snapshot()[1:]:
                lane.close()
        self._disconnect()
        if self.metrics_server:
            self.metrics_server.stop()

    def _hand_back(self, drain_s: float) -> None:
        """Scale-down: leave the group first (the broker sends the group's deltas to the
        other instances from its UNSUBACK on), then store and acknowledge what this instance
        already holds (bounded), so that nothing waits for an instance that is gone."""
        if not self.connected.is_set():
            return
        try:
            rc, mid = self.client.unsubscribe([self.delta_filter, self.request_filter, self.lane_request_filter]
                                              + self.releases.filters)
        except (ValueError, RuntimeError):
            return
        with self._unsubacks:
            left = rc == mqtt.MQTT_ERR_SUCCESS and self._unsubacks.wait_for(
                lambda: mid in self._unsubacked or not self.connected.is_set(), 2.0)
        deadline = time.monotonic() + drain_s
        while (self.queue or self._batch) and self.thread.is_alive() and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.02)  # the aggregator thread drains; this only polls for the end
        self.counters["handed_back"] += 1 if left else 0
        log.info("fleet server %s left group %s (%s); %d deliveries left unstored", self.cfg.server.name,
                 self.cfg.server.group, "acknowledged" if left else "no UNSUBACK", len(self.queue) + len(self._batch))

    def _disconnect(self) -> None:
        # acks written but not yet read by the broker die with the connection (a close with
        # unread input resets it), and the broker sends those deltas again. The broker answers
        # packets in order, so its UNSUBACK to a dummy unsubscribe means it has every earlier
        # ack: wait for that (bounded) before disconnecting.
        if self.connected.is_set():
            try:
                rc, mid = self.client.unsubscribe(f"$edge-barrier/{self.cfg.server.name}")
            except (ValueError, RuntimeError):
                rc, mid = mqtt.MQTT_ERR_NO_CONN, None
            with self._unsubacks:  # the answer may have come before unsubscribe returned
                done = rc == mqtt.MQTT_ERR_SUCCESS and self._unsubacks.wait_for(
                    lambda: mid in self._unsubacked or not self.connected.is_set(), 2.0)
            if not done:
                self.counters["ack_barrier_timeouts"] += 1
        self.client.disconnect()
        self.client.loop_stop()

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
        client.subscribe([(self.delta_filter, 1), (self.request_filter, 1), (self.lane_request_filter, 1)]
                         + [(f, 1) for f in self.releases.filters])
        self.releases.connected()
        self.counters["connects"] += 1
        self.connected.set()
        for lane in self.lanes.snapshot():
            lane.published = -1  # (re)publish every lane's latest version after every connect
        self._wake.set()
        log.info("fleet server %s subscribed to %s and %s", self.cfg.server.name, self.delta_filter, self.request_filter)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:
        self.connected.clear()
        with self._unsubacks:  # nobody waits for an answer that cannot come
            self._unsubacks.notify_all()

    def _on_unsubscribe(self, client, userdata, mid, reason_codes=None, properties=None) -> None:
        with self._unsubacks:
            self._unsubacked.append(mid)
            self._unsubacks.notify_all()

    def _on_message(self, client, userdata, msg) -> None:
        if self.releases.offer(msg):  # a chunk request or a report: the release service's
            return
        if msg.topic.startswith(self._request_prefix):
            # any message asks for its lane's head (request/<node>[/<lane>]); answered on the
            # aggregator thread, rate-limited; a lane this server does not have is not answered
            lane = self.lanes.by_key(msg.topic[len(self._request_prefix):].partition("/")[2])
            self.counters["head_requests" if lane is not None else "head_requests_unknown_lane"] += 1
            if lane is not None:
                lane.head_requested = True
            self._ack(msg.mid, msg.qos)
            self._wake.set()
            return
        if len(msg.payload) > self.cfg.mqtt.max_payload_bytes:
            self.counters["too_large"] += 1  # cannot ever be handled: taken, so it never comes back
            self._rl.warn("too_large", "a %d-byte delta is over [mqtt] max_payload_bytes: dropped", len(msg.payload))
            self._ack(msg.mid, msg.qos)
            return
        if len(self.queue) + len(self._batch) >= self.capacity:
            # backpressure: a QoS 1 delivery is left unacknowledged, so the broker keeps it for
            # this session and sends it again at the next connect (after the queue drained);
            # a QoS 0 one carries no promise and is dropped, counted
            if msg.qos:
                self.counters["held_unacked"] += 1
                self._redeliver = True
            else:
                self.counters["dropped_qos0"] += 1
            self._rl.warn("queue_full", "fleet server queue full (%d): deliveries wait at the broker", self.capacity)
            return
        self.queue.append(Delivery(topic=msg.topic, payload=msg.payload, mid=msg.mid, qos=msg.qos))
        if len(self.queue) + len(self._batch) >= self.capacity:
            self.counters["backpressure"] += 1  # full now: the broker holds what comes next
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
                    self.lanes.maybe_refresh()
                    self._clear_dropped()
                    self._commit_and_publish()
                self._cleared()
            except Exception as e:  # a store hiccup must not end the server: retried with backoff, on /healthz
                self._failed(e)

    def _drain(self) -> None:
        q = self.queue
        while q or self._batch:
            if not self._batch:
                self._batch = [q.popleft() for _ in range(min(512, len(q)))]
            batch = self._batch
            answers = []  # each lane's part of the batch, stored in its own store; a retry stores it again as resent
            for lane, part in self.lanes.split(batch, lambda d: d.payload):
                verdicts = [v for v in self._ingest(lane.agg, part) if v is not None]
                receipts = lane.agg.receipts(verdicts)  # one per verdict with a receipted node, in order
                topics = [self.lanes.receipt_topic(lane, v) for v in verdicts if receipted_node(v) is not None]
                answers.append((lane, list(zip(topics, receipts))))
            self._batch = []
            self._cleared()  # stored: healthy again before anyone hears of it
            self.counters["received"] += len(batch)
            for lane, receipts in answers:
                self._send_receipts(lane, receipts)
            for d in batch:
                self._ack(d.mid, d.qos)  # only now: the batch is in the store
            self._commit_and_publish()  # a new version, or a new epoch, goes out at once
        if self._redeliver and self.connected.is_set():
            self._reconnect()

    def _commit_and_publish(self) -> None:
        for lane in self.lanes.snapshot():
            lane.agg.maybe_commit()
            self._publish_latest(lane)

    def _clear_dropped(self) -> None:
        """A dropped lane's retained head is cleared, so no device starts from a head nobody updates."""
        for lane in self.lanes.take_dropped():
            if self.connected.is_set():
                self.client.publish(lane.global_topic, b"", qos=1, retain=True)

    def _ingest(self, agg: Aggregator, batch: list[Delivery]) -> list:
        """The batch's verdicts. A store error propagates (the batch is kept and retried). Any
        other error is one message the aggregator cannot handle: each is then tried alone,
        and one that fails alone is counted, logged and taken (``None``: no receipt), so that
        it cannot stall the stream behind it."""
        try:
            return agg.ingest([(d.topic, d.payload) for d in batch])
        except STORE_ERRORS:
            raise
        except Exception as e:
            if len(batch) == 1:
                self.counters["ingest_errors"] += 1
                self._rl.warn("ingest", "a %d-byte delta on %s could not be handled, taken: %s: %s",
                              len(batch[0].payload), batch[0].topic[:100], type(e).__name__, str(e)[:200])
                return [None]
        return [v for d in batch for v in self._ingest(agg, [d])]

    def _reconnect(self) -> None:
        # the broker sends an unacknowledged delivery again only at a new connection of the
        # session: drained, reconnect so that what waited there comes back
        self._redeliver = False
        self.counters["redeliver_reconnects"] += 1
        log.info("fleet server queue drained after backpressure: reconnecting for the held deliveries")
        self._disconnect()
        # what came in since the drain is unacknowledged too: the broker sends it again, so
        # keeping it here as well would only handle it twice
        self.counters["left_to_broker"] += len(self.queue)
        self.queue.clear()
        self.conn.connect_async(self.cfg.mqtt)
        self.client.loop_start()

    def _send_receipts(self, lane: Lane, receipts) -> None:
        for topic, r in receipts:
            info = self.client.publish(topic, pack_receipt(r, lane.agg.key), qos=1)
            # "no connection": paho keeps a QoS 1 message and sends it after the reconnect
            if info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                self.counters["receipts"] += 1
            else:
                self.counters["receipt_errors"] += 1

    def _failed(self, e: Exception) -> None:
        self._failures += 1
        self.counters["store_errors"] += 1
        self.store_error = f"{type(e).__name__}: {str(e)[:200]}"
        self._rl.warn("store", "fleet store failed (attempt %d; retrying): %s", self._failures, self.store_error)
        self._stop.wait(min(0.1 * 2 ** min(self._failures - 1, 6), 5.0))  # 0.1 s doubling, at most 5 s
        self._wake.set()

    def _cleared(self) -> None:
        if self.store_error:
            log.info("fleet store works again after %d failed attempts", self._failures)
        self.store_error, self._failures = "", 0

    def _publish_latest(self, lane: Lane) -> None:
        """A lane's latest head, retained on its topic: when it is newer than what this
        instance published, when a device asked (at most once a second), and every
        ``[server] republish_s``."""
        if not self.connected.is_set():
            return
        now = time.monotonic()
        requested = lane.head_requested and now - lane.last_request_publish >= 1.0
        periodic = now - lane.last_publish >= self.cfg.server.republish_s
        latest = lane.agg.store.latest()
        if latest is None or not (latest.version > lane.published or requested or periodic):
            return
        if requested:
            lane.head_requested = False
            lane.last_request_publish = now
            self.counters["republished_on_request"] += 1
        elif periodic and latest.version <= lane.published:
            self.counters["republished_periodic"] += 1
        head, acked = publish_head(self.client, lane.global_topic, lane.agg.store)
        if head is None:
            return
        if not acked:
            self.counters["publish_unacked"] += 1
        lane.published = head.version
        lane.last_publish = now
        self.counters["published"] += 1

    @property
    def published(self) -> int:
        """The default lane's version this instance last published (-1: none since the connect)."""
        return self.lanes.default.published

    # ---- introspection ----------------------------------------------------------------------
    def health(self) -> tuple[bool, dict]:
        alive, connected, store_ok = self.thread.is_alive(), self.connected.is_set(), not self.store_error
        ok = alive and connected and store_ok
        info = {"ready": ok, "broker_connected": connected, "version": self.agg.current,
                "queue": len(self.queue) + len(self._batch), "store_ok": store_ok,
                "lanes": {lane.key or "default": lane.agg.current for lane in self.lanes.snapshot()}}
        if not ok:
            info["reason"] = ("aggregator thread died" if not alive else "not connected to the broker" if not connected
                              else f"storing fails ({self._failures} attempts): {self.store_error}")
        return ok, info

    def registry(self) -> Registry:
        reg = Registry()
        a = self.agg

        def total(name: str):  # every lane's count (the lanes' own: edge_fleet_lane_*)
            return lambda: sum(lane.agg.counters[name] for lane in self.lanes.snapshot())

        def rejected():
            out = collections.Counter()
            for lane in self.lanes.snapshot():
                out.update(lane.agg.rejected)
            return [({"reason": r}, n) for r, n in out.items()]

        def per_lane(value):
            return lambda: [({"lane": lane.key or "default", "release": lane.release}, value(lane))
                            for lane in self.lanes.snapshot()]

        reg.add("edge_fleet_deltas_accepted_total", "counter", "deltas accepted and stored, every lane", total("accepted"))
        reg.add("edge_fleet_deltas_rejected_total", "counter", "deltas rejected, by reason, every lane", rejected)
        reg.add("edge_fleet_deltas_applied_total", "counter", "deltas applied into a version, every lane", total("applied"))
        reg.add("edge_fleet_versions_total", "counter", "versions committed by this instance, every lane", total("versions"))
        reg.add("edge_fleet_version", "gauge", "latest global version of this server's own model known to this instance",
                lambda: a.current)
        reg.add("edge_fleet_lane_version", "gauge", "latest global version of each lane (edge.fleet.lanes)",
                per_lane(lambda lane: lane.agg.current))
        reg.add("edge_fleet_lanes_total", "counter", "lane changes, by event (opened, dropped, refreshes, errors)",
                lambda: [({"event": k}, v) for k, v in self.lanes.counters.items()])
        reg.add("edge_fleet_queue_depth", "gauge", "received deltas waiting for validation",
                lambda: len(self.queue) + len(self._batch))
        reg.add("edge_fleet_store_ok", "gauge", "1 while storing works, 0 while it fails (retried)",
                lambda: float(not self.store_error))
        reg.add("edge_fleet_server_total", "counter", "server counters, by name",
                lambda: [({"name": k}, v) for k, v in self.counters.items()])
        reg.add("edge_fleet_mqtt_connected", "gauge", "1 while connected to the broker", lambda: float(self.connected.is_set()))
        for family in a.trust.metric_families() + self.releases.metric_families():
            reg.add(*family)
        return reg
