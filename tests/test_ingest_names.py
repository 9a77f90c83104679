"""The name rule for devices and streams from outside: every accepted name makes valid
MQTT topics, every rejected one raises ``DecodeError("bad_name")``, and the rule is
applied at each place a name enters (topic levels, labels, serial HELLO)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.client import Client as PahoClient

from edge.errors import DecodeError
from edge.ingest.names import MAX_NAME, check_name, is_valid_name
from edge.ingest.payload import decode_label
from edge.ingest.topics import TopicRoute
from edge.ingest.types import StreamKey

pytestmark = pytest.mark.timeout(60)
NOW = 1_700_000_000.0
ALPHABET = "ABCXYZabcxyz0189_.:-"
valid_names = st.text(st.sampled_from(ALPHABET), min_size=1, max_size=MAX_NAME).filter(lambda v: v not in (".", ".."))
anything = st.text(max_size=200) | st.text(st.sampled_from(ALPHABET + "/+#$\x00 é\n"), max_size=80)


def _assert_valid_publish_topic(topic: str) -> None:
    """paho's own publish check plus the MQTT 5 rules for a topic name."""
    raw = topic.encode("utf-8")
    PahoClient._raise_for_invalid_topic(raw)  # raises ValueError on wildcards or > 65535 bytes
    assert 0 < len(raw) <= 65535 and b"\x00" not in raw and "+" not in topic and "#" not in topic
    assert all(topic.split("/")) and not topic.startswith("$")


@settings(max_examples=500, deadline=None)
@given(dev=valid_names, stream=valid_names, node=st.sampled_from(["n1", "edge-node.7"]))
def test_every_valid_name_makes_a_valid_prediction_topic(dev, stream, node):
    assert check_name(dev, what="device") == dev and is_valid_name(stream)
    _assert_valid_publish_topic(f"edge/{node}/predictions/{dev}/{stream}")


@settings(max_examples=500, deadline=None)
@given(value=anything)
def test_a_name_is_either_valid_or_rejected_as_bad_name(value):
    if is_valid_name(value):
        assert check_name(value, what="device") == value
        _assert_valid_publish_topic(f"edge/n/predictions/{value}/s")
    else:
        with pytest.raises(DecodeError) as e:
            check_name(value, what="device")
        assert e.value.kind == "bad_name" and len(str(e.value)) < 200


@pytest.mark.parametrize("value", ["", "a/b", "+", "#", "x+", "$SYS", "a\x00b", "a b", "é", "x" * 65, "a\n",
                                   ".", "..", None, 7, b"abc", ["a"]])
def test_names_that_break_the_rule_are_rejected(value):
    assert not is_valid_name(value)
    with pytest.raises(DecodeError, match="not a valid name"):
        check_name(value, what="device")


def test_a_node_named_dot_dot_is_refused_and_its_state_folders_parent_is_left_alone(tmp_path):
    # "..": <state_dir>/.. would be the node's folder, and private_dir made the parent 0700
    import os

    from edge.config import load_config
    from edge.errors import ConfigError

    state = tmp_path / "parent" / "state"
    state.mkdir(parents=True)
    os.chmod(tmp_path / "parent", 0o755)
    cfg = tmp_path / "edge.toml"
    for name in ("..", "."):
        cfg.write_text(f'[node]\nname = "{name}"\nstate_dir = "{state}"\n[model]\npath = "vibration"\n')
        with pytest.raises(ConfigError, match=r"\[node\] name = '\.{1,2}' is invalid: .*not \. or \.\."):
            load_config(cfg)
    assert (os.stat(tmp_path / "parent").st_mode & 0o777) == 0o755


def test_a_str_subclass_is_returned_as_a_plain_str():
    class S(str):
        pass

    out = check_name(S("m1"), what="device")
    assert out == "m1" and type(out) is str


@settings(max_examples=300, deadline=None)
@given(dev=anything, stream=anything)
def test_topic_route_accepts_only_valid_captured_names(dev, stream):
    r = TopicRoute("s/{device}/{stream}")
    topic = f"s/{dev}/{stream}"
    if topic.count("/") != 2:
        return  # a level holding '/' is another topic shape, not a name
    try:
        key = r.match(topic)
    except DecodeError as e:
        assert e.kind == "bad_name" and not (is_valid_name(dev) and is_valid_name(stream))
        return
    if key is not None:
        assert key == StreamKey(dev, stream) and is_valid_name(dev) and is_valid_name(stream)


def test_topic_route_rejects_a_wildcard_or_overlong_device_level():
    r = TopicRoute("s/{device}/{stream}")
    for topic in ("s/a+b/x", "s/dev/" + "y" * 65_000, "s//x"):
        with pytest.raises(DecodeError) as e:
            r.match(topic)
        assert e.value.kind == "bad_name"


def test_a_topic_without_device_names_the_stream_by_its_levels():
    assert TopicRoute("plant/#").match("plant/l1/p7") == StreamKey("plant.l1.p7", "default")
    with pytest.raises(DecodeError) as e:
        TopicRoute("plant/#").match("plant/" + "z" * 100)
    assert e.value.kind == "bad_name"
    assert TopicRoute("plant/#", device="press").match("plant/" + "z" * 100) == StreamKey("press", "default")


@pytest.mark.parametrize("field", ["device", "stream"])
@pytest.mark.parametrize("value", ["a/b", "+", "#", "x" * 65, "$x"])
def test_a_label_naming_a_bad_device_or_stream_is_rejected(field, value):
    import orjson

    with pytest.raises(DecodeError) as e:
        decode_label(orjson.dumps({"label": "a", field: value}), now=NOW)
    assert e.value.kind == "bad_name"


def test_a_label_without_names_still_matches_any_stream():
    assert decode_label(b'{"label": "a", "device": "", "stream": ""}', now=NOW) == (NOW, "a", "", "")


# -- serial HELLO, through a real pty ------------------------------------------------------------

class _Sink:
    def __init__(self):
        import threading

        self.lock = threading.Lock()
        self.keys: list = []
        self.labels: list = []

    def push_samples(self, key, t, v):
        with self.lock:
            self.keys.append(key)

    def push_label(self, key, t, label):
        with self.lock:
            self.labels.append(key)


def _wait(cond, timeout=20.0):
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end and not cond():
        time.sleep(0.02)
    return cond()


def _serial_rig(device_id, **source_kw):
    import numpy as np

    from edge.ingest.serial import SerialSource
    from firmware_bridge.sim import FirmwareSim

    rng = np.random.default_rng(0)
    sim = FirmwareSim(source=lambda n: (np.zeros(n), rng.normal(0.0, 1.0, (n, 3))), device_id=device_id,
                      sample_rate=2000.0, block=40).start()
    sink = _Sink()
    src = SerialSource(name="mcu", port=sim.path, sink=sink, retry_interval=0.05, **source_kw)
    src.start()
    return sim, src, sink


@pytest.mark.timeout(60)
def test_a_hello_with_a_wildcard_device_id_forwards_nothing_until_a_valid_hello():
    sim, src, sink = _serial_rig("bad+id#")
    try:
        assert _wait(lambda: src.stats()["bad_hello"] >= 1 and src.stats()["unnamed_samples"] > 0)
        sim.send_label("x")
        assert _wait(lambda: src.stats()["unnamed_labels"] >= 1)
        assert sink.keys == [] and sink.labels == [] and src.key is None
        sim.device_id = "mcu-7"
        sim.reset()  # the device reboots and says HELLO with a valid id
        assert _wait(lambda: len(sink.keys) > 0)
        with sink.lock:
            assert set(sink.keys) == {StreamKey("mcu-7", "serial")}
    finally:
        src.stop()
        sim.stop()


@pytest.mark.timeout(60)
def test_a_bad_hello_is_counted_but_a_configured_device_name_keeps_the_stream():
    sim, src, sink = _serial_rig("x" * 200, device="press-1")
    try:
        assert _wait(lambda: len(sink.keys) > 0 and src.stats()["bad_hello"] >= 1)
        with sink.lock:
            assert set(sink.keys) == {StreamKey("press-1", "serial")}
        assert src.stats()["unnamed_samples"] == 0
    finally:
        src.stop()
        sim.stop()


@pytest.mark.parametrize("key, value", [("device", "x+y"), ("device", "a/b"), ("stream", "#"), ("stream", "s" * 65)])
def test_a_configured_device_or_stream_name_follows_the_same_rule(key, value):
    from edge.config import parse_config
    from edge.errors import ConfigError

    with pytest.raises(ConfigError, match=f"{key} = .* is not a valid name"):
        parse_config({"sources": [{"type": "mqtt", "topic": "line1/accel", key: value}]})
