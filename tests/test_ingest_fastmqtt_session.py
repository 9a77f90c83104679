"""FastSubscriber's persistent session and its acknowledgement policy, against a real
mosquitto (reached through a proxy the test can cut, so the broker keeps the session) and
a scripted fake broker (the CONNECT's bytes, session-present, DUP redelivery)."""
from __future__ import annotations

import threading
import time

import paho.mqtt.client as mqtt
import pytest

from edge.config import MqttConfig
from edge.ingest import mqttwire as wire
from edge.ingest.fastmqtt import FastSubscriber
from tests.mqttproxy import CuttableProxy
from tests.test_ingest_fastmqtt import FakeBroker, Sink, wait_until

pytestmark = pytest.mark.timeout(60)
PROTOCOLS = ["5", "3.1.1"]


def make_sub(port, *, protocol, filters, on_batch, client_id=None, **kw):
    cfg = MqttConfig(host="127.0.0.1", port=port, protocol=protocol, reconnect_min_s=0.05, reconnect_max_s=0.5,
                     session_expiry_s=kw.pop("session_expiry_s", 600))
    sub = FastSubscriber(cfg, client_id=client_id or f"sess-{protocol}-{time.monotonic_ns()}",
                         subscriptions=list(filters), on_batch=on_batch, **kw)
    sub.start()
    return sub


def publish_qos1(broker, protocol, topic, payloads):
    """Publish with a real paho client and wait until the broker acknowledged every one."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311)
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        infos = [c.publish(topic, p, qos=1) for p in payloads]
        for info in infos:
            info.wait_for_publish(20)
            assert info.is_published()
    finally:
        c.loop_stop()
        c.disconnect()


def payload_set(sink):
    with sink.cond:
        return {p for _, p in sink.msgs}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_qos1_sent_while_the_connection_is_down_arrive_after_reconnect(broker, protocol):
    proxy = CuttableProxy(broker.host, broker.port)
    sink = Sink()
    topic = f"down{protocol}/m1/accel"
    sub = make_sub(proxy.port, protocol=protocol, filters=[(f"down{protocol}/#", 1)], on_batch=sink)
    try:
        assert sub.wait_connected(20)
        publish_qos1(broker, protocol, topic, [b"before"])
        sink.wait_count(1, 20)
        proxy.down()
        assert wait_until(lambda: not sub.connected.is_set(), 20), "did not notice the cut"
        sent = [b"while-%d" % i for i in range(300)]
        publish_qos1(broker, protocol, topic, sent)  # acknowledged by the broker while we are away
        proxy.up()
        assert sub.wait_connected(30), "did not reconnect"
        assert wait_until(lambda: set(sent) <= payload_set(sink), 30), \
            f"{len(set(sent) - payload_set(sink))} of {len(sent)} lost"
        assert sub.counters["sessions_resumed"] >= 1
        assert sub.counters["handoff_errors"] == 0
    finally:
        sub.stop()
        proxy.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_restarted_subscriber_with_the_same_id_gets_what_was_queued(broker, protocol):
    cid = f"restart-{protocol}-{time.monotonic_ns()}"
    filters = [(f"rq{protocol}/#", 1)]
    first = Sink()
    sub = make_sub(broker.port, protocol=protocol, filters=filters, on_batch=first, client_id=cid)
    assert sub.wait_connected(20)
    sub.stop()
    assert not sub.thread.is_alive()
    sent = [b"%d" % i for i in range(100)]
    publish_qos1(broker, protocol, f"rq{protocol}/a", sent)
    second = Sink()
    sub = make_sub(broker.port, protocol=protocol, filters=filters, on_batch=second, client_id=cid)
    try:
        assert [p for _, p in second.wait_count(len(sent), 30)][:len(sent)] == sent
        assert sub.counters["sessions_resumed"] == 1
    finally:
        sub.stop()


class Flaky(Sink):
    """Raises for the first ``fail`` calls, then takes everything."""

    def __init__(self, fail: int):
        super().__init__()
        self.fail = fail
        self.calls = 0

    def __call__(self, msgs, received):
        self.calls += 1
        if self.calls <= self.fail:
            raise RuntimeError("pipeline hiccup " + "x" * 10_000)  # the log line must stay bounded
        super().__call__(msgs, received)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_failed_hand_off_is_not_acknowledged_and_comes_back(broker, protocol, caplog):
    sink = Flaky(fail=2)
    sub = make_sub(broker.port, protocol=protocol, filters=[(f"ho{protocol}/#", 1)], on_batch=sink)
    try:
        assert sub.wait_connected(20)
        sent = [b"%d" % i for i in range(50)]
        publish_qos1(broker, protocol, f"ho{protocol}/a", sent)
        assert wait_until(lambda: set(sent) <= payload_set(sink), 30), "messages of a failed hand-off were lost"
        c = sub.counters
        assert c["handoff_errors"] == 2 and c["poison_batches"] == 0 and c["handoff_lost"] == 0
        assert c["handoff_unacked"] >= 2 and c["connects"] >= 3
        assert all(len(r.getMessage()) < 1000 for r in caplog.records if r.name == "edge.mqtt.ingest")
        assert any("on_batch failed (RuntimeError: pipeline hiccup" in r.getMessage() for r in caplog.records)
    finally:
        sub.stop()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_poison_batch_is_given_up_after_n_failures(broker, protocol):
    class Poisoned(Sink):
        def __init__(self):
            super().__init__()
            self.refused = 0

        def __call__(self, msgs, received):
            if any(p == b"poison" for _, p in msgs):
                self.refused += 1
                raise ValueError("cannot take this")
            super().__call__(msgs, received)

    sink = Poisoned()
    sub = make_sub(broker.port, protocol=protocol, filters=[(f"px{protocol}/#", 1)], on_batch=sink, poison_after=3)
    try:
        assert sub.wait_connected(20)
        publish_qos1(broker, protocol, f"px{protocol}/a", [b"poison"])
        assert wait_until(lambda: sub.counters["poison_batches"] == 1, 30), sub.counters
        assert sub.wait_connected(20)
        publish_qos1(broker, protocol, f"px{protocol}/a", [b"after"])
        sink.wait_count(1, 30)
        c = sub.counters
        # given up once, acknowledged: not redelivered again, and the stream goes on
        assert sink.refused == 3 and c["handoff_errors"] == 3 and c["handoff_lost"] == 1
        assert [p for _, p in sink.msgs] == [b"after"]
        assert sub.thread.is_alive()
    finally:
        sub.stop()


def test_qos0_messages_of_a_failed_hand_off_are_counted_lost(broker):
    sink = Flaky(fail=1)
    sub = make_sub(broker.port, protocol="5", filters=[("q0f/#", 0)], on_batch=sink)
    try:
        assert sub.wait_connected(20)
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        c.connect(broker.host, broker.port)
        c.loop_start()
        c.publish("q0f/a", b"gone", qos=0).wait_for_publish(10)
        assert wait_until(lambda: sub.counters["handoff_errors"] == 1, 20)
        assert sub.wait_connected(20)
        c.publish("q0f/a", b"kept", qos=0).wait_for_publish(10)
        sink.wait_count(1, 20)
        c.loop_stop()
        c.disconnect()
        assert sub.counters["handoff_lost"] == 1 and sub.counters["handoff_unacked"] == 0
        assert [p for _, p in sink.msgs] == [b"kept"]
    finally:
        sub.stop()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_connect_asks_for_a_persistent_session_and_dup_redeliveries_are_taken_and_acked(protocol):
    connects: list[bytes] = []

    def script(fb, conn, i):
        kind, body = fb.read_packet(conn)
        assert kind == wire.CONNECT
        connects.append(body)
        conn.sendall(wire.encode_connack(0, protocol=protocol, session_present=True))
        assert fb.read_packet(conn)[0] == wire.SUBSCRIBE
        conn.sendall(wire.encode_suback(1, [1], protocol=protocol))
        conn.sendall(wire.encode_publish("t/a", b"again", qos=1, packet_id=9, protocol=protocol, dup=True))
        while True:
            fb.read_packet(conn)

    fb = FakeBroker(script)
    sink = Sink()
    sub = make_sub(fb.port, protocol=protocol, filters=[("t/#", 1)], on_batch=sink, session_expiry_s=3600)
    try:
        assert sink.wait_count(1, 20) == [("t/a", b"again")]
        assert wait_until(lambda: b"\x40\x02\x00\x09" in fb.received, 20), "redelivered message not acknowledged"
        assert sub.counters["sessions_resumed"] == 1
        flags = connects[0][7]
        assert not flags & 0x02, "Clean Start / Clean Session must be off"
        if protocol == "5":  # properties: Session Expiry Interval (0x11) = 3600, Maximum Packet Size (0x27)
            assert connects[0][10:16] == b"\x0a\x11\x00\x00\x0e\x10" and connects[0][16:17] == b"\x27"
    finally:
        sub.stop()
        fb.close()


def test_session_expiry_zero_gives_a_clean_session():
    connects: list[bytes] = []
    got = threading.Event()

    def script(fb, conn, i):
        connects.append(fb.read_packet(conn)[1])
        got.set()
        conn.sendall(wire.encode_connack(0, protocol="5"))
        while True:
            fb.read_packet(conn)

    fb = FakeBroker(script)
    sub = make_sub(fb.port, protocol="5", filters=[], on_batch=Sink(), session_expiry_s=0)
    try:
        assert got.wait(20)
        # clean start; no Session Expiry, only the Maximum Packet Size (0x27) in the properties
        assert connects[0][7] & 0x02 and connects[0][10:12] == b"\x05\x27"
    finally:
        sub.stop()
        fb.close()
