"""The fleet server's side of model releases: ``make_release`` (pack, sign, store), the
retained manifest, chunk serving by signed request, report intake, the rollout rule
(waves open, halt on a worse report, done), operator halt/resume/abort, and a restarted
server continuing the rollout, on SQLite and on PostgreSQL. Real mosquitto, a real
``FleetServer``; the devices are fakes made from ``release_codec`` with real device keys."""
from __future__ import annotations

import hashlib
import threading

import paho.mqtt.client as mqtt
import pytest

from edge.errors import ConfigError
from edge.fleet import release_codec as rc
from edge.fleet.config import load_server_config
from edge.fleet.keys import create_key, generate_key, load_private, load_public
from edge.fleet.release import make_release, operate, publish_manifest_once, release_topic
from edge.fleet.server import FleetServer
from edge.fleet.store import open_store
from edge.zoo import folder_digest, resolve_model
from tests.fleet_helpers import make_keys, server_toml
from tests.helpers import poll

pytestmark = pytest.mark.timeout(120)
PG = "postgresql://postgres@127.0.0.1:5432/test"
NODES = [f"n{i}" for i in range(8)]
MODEL = resolve_model("vibration")


class FakeDevice:
    """A device's release protocol made from the codec: it reads the manifest and its own
    chunk topic, and sends signed chunk requests and reports."""

    def __init__(self, broker, node: str, key, *, prefix="fleet/test/vibration/release"):
        self.node, self.key, self.prefix, self.seq = node, key, prefix, 0
        self.manifests: list[bytes] = []
        self.chunks: list[bytes] = []
        self.cond = threading.Condition()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.c.on_connect = lambda c, *a: c.subscribe([(prefix, 1), (f"{prefix}/chunk/{node}", 1)])
        self.c.on_message = self._on_message
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()

    def _on_message(self, c, u, m):
        with self.cond:
            (self.chunks if "/chunk/" in m.topic else self.manifests).append(m.payload)
            self.cond.notify_all()

    def wait(self, pred, what: str, timeout: float = 20.0):
        with self.cond:
            if not self.cond.wait_for(lambda: pred(self), timeout):
                raise AssertionError(f"{self.node}: timed out waiting for {what}")

    def manifest(self, release_pub, pred=lambda m: True, timeout: float = 20.0) -> rc.Manifest:
        """The newest manifest that verifies and satisfies ``pred``."""
        def ok(d):
            ms = [rc.unpack_manifest(p, [release_pub]) for p in d.manifests if p]
            return any(pred(m) for m in ms)
        self.wait(ok, "a manifest", timeout)
        with self.cond:
            return max((rc.unpack_manifest(p, [release_pub]) for p in self.manifests if p), key=lambda m: m.seq)

    def get(self, m: rc.Manifest, start: int, count: int, *, key=None, node=None):
        r = rc.ChunkRequest(fleet="test", model="vibration", node=node or self.node, release=m.release,
                            start=start, count=count)
        self.c.publish(f"{self.prefix}/get/{self.node}", rc.pack_request(r, key or self.key), qos=1).wait_for_publish(5)

    def report(self, m: rc.Manifest, state: str, reason: str = "", *, key=None, node=None):
        self.seq += 1
        r = rc.Report(fleet="test", model="vibration", node=node or self.node, release=m.release, seq=self.seq,
                      state=state, reason=reason, evidence={"labels": 60} if state == "shadowing" else {},
                      progress=(m.n_chunks, m.n_chunks))
        self.c.publish(f"{self.prefix}/report/{self.node}", rc.pack_report(r, key or self.key), qos=1).wait_for_publish(5)

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def keys(tmp_path):
    k = make_keys(tmp_path, NODES)
    k["release"] = create_key(tmp_path / "keys", "rel", role="release")
    return k


def _cfg(tmp_path, keys, broker, *, store=None, extra: str = ""):
    p = server_toml(tmp_path, keys, broker, store=store or str(tmp_path / "fleet.db"), k=1000, t_s=3600.0)
    p.write_text(p.read_text() + f'''
[release]
key_file = "{keys["release"].private_path}"
chunk_size = 4096
check_s = 0.05
{extra}
''')
    return load_server_config(p)


def _server(cfg) -> FleetServer:
    s = FleetServer(cfg)
    s.start()
    assert s.connected.wait(10)
    return s


@pytest.fixture
def devices(broker, keys):
    made = {n: FakeDevice(broker, n, load_private(keys[n].private_path)) for n in NODES}
    yield made
    for d in made.values():
        d.close()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    c.connect(broker.host, broker.port)
    c.loop_start()
    c.publish("fleet/test/vibration/release", b"", qos=1, retain=True).wait_for_publish(5)
    c.disconnect()
    c.loop_stop()


def _outcome(server, kind: str, outcome: str) -> int:
    return server.releases.counters[(kind, outcome)]


def test_release_is_stored_signed_and_published_retained(tmp_path, broker, keys, devices):
    cfg = _cfg(tmp_path, keys, broker)
    store = open_store(cfg.server.store)
    rec = make_release(cfg, store, MODEL.path, load_private(keys["release"].private_path), waves="100")
    rec2, published = publish_manifest_once(cfg, store, "vibration")
    pub = load_public(keys["release"].public_path)
    m = devices["n0"].manifest(pub)
    assert published and rec2.seq == rec.seq == m.seq == 1
    assert m.digest == folder_digest(MODEL.path)  # what `edge pin` prints
    assert hashlib.sha256(store.release_bundle(rec.release)).hexdigest() == m.bundle_sha256
    assert m.previous == {"version": MODEL.manifest.version, "digest": folder_digest(MODEL.path)}
    assert (m.state, m.wave, m.waves) == ("rolling", 0, (100,))
    store.close()


def test_an_oversized_release_is_refused_at_release_time(tmp_path, broker, keys):
    cfg = _cfg(tmp_path, keys, broker, extra="max_bundle_bytes = 4096")
    store = open_store(cfg.server.store)
    with pytest.raises(ConfigError, match="max_bundle_bytes"):
        make_release(cfg, store, MODEL.path, load_private(keys["release"].private_path))
    assert store.releases() == []
    store.close()


def test_chunks_are_served_by_signed_request_and_rebuild_the_bundle(tmp_path, broker, keys, devices):
    cfg = _cfg(tmp_path, keys, broker)
    store = open_store(cfg.server.store)
    make_release(cfg, store, MODEL.path, load_private(keys["release"].private_path), waves="100")
    server = _server(cfg)
    try:
        d = devices["n1"]
        m = d.manifest(load_public(keys["release"].public_path))
        for start in range(0, m.n_chunks, rc.MAX_COUNT):
            d.get(m, start, rc.MAX_COUNT)
        d.wait(lambda x: len(x.chunks) >= m.n_chunks, "every chunk")
        parts = {}
        for frame in d.chunks:
            c = rc.unpack_chunk(frame, max_len=m.chunk_size)
            parts[c.index] = rc.check_chunk(m, c)
        bundle = b"".join(parts[i] for i in range(m.n_chunks))
        assert hashlib.sha256(bundle).hexdigest() == m.bundle_sha256
        assert rc.parse_bundle(bundle) == MODEL.files
        assert _outcome(server, "request", "served") == -(-m.n_chunks // rc.MAX_COUNT)
        assert devices["n2"].chunks == []  # each device's chunks go to its own topic only
    finally:
        server.stop()
        store.close()


def test_unsigned_foreign_and_impersonating_messages_are_refused_and_counted(tmp_path, broker, keys, devices):
    cfg = _cfg(tmp_path, keys, broker)
    store = open_store(cfg.server.store)
    rec = make_release(cfg, store, MODEL.path, load_private(keys["release"].private_path), waves="100")
    server = _server(cfg)
    try:
        d = devices["n1"]
        m = d.manifest(load_public(keys["release"].public_path))
        d.get(m, 0, 4, key=generate_key())  # a key nobody registered
        d.get(m, 0, 4, key=load_private(keys["n2"].private_path), node="n2")  # n2's key on n1's topic
        d.c.publish(f"{d.prefix}/get/{d.node}", b"\x00" * 40, qos=1).wait_for_publish(5)  # garbage
        d.report(m, "switched", key=generate_key())
        d.report(m, "switched", key=load_private(keys["n2"].private_path), node="n2")
        poll(lambda: sum(server.releases.counters[(k, o)] for k in ("request", "report")
                         for o in ("unknown_key", "node_mismatch", "garbage")) >= 5, 20, what="five refusals")
        assert _outcome(server, "request", "unknown_key") == 2  # a stranger's and n2's key on n1's topic
        assert _outcome(server, "request", "garbage") == 1
        assert _outcome(server, "report", "unknown_key") == 2
        assert d.chunks == [] and store.release_reports(rec.release) == []
        text = server.registry().render()
        assert 'edge_fleet_release_messages_total{kind="request",outcome="unknown_key"} 2.0' in text
    finally:
        server.stop()
        store.close()


def _admitted(rel, waves, wave):
    return [n for n in NODES if rc.wave_of(rel, n, waves) <= wave]


def _switch(devices, nodes, m):
    for n in nodes:
        devices[n].report(m, "verified")
        devices[n].report(m, "switched")


def test_waves_open_as_devices_switch_until_done(tmp_path, broker, keys, devices):
    cfg = _cfg(tmp_path, keys, broker)
    store = open_store(cfg.server.store)
    rec = make_release(cfg, store, MODEL.path, load_private(keys["release"].private_path), waves="25,60,100",
                       release_id=_split_id((25, 60, 100)))
    pub = load_public(keys["release"].public_path)
    server = _server(cfg)
    try:
        watcher = devices["n0"]
        switched: set = set()
        while True:
            m = watcher.manifest(pub, lambda x: x.state == "done" or bool(set(_admitted(rec.release, x.waves, x.wave)) - switched))
            if m.state == "done":
                break
            todo = [n for n in _admitted(m.release, m.waves, m.wave) if n not in switched]
            # the wave that is not open yet is not served
            later = [n for n in NODES if n not in _admitted(m.release, m.waves, m.wave)]
            if later:
                before = _outcome(server, "request", "not_admitted")
                devices[later[0]].get(m, 0, 1)
                poll(lambda: _outcome(server, "request", "not_admitted") > before, 20, what="not_admitted")
            _switch(devices, todo, m)
            switched |= set(todo)
        assert switched == set(NODES) and m.wave == len(m.waves) - 1
        poll(lambda: {p.node: p.state for p in store.release_reports(rec.release)} == dict.fromkeys(NODES, "switched"),
             20, what="every device's switched report stored")
        assert store.release(rec.release).state == "done"
    finally:
        server.stop()
        store.close()


def test_a_worse_report_halts_the_rollout_and_abort_is_published(tmp_path, broker, keys, devices):
    cfg = _cfg(tmp_path, keys, broker)
    store = open_store(cfg.server.store)
    key = load_private(keys["release"].private_path)
    # a plan whose first wave admits someone: 50% of 8 names
    rec = make_release(cfg, store, MODEL.path, key, waves="50,100", release_id=_split_id())
    first = assume_devices = _admitted(rec.release, (50, 100), 0)
    pub = load_public(keys["release"].public_path)
    server = _server(cfg)
    try:
        m = devices["n0"].manifest(pub)
        devices[assume_devices[0]].report(m, "shadowing")
        devices[assume_devices[0]].report(m, "refused", "worse")
        halted = devices["n0"].manifest(pub, lambda x: x.state == "halted")
        assert halted.wave == 0 and halted.seq > m.seq
        assert "worse" in store.release(rec.release).note
        later = [n for n in NODES if n not in first][0]
        before = _outcome(server, "request", "not_admitted")
        devices[later].get(halted, 0, 1)  # a halted release is served to nobody
        poll(lambda: _outcome(server, "request", "not_admitted") > before, 20, what="not_admitted")
        assert devices[later].chunks == []
        operate(store, rec.release, "abort", key)
        publish_manifest_once(cfg, store, "vibration")
        aborted = devices["n0"].manifest(pub, lambda x: x.state == "aborted")
        assert aborted.seq > halted.seq and aborted.previous["digest"] == folder_digest(MODEL.path)
        with pytest.raises(Exception, match="aborted"):
            operate(store, rec.release, "resume", key)
    finally:
        server.stop()
        store.close()


def test_resume_forgives_the_refusals_counted_so_far(tmp_path, broker, keys):
    cfg = _cfg(tmp_path, keys, broker)
    store = open_store(cfg.server.store)
    key = load_private(keys["release"].private_path)
    rec = make_release(cfg, store, MODEL.path, key, waves="100")
    halted = operate(store, rec.release, "halt", key)
    resumed = operate(store, rec.release, "resume", key)
    m = rc.unpack_manifest(resumed.manifest, [load_public(keys["release"].public_path)])
    assert (halted.state, resumed.state, m.state) == ("halted", "rolling", "rolling")
    assert rec.seq < halted.seq < resumed.seq == m.seq
    store.close()


def _split_id(waves=(50, 100)) -> str:
    """A release id whose first wave admits 1 to 4 of the 8 names: the rollout then has a
    first wave to complete and a second to open (a random id gives none, or 7 of 8, at times)."""
    return next(r for r in (f"{i:016x}" for i in range(1000)) if 1 <= len(_admitted(r, waves, 0)) <= 4)


def _restart_continues(tmp_path, broker, keys, devices, store_url):
    cfg = _cfg(tmp_path, keys, broker, store=store_url)
    store = open_store(store_url)
    rec = make_release(cfg, store, MODEL.path, load_private(keys["release"].private_path), waves="50,100",
                       release_id=_split_id())
    pub = load_public(keys["release"].public_path)
    first = _admitted(rec.release, (50, 100), 0)
    server = _server(cfg)
    try:
        m = devices["n0"].manifest(pub)
        _switch(devices, first, m)
        opened = devices["n0"].manifest(pub, lambda x: x.wave == 1)
    finally:
        server.stop()
    # a new server process's worth of state: a new server object on the same store
    server = _server(cfg)
    try:
        rest = [n for n in NODES if n not in first]
        _switch(devices, rest, opened)
        done = devices["n0"].manifest(pub, lambda x: x.state == "done")
        assert done.seq > opened.seq
        # done once switch_ratio of them switched: the last reports may come just after
        poll(lambda: {p.node for p in store.release_reports(rec.release) if p.state == "switched"} == set(NODES),
             20, what="every device's switched report stored")
    finally:
        server.stop()
        store.close()


def test_a_restarted_server_continues_the_rollout_sqlite(tmp_path, broker, keys, devices):
    _restart_continues(tmp_path, broker, keys, devices, str(tmp_path / "fleet.db"))


@pytest.fixture
def schema():
    yield from fresh_pg_schema("fleet")


def test_a_restarted_server_continues_the_rollout_postgresql(tmp_path, broker, keys, devices, schema):
    _restart_continues(tmp_path, broker, keys, devices, f"{PG}?schema={schema}")


# ---- the shipped ACL on release topics (deploy/mosquitto/edge.acl) ----------------------------

from tests.test_fleet_acl import NOT_AUTHORIZED, OK, acl_broker, peers  # noqa: E402,F401  (fixtures)
from tests.helpers import fresh_pg_schema

REL = "fleet/test/vibration/release"


def test_acl_a_device_writes_only_its_own_get_and_report_topics(peers):
    n1 = peers["n1"]
    assert n1.publish(f"{REL}/get/n1") == OK
    assert n1.publish(f"{REL}/report/n1") == OK
    for topic in (f"{REL}/get/n2", f"{REL}/report/n2", f"{REL}/chunk/n1", REL):
        assert n1.publish(topic, retain=topic == REL) == NOT_AUTHORIZED, topic


def test_acl_a_device_reads_the_manifest_and_only_its_own_chunks(peers):
    n1, n2, srv = peers["n1"], peers["n2"], peers["fleet-server"]
    for topic in (REL, f"{REL}/chunk/+", f"{REL}/get/+", f"{REL}/report/+"):
        assert n1.subscribe(topic) == 1
    assert srv.subscribe(f"$share/fleet/{REL}/get/+") == 1
    assert srv.subscribe(f"$share/fleet/{REL}/report/+") == 1
    assert srv.publish(f"{REL}/chunk/n2", b"for n2") == OK
    assert n2.publish(f"{REL}/get/n2", b"g2") == OK
    assert n2.publish(f"{REL}/report/n2", b"r2") == OK
    assert srv.publish(REL, b"manifest") == OK
    assert srv.publish(f"{REL}/chunk/n1", b"for n1") == OK
    n1._wait(lambda: (f"{REL}/chunk/n1", b"for n1") in n1.msgs)
    srv._wait(lambda: (f"{REL}/report/n2", b"r2") in srv.msgs)
    assert [m for m in n1.msgs if m[0].startswith(REL)] == [(REL, b"manifest"), (f"{REL}/chunk/n1", b"for n1")]
    assert (f"{REL}/get/n2", b"g2") in srv.msgs
    assert srv.publish(REL, b"", retain=True) == OK


# ---- the commands ------------------------------------------------------------------------------

def _edge(*args, check=True):
    import json
    import subprocess
    import sys
    from pathlib import Path

    p = subprocess.run([sys.executable, "-m", "edge.cli", *map(str, args)], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parent.parent)
    if check:
        assert p.returncode == 0, p.stderr[-2000:]
    return p, [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


def test_release_rollout_and_releases_commands(tmp_path, broker, keys, devices):
    kd = tmp_path / "cli-keys"
    p, _ = _edge("keys", "create", "ops", "--role", "release", "--dir", kd)
    assert "created release key ops" in p.stdout
    cfg = server_toml(tmp_path, keys, broker, store=str(tmp_path / "fleet.db"), k=1000, t_s=3600.0)
    _, (out,) = _edge("fleet-server", "release", MODEL.path, "--waves", "10,100", "--min-labels", "7", "-c", cfg,
                      "--key", "ops", "--keys-dir", kd)
    assert out["published"] and out["state"] == "rolling" and out["waves"] == [10, 100]
    m = devices["n0"].manifest(load_public(kd / "ops.release.pub"))
    assert (m.release, m.min_labels, m.digest) == (out["release"], 7, folder_digest(MODEL.path))
    _, (st,) = _edge("fleet-server", "rollout", "status", "-c", cfg)
    assert st["release"] == m.release and st["seq"] == m.seq
    _, (halted,) = _edge("fleet-server", "rollout", "halt", "-c", cfg, "--key", "ops", "--keys-dir", kd)
    assert halted["state"] == "halted" and halted["published"]
    assert devices["n0"].manifest(load_public(kd / "ops.release.pub"), lambda x: x.state == "halted").seq > m.seq
    p, _ = _edge("fleet-server", "rollout", "halt", "-c", cfg, "--key", "ops", "--keys-dir", kd, check=False)
    assert p.returncode != 0 and "halt applies to rolling only" in p.stderr
    _, listing = _edge("fleet-server", "releases", "-c", cfg)
    assert [r["release"] for r in listing] == [m.release] and listing[0]["reports"] == []
    p, _ = _edge("fleet-server", "release", MODEL.path, "-c", cfg, check=False)  # no key given, none configured
    assert p.returncode == 2 and "release key" in p.stderr


def test_a_rolled_back_after_a_switch_halts_but_one_answering_a_halt_does_not(tmp_path, broker, keys, devices):
    cfg = _cfg(tmp_path, keys, broker)
    store = open_store(cfg.server.store)
    key = load_private(keys["release"].private_path)
    rec = make_release(cfg, store, MODEL.path, key, waves="100")
    pub = load_public(keys["release"].public_path)
    server = _server(cfg)
    try:
        m = devices["n0"].manifest(pub)
        devices["n1"].report(m, "shadowing")
        devices["n1"].report(m, "rolled_back", "halted before the switch")  # never switched: not counted
        poll(lambda: any(p.state == "rolled_back" for p in store.release_reports(rec.release)), 20, what="report")
        server.releases.check()
        assert store.release(rec.release).state == "rolling"
        _switch(devices, ["n2"], m)
        devices["n2"].report(m, "rolled_back", "failed after the switch")
        halted = devices["n0"].manifest(pub, lambda x: x.state == "halted")
        assert "rolled_back: 1" in store.release(rec.release).note and halted.seq > m.seq
    finally:
        server.stop()
        store.close()
