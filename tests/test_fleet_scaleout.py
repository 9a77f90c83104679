"""Scale-out that holds: several real `edge fleet-server run` processes in one shared
subscription group on one PostgreSQL and one mosquitto, with simulated devices that sign
valid deltas and, like the real courier, send a delta again until a signed receipt says
it is stored (here every 1 s, so the tests stay short; a real device waits at least 10 s).

- a burst through 2 and 3 instances: every delta stored once, no deadlock left unhandled;
- 5 kills (SIGKILL) and 5 scale-downs (SIGTERM) of an instance at random moments while
  the devices send (a few seconds in all): every delta stored exactly once, whether or not
  the instance comes back;
- the retained global head, watched all along, never goes back; `rollback` publishes
  while the instances run.
"""
from __future__ import annotations

import random
import signal
import threading

import paho.mqtt.client as mqtt
import pytest

from edge.fleet.codec import unpack_message
from edge.fleet.keys import load_public
from edge.fleet.receipts import unpack_receipt
from edge.fleet.store import open_store
from tests.fleet_helpers import make_keys, server_toml, signed_delta
from tests.test_fleet_postgres import PG, _spawn, _wait, schema  # noqa: F401 (schema: the fixture)

pytestmark = pytest.mark.timeout(300)
RESEND_S = 1.0


class SimDevices:
    """Simulated devices on one MQTT connection: ``send`` publishes a signed delta and keeps
    it until an ``accepted`` receipt for it comes; ``resend`` (its own thread) publishes
    the un-receipted ones again every ``RESEND_S``. ``heads`` is every version the global
    topic carried, in arrival order."""

    def __init__(self, broker, keys: dict, nodes: list[str]):
        self.keys, self.nodes = keys, nodes
        self.server_key = load_public(keys["server"].public_path)
        self.pending: dict[tuple[str, int], bytes] = {}
        self.sent, self.receipted, self.heads = 0, set(), []
        self.cond = threading.Condition()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.c.on_connect = lambda c, *a: c.subscribe([("fleet/test/vibration/receipt/+", 1),
                                                       ("fleet/test/vibration/global", 1)])
        self.c.on_message = self._on_message
        self.c.reconnect_delay_set(0.1, 0.5)
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._resend, daemon=True)
        self._thread.start()

    def _on_message(self, c, u, m):
        if m.topic.endswith("/global"):
            if m.payload:
                with self.cond:
                    self.heads.append(unpack_message(m.payload).header.version)
            return
        r = unpack_receipt(m.payload, [self.server_key])
        with self.cond:
            if r.status == "accepted" and self.pending.pop((r.node, r.seq), None) is not None:
                self.receipted.add((r.node, r.seq))
            self.cond.notify_all()

    def send(self, node: str, seq: int) -> None:
        payload = signed_delta(self.keys[node].private_path, node=node, seq=seq, seed=hash((node, seq)) % 2**31)
        with self.cond:
            self.pending[(node, seq)] = payload
            self.sent += 1
        self.c.publish(f"fleet/test/vibration/delta/{node}", payload, qos=1)

    def _resend(self) -> None:
        while not self._stop.wait(RESEND_S):  # the device's resend timer, not a test's wait
            with self.cond:
                due = list(self.pending.items())
            for (node, _), payload in due:
                self.c.publish(f"fleet/test/vibration/delta/{node}", payload, qos=1)

    def wait_all_receipted(self, timeout: float, logs=()) -> None:
        _wait(lambda: not self.pending, timeout, f"receipts for every delta ({len(self.pending)} missing)", logs)

    def close(self) -> None:
        self._stop.set()
        self.c.disconnect()
        self.c.loop_stop()


def assert_stored_exactly_once(url: str, sent: set, timeout: float, logs=()) -> None:
    """Every sent (node, seq) stored once, and applied into exactly one version."""
    store = open_store(url)
    try:
        _wait(lambda: store.pending().count == 0 and len(store.deltas()) >= len(sent), timeout, "every delta applied", logs)
        deltas = store.deltas()
        assert sorted((d.node, d.seq) for d in deltas) == sorted(sent)  # each once, none missing, none extra
        made = {v.version: v for v in store.versions(limit=10**6) if v.n_deltas}
        applied = [d.applied_version for d in deltas]
        assert {v: applied.count(v) for v in set(applied)} == {v: r.n_deltas for v, r in made.items()}
    finally:
        store.close()


def assert_heads_never_go_back(heads: list[int]) -> None:
    back = [(a, b) for a, b in zip(heads, heads[1:]) if b < a]
    assert not back, f"the retained head went back: {back[:5]} in {len(heads)} publishes"


def _stop_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(20)
        except Exception:
            p.kill()


def _fleet(tmp_path, broker, schema, n_instances: int, nodes, *, k: int = 20, t_s: float = 0.5):
    keys = make_keys(tmp_path, nodes)
    url = f"{PG}?schema={schema}"
    cfgs = [server_toml(tmp_path, keys, broker, store=url, name=f"srv-{i}", k=k, t_s=t_s, group="fleet")
            for i in range(n_instances)]
    logs = [tmp_path / f"srv-{i}.log" for i in range(n_instances)]
    procs = [_spawn(c, lg) for c, lg in zip(cfgs, logs)]
    _wait(lambda: all("subscribed" in lg.read_text() for lg in logs), 90, "every instance subscribed", logs)
    return keys, url, cfgs, logs, procs


@pytest.mark.parametrize("n_instances", [2, 3])
def test_a_burst_through_several_instances_stores_every_delta_once_without_deadlock(tmp_path, broker, schema,
                                                                                    n_instances):
    nodes = [f"n{i:02d}" for i in range(30)]
    keys, url, cfgs, logs, procs = _fleet(tmp_path, broker, schema, n_instances, nodes)
    devs = SimDevices(broker, keys, nodes)
    try:
        sent = set()
        for seq in range(1, 9):  # 240 deltas, every device in every batch: the old deadlock's pattern
            for n in nodes:
                devs.send(n, seq)
                sent.add((n, seq))
        devs.wait_all_receipted(60, logs)
        assert_stored_exactly_once(url, sent, 30, logs)
        text = "".join(lg.read_text() for lg in logs)
        assert "deadlock" not in text.lower() and "Traceback" not in text
        assert_heads_never_go_back(devs.heads)
    finally:
        devs.close()
        _stop_all(procs)


def test_kills_and_scale_downs_while_devices_send_lose_nothing(tmp_path, broker, schema):
    """3 instances; 5 times an instance is killed with SIGKILL and 5 times stopped with
    SIGTERM, at random moments while 20 devices send; a stopped instance comes back,
    for the others (the first stays gone). Every delta is then stored exactly once within 60 s of the last send."""
    nodes = [f"n{i:02d}" for i in range(20)]
    keys, url, cfgs, logs, procs = _fleet(tmp_path, broker, schema, 3, nodes)
    devs = SimDevices(broker, keys, nodes)
    rng = random.Random(17)
    store = open_store(url)
    try:
        sent, seq, events = set(), 0, ["kill"] * 5 + ["term"] * 5
        rng.shuffle(events)
        for i, what in enumerate(events):
            # a random moment while deltas flow: a round is sent, and the event comes once a
            # random part of it is stored (the rest is in flight, queued, or being stored)
            for _ in range(rng.randint(1, 3)):
                seq += 1
                for n in nodes[: rng.randint(5, len(nodes))]:
                    devs.send(n, seq)
                    sent.add((n, seq))
            before = len(sent) - len(devs.pending)
            part = rng.randint(1, max(1, len(devs.pending) // 2))
            _wait(lambda: len(store.deltas()) >= before + part, 30, "part of the round stored", logs)
            live = [j for j, p in enumerate(procs) if p.poll() is None]
            j = rng.choice(live)
            procs[j].send_signal(signal.SIGKILL if what == "kill" else signal.SIGTERM)
            # -15: a SIGTERM that came while a restarted instance was still starting
            assert procs[j].wait(30) in (0, -9, -15)
            # at least two instances run on; a stopped one comes back, as systemd would,
            # except the first, which is gone for good
            if len(live) <= 2:
                procs[j] = _spawn(cfgs[j], logs[j])
        for n in nodes:  # a last round after the last event
            devs.send(n, seq + 1)
            sent.add((n, seq + 1))
        devs.wait_all_receipted(60, logs)
        assert_stored_exactly_once(url, sent, 30, logs)
        assert_heads_never_go_back(devs.heads)
    finally:
        store.close()
        devs.close()
        _stop_all(procs)


def test_rollback_publishes_while_instances_run_and_the_head_never_goes_back(tmp_path, broker, schema, capsys):
    from edge.cli import main

    nodes = [f"n{i}" for i in range(6)]
    keys, url, cfgs, logs, procs = _fleet(tmp_path, broker, schema, 2, nodes, k=3, t_s=0.2)
    devs = SimDevices(broker, keys, nodes)
    try:
        for n in nodes:
            devs.send(n, 1)
        devs.wait_all_receipted(30, logs)
        _wait(lambda: devs.heads and max(devs.heads) >= 1, 30, "a version from the deltas", logs)
        assert main(["fleet-server", "rollback", "0", "-c", str(cfgs[0])]) == 0
        out = capsys.readouterr().out
        assert "published True" in out
        rolled = int(out.split()[1])
        _wait(lambda: rolled in devs.heads, 10, "the rollback's version on the topic", logs)
        for n in nodes:  # deltas after the rollback: versions go on from it
            devs.send(n, 2)
        devs.wait_all_receipted(30, logs)
        _wait(lambda: max(devs.heads) > rolled, 30, "a version after the rollback", logs)
        assert_heads_never_go_back(devs.heads)
    finally:
        devs.close()
        _stop_all(procs)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_an_instance_gone_for_good_strands_no_share(tmp_path, broker, schema, how):
    """One of two instances is killed (or scaled down) and does not come back; deltas sent
    once after it is gone, never resent, are all stored by the other instance (its session
    ended with it, so the broker routes the whole group's stream to the one left)."""
    nodes = [f"n{i:02d}" for i in range(20)]
    keys, url, cfgs, logs, procs = _fleet(tmp_path, broker, schema, 2, nodes)
    devs = SimDevices(broker, keys, nodes)
    devs._stop.set()  # these devices never resend: nothing may wait for the instance that is gone
    try:
        procs[0].send_signal(getattr(signal, how))
        procs[0].wait(30)
        _wait(lambda: _sessions_gone(broker, "srv-0"), 10, "the broker to see srv-0 go", logs)
        sent = {(n, 1) for n in nodes}
        for n, seq in sorted(sent):
            devs.send(n, seq)
        devs.wait_all_receipted(20, logs)
        assert_stored_exactly_once(url, sent, 20, logs)
    finally:
        devs.close()
        _stop_all(procs)


def test_a_scale_down_in_the_middle_of_a_burst_needs_no_resend(tmp_path, broker, schema):
    """SIGTERM to one of two instances while 400 deltas arrive: it leaves the group, stores,
    receipts and acknowledges what it holds, then exits 0; devices that never resend still
    get a receipt for every delta, also for those sent after it is gone (the other instance
    takes the rest of the stream)."""
    nodes = [f"n{i:02d}" for i in range(40)]
    keys, url, cfgs, logs, procs = _fleet(tmp_path, broker, schema, 2, nodes)
    devs = SimDevices(broker, keys, nodes)
    devs._stop.set()  # no resends: a scale-down must strand nothing
    store = open_store(url)
    try:
        sent = {(n, seq) for seq in range(1, 11) for n in nodes}
        termed = False
        for n, seq in sorted(sent, key=lambda x: (x[1], x[0])):
            devs.send(n, seq)
            if not termed and len(devs.receipted) >= 20:
                procs[0].send_signal(signal.SIGTERM)  # mid-burst: some receipted, the rest still coming
                termed = True
        if not termed:  # the burst was sent before 20 receipts came: it is still being stored
            procs[0].send_signal(signal.SIGTERM)
        assert procs[0].wait(30) == 0
        for n in nodes:  # and after it is gone: the whole stream goes to the instance left
            devs.send(n, 11)
            sent.add((n, 11))
        devs.wait_all_receipted(30, logs)
        assert_stored_exactly_once(url, sent, 20, logs)
        assert "left group fleet (acknowledged)" in logs[0].read_text()
    finally:
        store.close()
        devs.close()
        _stop_all(procs)


def _sessions_gone(broker, client_id: str) -> bool:
    """The broker logged the end of ``client_id``'s connection (a clean disconnect, a closed
    or broken socket): from then on it routes nothing to that connection."""
    return any(client_id in ln and ("disconnect" in ln or "closed" in ln) for ln in broker.log_text().splitlines())


def test_one_instance_publishes_at_a_time_and_always_the_newest(tmp_path, schema):
    """The publish lock across instances: while one store holds it, another waits (seen in
    pg_locks, not by a timer), and gets the version committed meanwhile when its turn comes."""
    import psycopg

    url = f"{PG}?schema={schema}"
    a, b = open_store(url), open_store(url)
    try:
        a.ensure_version0(b"v0")
        got, entered = [], threading.Event()

        def publisher():
            with b.publishing() as head:
                got.append(head.version)
                entered.set()
        with a.publishing() as head:
            assert head.version == 0
            t = threading.Thread(target=publisher, daemon=True)
            t.start()
            with psycopg.connect(PG, autocommit=True) as c:
                _wait(lambda: c.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                        "AND NOT granted").fetchone()[0] > 0, 10, "b to wait for the publish lock")
            assert not entered.is_set()
            # committed (by a third connection) while a publishes: b must publish this one
            c2 = open_store(url)
            c2.add_version(lambda v: b"v%d" % v, "meanwhile")
            c2.close()
        t.join(10)
        assert got == [1]
    finally:
        a.close()
        b.close()


def test_the_example_broker_config_loads_in_mosquitto():
    """deploy/mosquitto/fleet.conf is valid for the installed mosquitto (it starts with it)."""
    import shutil
    from pathlib import Path

    from edge.broker import BrokerProcess

    if not shutil.which("mosquitto"):
        pytest.skip("mosquitto is not installed")
    conf = (Path(__file__).resolve().parent.parent / "deploy/mosquitto/fleet.conf").read_text()
    with BrokerProcess(kind="mosquitto", extra_conf=conf) as b:
        assert b.proc.poll() is None and "Error" not in b.log_text()
