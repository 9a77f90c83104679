"""The node's MQTT connection: subscribe sensor and label topics, publish results.

A thin shell around paho-mqtt (v2 callback API). paho's own network thread reads the
socket and calls ``on_message`` which only hands ``(topic, payload, received_at)`` to
the daemon's bounded queue; decoding happens on the pipeline thread. Availability is a
retained ``online`` on connect and a retained ``offline`` as last will and on clean
stop. paho reconnects with exponential backoff (``reconnect_min_s`` .. ``reconnect_max_s``)
and ``on_connect`` resubscribes, so a broker restart costs only the messages sent while
it was down.
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from typing import Callable

import paho.mqtt.client as mqtt

from edge.config import MqttConfig

log = logging.getLogger("edge.mqtt")

MessageHandler = Callable[[str, bytes, float], None]


class MqttLink:
    """One client for everything the node says and hears on the broker."""

    def __init__(self, cfg: MqttConfig, *, client_id: str, status_topic: str,
                 subscriptions: list[tuple[str, int]], on_message: MessageHandler):
        self.cfg = cfg
        self.status_topic = status_topic
        self.subscriptions = subscriptions
        self._handler = on_message
        self.connected = threading.Event()
        self._stopping = False
        self.counters = {"connects": 0, "disconnects": 0, "published": 0, "publish_errors": 0}
        proto = mqtt.MQTTv5 if cfg.protocol == "5" else mqtt.MQTTv311
        kw = {} if proto == mqtt.MQTTv5 else {"clean_session": True}
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=proto, **kw)
        if cfg.username:
            c.username_pw_set(cfg.username, cfg.password or None)
        if cfg.tls:
            c.tls_set(ca_certs=cfg.ca_file or None, certfile=cfg.cert_file or None,
                      keyfile=cfg.key_file or None, cert_reqs=ssl.CERT_REQUIRED)
        c.will_set(status_topic, b"offline", qos=1, retain=True)
        c.reconnect_delay_set(cfg.reconnect_min_s, cfg.reconnect_max_s)
        c.max_queued_messages_set(10_000)  # paho's own outgoing queue while disconnected
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self.client = c

    def start(self) -> None:
        """Connect in the background; paho keeps retrying until the broker answers."""
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s)
        self.client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def stop(self) -> None:
        """Say ``offline`` (retained), then disconnect cleanly."""
        self._stopping = True
        if self.connected.is_set():
            info = self.client.publish(self.status_topic, b"offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=2.0)
            except (RuntimeError, ValueError):
                pass  # not connected any more: the broker sends the will instead
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> bool:
        """Publish without blocking; False when paho refused it (queue full, no connection)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            self.counters["published"] += 1
            return True
        self.counters["publish_errors"] += 1
        return False

    # paho callbacks (run on paho's network thread)
    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            log.warning("broker %s:%d refused the connection: %s", self.cfg.host, self.cfg.port, reason_code)
            return
        self.counters["connects"] += 1
        sock = client.socket()
        if sock is not None and hasattr(sock, "setsockopt"):
            # predictions are small packets: without this, Nagle holds one back until the
            # broker's delayed ACK of the previous one (~40 ms)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
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
        self._handler(msg.topic, msg.payload, time.time())
