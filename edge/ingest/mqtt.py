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

**Delivery.** "Taken" is not "delivered": an MQTT 5 broker answers a QoS 1 publish it
refuses (an ACL: 0x87 Not authorized, a quota, ...) with a PUBACK whose reason code is a
failure, and paho then marks the message published all the same (``is_published()`` is
True). Every such refusal is counted (``counters["publish_refused"]``, and by reason name
in ``publish_refused``) and logged, rate-limited, as a WARNING naming the code.
``publish_tracked`` publishes at QoS 1 and returns a ``Delivery`` that says when the
broker answered and whether it took the message, for a caller that must keep what was
not delivered (fleet sync's outbox). MQTT 3.1.1 has no reason codes: mosquitto acks a
refused publish there as a success, so only MQTT 5 can tell.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from collections import OrderedDict, deque
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
_EARLY_ACKS = 1024  # broker answers kept for a publish_tracked that has not registered its mid yet


class Delivery:
    """One QoS 1 publish of ``publish_tracked``: ``done`` once the broker answered it (PUBACK),
    ``ok`` when that answer's reason code is a success, ``reason`` its name (``"success"``,
    ``"not_authorized"``, ...; ``""`` until done), ``code`` its value and ``acked_at`` when
    it came (``time.monotonic()``).

    >>> d = Delivery(7, "fleet/f/m/delta/n1")
    >>> d.done, d.ok
    (False, False)
    >>> d._resolve(0x87, "not_authorized"); (d.done, d.ok, d.reason, hex(d.code))
    (True, False, 'not_authorized', '0x87')
    """

    __slots__ = ("mid", "topic", "code", "reason", "acked_at", "_done")

    def __init__(self, mid: int, topic: str):
        self.mid, self.topic, self.code, self.reason, self.acked_at = mid, topic, 0, "", 0.0
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def ok(self) -> bool:
        return self._done.is_set() and self.code < 0x80  # MQTT 5: reason codes from 0x80 up are failures

    def wait(self, timeout: float) -> bool:
        """Wait (bounded) until the broker answered; True when it did."""
        return self._done.wait(timeout)

    def _resolve(self, code: int, reason: str, at: float | None = None) -> None:
        self.code, self.reason, self.acked_at = int(code), reason, time.monotonic() if at is None else at
        self._done.set()


def reason_name(reason_code) -> str:
    """A paho ``ReasonCode`` as a counter label: ``Not authorized`` -> ``not_authorized``.

    >>> from paho.mqtt.reasoncodes import ReasonCode
    >>> from paho.mqtt.packettypes import PacketTypes
    >>> reason_name(ReasonCode(PacketTypes.PUBACK, identifier=0x87)), reason_name(None)
    ('not_authorized', 'success')
    """
    if reason_code is None:
        return "success"
    try:
        return str(reason_code.getName()).strip().lower().replace(" ", "_").replace("-", "_")[:40] or "unknown"
    except Exception:  # noqa: BLE001 - a reason code paho cannot name
        return f"code_{int(getattr(reason_code, 'value', 0)):#04x}"


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
                         "handler_errors": 0, "held_unacked": 0, "publish_refused": 0,
                         "subscribed": 0, "subscribe_refused": 0}
        self.publish_errors = dict.fromkeys(PUBLISH_ERRORS, 0)
        self.publish_refused: dict[str, int] = {}  # QoS 1 publishes the broker answered with a failure, by reason
        # publish_tracked's deliveries by mid, and answers that came before their mid was
        # registered (paho may handle the PUBACK before publish() has returned to us).
        # Lock order: paho holds its message lock while calling _on_publish, and publish()
        # takes that lock, so _dlock is never held around a paho call.
        self._dlock = threading.Lock()
        self._tracked: OrderedDict[int, Delivery] = OrderedDict()
        self._early: OrderedDict[int, tuple[float, int, str]] = OrderedDict()
        self._tracking = False  # no bookkeeping per publish until publish_tracked is used
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
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
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
        return self._publish(topic, payload, qos, retain) is not None

    def publish_tracked(self, topic: str, payload: bytes, *, retain: bool = False) -> Delivery | None:
        """Publish at QoS 1 without blocking and follow it to the broker's answer: a
        ``Delivery`` (``done``/``ok``/``reason``), or None when paho refused it (counted by
        reason like ``publish``). Never raises. A delivery paho never gets an answer for
        (it gave the message up) stays not done: the caller decides when to try again."""
        t0 = time.monotonic()
        self._tracking = True  # from now on _on_publish keeps early answers
        info = self._publish(topic, payload, 1, retain)
        if info is None:
            return None
        d = Delivery(info.mid, topic)
        with self._dlock:
            early = self._early.pop(info.mid, None)
            if early is not None and early[0] >= t0:  # answered before we got here: it is this message's
                d._resolve(early[1], early[2], early[0])
                return d
            self._tracked[info.mid] = d
            while len(self._tracked) > self.max_queued:  # paho holds at most that many: these were given up
                self._tracked.popitem(last=False)
        return d

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool):
        """``publish``'s work: paho's ``MQTTMessageInfo`` when it took the message, else None (counted)."""
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
                        return info
                    if rc == mqtt.MQTT_ERR_NO_CONN and qos > 0:  # paho keeps it and sends it after the reconnect
                        self.counters["published"] += 1
                        self.counters["queued_offline"] += 1
                        return info
                    why = {mqtt.MQTT_ERR_QUEUE_SIZE: "queue_full", mqtt.MQTT_ERR_NO_CONN: "no_connection"}.get(rc, "other")
            self.counters["publish_errors"] += 1
            self.publish_errors[why] += 1
            return None

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

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties=None) -> None:
        """The broker's answer to this connection's subscriptions (one SUBSCRIBE per connect):
        ``subscribed`` counts the answers; a topic the broker refused (its ACL, a bad filter:
        MQTT 5 names the reason, 3.1.1 says 0x80) is counted and logged, since nothing will
        ever arrive on it."""
        self.counters["subscribed"] += 1
        refused = [(topic, rc) for (topic, _), rc in zip(self.subscriptions, reason_codes or [])
                   if getattr(rc, "is_failure", False)]
        if refused:
            self.counters["subscribe_refused"] += len(refused)
            log.warning("broker %s:%d refused the subscription to %s", self.cfg.host, self.cfg.port,
                        ", ".join(f"{t} ({rc})" for t, rc in refused))

    def _on_publish(self, client, userdata, mid, reason_code, properties=None) -> None:
        """The broker's answer to a publish (paho calls this for QoS 0 once written, too)."""
        try:
            code = int(getattr(reason_code, "value", 0) or 0)
            name = "success" if code < 0x80 else reason_name(reason_code)
            d = None
            if self._tracking:
                with self._dlock:
                    d = self._tracked.pop(mid, None)
                    if d is None:
                        self._early[mid] = (time.monotonic(), code, name)
                        if len(self._early) > _EARLY_ACKS:
                            self._early.popitem(last=False)
            if code >= 0x80:  # refused: paho marks it published anyway; it was not delivered
                self.counters["publish_refused"] += 1
                self.publish_refused[name] = self.publish_refused.get(name, 0) + 1
                self._badlog.warn(f"refused:{name}", "the broker refused a QoS 1 publish%s (reason 0x%02X %s): "
                                  "not delivered", f" to {d.topic[:120]!r}" if d is not None else "", code, name)
            if d is not None:
                d._resolve(code, name)
        except Exception as e:  # noqa: BLE001 - an escaping exception would end paho's network thread
            self.counters["handler_errors"] += 1
            self._badlog.warn("on_publish", "handling a PUBACK failed: %s", describe_error(e))

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
