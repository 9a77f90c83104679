"""MqttLink (paho) against a real mosquitto: publish refusals are counted by reason and never
raise, the publish bound is the configured one, labels survive a reconnect (persistent
session), a failing handler does not end paho's thread, and stop() returns when the broker
is gone."""
from __future__ import annotations

import threading
import time

import paho.mqtt.client as mqtt
import pytest

from edge.config import MqttConfig
from edge.ingest.mqtt import PUBLISH_ERRORS, MqttLink
from tests.mqttproxy import CuttableProxy
from tests.test_ingest_fastmqtt import wait_until

pytestmark = pytest.mark.timeout(90)
PROTOCOLS = ["5", "3.1.1"]


class Inbox:
    def __init__(self, fail_first: int = 0):
        self.got: list[tuple[str, bytes]] = []
        self.fail_first = fail_first
        self.lock = threading.Lock()

    def __call__(self, topic, payload, received):
        with self.lock:
            if self.fail_first:
                self.fail_first -= 1
                raise RecursionError("deep " * 1000)
            self.got.append((topic, payload))

    def payloads(self):
        with self.lock:
            return [p for _, p in self.got]


def make_link(port, protocol, *, subs=(), handler=None, max_queued=10_000, **cfg_kw):
    cfg = MqttConfig(host="127.0.0.1", port=port, protocol=protocol, reconnect_min_s=cfg_kw.pop("reconnect_min_s", 0.05),
                     reconnect_max_s=cfg_kw.pop("reconnect_max_s", 0.5), **cfg_kw)
    link = MqttLink(cfg, client_id=f"link-{protocol}-{time.monotonic_ns()}", status_topic=f"st/{time.monotonic_ns()}",
                    subscriptions=list(subs), on_message=handler or Inbox(), max_queued=max_queued)
    link.start()
    return link


def listener(broker, filt):
    """A plain paho subscriber straight on the broker; returns (client, received payloads)."""
    got: list[bytes] = []
    ready = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_connect = lambda cl, *a: cl.subscribe(filt, qos=1)
    c.on_subscribe = lambda *a: ready.set()
    c.on_message = lambda cl, u, m: got.append(m.payload)
    c.connect(broker.host, broker.port)
    c.loop_start()
    assert ready.wait(20)
    return c, got


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_publishes_return_false_are_counted_and_never_raise(broker, protocol):
    link = make_link(broker.port, protocol)
    try:
        assert link.wait_connected(20)
        sensor_topic = "s/" + "x" * 65_528  # a legal 65,530-byte sensor topic ...
        cases = {f"edge/n1/predictions/{sensor_topic}": "too_long_topic",  # ... makes a prediction topic too long
                 "edge/n1/predictions/dev+1/accel": "invalid_topic", "edge/n1/predictions/#": "invalid_topic",
                 "": "invalid_topic", "edge/\ud800": "invalid_topic", "edge/a\x00b": "invalid_topic"}
        for topic, why in cases.items():
            before = link.publish_errors[why]
            assert link.publish(topic, b"{}", qos=1) is False
            assert link.publish_errors[why] == before + 1, topic[:40]
        assert link.publish("edge/n1/ok", {"not": "bytes"}) is False  # paho raises TypeError for this
        assert link.publish_errors["other"] == 1
        assert link.counters["publish_errors"] == len(cases) + 1 == sum(link.publish_errors.values())
        assert link.counters["published"] == 0
        assert link.publish(sensor_topic, b"fine") is True  # 65,530 bytes is still legal
        assert link.connected.is_set() and link.client._thread.is_alive()
    finally:
        link.stop()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_publish_bound_from_config_is_honoured_while_disconnected(broker, protocol):
    proxy = CuttableProxy(broker.host, broker.port)
    lc, got = listener(broker, f"pb{protocol}/#")
    link = make_link(proxy.port, protocol, max_queued=20)
    try:
        assert link.wait_connected(20)
        assert wait_until(lambda: not link.client._out_messages, 20)  # the "online" status is acknowledged
        proxy.down()
        assert wait_until(lambda: not link.connected.is_set(), 20)
        results = [link.publish(f"pb{protocol}/a", b"%d" % i, qos=1) for i in range(50)]
        assert results == [True] * 20 + [False] * 30  # paho keeps the oldest 20 and refuses the rest
        assert link.publish(f"pb{protocol}/a", b"qos0", qos=0) is False
        assert link.publish_errors["queue_full"] == 30 and link.publish_errors["no_connection"] == 1
        assert link.counters["queued_offline"] == 20 and link.counters["published"] == 20
        proxy.up()
        assert link.wait_connected(30)
        assert wait_until(lambda: len(got) >= 20, 30)
        assert sorted(got, key=int) == [b"%d" % i for i in range(20)]
    finally:
        link.stop()
        lc.loop_stop()
        lc.disconnect()
        proxy.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_labels_published_while_reconnecting_arrive(broker, protocol):
    proxy = CuttableProxy(broker.host, broker.port)
    inbox = Inbox()
    link = make_link(proxy.port, protocol, subs=[(f"lb{protocol}/#", 1)], handler=inbox, session_expiry_s=600)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    try:
        assert link.wait_connected(20)
        assert wait_until(lambda: link.counters["connects"] == 1 and link.counters["subscribed"] == 1, 20)
        pub.publish(f"lb{protocol}/m1/label", b"first", qos=1).wait_for_publish(20)
        assert wait_until(lambda: inbox.payloads() == [b"first"], 20)
        proxy.down()
        assert wait_until(lambda: not link.connected.is_set(), 20)
        labels = [b"label-%d" % i for i in range(100)]
        for p in labels:
            pub.publish(f"lb{protocol}/m1/label", p, qos=1).wait_for_publish(20)
        proxy.up()
        assert wait_until(lambda: set(labels) <= set(inbox.payloads()), 30), \
            f"{len(set(labels) - set(inbox.payloads()))} labels lost"
        assert link.counters["sessions_resumed"] >= 1
    finally:
        pub.loop_stop()
        pub.disconnect()
        link.stop()
        proxy.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_held_messages_are_not_acknowledged_and_come_again_to_the_next_session(broker, protocol):
    """After hold() (the daemon's stop) a QoS 1 label is left unacknowledged, so the broker
    sends it again when the session reconnects: the next start gets it. What was handed
    on, or refused by a failing handler, is acknowledged and does not come again."""
    cid, topic = f"hold-{protocol}-{time.monotonic_ns()}", f"hl{protocol}/{time.monotonic_ns()}"

    def link_with(inbox):
        cfg = MqttConfig(host="127.0.0.1", port=broker.port, protocol=protocol, reconnect_min_s=0.05,
                         reconnect_max_s=0.5, session_expiry_s=600)
        link = MqttLink(cfg, client_id=cid, status_topic=f"st/{cid}", subscriptions=[(f"{topic}/#", 1)], on_message=inbox)
        link.start()
        assert link.wait_connected(20)
        assert wait_until(lambda: link.client._out_messages == {} and link.counters["subscribed"] >= 1, 20)
        return link

    first, second = Inbox(fail_first=1), Inbox()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    a = link_with(first)
    b = None
    try:
        for p in (b"bad", b"taken"):
            pub.publish(f"{topic}/x", p, qos=1).wait_for_publish(20)
        assert wait_until(lambda: first.payloads() == [b"taken"], 20)
        a.hold()
        held = [b"held-%d" % i for i in range(30)]  # beyond the broker's messages in flight, too
        for p in held:
            pub.publish(f"{topic}/x", p, qos=1).wait_for_publish(20)
        assert wait_until(lambda: a.counters["held_unacked"] >= 1, 20)
        assert first.payloads() == [b"taken"]  # nothing handed on after hold()
        a.stop()
        b = link_with(second)
        assert wait_until(lambda: set(held) <= set(second.payloads()), 30), \
            f"{len(set(held) - set(second.payloads()))} held messages did not come again"
        assert not {b"bad", b"taken"} & set(second.payloads())
    finally:
        pub.loop_stop()
        pub.disconnect()
        a.stop()
        if b is not None:
            b.stop()


def test_a_failing_handler_is_counted_and_paho_keeps_running(broker, caplog):
    inbox = Inbox(fail_first=1)
    link = make_link(broker.port, "5", subs=[("hf/#", 1)], handler=inbox)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    try:
        assert link.wait_connected(20)
        assert wait_until(lambda: link.counters["subscribed"] == 1, 20)
        for p in (b"one", b"two"):
            pub.publish("hf/a", p, qos=1).wait_for_publish(20)
        assert wait_until(lambda: inbox.payloads() == [b"two"], 20)
        assert link.counters["handler_errors"] == 1 and link.client._thread.is_alive()
        assert all(len(r.getMessage()) < 1000 for r in caplog.records if r.name == "edge.mqtt")
    finally:
        pub.loop_stop()
        pub.disconnect()
        link.stop()


def test_stop_returns_when_the_broker_is_gone(broker):
    proxy = CuttableProxy(broker.host, broker.port)
    # a long backoff: stop() must not wait for it to end
    link = make_link(proxy.port, "5", reconnect_min_s=60.0, reconnect_max_s=600.0)
    assert link.wait_connected(20)
    proxy.close()  # nothing listens there any more
    assert wait_until(lambda: not link.connected.is_set(), 20)
    t = threading.Thread(target=link.stop)
    t.start()
    t.join(30)  # a hang guard far below the 60 s backoff, not a speed limit
    assert not t.is_alive(), "stop() waited for the reconnect backoff"


def test_reasons_are_fixed():
    assert PUBLISH_ERRORS == ("invalid_topic", "too_long_topic", "queue_full", "no_connection", "other")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_broker_that_lost_the_session_is_counted(broker, protocol):
    link = make_link(broker.port, protocol, subs=[("sl/#", 1)])
    try:
        assert link.wait_connected(20)
        broker.kill()  # the test broker runs without persistence: its sessions die with it
        assert wait_until(lambda: not link.connected.is_set(), 30)
        broker.restart()
        assert wait_until(lambda: link.counters["connects"] == 2, 30)
        assert link.counters["sessions_lost"] == 1 and link.counters["sessions_resumed"] == 0
    finally:
        link.stop()


def test_qos0_backlog_is_bounded_when_the_broker_does_not_keep_up(broker):
    proxy = CuttableProxy(broker.host, broker.port)
    lc, got = listener(broker, "bk/#")
    link = make_link(proxy.port, "5", max_queued=50, keepalive_s=300)
    try:
        assert link.wait_connected(20)
        assert wait_until(lambda: not link.client._out_messages, 20)
        proxy.pause()
        payload = b"p" * 20_000
        accepted = 0
        for i in range(5_000):  # ~100 MB offered: far more than the socket buffers hold
            if link.publish("bk/a", b"%06d" % i + payload, qos=0):
                accepted += 1
            elif link.publish_errors["queue_full"] >= 20:
                break
        assert link.publish_errors["queue_full"] >= 20, "the QoS 0 backlog was never refused"
        assert link.counters["published"] == accepted
        proxy.resume()
        assert wait_until(lambda: len(got) >= accepted, 60), f"{len(got)} of {accepted} arrived"
        assert link.publish("bk/a", b"after", qos=0) is True  # drained: taken again
        assert link.counters["qos0_lost"] == 0
    finally:
        link.stop()
        lc.loop_stop()
        lc.disconnect()
        proxy.close()


def test_qos0_messages_dropped_by_a_broken_connection_are_counted(broker):
    proxy = CuttableProxy(broker.host, broker.port)
    link = make_link(proxy.port, "5", max_queued=50, keepalive_s=300)
    try:
        assert link.wait_connected(20)
        proxy.pause()
        payload = b"p" * 20_000
        for i in range(5_000):
            if not link.publish("lost/a", payload, qos=0) and link.publish_errors["queue_full"]:
                break
        assert link.publish_errors["queue_full"] == 1
        proxy.down()  # the connection breaks with messages still unwritten in paho
        proxy.resume()
        proxy.up()
        assert wait_until(lambda: link.counters["connects"] == 2, 30)
        assert wait_until(lambda: link.counters["qos0_lost"] >= 1, 10)
        assert link.counters["qos0_lost"] <= 50
    finally:
        link.stop()
        proxy.close()


def test_a_publish_the_broker_refuses_is_not_delivered_and_is_counted(caplog):
    """MQTT 5: mosquitto answers a publish its ACL denies with PUBACK 0x87, which paho marks
    published all the same; the link's Delivery says not ok, and the refusal is counted by
    reason and logged (a plain publish() still answers True: paho took it)."""
    from tests.fleet_helpers import acl_broker

    with acl_broker("denied/#") as b:
        link = make_link(b.port, "5")
        try:
            assert link.wait_connected(20)
            with caplog.at_level("WARNING", logger="edge.mqtt"):
                refused = link.publish_tracked("denied/x", b"delta")
                taken = link.publish_tracked("allowed/x", b"delta")
                assert refused is not None and refused.wait(20) and taken.wait(20)
                assert link.publish("denied/y", b"plain", qos=1) is True
                assert wait_until(lambda: link.counters["publish_refused"] == 2, 20)
            assert (refused.ok, refused.reason, refused.code) == (False, "not_authorized", 0x87)
            assert (taken.ok, taken.reason) == (True, "success")
            assert link.publish_refused == {"not_authorized": 2}
            assert any("0x87" in r.getMessage() and "denied/x" in r.getMessage() for r in caplog.records)
        finally:
            link.stop()


def test_a_refused_subscription_is_counted_and_named(caplog):
    """mosquitto grants a subscription its ACL denies (and filters each message), so the
    refusal is given here as paho hands it over: one reason code per topic of the SUBSCRIBE."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    cfg = MqttConfig(host="127.0.0.1", port=1, protocol="5")
    link = MqttLink(cfg, client_id="sub-refused", status_topic="st/sub-refused",
                    subscriptions=[("a/#", 1), ("b/#", 1)], on_message=Inbox())
    ok, denied = ReasonCode(PacketTypes.SUBACK, identifier=1), ReasonCode(PacketTypes.SUBACK, identifier=0x87)
    with caplog.at_level("WARNING", logger="edge.mqtt"):
        link._on_subscribe(link.client, None, 1, [ok, denied])
    assert link.counters["subscribed"] == 1 and link.counters["subscribe_refused"] == 1
    assert any("b/#" in r.getMessage() and "a/#" not in r.getMessage() for r in caplog.records)
