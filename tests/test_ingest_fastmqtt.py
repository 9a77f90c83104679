"""FastSubscriber against a real mosquitto (order, QoS 1 acknowledgement, big payloads, broker
restart, mutual TLS) and against a scripted fake broker (malformed packets, server
DISCONNECT, refused subscriptions, keepalive)."""
from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edge.bench.rawmqtt import RawPublisher, publish_packet
from edge.broker import BrokerProcess, free_port
from edge.config import MqttConfig
from edge.ingest import mqttwire as wire
from edge.ingest.fastmqtt import FastSubscriber

pytestmark = pytest.mark.timeout(30)


class Sink:
    """Collects what ``on_batch`` gets."""

    def __init__(self):
        self.msgs: list[tuple[str, bytes]] = []
        self.batches = 0
        self.cond = threading.Condition()

    def __call__(self, msgs, received):
        assert isinstance(received, float)
        with self.cond:
            self.msgs += msgs
            self.batches += 1
            self.cond.notify_all()

    def wait_count(self, n: int, timeout: float = 10.0) -> list[tuple[str, bytes]]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.msgs) >= n, timeout), f"got {len(self.msgs)} of {n} messages"
            return list(self.msgs)


def wait_until(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def subscriber(host, port, *, protocol="5", filters=(("t/#", 1),), **kw):
    sink = Sink()
    cfg = MqttConfig(host=host, port=port, protocol=protocol, reconnect_min_s=0.05, reconnect_max_s=0.2,
                     keepalive_s=kw.pop("keepalive_s", 30), max_payload_bytes=kw.pop("max_payload_bytes", 1 << 20))
    sub = FastSubscriber(cfg, client_id=f"fast-test-{protocol}-{time.monotonic_ns()}", subscriptions=list(filters),
                         on_batch=sink, **kw)
    sub.start()
    return sub, sink


def paho_publisher(broker, protocol="5"):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311)
    c.connect(broker.host, broker.port)
    c.loop_start()
    return c


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_receives_qos0_and_qos1_in_order(broker, protocol):
    sub, sink = subscriber(broker.host, broker.port, protocol=protocol, filters=[(f"q{protocol}/#", 1)])
    assert sub.wait_connected(10)
    pub = paho_publisher(broker, protocol)
    sent = [(f"q{protocol}/dev{i % 3}/accel", b"%d" % i, i % 2) for i in range(300)]
    infos = [pub.publish(t, p, qos=q) for t, p, q in sent]
    for info in infos:
        info.wait_for_publish(5)
    got = sink.wait_count(len(sent))
    # MQTT orders messages per QoS level: the broker may hold QoS 1 back behind its in-flight window
    for qos in (0, 1):
        assert [m for m in got if int(m[1]) % 2 == qos] == [(t, p) for t, p, q in sent if q == qos]
    assert len(got) == len(sent)
    # mosquitto keeps at most 20 unacknowledged QoS 1 messages in flight: all 150 arriving means PUBACK works
    assert sub.counters["messages"] == 300 and sub.counters["protocol_errors"] == 0
    pub.loop_stop()
    pub.disconnect()
    sub.stop()
    assert not sub.thread.is_alive()


def test_large_payloads_span_several_reads(broker):
    sub, sink = subscriber(broker.host, broker.port, protocol="5", filters=[("big/#", 0)], chunk_size=4096,
                           max_payload_bytes=2 << 20)
    assert sub.wait_connected(10)
    pub = RawPublisher(broker.host, broker.port, client_id="big-pub")
    payloads = [bytes([i]) * n for i, n in enumerate((100_000, 10, 1_500_000, 70_000, 3))]
    pub.send(b"".join(publish_packet(b"big/%d" % i, p) for i, p in enumerate(payloads)))
    got = sink.wait_count(len(payloads))
    assert got == [(f"big/{i}", p) for i, p in enumerate(payloads)]
    assert sub.counters["bytes"] > sum(map(len, payloads))
    pub.close()
    sub.stop()


def test_broker_restart_reconnects_and_resubscribes(broker):
    sub, sink = subscriber(broker.host, broker.port, protocol="5", filters=[("rs/#", 1)])
    assert sub.wait_connected(10)
    pub = RawPublisher(broker.host, broker.port, client_id="rs-pub-1")
    pub.send(publish_packet(b"rs/a", b"before"))
    sink.wait_count(1)
    pub.sock.close()
    broker.kill()
    assert wait_until(lambda: not sub.connected.is_set()), "did not notice the broker died"
    broker.restart()
    assert sub.wait_connected(10), "did not reconnect"
    pub = RawPublisher(broker.host, broker.port, client_id="rs-pub-2")
    pub.send(publish_packet(b"rs/a", b"after"))
    assert sink.wait_count(2)[1] == ("rs/a", b"after")
    assert sub.counters["connects"] == 2 and sub.counters["disconnects"] == 1
    assert sub.counters["sessions_lost"] == 1  # the test broker keeps no sessions across a restart
    pub.close()
    sub.stop()


def _peak_traced(fn) -> int:
    """Peak bytes allocated (by any thread) while ``fn`` runs."""
    import tracemalloc

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("qos", [0, 1])
def test_an_over_long_packet_is_skipped_without_being_held(broker, qos):
    # MQTT 3.1.1 cannot say a maximum packet size: the broker sends the 24 MiB message, and the
    # reader must read past it in bounded memory, count it, and go on with the next one.
    sub, sink = subscriber(broker.host, broker.port, protocol="3.1.1", filters=[(f"huge{qos}/#", 1)],
                           max_payload_bytes=64 << 10)
    assert sub.wait_connected(10)
    pub = RawPublisher(broker.host, broker.port, client_id=f"huge-pub-{qos}")
    big = wire.encode_publish(b"huge%d/m1/accel" % qos, b"\x00" * (24 << 20), qos=qos, packet_id=5)
    both = big + publish_packet(b"huge%d/m1/accel" % qos, b"[1.0]")  # made before the memory is traced

    def send_and_receive():
        pub.send(both)
        assert sink.wait_count(1, timeout=20) == [(f"huge{qos}/m1/accel", b"[1.0]")]

    peak = _peak_traced(send_and_receive)
    assert sub.counters["oversized"] == 1 and sub.counters["oversized_bytes"] == len(big)
    del big, both
    assert peak < 4 << 20, f"{peak / 2**20:.1f} MiB allocated while a 24 MiB message went past"
    assert sub.connected.is_set() and sub.counters["protocol_errors"] == 0 and sub.counters["connects"] == 1
    pub.close()
    sub.stop()


def test_mqtt5_tells_the_broker_its_maximum_packet_size(broker):
    # the broker then drops the long message for us: it never reaches the reader at all
    sub, sink = subscriber(broker.host, broker.port, protocol="5", filters=[("mps/#", 1)], max_payload_bytes=64 << 10)
    assert sub.wait_connected(10)
    pub = RawPublisher(broker.host, broker.port, client_id="mps-pub")
    pub.send(publish_packet(b"mps/a", b"\x01" * (8 << 20)) + publish_packet(b"mps/a", b"[2.0]"))
    assert sink.wait_count(1) == [("mps/a", b"[2.0]")]
    assert sub.counters["bytes"] < 1 << 20 and sub.counters["oversized"] == 0
    pub.close()
    sub.stop()


class FakeBroker:
    """A scripted broker: ``script(conn, index)`` runs on each accepted connection."""

    def __init__(self, script):
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.script = script
        self.connections = 0
        self.received: list[bytes] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        self.srv.settimeout(0.1)
        while not self._stop:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                continue
            i = self.connections
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn, i), daemon=True).start()

    def _serve(self, conn, i):
        with conn:
            conn.settimeout(10)
            try:
                self.script(self, conn, i)
            except OSError:
                pass

    def read_packet(self, conn) -> tuple[int, bytes]:
        buf = b""
        while (span := wire.packet_span(buf)) is None:
            data = conn.recv(4096)
            if not data:
                raise ConnectionError("closed")
            buf += data
        first, body, end = span
        self.received.append(buf[:end])
        return first >> 4, buf[body:end]

    def accept_client(self, conn, codes=(0,)):
        assert self.read_packet(conn)[0] == wire.CONNECT
        conn.sendall(wire.encode_connack(0, protocol="5"))
        assert self.read_packet(conn)[0] == wire.SUBSCRIBE
        conn.sendall(wire.encode_suback(1, list(codes), protocol="5"))

    def close(self):
        self._stop = True
        self.srv.close()


def test_malformed_packet_is_counted_and_the_connection_is_reestablished():
    def script(fb, conn, i):
        fb.accept_client(conn)
        if i == 0:
            conn.sendall(wire.encode_publish("t/ok", b"1", protocol="5") + b"\x36\x05\x00\x01a\x00\x01")  # QoS 3
            conn.settimeout(10)  # until the client drops this connection over the malformed packet (bounded)
            try:
                while conn.recv(4096):
                    pass
            except OSError:
                pass
        else:
            conn.sendall(wire.encode_publish("t/ok", b"2", protocol="5"))
            while True:
                fb.read_packet(conn)

    fb = FakeBroker(script)
    sub, sink = subscriber("127.0.0.1", fb.port)
    assert [p for _, p in sink.wait_count(2)] == [b"1", b"2"]
    assert sub.counters["protocol_errors"] == 1 and sub.counters["connects"] == 2
    assert sub.thread.is_alive()
    sub.stop()
    fb.close()


def test_server_disconnect_ends_the_session_and_it_reconnects():
    def script(fb, conn, i):
        fb.accept_client(conn)
        conn.sendall(wire.encode_publish("t/x", b"%d" % i, qos=1, packet_id=7, protocol="5") + b"\xe0\x01\x8b")
        while True:
            fb.read_packet(conn)

    fb = FakeBroker(script)
    sub, sink = subscriber("127.0.0.1", fb.port)
    sink.wait_count(2)
    assert sub.counters["protocol_errors"] == 0 and sub.counters["disconnects"] >= 1
    assert wait_until(lambda: b"\x40\x02\x00\x07" in fb.received), "QoS 1 message not acknowledged"
    sub.stop()
    fb.close()


def test_refused_subscription_is_logged_and_pings_keep_the_link(caplog):
    pinged = threading.Event()

    def script(fb, conn, i):
        fb.accept_client(conn, codes=(0x80,))
        while True:
            kind, _ = fb.read_packet(conn)
            if kind == wire.PINGREQ:
                conn.sendall(b"\xd0\x00")
                pinged.set()
            elif kind == wire.DISCONNECT:
                return

    fb = FakeBroker(script)
    with caplog.at_level(logging.WARNING, logger="edge.mqtt.ingest"):
        sub, _ = subscriber("127.0.0.1", fb.port, keepalive_s=5)
        assert sub.wait_connected(10)
        assert pinged.wait(6), "no PINGREQ within the keepalive"
    assert any("refused the subscription" in r.getMessage() for r in caplog.records)
    sub.stop()
    assert wait_until(lambda: fb.received and fb.received[-1] == wire.DISCONNECT_PACKET, 3)
    assert sub.counters["connects"] == 1 and sub.counters["disconnects"] == 1
    fb.close()


@pytest.fixture(scope="module")
def tls_broker():
    """mosquitto with a plain listener and a mutual-TLS one; certificates from a throwaway CA."""
    if not shutil.which("openssl") or not shutil.which("mosquitto"):
        pytest.skip("needs openssl and mosquitto")
    d = Path(tempfile.mkdtemp(prefix="edge-tls-"))
    d.chmod(0o755)  # mosquitto started as root reads its files as the mosquitto user
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def ssl_cmd(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=20)

    ssl_cmd("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=edge-test-ca")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        ssl_cmd("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        ssl_cmd("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "1", "-extfile", "san.ext")
    for f in d.iterdir():
        f.chmod(0o644)
    tls_port = free_port()
    conf = (f"listener {tls_port} 127.0.0.1\ncafile {d / 'ca.crt'}\ncertfile {d / 'server.crt'}\n"
            f"keyfile {d / 'server.key'}\nrequire_certificate true\n")
    with BrokerProcess(kind="mosquitto", extra_conf=conf) as b:
        assert wait_until(lambda: socket.create_connection(("127.0.0.1", tls_port), 1).close() is None, 5)
        yield b, tls_port, d
    shutil.rmtree(d, ignore_errors=True)


def tls_subscriber(port, certs, ca="ca.crt"):
    sink = Sink()
    cfg = MqttConfig(host="127.0.0.1", port=port, protocol="5", tls=True, ca_file=str(certs / ca),
                     cert_file=str(certs / "client.crt"), key_file=str(certs / "client.key"),
                     reconnect_min_s=0.05, reconnect_max_s=0.2)
    sub = FastSubscriber(cfg, client_id=f"tls-{time.monotonic_ns()}", subscriptions=[("tls/#", 1)], on_batch=sink)
    sub.start()
    return sub, sink


def test_mutual_tls_receives_messages(tls_broker):
    broker, tls_port, certs = tls_broker
    sub, sink = tls_subscriber(tls_port, certs)
    assert sub.wait_connected(10)
    pub = RawPublisher(broker.host, broker.port, client_id="tls-pub")
    payloads = [b"%d" % i for i in range(2000)] + [b"z" * 200_000]  # many small ones, one over several TLS records
    pub.send(b"".join(publish_packet(b"tls/a", p) for p in payloads))
    assert [p for _, p in sink.wait_count(len(payloads))] == payloads
    pub.close()
    sub.stop()


def test_tls_with_an_untrusted_server_never_connects(tls_broker):
    _, tls_port, certs = tls_broker
    sub, _ = tls_subscriber(tls_port, certs, ca="client.crt")  # not the CA that signed the server
    assert not sub.wait_connected(1.0)
    assert sub.counters["connects"] == 0 and sub.thread.is_alive()
    sub.stop()
