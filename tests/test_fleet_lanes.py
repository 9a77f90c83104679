"""Aggregation lanes (edge/fleet/lanes.py, FORMAT.md "Lanes"): a device that switched to a
release syncs in the lane of its model's content hash, beside the devices on the server's
own model, in the same run. Real mosquitto, a real ``FleetServer``, real SQLite and
PostgreSQL stores; the devices' deltas are signed with real device keys."""
from __future__ import annotations

import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from edge.fleet.client import SyncClient
from edge.fleet.codec import unpack_message, verify_signature
from edge.fleet.config import load_server_config
from edge.fleet.device import lane_of
from edge.fleet.heads import initial_arrays, lane_key
from edge.fleet.keys import create_key, load_private, load_public
from edge.fleet.lanes import lane_store_url
from edge.fleet.receipts import unpack_receipt
from edge.fleet.release import make_release, operate
from edge.fleet.server import FleetServer
from edge.fleet.store import open_store
from edge.zoo import ModelFolder, resolve_model
from tests.fleet_helpers import make_keys, server_toml, signed_delta
from tests.helpers import Client

pytestmark = pytest.mark.timeout(120)
PG = "postgresql://postgres@127.0.0.1:5432/test"
BASE = "fleet/test/vibration"
DEFAULT = resolve_model("vibration")


def _release_folder(root, version: str, head_scale: float):
    """The shipped model re-versioned, with its head scaled: another content hash, another
    version 0 of the head (the graph is left out: it would be stale for the new weights)."""
    from safetensors.numpy import load, save

    dst = root / f"vibration-{version}"
    shutil.copytree(DEFAULT.path, dst, ignore=shutil.ignore_patterns("model.onnx", "__pycache__"))
    m = dst / "manifest.toml"
    m.write_text(re.sub(r'(?m)^version = ".*"$', f'version = "{version}"', m.read_text(), count=1))
    w = dst / "weights.safetensors"
    t = dict(load(w.read_bytes()))
    for k in ("head.weight", "head.bias"):
        t[k] = (t[k] * np.float32(head_scale)).astype(np.float32)
    w.write_bytes(save(t))
    return ModelFolder(dst)


@pytest.fixture
def keys(tmp_path):
    k = make_keys(tmp_path, ["n1", "n2"])
    k["release"] = create_key(tmp_path / "keys", "rel", role="release")
    return k


def _cfg(tmp_path, keys, broker, store: str, *, max_lanes: int = 4):
    p = server_toml(tmp_path, keys, broker, store=store, k=2, t_s=3600.0)
    text = p.read_text().replace("[mqtt]", f"max_lanes = {max_lanes}\n\n[mqtt]", 1)
    p.write_text(text + f'\n[release]\nkey_file = "{keys["release"].private_path}"\nchunk_size = 4096\n')
    return load_server_config(p)


def _release(cfg, keys, folder, rid: str):
    store = open_store(cfg.server.store)
    try:
        return make_release(cfg, store, folder.path, load_private(keys["release"].private_path), waves="100",
                            release_id=rid)
    finally:
        store.close()


def _server(cfg) -> FleetServer:
    s = FleetServer(cfg)
    s.start()
    assert s.connected.wait(10)
    return s


def _heads(msgs, topic: str) -> list:
    return [unpack_message(p) for t, p, _ in msgs if t == topic and p]


def _head(watch, topic: str, version: int):
    return watch.wait_for(lambda m: [g for g in _heads(m, topic) if g.header.version == version], 20)[0]


def _receipts(watch, topic: str, server_pub) -> list:
    return [unpack_receipt(p, [server_pub]) for t, p, _ in watch.msgs if t == topic]


def _receipt(watch, topic: str, server_pub, seq: int):
    return watch.wait_for(lambda m: [r for r in _receipts(watch, topic, server_pub) if r.seq == seq], 20)[0]


def _clear_retained(broker, *topics: str) -> None:
    c = Client(broker)
    for t in topics:
        c.publish(t, b"", qos=1)
        c.c.publish(t, b"", qos=1, retain=True).wait_for_publish(5)
    c.close()


@pytest.fixture
def pg_schema():
    yield from fresh_pg_schema("lanes")


def _lanes_beside_the_default_lane(tmp_path, broker, keys, store: str) -> str:
    cfg = _cfg(tmp_path, keys, broker, store)
    rel = _release_folder(tmp_path, "1.1.0", head_scale=0.5)
    lane = lane_key(rel.content_hash)
    _release(cfg, keys, rel, "0123456789abcdef")
    server_pub = load_public(keys["server"].public_path)
    watch = Client(broker, f"{BASE}/global", f"{BASE}/global/+", f"{BASE}/receipt/+", f"{BASE}/receipt/+/+")
    server = _server(cfg)
    try:
        # the lane's version 0 is the release's own shipped head, signed, retained on its own topic
        v0 = _head(watch, f"{BASE}/global/{lane}", 0)
        assert verify_signature(v0, server_pub) and v0.header.model_hash == rel.content_hash
        want = initial_arrays(rel, kind="linear")
        assert all(np.array_equal(v0.tensors[k], want[k]) for k in want)
        d0 = _head(watch, f"{BASE}/global", 0)
        assert d0.header.model_hash == DEFAULT.content_hash

        # a device on the release: its deltas go into the lane, answered on the lane's receipt topic
        for n, seed in (("n1", 1), ("n2", 2)):
            watch.publish(f"{BASE}/delta/{n}", signed_delta(keys[n].private_path, node=n, seq=1, seed=seed, model=rel))
        r = _receipt(watch, f"{BASE}/receipt/n1/{lane}", server_pub, 1)
        assert r.accepted and r.stored_seq == 1
        v1 = _head(watch, f"{BASE}/global/{lane}", 1)
        assert v1.header.model_hash == rel.content_hash and v1.header.samples == 2
        assert not any(g.header.version >= 1 for g in _heads(watch.msgs, f"{BASE}/global"))  # default untouched
        # a head request on the lane's topic is answered with the lane's head
        seen = len(_heads(watch.msgs, f"{BASE}/global/{lane}"))
        watch.publish(f"{BASE}/request/n1/{lane}", b"{}")
        again = watch.wait_for(lambda m: _heads(m, f"{BASE}/global/{lane}")[seen:], 20)
        assert again[0].header.version == 1 and server.counters["republished_on_request"] >= 1

        # devices on the default model, same nodes and seqs, in the same run: the default lane
        for n, seed in (("n1", 3), ("n2", 4)):
            watch.publish(f"{BASE}/delta/{n}", signed_delta(keys[n].private_path, node=n, seq=1, seed=seed))
        assert _receipt(watch, f"{BASE}/receipt/n1", server_pub, 1).accepted
        d1 = _head(watch, f"{BASE}/global", 1)
        assert d1.header.model_hash == DEFAULT.content_hash

        # a hash no stored release has is still refused (by the default lane), and the refusal
        # goes where a device serving that model listens: the claimed hash's lane topic
        other = _release_folder(tmp_path, "9.9.9", head_scale=2.0)
        watch.publish(f"{BASE}/delta/n1", signed_delta(keys["n1"].private_path, node="n1", seq=2, model=other))
        refused = _receipt(watch, f"{BASE}/receipt/n1/{lane_key(other.content_hash)}", server_pub, 2)
        assert not refused.accepted and refused.reason == "wrong_model_hash"
        assert server.agg.rejected["wrong_model_hash"] == 1
        assert server.lanes.by_key(lane_key(other.content_hash)) is None
    finally:
        server.stop()

    # a restarted server has the lane again, at its version, and goes on in it
    server = _server(cfg)
    try:
        assert server.lanes.by_key(lane).agg.current == 1
        for n, seed in (("n1", 5), ("n2", 6)):
            watch.publish(f"{BASE}/delta/{n}", signed_delta(keys[n].private_path, node=n, seq=2, seed=seed,
                                                            base_version=1, model=rel))
        assert _receipt(watch, f"{BASE}/receipt/n2/{lane}", server_pub, 2).accepted
        assert _head(watch, f"{BASE}/global/{lane}", 2).header.model_hash == rel.content_hash
        assert server.agg.current == 1  # the default lane kept its own history
    finally:
        server.stop()
        watch.close()
        _clear_retained(broker, f"{BASE}/global", f"{BASE}/global/{lane}", f"{BASE}/release")
    return lane


def test_a_release_lane_aggregates_beside_the_default_lane_and_survives_a_restart_sqlite(tmp_path, broker, keys):
    lane = _lanes_beside_the_default_lane(tmp_path, broker, keys, str(tmp_path / "fleet.db"))
    assert (tmp_path / f"fleet.lane-{lane}.db").is_file()


def test_a_release_lane_aggregates_beside_the_default_lane_and_survives_a_restart_postgresql(tmp_path, broker, keys,
                                                                                            pg_schema):
    _lanes_beside_the_default_lane(tmp_path, broker, keys, f"{PG}?schema={pg_schema}")


def test_lanes_are_bounded_and_an_aborted_release_loses_its_lane_first(tmp_path, broker, keys):
    cfg = _cfg(tmp_path, keys, broker, str(tmp_path / "fleet.db"), max_lanes=1)
    a, b = _release_folder(tmp_path, "1.1.0", 0.5), _release_folder(tmp_path, "1.2.0", 0.25)
    la, lb = lane_key(a.content_hash), lane_key(b.content_hash)
    _release(cfg, keys, a, "aaaaaaaaaaaaaaaa")
    watch = Client(broker, f"{BASE}/global/+", f"{BASE}/receipt/+/+")
    server = _server(cfg)
    try:
        _head(watch, f"{BASE}/global/{la}", 0)
        # a newer release while the server runs: its first delta makes the server read the
        # store again, the one lane goes to it, and the older release's retained head is cleared
        _release(cfg, keys, b, "bbbbbbbbbbbbbbbb")
        watch.publish(f"{BASE}/delta/n1", signed_delta(keys["n1"].private_path, node="n1", seq=1, model=b))
        server_pub = load_public(keys["server"].public_path)
        assert _receipt(watch, f"{BASE}/receipt/n1/{lb}", server_pub, 1).accepted
        assert [lane.key for lane in server.lanes.snapshot()] == ["", lb]
        watch.wait_for(lambda m: [1 for t, p, _ in m if t == f"{BASE}/global/{la}" and p == b""], 20)
        # aborting the newer one gives the lane back to the older: aborted releases go last
        store = open_store(cfg.server.store)
        try:
            operate(store, "bbbbbbbbbbbbbbbb", "abort", load_private(keys["release"].private_path))
        finally:
            store.close()
        server.lanes.refresh()  # the aggregator thread does this every second; here, now
        assert [lane.release for lane in server.lanes.snapshot()] == ["", "aaaaaaaaaaaaaaaa"]
    finally:
        server.stop()
        watch.close()
        _clear_retained(broker, f"{BASE}/global", f"{BASE}/global/{la}", f"{BASE}/global/{lb}", f"{BASE}/release")


def test_a_device_serving_a_release_uses_its_lanes_topics(tmp_path):
    rel = _release_folder(tmp_path, "1.1.0", 0.5)
    cfg = SimpleNamespace(model=SimpleNamespace(path="vibration"))
    assert lane_of(cfg, DEFAULT) == "" and lane_of(cfg, rel) == rel.content_hash[:16]

    class Worker:  # what SyncClient needs of the learner thread to be built
        learner = SimpleNamespace(head=SimpleNamespace(kind="linear", arrays=lambda: initial_arrays(rel, kind="linear")),
                                  counters={"labels": 0})

        def attach_state(self, name, obj):
            pass

    key = load_private(make_keys(tmp_path, ["n1"])["n1"].private_path)
    c = SyncClient(worker=Worker(), node="n1", fleet="test", model="vibration", model_hash=rel.content_hash, key=key,
                   server_keys=[], publish=lambda *a, **k: None, lane=lane_of(cfg, rel))
    lane = rel.content_hash[:16]
    assert (c.global_topic, c.receipt_topic, c.request_topic, c.delta_topic) == (
        f"{BASE}/global/{lane}", f"{BASE}/receipt/n1/{lane}", f"{BASE}/request/n1/{lane}", f"{BASE}/delta/n1")


def test_lane_stores_sit_beside_the_default_store():
    assert lane_store_url("/s/fleet.db", "ab") == "/s/fleet.lane-ab.db"
    assert lane_store_url(f"{PG}?schema=f1", "ab") == f"{PG}?schema=f1_lane_ab"


# ---- the shipped ACL on lane topics (deploy/mosquitto/edge.acl) -------------------------------

from tests.test_fleet_acl import NOT_AUTHORIZED, OK, PREFIX, acl_broker, peers  # noqa: E402,F401  (fixtures)
from tests.helpers import fresh_pg_schema

LANE = "0123456789abcdef"


def test_acl_a_device_writes_only_its_own_lane_requests_and_reads_only_its_own_lane_receipts(peers):
    n1, n2, srv = peers["n1"], peers["n2"], peers["fleet-server"]
    assert n1.publish(f"{PREFIX}/request/n1/{LANE}") == OK
    assert n1.publish(f"{PREFIX}/request/n2/{LANE}") == NOT_AUTHORIZED
    assert n1.publish(f"{PREFIX}/global/{LANE}", retain=True) == NOT_AUTHORIZED
    assert n1.publish(f"{PREFIX}/receipt/n1/{LANE}") == NOT_AUTHORIZED
    for topic in (f"{PREFIX}/global/+", f"{PREFIX}/receipt/+/+"):
        assert n1.subscribe(topic) == 1
    assert srv.subscribe(f"$share/fleet/{PREFIX}/request/+/+") == 1
    assert srv.publish(f"{PREFIX}/receipt/n2/{LANE}", b"for n2") == OK
    assert srv.publish(f"{PREFIX}/global/{LANE}", b"lane head") == OK
    assert srv.publish(f"{PREFIX}/receipt/n1/{LANE}", b"for n1") == OK
    assert n2.publish(f"{PREFIX}/request/n2/{LANE}", b"r2") == OK
    srv._wait(lambda: (f"{PREFIX}/request/n2/{LANE}", b"r2") in srv.msgs)
    n1._wait(lambda: (f"{PREFIX}/receipt/n1/{LANE}", b"for n1") in n1.msgs)
    assert n1.msgs == [(f"{PREFIX}/global/{LANE}", b"lane head"), (f"{PREFIX}/receipt/n1/{LANE}", b"for n1")]


# ---- end to end: a real `edge run` switches to a release, then syncs in its lane ---------------

def test_a_daemon_that_switched_to_a_release_syncs_in_its_lane(tmp_path, broker):
    """One real device process ([adapt], [fleet], [deploy]) and a real FleetServer: the
    release rolls out to it through the server's chunks, the restarted daemon serves it, and
    its deltas, learned on the new backbone, are accepted into the release's lane (a signed
    receipt on the lane's topic), whose new version the device adopts. About 30-60 s on the
    shared box: the only proof with a daemon that really switched (the rest of this file
    drives the server with signed deltas)."""
    from edge.serve.cache import ArtifactCache
    from edge.serve.compile import obtain
    from edge.serve.testing import make_tiny_model
    from edge.fleet.keys import export_public
    from tests.helpers import poll
    from tests.test_deploy_device import _scale_head, _set_version
    from tests.test_release_fleet_e2e import Feed, Proc, Watch, _device_toml

    node, cache = "fl-a", tmp_path / "cache"
    for name, version, factor in (("current", "0.0.1", 0.1), ("good", "0.0.2", 1.0)):
        make_tiny_model(tmp_path / name, name="tiny")
        _set_version(tmp_path / name, version)
        if factor != 1.0:
            _scale_head(tmp_path / name, factor)
        obtain(ModelFolder(tmp_path / name), "onnxruntime", "int8", cache=ArtifactCache(cache))
    good = ModelFolder(tmp_path / "good")
    lane = lane_key(good.content_hash)
    keys = make_keys(tmp_path, [node])
    keys["release"] = create_key(tmp_path / "keys", "rel", role="release")
    export_public(tmp_path / "keys", "rel", role="release", to=tmp_path / "keys" / "releases")
    srv_toml = server_toml(tmp_path, keys, broker, store=str(tmp_path / "fleet.db"), model=str(tmp_path / "current"),
                           k=1, t_s=3600.0)
    srv_toml.write_text(srv_toml.read_text() + f'\n[release]\nkey_file = "{keys["release"].private_path}"\n'
                        'chunk_size = 4096\ncheck_s = 0.1\n')
    cfg = load_server_config(srv_toml)
    dev_toml = _device_toml(tmp_path, keys, broker, node, cache)
    dev_toml.write_text(dev_toml.read_text().replace(
        '[fleet]\n', f'[fleet]\nenabled = true\nserver_key = "{keys["server"].public_path}"\ninterval_s = 0.5\n', 1))
    base = "fleet/test/tiny"
    server_pub = load_public(keys["server"].public_path)
    watch = Watch(broker, load_public(keys["release"].public_path))
    seen = Client(broker, f"{base}/receipt/{node}/+", f"{base}/global/{lane}", f"edge/{node}/events")
    feed, device = Feed(broker), Proc(["run", "-c", str(dev_toml)], tmp_path / f"{node}.log")
    server = _server(cfg)
    device.start()
    try:
        poll(lambda: feed.send(2) or watch.serving(node, "tiny@0.0.1"), 180, interval=0.5,
             what="predictions of the current model")
        _release(cfg, keys, good, "00000000000000a1")
        poll(lambda: feed.send(4) or watch.serving(node, "tiny@0.0.2"), 180, interval=0.3,
             what="the device serving the release")

        def lane_receipts():
            return [r for r in _receipts(seen, f"{base}/receipt/{node}/{lane}", server_pub) if r.accepted]
        poll(lambda: feed.send(2) or lane_receipts(), 120, interval=0.3, what="a delta accepted into the release's lane")
        assert server.lanes.by_key(lane).agg.counters["accepted"] >= 1
        assert server.agg.rejected["wrong_model_hash"] == 0  # nothing of it went to the default lane
        poll(lambda: feed.send(2) or any(b"sync_rebased" in p for t, p, _ in seen.msgs if t.endswith("/events")), 60,
             interval=0.3, what="the device adopting a version of its lane's head")
        assert any(g.header.version >= 1 and g.header.model_hash == good.content_hash
                   for g in _heads(seen.msgs, f"{base}/global/{lane}"))
    finally:
        device.stop()
        server.stop()
        watch.close()
        seen.close()
        _clear_retained(broker, f"{base}/global", f"{base}/global/{lane}", f"{base}/release")
        feed.c.close()
