"""Fleet sync in the daemon: the sync client and its own MQTT connection, built from the config.

The connection (client id ``<client_id>-fleet``, status ``<prefix>/<node>/fleet/status``)
subscribes to the retained global head of its model's lane (``lane_of``), to this node's receipt topic (the server's
signed answer to each delta) and to ``<prefix>/<node>/fleet/sync`` (any message there
asks for a delta now). Deltas and head requests are published tracked
(``MqttLink.publish_tracked``): a delta counts as handed over only when the broker's
PUBACK carries a success code. Keeping it apart from the node's own connection means
sync traffic never queues behind predictions, and sync can be offline alone.
"""
from __future__ import annotations

from edge.fleet.client import SyncClient
from edge.fleet.keys import load_private, load_public
from edge.ingest.mqtt import MqttLink


def lane_of(cfg, model) -> str:
    """The fleet lane ``model`` syncs in (FORMAT.md "Lanes"): "" (the server's own model's,
    the topics of before lanes) while the configured ``[model]`` serves; the lane of its
    content hash once a switched release (``edge.deploy``) serves another model."""
    from edge.fleet.heads import lane_key
    from edge.zoo import resolve_model

    configured = resolve_model(cfg.model.path)
    if configured.path == model.path or configured.content_hash == model.content_hash:
        return ""
    return lane_key(model.content_hash)


class DeviceSync:
    """``SyncClient`` plus its MQTT link; ``start``/``stop``/``metrics`` for the daemon."""

    def __init__(self, *, cfg, worker, model, on_event):
        f = cfg.fleet
        base = cfg.topic_base
        self.sync_topic = f"{base}/fleet/sync"
        self.link: MqttLink | None = None
        self.client = SyncClient(worker=worker, node=cfg.node.name, fleet=f.fleet, model=model.manifest.name,
                                 model_hash=model.content_hash, key=load_private(f.key_file),
                                 server_keys=[load_public(f.server_key)], publish=self._publish,
                                 topic_prefix=f.topic_prefix, interval_s=f.interval_s, encoding=f.encoding,
                                 fraction=f.topk_fraction, min_samples=f.min_samples, on_event=on_event,
                                 connected=lambda: self.link is not None and self.link.connected.is_set(),
                                 lane=lane_of(cfg, model))
        self.link = MqttLink(cfg.mqtt, client_id=f"{cfg.mqtt.client_id or 'edge-' + cfg.node.name}-fleet",
                             status_topic=f"{base}/fleet/status",
                             subscriptions=[(self.client.global_topic, 1), (self.client.receipt_topic, 1),
                                            (self.sync_topic, 1)], on_message=self._on_message)

    def _publish(self, topic: str, payload: bytes, *, qos: int = 1):
        return self.link.publish_tracked(topic, payload)

    def _on_message(self, topic: str, payload: bytes, received_at: float) -> None:
        if topic == self.client.global_topic:
            self.client.on_global(payload)
        elif topic == self.client.receipt_topic:
            self.client.on_receipt(payload)
        elif topic == self.sync_topic:
            self.client.sync_now()

    def start(self) -> None:
        self.link.start()
        self.client.start()

    def stop(self) -> None:
        self.client.stop()
        self.link.stop()

    def metrics(self) -> dict:
        return self.client.metrics()
