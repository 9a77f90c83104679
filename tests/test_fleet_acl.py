"""The shipped ACL (deploy/mosquitto/edge.acl) on a real mosquitto with passwords and MQTT 5:
a device sends only its own deltas and requests and reads only the global head and its
own receipts; only the fleet server writes global heads and receipts and reads deltas
(shared subscriptions included). The broker's PUBACK / SUBACK reason codes say so."""
from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edge.broker import BrokerProcess
from edge.fleet.config import load_server_config
from edge.fleet.keys import load_public
from edge.fleet.receipts import unpack_receipt
from edge.fleet.server import FleetServer
from tests.fleet_helpers import make_keys, server_toml, signed_delta

ROOT = Path(__file__).resolve().parent.parent
ACL = ROOT / "deploy" / "mosquitto" / "edge.acl"
PREFIX = "fleet/test/vibration"
NOT_AUTHORIZED = 0x87


class _Ok:
    """A PUBACK that hands the message over: Success, or No matching subscribers (0x10)."""

    def __eq__(self, rc):
        return rc in (0x00, 0x10)

    def __repr__(self):
        return "success (0x00 or 0x10)"


OK = _Ok()
USERS = {"n1": "pw-n1", "n2": "pw-n2", "fleet-server": "pw-server"}


@pytest.fixture(scope="module")
def acl_broker(tmp_path_factory):
    if not shutil.which("mosquitto_passwd"):
        pytest.skip("mosquitto_passwd is not installed (apt-get install mosquitto)")
    d = tmp_path_factory.mktemp("acl")
    pw = d / "passwd"
    for i, (user, password) in enumerate(USERS.items()):
        subprocess.run(["mosquitto_passwd", "-b"] + (["-c"] if i == 0 else []) + [str(pw), user, password],
                       check=True, capture_output=True)
    # started as root (CI), mosquitto would drop to its own user, which cannot read the test's files
    conf = f"allow_anonymous false\npassword_file {pw}\nacl_file {ACL}\nuser root\n"
    with BrokerProcess(kind="mosquitto", extra_conf=conf) as b:
        yield b


class Peer:
    """A client of one user that records each PUBACK's and SUBACK's reason codes and what it receives."""

    def __init__(self, broker, user: str):
        self.acks: dict[int, int] = {}
        self.subacks: dict[int, list[int]] = {}
        self.msgs: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"acl-{user}", protocol=mqtt.MQTTv5)
        c.username_pw_set(user, USERS[user])
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        c.connect(broker.host, broker.port)
        c.loop_start()
        self.c = c

    def _on_publish(self, c, u, mid, rc, props):
        with self.cond:
            self.acks[mid] = rc.value
            self.cond.notify_all()

    def _on_subscribe(self, c, u, mid, rcs, props):
        with self.cond:
            self.subacks[mid] = [r.value for r in rcs]
            self.cond.notify_all()

    def _on_message(self, c, u, m):
        with self.cond:
            self.msgs.append((m.topic, m.payload))
            self.cond.notify_all()

    def _wait(self, pred, timeout=10.0):
        with self.cond:
            assert self.cond.wait_for(pred, timeout), "timed out"

    def publish(self, topic: str, payload: bytes = b"x", *, retain: bool = False) -> int:
        """The PUBACK's reason code."""
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        self._wait(lambda: info.mid in self.acks)
        return self.acks[info.mid]

    def subscribe(self, topic: str) -> int:
        """The SUBACK's reason code (granted QoS, or >= 0x80)."""
        _, mid = self.c.subscribe(topic, qos=1)
        self._wait(lambda: mid in self.subacks)
        return self.subacks[mid][0]

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def peers(acl_broker):
    ps = {u: Peer(acl_broker, u) for u in USERS}
    yield ps
    for p in ps.values():
        p.close()


def test_a_device_writes_only_its_own_delta_and_request_topics(peers):
    n1 = peers["n1"]
    assert n1.publish(f"{PREFIX}/delta/n1") == OK
    assert n1.publish(f"{PREFIX}/request/n1") == OK
    assert n1.publish(f"{PREFIX}/delta/n2") == NOT_AUTHORIZED
    assert n1.publish(f"{PREFIX}/request/n2") == NOT_AUTHORIZED
    assert n1.publish(f"{PREFIX}/global", retain=True) == NOT_AUTHORIZED
    assert n1.publish(f"{PREFIX}/receipt/n1") == NOT_AUTHORIZED


def test_a_device_reads_the_global_head_and_only_its_own_receipts(peers):
    """mosquitto grants a subscription and applies read rules to each message it would deliver:
    what a device may not read never reaches it, whatever it subscribed to."""
    n1, n2, srv = peers["n1"], peers["n2"], peers["fleet-server"]
    for topic in (f"{PREFIX}/global", f"{PREFIX}/receipt/+", f"{PREFIX}/delta/+", f"{PREFIX}/request/+"):
        assert n1.subscribe(topic) == 1
    # each PUBACK comes after the broker routed the message, so these are all decided first
    assert srv.publish(f"{PREFIX}/receipt/n2", b"for n2") == OK
    assert n2.publish(f"{PREFIX}/delta/n2", b"d2") == OK
    assert n2.publish(f"{PREFIX}/request/n2", b"") == OK
    assert srv.publish(f"{PREFIX}/global", b"head") == OK
    assert srv.publish(f"{PREFIX}/receipt/n1", b"for n1") == OK
    n1._wait(lambda: (f"{PREFIX}/receipt/n1", b"for n1") in n1.msgs)
    assert n1.msgs == [(f"{PREFIX}/global", b"head"), (f"{PREFIX}/receipt/n1", b"for n1")]


def test_only_the_server_writes_heads_and_receipts_and_reads_deltas_also_shared(peers):
    srv, n1, n2 = peers["fleet-server"], peers["n1"], peers["n2"]
    assert srv.publish(f"{PREFIX}/global", b"", retain=True) == OK  # (an empty retained message clears it)
    assert srv.publish(f"{PREFIX}/receipt/n1") == OK
    assert srv.subscribe(f"$share/fleet/{PREFIX}/delta/+") == 1
    assert srv.subscribe(f"$share/fleet/{PREFIX}/request/+") == 1
    assert n2.subscribe(f"$share/other/{PREFIX}/delta/+") == 1  # granted, and yet it gets nothing
    assert n1.publish(f"{PREFIX}/delta/n1", b"d1") == OK
    assert n1.publish(f"{PREFIX}/request/n1", b"r1") == OK
    srv._wait(lambda: (f"{PREFIX}/request/n1", b"r1") in srv.msgs)
    assert srv.msgs == [(f"{PREFIX}/delta/n1", b"d1"), (f"{PREFIX}/request/n1", b"r1")]
    assert n2.msgs == []


def test_a_fleet_server_with_a_password_file_answers_a_device_through_the_acl(tmp_path, acl_broker, peers):
    """The whole path under the shipped ACL: the server logs in with [mqtt] password_file,
    a device's delta passes the broker, and the device gets its signed receipt."""
    keys = make_keys(tmp_path, ["n1"])
    secret = tmp_path / "server.pw"
    secret.write_text(USERS["fleet-server"] + "\n")
    secret.chmod(0o600)
    cfg = server_toml(tmp_path, keys, acl_broker, store=str(tmp_path / "fleet.db"), name="fleet-srv-acl", k=1000, t_s=3600.0)
    cfg.write_text(cfg.read_text() + f'username = "fleet-server"\npassword_file = "{secret}"\n')
    server = FleetServer(load_server_config(cfg))
    server.start()
    n1 = peers["n1"]
    try:
        assert server.connected.wait(10)
        assert n1.subscribe(f"{PREFIX}/receipt/n1") == 1
        assert n1.publish(f"{PREFIX}/delta/n1", signed_delta(keys["n1"].private_path, node="n1", seq=1)) == OK
        n1._wait(lambda: any(t == f"{PREFIX}/receipt/n1" and p != b"for n1" for t, p in n1.msgs))
        (r,) = [unpack_receipt(p, [load_public(keys["server"].public_path)]) for t, p in n1.msgs if t.endswith("/receipt/n1")]
        assert (r.node, r.seq, r.status) == ("n1", 1, "accepted")
    finally:
        server.stop()
