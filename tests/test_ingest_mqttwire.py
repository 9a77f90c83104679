"""The MQTT wire codec: PUBLISH streams split anywhere parse back exactly, in both protocol
versions; malformed packets and garbage raise only ``ProtocolError``."""
from __future__ import annotations

import doctest

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.ingest import mqttwire as wire
from edge.ingest.mqttwire import ProtocolError

pytestmark = pytest.mark.timeout(60)

topics = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="+#\x00"), min_size=1, max_size=40)
payloads = st.one_of(st.binary(max_size=80), st.integers(100, 20_000).map(lambda n: bytes(range(256)) * (n // 256) + b"x"))
# real MQTT 5 PUBLISH properties: payload format, message expiry, content type, user property, subscription id
properties = st.lists(st.sampled_from([b"\x01\x01", b"\x02\x00\x00\x00\x3c", b"\x03\x00\x10application/json",
                                       b"\x26\x00\x01k\x00\x02vv", b"\x0b\x07", b"\x0b\x80\x01"]), max_size=4).map(b"".join)


@st.composite
def publishes(draw, protocol):
    """(messages, encoded stream, packet ids to acknowledge)."""
    msgs, blob, acks = [], [], []
    for topic, payload, qos in draw(st.lists(st.tuples(topics, payloads, st.sampled_from([0, 1])), max_size=12)):
        pid = draw(st.integers(1, 0xFFFF)) if qos else 0
        props = draw(properties) if protocol == "5" else b""
        blob.append(wire.encode_publish(topic, payload, qos=qos, packet_id=pid, protocol=protocol, properties=props,
                                        retain=draw(st.booleans()), dup=bool(qos) and draw(st.booleans())))
        msgs.append((topic, payload))
        if qos:
            acks.append(pid)
    return msgs, b"".join(blob), acks


def feed(stream: bytes, cuts: list[int], protocol: str):
    """Drive ``parse_stream`` the way the socket shell does, reads ending at ``cuts``."""
    msgs, acks, controls, cache = [], [], [], {}
    rest = b""
    edges = sorted({c % (len(stream) + 1) for c in cuts} | {len(stream)})
    start = 0
    for end in edges:
        buf = rest + stream[start:end]
        start = end
        m, used, a, c = wire.parse_stream(buf, protocol, topics=cache)
        msgs += m
        acks += a
        controls += c
        rest = buf[used:]
    return msgs, acks, controls, rest


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_publish_stream_split_anywhere_parses_back(protocol, data):
    msgs, stream, acks = data.draw(publishes(protocol))
    cuts = data.draw(st.lists(st.integers(0, max(0, len(stream))), max_size=8))
    got, got_acks, controls, rest = feed(stream, cuts, protocol)
    assert got == msgs and got_acks == acks and controls == [] and rest == b""


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_control_packets_between_publishes_come_out_in_order(protocol, data):
    first, s1, _ = data.draw(publishes(protocol))
    second, s2, _ = data.draw(publishes(protocol))
    suback = wire.encode_suback(1, [0, 1, 0x80], protocol=protocol)
    stream = s1 + suback + b"\xd0\x00" + s2
    got, _, controls, rest = feed(stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=6)), protocol)
    assert got == first + second and rest == b""
    assert [k for k, _ in controls] == [wire.SUBACK, wire.PINGRESP]
    assert wire.parse_suback(controls[0][1], protocol) == (1, [0, 1, 0x80])


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
@settings(max_examples=400, deadline=None)
@given(garbage=st.binary(max_size=200), prefix=st.booleans(),
       head=st.sampled_from([b"", b"\x30", b"\x32", b"\x3b", b"\x30\x80", b"\x90", b"\xd0", b"\xe0"]))
def test_garbage_raises_only_protocol_error(protocol, garbage, prefix, head):
    buf = (wire.encode_publish("a/b", b"ok", protocol=protocol) if prefix else b"") + head + garbage
    for parse in (wire.parse_stream, wire.parse_publishes):
        try:
            out = parse(buf, protocol)
        except ProtocolError:
            continue
        assert 0 <= out[1] <= len(buf)
        assert all(type(t) is str and type(p) is bytes for t, p in out[0])


@pytest.mark.parametrize("protocol, packet, why", [
    ("3.1.1", b"\x30\xff\xff\xff\xff\x01", "varint of 5 bytes"),
    ("3.1.1", b"\x36\x05\x00\x01a\x00\x01", "QoS 3"),
    ("3.1.1", b"\x34\x05\x00\x01a\x00\x01", "QoS 2 (never subscribed)"),
    ("3.1.1", b"\x32\x05\x00\x01a\x00\x00", "packet id 0"),
    ("3.1.1", b"\x30\x03\x00\x05a", "topic longer than the packet"),
    ("3.1.1", b"\x30\x03\x00\x01\xff", "topic not UTF-8"),
    ("3.1.1", b"\x30\x03\x00\x01#", "wildcard in a PUBLISH topic"),
    ("5", b"\x30\x06\x00\x00\x03\x23\x00\x01", "topic alias (empty topic), never advertised"),
    ("5", b"\x30\x05\x00\x01a\x09\x01", "property block overruns the packet"),
    ("5", b"\x30\x03\x00\x01a", "no property length"),
    ("3.1.1", b"\x10\x00", "CONNECT from the broker"),
    ("3.1.1", b"\xd1\x00", "reserved flags set"),
])
def test_malformed_packets_raise_protocol_error(protocol, packet, why):
    with pytest.raises(ProtocolError):
        wire.parse_stream(packet, protocol)


def test_incomplete_packet_waits_for_more_bytes():
    pkt = wire.encode_publish("s/m1/accel", b"x" * 300, qos=1, packet_id=9, protocol="5")
    for cut in (1, 2, 3, len(pkt) - 1):
        assert wire.parse_stream(pkt[:cut], "5") == ([], 0, [], [])
        assert wire.packet_length(pkt[:cut]) in (None, len(pkt))
    assert wire.packet_length(pkt[:3]) == len(pkt)


def test_topics_are_decoded_once_per_distinct_topic():
    cache: dict[bytes, str] = {}
    stream = b"".join(wire.encode_publish(f"s/{i % 3}", b"p") for i in range(30))
    msgs, _, _ = wire.parse_publishes(stream, "3.1.1", topics=cache)
    assert len(msgs) == 30 and len(cache) == 3
    assert msgs[4][0] is msgs[1][0]  # the same str object, not a new one per message


def test_connect_and_subscribe_encode_per_protocol():
    c5 = wire.encode_connect("id", protocol="5", keepalive=30, username="u", password="p")
    c3 = wire.encode_connect("id", protocol="3.1.1", keepalive=30)
    assert c5[:13] == b"\x10\x15\x00\x04MQTT\x05\xc2\x00\x1e\x00" and c5.endswith(b"\x00\x01u\x00\x01p")
    assert c3 == b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x1e\x00\x02id"
    assert wire.encode_subscribe(1, [("a/+", 1)], protocol="5") == b"\x82\x09\x00\x01\x00\x00\x03a/+\x01"
    assert wire.encode_pubacks([1, 258]) == b"\x40\x02\x00\x01\x40\x02\x01\x02"


def test_connack_and_suback_decode():
    assert wire.parse_connack(wire.encode_connack(0, protocol="5")[2:], "5") == (False, 0)
    assert wire.parse_connack(wire.encode_connack(5, protocol="3.1.1")[2:], "3.1.1") == (False, 5)
    with pytest.raises(ProtocolError):
        wire.parse_connack(b"\x00\x00", "5")  # MQTT 5 needs a property block
    with pytest.raises(ProtocolError):
        wire.parse_suback(b"\x00\x01\x05", "5")  # properties overrun


def test_docstring_examples_run():
    result = doctest.testmod(wire)
    assert result.failed == 0 and result.attempted > 0


def test_messages_before_a_malformed_packet_travel_with_the_error():
    good = wire.encode_publish("a/1", b"x", protocol="5") + wire.encode_publish("a/2", b"y", protocol="5")
    with pytest.raises(ProtocolError) as e:
        wire.parse_stream(good + b"\xd0\x00" + good + b"\x36\x05\x00\x01a\x00\x01", "5")
    assert e.value.messages == [("a/1", b"x"), ("a/2", b"y")] * 2


# ---- bounded before buffered (issue 19): packet size limits on both ends ----------------------

import re  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

from edge.bench.rawmqtt import RawPublisher  # noqa: E402
from edge.broker import BrokerProcess  # noqa: E402
from edge.config import MqttConfig  # noqa: E402
from edge.ingest.mqttwire import encode_publish, max_packet_size  # noqa: E402
from edge.mqttconn import make_client  # noqa: E402


class _PahoSink:
    """A paho subscriber built by ``make_client`` (the node connection's factory)."""

    def __init__(self, host, port, cfg: MqttConfig, filt: str, stop_payload: bytes):
        self.got: list[tuple[str, int]] = []
        self.subscribed, self.done = threading.Event(), threading.Event()
        self.conn = make_client(cfg, client_id=f"mps-{filt[:4]}-{id(self)}", manual_ack=False)
        c = self.conn.client
        c.on_connect = lambda cl, *a: cl.subscribe(filt, qos=0)
        c.on_subscribe = lambda *a: self.subscribed.set()

        def on_message(cl, u, m):
            self.got.append((m.topic, len(m.payload)))
            if m.payload == stop_payload:
                self.done.set()
        c.on_message = on_message
        self.conn.connect_async(cfg)
        c.loop_start()

    def close(self):
        self.conn.client.disconnect()
        self.conn.client.loop_stop()


def test_the_paho_connection_tells_the_broker_its_maximum_packet_size(broker):
    cfg = MqttConfig(host=broker.host, port=broker.port, protocol="5", max_payload_bytes=64 << 10, session_expiry_s=0)
    sink = _PahoSink(broker.host, broker.port, cfg, "mpsp/#", b"[3.0]")
    try:
        assert sink.subscribed.wait(10)
        pub = RawPublisher(broker.host, broker.port, client_id="mps-paho-pub")
        pub.send(encode_publish("mpsp/labels", b"\x02" * (8 << 20)) + encode_publish("mpsp/labels", b"[3.0]"))
        assert sink.done.wait(20)
        assert sink.got == [("mpsp/labels", 5)]  # the 8 MiB one never reached paho's reader
        pub.close()
    finally:
        sink.close()


def _example_broker_limit() -> int:
    conf = (Path(__file__).parent.parent / "deploy" / "mosquitto" / "mosquitto-tls.conf").read_text()
    (value,) = re.findall(r"^max_packet_size\s+(\d+)", conf, re.M)
    return int(value)


def test_the_example_broker_config_limits_packets_to_what_a_node_takes():
    assert _example_broker_limit() == max_packet_size(MqttConfig().max_payload_bytes)


def test_mosquitto_with_the_example_limit_never_forwards_a_longer_message():
    # what the line does on a real mosquitto, to an MQTT 3.1.1 subscriber (which cannot say a limit itself)
    limit = _example_broker_limit()
    with BrokerProcess(kind="mosquitto", extra_conf=f"max_packet_size {limit}\n") as b:
        cfg = MqttConfig(host=b.host, port=b.port, protocol="3.1.1", session_expiry_s=0)
        sink = _PahoSink(b.host, b.port, cfg, "lim/#", b"[4.0]")
        try:
            assert sink.subscribed.wait(10)
            big = RawPublisher(b.host, b.port, client_id="lim-big")
            try:
                big.send(encode_publish("lim/a", b"\x03" * (limit + 1)))
            except OSError:
                pass  # the broker may close on us mid-send
            small = RawPublisher(b.host, b.port, client_id="lim-small")
            small.send(encode_publish("lim/a", b"[4.0]"))
            assert sink.done.wait(20)
            assert sink.got == [("lim/a", 5)]
            small.close()
        finally:
            sink.close()
