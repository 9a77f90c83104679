"""One factory for every paho MQTT connection: the daemon's ``MqttLink`` and the fleet server.

Both must apply the same rules (protocol, credentials, TLS with certificate checks,
reconnect backoff, manual acknowledgement, persistent sessions), so both build their
client here (STYLE 18) instead of each keeping its own copy. ``cfg.password`` is used as
the config loader resolved it: the loaders read ``[mqtt] password_file`` into it, so the
factory never reads files and never sees which of the two keys was set.

``make_client`` returns the client and the keyword arguments for ``connect_async`` (the
MQTT 5 Clean Start flag and CONNECT properties, or nothing for 3.1.1, whose Clean Session
flag is a constructor argument). In MQTT 5 the CONNECT always says a Maximum Packet Size
derived from ``[mqtt] max_payload_bytes`` (``mqttwire.max_packet_size``), as the raw
sensor reader's does.

>>> from edge.config import MqttConfig
>>> conn = make_client(MqttConfig(session_expiry_s=60), client_id="doc", receive_maximum=16)
>>> conn.connect_kw["clean_start"], conn.connect_kw["properties"].SessionExpiryInterval
(False, 60)
>>> conn.connect_kw["properties"].ReceiveMaximum
16
>>> conn.connect_kw["properties"].MaximumPacketSize == max_packet_size(MqttConfig().max_payload_bytes)
True
"""
from __future__ import annotations

import ssl
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.config import MqttConfig
from edge.ingest.mqttwire import max_packet_size


@dataclass(frozen=True)
class Will:
    """The last will: what the broker publishes for a client that vanishes."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass
class Connection:
    """A configured, not yet connected paho client and what ``connect_async`` needs besides host and port."""

    client: mqtt.Client
    connect_kw: dict = field(default_factory=dict)

    def connect_async(self, cfg: MqttConfig) -> None:
        self.client.connect_async(cfg.host, cfg.port, keepalive=cfg.keepalive_s, **self.connect_kw)


def make_client(cfg: MqttConfig, *, client_id: str, will: Will | None = None, manual_ack: bool = True,
                session_expiry_s: int | None = None, receive_maximum: int = 0) -> Connection:
    """A paho client for ``cfg``: protocol, credentials, TLS (certificates required), will,
    reconnect delays and manual acks (QoS 1 deliveries are acknowledged by the caller once
    handled, so that what it could not handle comes again). ``session_expiry_s`` overrides
    ``cfg.session_expiry_s`` (0: clean sessions). ``receive_maximum`` (MQTT 5, 1..65535) caps
    the unacknowledged QoS 1 deliveries the broker sends at once: the caller's backpressure."""
    expiry = cfg.session_expiry_s if session_expiry_s is None else session_expiry_s
    persistent = expiry > 0
    proto = mqtt.MQTTv5 if cfg.protocol == "5" else mqtt.MQTTv311
    kw = {} if proto == mqtt.MQTTv5 else {"clean_session": not persistent}
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=proto, manual_ack=manual_ack, **kw)
    if cfg.username:
        c.username_pw_set(cfg.username, cfg.password or None)
    if cfg.tls:
        c.tls_set(ca_certs=cfg.ca_file or None, certfile=cfg.cert_file or None,
                  keyfile=cfg.key_file or None, cert_reqs=ssl.CERT_REQUIRED)
    if will is not None:
        c.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
    c.reconnect_delay_set(cfg.reconnect_min_s, cfg.reconnect_max_s)
    connect_kw: dict = {}
    if proto == mqtt.MQTTv5:
        props = Properties(PacketTypes.CONNECT)
        # bounded before buffered: the broker drops (for us) a message we would refuse anyway,
        # instead of paho reading all of it into memory first. 3.1.1 cannot say this: there
        # only the broker's own limit protects (deploy/mosquitto/, max_packet_size).
        props.MaximumPacketSize = max_packet_size(cfg.max_payload_bytes)
        if persistent:
            props.SessionExpiryInterval = expiry
        if receive_maximum:
            props.ReceiveMaximum = max(1, min(int(receive_maximum), 0xFFFF))
        connect_kw = {"clean_start": not persistent, "properties": props}
    return Connection(client=c, connect_kw=connect_kw)
