"""Home Assistant MQTT discovery for the daemon's streams (``[mqtt] ha_discovery = true``).

One retained config message per stream on
``<ha_prefix>/sensor/<node>_<device>_<stream>/config`` makes the stream's prediction a
sensor in Home Assistant, with the scores as attributes and the node's retained
``online``/``offline`` status as its availability, as Zigbee2MQTT and ESPHome announce
their devices.
"""
from __future__ import annotations

import re

import orjson

_OBJECT_ID = re.compile(r"[^A-Za-z0-9_-]")


def discovery_message(cfg, manifest, key) -> tuple[str, bytes]:
    """``(topic, payload)`` of the discovery config of stream ``key``.

    >>> from edge.config import Config
    >>> from edge.ingest.types import StreamKey
    >>> class M: name, version, task = "vibration", "1.0.0", "classification"
    >>> topic, payload = discovery_message(Config(), M, StreamKey("press:7", "accel"))
    >>> topic
    'homeassistant/sensor/edge-01_press_7_accel/config'
    """
    node = cfg.node.name
    base = cfg.topic_base
    object_id = _OBJECT_ID.sub("_", f"{node}_{key.device}_{key.stream}")
    state = f"{base}/predictions/{key.device}/{key.stream}"
    value = "{{ value_json.prediction }}" if manifest.task == "classification" else "{{ value_json.prediction[0] }}"
    msg = {"name": f"{key.device} {key.stream} {manifest.name}", "unique_id": f"edge_{object_id}",
           "object_id": object_id, "state_topic": state, "value_template": value, "json_attributes_topic": state,
           "availability_topic": f"{base}/status", "payload_available": "online", "payload_not_available": "offline",
           "device": {"identifiers": [f"edge_{_OBJECT_ID.sub('_', node)}"], "name": f"edge {node}",
                      "model": f"{manifest.name} {manifest.version}", "manufacturer": "edge-runtime"}}
    return f"{cfg.mqtt.ha_prefix}/sensor/{object_id}/config", orjson.dumps(msg)


def announcer(cfg, manifest, publish):
    """The pipeline's ``on_stream`` callback: announce each new stream, retained at QoS 1,
    through ``publish(topic, payload, qos=, retain=)`` (the node's MQTT link)."""

    def announce(key) -> None:
        topic, payload = discovery_message(cfg, manifest, key)
        publish(topic, payload, qos=1, retain=True)

    return announce
