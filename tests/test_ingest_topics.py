"""Topic routes: named levels, wildcards, and MQTT's matching rules."""
from __future__ import annotations

import pytest

from edge.ingest.topics import TopicRoute, topic_matches
from edge.ingest.types import StreamKey


@pytest.mark.parametrize("filt, topic, ok", [
    ("a/+/c", "a/b/c", True), ("a/+/c", "a/b/d", False), ("a/#", "a", True), ("a/#", "a/b/c", True),
    ("#", "$SYS/x", False), ("+/x", "$SYS/x", False), ("a/+", "a/b/c", False), ("a/b", "a/b", True),
])
def test_mqtt_matching_rules(filt, topic, ok):
    assert topic_matches(filt.split("/"), topic.split("/")) is ok


def test_named_levels_map_to_device_and_stream():
    r = TopicRoute("plant/{device}/vib/{stream}")
    assert r.subscription == "plant/+/vib/+"
    assert r.match("plant/press-7/vib/x") == StreamKey("press-7", "x")


def test_fixed_topic_uses_configured_names():
    r = TopicRoute("line1/accel", device="press-1", stream="accel")
    assert r.match("line1/accel") == StreamKey("press-1", "accel")
    assert TopicRoute("line1/#").match("line1/m3/a") == StreamKey("line1.m3.a", "default")
