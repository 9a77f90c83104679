"""Publishing the signed global head, retained, in order across server instances.

One implementation for the server (``FleetServer._publish_latest``) and for ``fleet-server
rollback`` while servers run: ``publish_head`` publishes the newest committed version
under the store's publish lock and holds it until the broker's PUBACK, so that no
publisher's older head can follow a newer one on the retained topic.
"""
from __future__ import annotations

import threading

import paho.mqtt.client as mqtt

from edge.fleet.config import ServerConfig
from edge.fleet.heads import global_topic
from edge.fleet.store import VersionRecord
from edge.mqttconn import make_client


def publish_head(client, topic: str, store, *, timeout_s: float = 2.0) -> tuple[VersionRecord | None, bool]:
    """Publish the newest committed version retained (QoS 1) under the store's publish lock
    (one publisher at a time, across instances and a ``rollback``) and hold the lock until
    the broker's PUBACK: the broker then has it before anyone publishes again, so the
    retained head never goes back. Returns the version and whether the broker took it."""
    with store.publishing() as head:
        if head is None:
            return None, False
        return head, publish_retained_acked(client, topic, head.message, timeout_s=timeout_s)


def publish_retained_acked(client, topic: str, payload: bytes, *, timeout_s: float = 2.0) -> bool:
    """Publish ``payload`` retained at QoS 1 and wait (bounded) for the broker's PUBACK;
    whether the broker took it. Called under a store's publish lock, so that the lock is held
    until the broker has the message and no older one can follow it."""
    info = client.publish(topic, payload, qos=1, retain=True)
    if info.rc != mqtt.MQTT_ERR_SUCCESS:
        return False
    try:
        info.wait_for_publish(timeout_s)
    except (ValueError, RuntimeError):  # the connection went meanwhile: paho sends it again
        pass
    return info.is_published()


def publish_once(cfg: ServerConfig, store, *, timeout_s: float = 10.0) -> tuple[VersionRecord | None, bool]:
    """``rollback``'s publish while servers run: its own clean connection, the newest head."""
    import os

    s = cfg.server
    conn = make_client(cfg.mqtt, client_id=f"{cfg.mqtt.client_id or s.name}-publish-{os.getpid()}", session_expiry_s=0)
    up = threading.Event()
    conn.client.on_connect = lambda c, u, f, rc, p=None: None if rc.is_failure else up.set()
    conn.connect_async(cfg.mqtt)
    conn.client.loop_start()
    try:
        if not up.wait(timeout_s):
            return store.latest(), False
        from edge.zoo import resolve_model

        topic = global_topic(s.topic_prefix, s.fleet, resolve_model(s.model).manifest.name)
        return publish_head(conn.client, topic, store, timeout_s=timeout_s)
    finally:
        conn.client.disconnect()
        conn.client.loop_stop()
