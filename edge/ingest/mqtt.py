"""The node's MQTT connection: subscribe sensor and label topics, publish results.

A thin shell around paho-mqtt (v2 callback API). paho's own network thread reads the
socket and calls ``on_message`` which only hands ``(topic, payload, received_at)`` to
the daemon's bounded queue; decoding happens on the pipeline thread. An exception from
that handler is counted (``handler_errors``) and logged, rate-limited and bounded; it
never reaches paho, whose thread would die of it. Availability is a retained ``online``
on connect and a retained ``offline`` as last will and on clean stop. paho reconnects
with exponential backoff (``reconnect_min_s`` .. ``reconnect_max_s``) and ``on_connect``
resubscribes.

**Session.** With ``[mqtt] session_expiry_s`` > 0 the session is persistent (MQTT 5:
Clean Start 0 and a Session Expiry Interval; 3.1.1: Clean Session 0) under the stable
client id, so QoS 1 messages for the node (labels) published while it reconnects are
queued by the broker and delivered when it is back (``sessions_resumed``; a reconnect that
finds the session gone counts ``sessions_lost``). paho acknowledges a message once
``on_message`` returned, which is after the hand-off to the daemon's queue.

**Publishing.** ``publish`` never raises and never blocks. It returns True when paho
took the message and False when it refused it; each refusal is counted in
``counters["publish_errors"]`` and by reason in ``publish_errors``:

- ``invalid_topic``: empty, a ``+``/``#`` wildcard, a NUL, or not encodable as UTF-8
  (checked here: paho would raise, or send what the broker drops us for);
- ``too_long_topic``: more than 65,535 bytes in UTF-8;
- ``queue_full``: ``max_queued`` (``[queues] publish``) is reached. Two bounds of that
  size: QoS 1 messages paho holds (in flight, or waiting for a reconnect), and QoS 0
  messages paho took but has not yet written to the socket (a broker or network that
  does not keep up). The new message is refused and the queued ones are kept: paho has
  no drop-oldest, and the oldest of a QoS 1 queue may already be on the wire;
- ``no_connection``: a QoS 0 message while disconnected (paho does not queue QoS 0);
- ``other``: any other refusal or error from paho (a payload over 256 MiB, ...).

A QoS 1 message published while disconnected is queued by paho (it answers "no
connection" but keeps it) and sent after the reconnect; that counts as taken
(``queued_offline`` counts those too). A QoS 0 message paho took but had not written
when the connection broke is dropped by paho at the reconnect; those are counted in
``qos0_lost`` (they were counted in ``published`` when taken).
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from typing import Callable

import paho.mqtt.client as mqtt

from edge.config import MqttConfig
from edge.ingest.fastmqtt import describe_error
from edge.mqttconn import Will, make_client
from edge.observe import RateLimitedLog

log = logging.getLogger("edge.mqtt")

MessageHandler = Callable[[str, bytes, float], None]
PUBLISH_ERRORS = ("invalid_topic", "too_long_topic", "queue_full", "no_connection", "other")
_MAX_TOPIC_BYTES = 0xFFFF
_STOP_WAIT_S = 2.0  # longest stop() waits for the retained "offline" to be acknowledged


def topic_problem(topic: object) -> str | None:
    """Why ``topic`` cannot be published to (a ``PUBLISH_ERRORS`` reason), or None when it can.

    >>> topic_problem("edge/n1/predictions/m1/accel") is None
    True
    >>> [topic_problem(t) for t in ("", "a/+/b", "a/#", "x" * 70_000, "\\ud800")]
    ['invalid_topic', 'invalid_topic', 'invalid_topic', 'too_long_topic', 'invalid_topic']
    """
    if not isinstance(topic, str) or not topic or "+" in topic or "#" in topic or "\x00" in topic:
        return "invalid_topic"
    try:
        n = len(topic.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate
        return "invalid_topic"
    return "too_long_topic" if n > _MAX_TOPIC_BYTES else None


class MqttLink:
    """One client for everything the node says and hears on the broker.

    ``max_queued`` bounds paho's QoS 1 outgoing queue (the daemon passes ``[queues] publish``).
    """

    def __init__(self, cfg: MqttConfig, *, client_id: str, status_topic: str,
                 subscriptions: list[tuple[str, int]], on_message: MessageHandler, max_queued: int = 10_000):
        if max_queued < 1:
            raise ValueError(f"max_queued must be >= 1, not {max_queued}")
        self.cfg = cfg
        self.status_topic = status_topic
        self.subscriptions = subscriptions
        self.max_queued = max_queued
        self._handler = on_message
        self.connected = threading.Event()
        self._stopping = False
        self.counters = {"connects": 0, "disconnects": 0, "published": 0, "publish_errors": 0,
                         "queued_offline": 0, "qos0_lost": 0, "sessions_resumed": 0, "sessions_lost": 0,
                         "handler_errors": 0, "held_unacked": 0}
        self.publish_errors = dict.fromkeys(PUBLISH_ERRORS, 0)
        self._lock = threading.Lock()  # publish() is called from several threads (pipeline, learner, events)
        self._intake = threading.Lock()  # hold() waits for a message being handed on
        self._held = False
        self._unsent0: deque = deque()  # MQTTMessageInfo of QoS 0 publishes paho took, oldest first
        self._badlog = RateLimitedLog(log)
        # one factory builds every connection (protocol, credentials, TLS, will, backoff);
        # QoS 1 messages are acknowledged by _on_message once handed on, not by paho before
        conn = make_client(cfg, client_id=client_id, will=Will(status_topic, b"offline"), manual_ack=True)
        c = conn.client
        c.max_queued_messages_set(max_queued)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self.client = c
        self._connect_kw: dict = conn.connect_kw

    def start(self) -> None:
        """Connect in the background; paho keeps retrying until the broker answers."""
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s, **self._connect_kw)
        self.client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def hold(self) -> None:
        """From now on take no message: each is left unacknowledged (``held_unacked``), so
        that the broker sends it again when this session reconnects (the next start),
        instead of it being taken while nothing can handle it any more. Waits for a
        message being handed on. The daemon holds its link before the pipeline's last
        drain at stop; publishing goes on."""
        with self._intake:
            self._held = True

    def stop(self) -> None:
        """Say ``offline`` (retained), then disconnect; bounded (about 2 s) when the broker is gone."""
        self._stopping = True
        if self.connected.is_set():
            try:
                info = self.client.publish(self.status_topic, b"offline", qos=1, retain=True)
                info.wait_for_publish(timeout=_STOP_WAIT_S)
            except (RuntimeError, ValueError):
                pass  # not connected any more: the broker sends the will instead
        self.client.disconnect()  # also ends a reconnect wait at once
        self.client.loop_stop()

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> bool:
        """Publish without blocking; False (counted by reason) when it was refused. Never raises."""
        with self._lock:
            why = topic_problem(topic)
            if why is None and qos == 0 and self._qos0_backlog() >= self.max_queued:
                why = "queue_full"
            if why is None:
                try:
                    info = self.client.publish(topic, payload, qos=qos, retain=retain)
                except Exception as e:  # ValueError/TypeError: bad qos, a payload paho cannot encode or too large
                    self._badlog.warn("publish", "publish to a %d-character topic refused: %s", len(topic),
                                      describe_error(e))
                    why = "other"
                else:
                    rc = info.rc
                    if rc == mqtt.MQTT_ERR_SUCCESS:
                        self.counters["published"] += 1
                        if qos == 0:
                            self._unsent0.append(info)
                        return True
                    if rc == mqtt.MQTT_ERR_NO_CONN and qos > 0:  # paho keeps it and sends it after the reconnect
                        self.counters["published"] += 1
                        self.counters["queued_offline"] += 1
                        return True
                    why = {mqtt.MQTT_ERR_QUEUE_SIZE: "queue_full", mqtt.MQTT_ERR_NO_CONN: "no_connection"}.get(rc, "other")
            self.counters["publish_errors"] += 1
            self.publish_errors[why] += 1
            return False

    def _qos0_backlog(self) -> int:
        """QoS 0 messages paho took and has not written yet (paho writes them in order)."""
        q = self._unsent0
        while q:
            try:
                if not q[0].is_published():
                    break
            except (ValueError, RuntimeError):  # paho gave up on it: the connection broke before it was written
                self.counters["qos0_lost"] += 1
            q.popleft()
        return len(q)

    # paho callbacks (run on paho's network thread)
    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            log.warning("broker %s:%d refused the connection: %s", self.cfg.host, self.cfg.port, reason_code)
            return
        self.counters["connects"] += 1
        if getattr(flags, "session_present", False):
            self.counters["sessions_resumed"] += 1
        elif self.cfg.session_expiry_s and self.counters["connects"] > 1:
            self.counters["sessions_lost"] += 1  # the broker restarted without persistence, or it expired
            log.warning("broker %s:%d no longer had the node's session: QoS 1 messages queued for it are lost",
                        self.cfg.host, self.cfg.port)
        sock = client.socket()
        if sock is not None and hasattr(sock, "setsockopt"):
            # predictions are small packets: without this, Nagle holds one back until the
            # broker's delayed ACK of the previous one (~40 ms)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        with self._lock:
            self._qos0_backlog()  # paho dropped the unwritten QoS 0 messages at this reconnect: count them now
        if self.subscriptions:
            client.subscribe(self.subscriptions)
        client.publish(self.status_topic, b"online", qos=1, retain=True)
        log.info("connected to %s:%d (MQTT %s); subscribed to %s", self.cfg.host, self.cfg.port,
                 self.cfg.protocol, ", ".join(t for t, _ in self.subscriptions) or "nothing")
        self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if was and not self._stopping:
            self.counters["disconnects"] += 1
            log.warning("disconnected from broker (%s); reconnecting with backoff", reason_code)

    def _on_message(self, client, userdata, msg) -> None:
        with self._intake:
            if self._held:  # not acknowledged: the broker keeps it for this session
                self.counters["held_unacked"] += 1
                return
            try:
                self._handler(msg.topic, msg.payload, time.time())
            except Exception as e:  # an escaping exception would end paho's network thread
                self.counters["handler_errors"] += 1
                self._badlog.warn("handler", "message handler failed on a %d-byte message: %s",
                                  len(msg.payload), describe_error(e))
        if msg.qos:  # handed on, or refused as bad: a message that cannot be handled must not come back
            client.ack(msg.mid, msg.qos)
