"""Model releases end to end across a fleet (issue 20): a REAL fleet server process
(``edge fleet-server run``, SQLite or PostgreSQL store) and three REAL ``edge run`` processes with
``[deploy]`` on, over one real mosquitto; the tiny test model; the operator's commands
(``rollout status``, ``rollout abort``, ``releases``) run as processes too.

The scenarios share the processes (module scope) and run in file order, each starting from
where the one before left the fleet:

1. a good release rolls out wave by wave (``34,67,100`` over three devices, one device per
   wave), the server is killed (``kill -9``) right after its first wave opened the second and
   started again: the new process continues from the store; every device switches (run
   on SQLite and again on PostgreSQL);
2. ``rollout abort`` brings every switched device back to the previous model;
3. a worse release (a flipped head: worse on the devices' live labels) is refused by the
   only device of its first wave and halted there; the other devices never take it, none
   switches, and every device serves the current model throughout.

Release ids are chosen (``make_release`` in-process on the server's store, then published
by the running server) so that the waves hold the devices as the scenarios need: the wave
of a device is a hash of the release id and its name (RELEASE_FORMAT.md, "Wave selection").
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
import uuid
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import pytest

from edge.errors import DecodeError
from edge.fleet import release_codec as rc
from edge.fleet.config import load_server_config
from edge.fleet.keys import create_key, export_public, load_private, load_public
from edge.fleet.release import make_release
from edge.fleet.store import open_store
from edge.serve.cache import ArtifactCache
from edge.serve.compile import obtain
from edge.serve.testing import make_tiny_model, synthetic_dataset
from edge.zoo import ModelFolder
from tests.fleet_helpers import make_keys, server_toml
from tests.helpers import Client, poll
from tests.release_helpers import device_toml
from tests.test_deploy_device import _scale_head, _set_version

ROOT = Path(__file__).resolve().parent.parent
NODES = ("fl-a", "fl-b", "fl-c")
WAVES = (34, 67, 100)
PG = "postgresql://postgres@127.0.0.1:5432/test"
pytestmark = pytest.mark.timeout(300)


def _release_id(pred) -> str:
    """The first id ``0000000000000001``, ``...2``, ... whose waves over NODES satisfy ``pred``."""
    for i in range(1, 100_000):
        rid = f"{i:016x}"
        if pred({n: rc.wave_of(rid, n, WAVES) for n in NODES}):
            return rid
    raise AssertionError("no release id fits")


GOOD_ID = _release_id(lambda w: sorted(w.values()) == [0, 1, 2])  # one device per wave
WORSE_ID = _release_id(lambda w: sorted(w.values()) == [0, 1, 2] and w != {n: rc.wave_of(GOOD_ID, n, WAVES)
                                                                           for n in NODES})


class Proc:
    """One ``python -m edge.cli ...`` process, its output in a log file."""

    def __init__(self, args: list[str], log: Path):
        self.args, self.log, self.p = args, log, None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.p = subprocess.Popen([sys.executable, "-m", "edge.cli", *self.args], cwd=ROOT, stdout=out,
                                      stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})

    def kill9(self) -> None:
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(10)

    def stop(self) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                self.p.kill()


class Watch:
    """What the fleet shows: every verified manifest (in arrival order), and per node the
    models its predictions named, with the manifest count when each model was first seen."""

    def __init__(self, broker, release_pub):
        self.pub, self.lock = release_pub, threading.Lock()
        self.manifests: list[rc.Manifest] = []
        self.models: dict[str, dict[str, int]] = {n: {} for n in NODES}  # node -> model -> manifests seen then
        self.counts: dict[str, dict[str, int]] = {n: {} for n in NODES}  # node -> model -> predictions
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.c.on_connect = lambda c, *a: c.subscribe([("fleet/test/tiny/release", 1), ("edge/+/predictions/#", 0)])
        self.c.on_message = self._on_message
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()

    def _on_message(self, c, u, msg) -> None:
        with self.lock:
            if msg.topic.endswith("/release"):
                try:
                    self.manifests.append(rc.unpack_manifest(msg.payload, [self.pub]))
                except DecodeError:
                    pass  # a cleared topic, or an earlier run's manifest (another release key)
                return
            node, model = msg.topic.split("/")[1], orjson.loads(msg.payload).get("model")
            if node in self.models:
                self.models[node].setdefault(model, len(self.manifests))
                self.counts[node][model] = self.counts[node].get(model, 0) + 1

    def manifest(self, release: str, pred=lambda m: True):
        with self.lock:
            return next((m for m in reversed(self.manifests) if m.release == release and pred(m)), None)

    def serving(self, node: str, model: str) -> bool:
        with self.lock:
            return model in self.models[node]

    def snapshot(self) -> dict:
        with self.lock:
            return {n: dict(c) for n, c in self.counts.items()}

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class Feed:
    """Labelled windows of the tiny model's data: one sensor topic every device reads, and
    each window's label on every device's own label topic."""

    def __init__(self, broker):
        self.c = Client(broker)
        self.t, self.i = time.time(), 0

    def send(self, n: int) -> None:
        x, y = synthetic_dataset(n, seed=self.i)
        for k in range(n):
            t0 = self.t
            self.t += 128 * 0.002
            self.c.publish("sensors/m1/acc", {"t0": t0, "dt": 0.002, "v": x[k].T.round(5).tolist()}, qos=0)
            for node in NODES:
                self.c.publish(f"edge/{node}/labels/m1/acc", {"t": t0 + 0.12, "label": ["low", "mid", "high"][y[k]]},
                               qos=0)
        self.i += 1


def _device_toml(root: Path, keys: dict, broker, node: str, cache: Path) -> Path:
    """A small device: the current model served int8, [deploy] on, every window shadowed, and
    [adapt] on: each device's head adapts on these same labels and soon beats the current
    model's weak shipped head. The shadow test compares a release with the current backbone
    and its shipped head, not with the adapted one (edge/deploy/shadow.py), so a good release
    still rolls out while the devices learn (the learner bound to a switched model:
    tests/test_release_e2e.py)."""
    p = root / f"{node}.toml"
    device_toml(p, node=node, state=root / "state" / node, broker=broker, model=root / "current", cache=cache,
                key_file=keys[node].private_path, adapt="enabled = true")
    return p


def _store_url(kind: str, root: Path):
    """The fleet store: a SQLite file, or a fresh PostgreSQL schema (skipped when none is reachable)."""
    if kind == "sqlite":
        return str(root / "fleet.db"), lambda: None
    psycopg = pytest.importorskip("psycopg")
    try:
        psycopg.connect(PG, connect_timeout=3).close()
    except psycopg.Error:
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432 (.ci/run starts one)")
    name = f"fleet_e2e_{uuid.uuid4().hex[:10]}"

    def drop():
        with psycopg.connect(PG, autocommit=True) as c:
            c.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    return f"{PG}?schema={name}", drop


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fleet(request, tmp_path_factory, broker):
    """The models (current: a weak head; good: the real one; worse: flipped), their int8 builds in
    the devices' shared cache, keys, the fleet server process (on SQLite, or on PostgreSQL) and
    three device processes."""
    root = tmp_path_factory.mktemp("fleet-e2e")
    store, drop_store = _store_url(request.param, root)
    cache = root / "cache"
    for name, version, factor in (("current", "0.0.1", 0.1), ("good", "0.0.2", 1.0), ("worse", "0.0.3", -1.0)):
        make_tiny_model(root / name, name="tiny")
        _set_version(root / name, version)
        if factor != 1.0:
            _scale_head(root / name, factor)
        obtain(ModelFolder(root / name), "onnxruntime", "int8", cache=ArtifactCache(cache))
    keys = make_keys(root, NODES)
    keys["release"] = create_key(root / "keys", "rel", role="release")
    export_public(root / "keys", "rel", role="release", to=root / "keys" / "releases")
    srv_toml = server_toml(root, keys, broker, store=store, model=str(root / "current"),
                           k=1000, t_s=3600.0)
    srv_toml.write_text(srv_toml.read_text() + f'''
[release]
key_file = "{keys["release"].private_path}"
chunk_size = 4096
check_s = 0.1
''')
    server = Proc(["fleet-server", "run", "-c", str(srv_toml)], root / "server.log")
    devices = {n: Proc(["run", "-c", str(_device_toml(root, keys, broker, n, cache))], root / f"{n}.log")
               for n in NODES}
    watch = Watch(broker, load_public(keys["release"].public_path))
    feed = Feed(broker)
    server.start()
    for d in devices.values():
        d.start()
    f = types.SimpleNamespace(store=request.param, root=root, keys=keys, srv_toml=srv_toml, cfg=load_server_config(srv_toml), server=server,
                              devices=devices, watch=watch, feed=feed,
                              release_key=load_private(keys["release"].private_path))
    try:
        poll(lambda: feed.send(2) or all(watch.serving(n, "tiny@0.0.1") for n in NODES), 180, interval=0.5,
             what="predictions of the current model from every device")
        yield f
    finally:
        for d in devices.values():
            d.stop()
        server.stop()
        watch.close()
        feed.c.publish("fleet/test/tiny/release", b"", qos=1)  # the next run's devices trust other keys
        feed.c.close()
        drop_store()


def _release(f, folder: Path, rid: str, *, min_labels: int = 20, margin: float = 0.05):
    """``make_release`` on the server's store with the release id ``rid``; the running server publishes it."""
    import edge.fleet.release as rel

    real = rel.secrets
    rel.secrets = types.SimpleNamespace(token_hex=lambda n: rid)  # the only random part of a release
    store = open_store(f.cfg.server.store)
    try:
        return make_release(f.cfg, store, folder, f.release_key, waves=",".join(map(str, WAVES)),
                            min_labels=min_labels, margin=margin)
    finally:
        rel.secrets = real
        store.close()


def _edge(f, *args) -> list[dict]:
    """An operator's command against the server's config, its JSON lines."""
    p = subprocess.run([sys.executable, "-m", "edge.cli", "fleet-server", *args, "-c", str(f.srv_toml)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-2000:]
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


def _feed_until(f, pred, timeout: float, what: str):
    """Live labelled windows until ``pred()`` (bounded, on the event, not on time)."""
    return poll(lambda: f.feed.send(4) or pred(), timeout, interval=0.3, what=what)


def _wave(rid: str, node: str) -> int:
    return rc.wave_of(rid, node, WAVES)


def test_a_good_release_rolls_out_wave_by_wave_through_a_server_restart(fleet):
    f, w = fleet, fleet.watch
    order = sorted(NODES, key=lambda n: _wave(GOOD_ID, n))  # the device of wave 0, of 1, of 2
    rec = _release(f, f.root / "good", GOOD_ID)
    assert rec.release == GOOD_ID and rec.state == "rolling" and rec.wave == 0
    _feed_until(f, lambda: w.serving(order[0], "tiny@0.0.2"), 120, "the first wave's device serving 0.0.2")
    opened = _feed_until(f, lambda: w.manifest(GOOD_ID, lambda m: m.wave >= 1), 60, "the second wave opened")
    assert opened.wave == 1 and opened.state == "rolling"
    # the server dies right after it opened a wave; a new process goes on from the SQLite store
    f.server.kill9()
    (status,) = _edge(f, "rollout", "status")
    assert status["release"] == GOOD_ID and status["wave"] == 1 and status["devices"].get("switched") == 1
    f.server.start()
    done = _feed_until(f, lambda: w.manifest(GOOD_ID, lambda m: m.state == "done"), 180, "the rollout done")
    assert done.seq > opened.seq
    _feed_until(f, lambda: all(w.serving(n, "tiny@0.0.2") for n in NODES), 60, "every device serving 0.0.2")
    # wave by wave: a device served the release only once the manifest of its wave was out
    waves_seen = [m.wave for m in w.manifests if m.release == GOOD_ID]
    assert waves_seen == sorted(waves_seen) and {0, 1, 2} <= set(waves_seen)
    for n in NODES:
        first_admitting = next(i for i, m in enumerate(w.manifests)
                               if m.release == GOOD_ID and (m.state == "done" or m.wave >= _wave(GOOD_ID, n)))
        assert w.models[n]["tiny@0.0.2"] > first_admitting, f"{n} served 0.0.2 before its wave opened"
    (status,) = _edge(f, "rollout", "status")
    assert status["state"] == "done" and status["devices"] == {"switched": 3}
    assert status["ever_switched"] == sorted(NODES)
    (listing, *_) = _edge(f, "releases")
    assert {r["node"]: r["state"] for r in listing["reports"]} == dict.fromkeys(NODES, "switched")
    assert {r["node"]: r["wave"] for r in listing["reports"]} == {n: _wave(GOOD_ID, n) for n in NODES}


def _sqlite_only(f) -> None:
    """Abort and halt are the same on both stores: the PostgreSQL run is for the restart only."""
    if f.store != "sqlite":
        pytest.skip("abort and halt run on SQLite; the PostgreSQL run covers the restarted server")


def test_abort_brings_every_switched_device_back_to_the_previous_model(fleet):
    f, w = fleet, fleet.watch
    _sqlite_only(f)
    assert all(w.serving(n, "tiny@0.0.2") for n in NODES), "needs the good release switched (the test before)"
    before = w.snapshot()
    (out,) = _edge(f, "rollout", "abort", "--key", "rel", "--keys-dir", str(f.root / "keys"))
    assert out["state"] == "aborted" and out["published"]

    def back(n):  # predictions of 0.0.1 again, after the abort
        return w.snapshot()[n].get("tiny@0.0.1", 0) > before[n].get("tiny@0.0.1", 0)

    _feed_until(f, lambda: all(back(n) for n in NODES), 120, "every device serving 0.0.1 again")
    _feed_until(f, lambda: {r["state"] for r in _edge(f, "releases")[0]["reports"]} == {"rolled_back"}, 60,
                "every device's rolled_back report")
    for n in NODES:
        active = f.root / "state" / n / n / "deploy" / "active.json"
        assert not active.exists() or json.loads(active.read_text()) is None
    # nothing serves 0.0.2 any more: a window sent now is predicted by 0.0.1 on every device
    mid = w.snapshot()
    _feed_until(f, lambda: all(w.snapshot()[n].get("tiny@0.0.1", 0) > mid[n].get("tiny@0.0.1", 0) for n in NODES),
                30, "fresh predictions of 0.0.1")
    late = w.snapshot()
    assert all(late[n].get("tiny@0.0.2", 0) == mid[n].get("tiny@0.0.2", 0) for n in NODES)


def test_a_worse_release_is_halted_in_its_first_wave_and_no_device_switches(fleet):
    f, w = fleet, fleet.watch
    _sqlite_only(f)
    first = next(n for n in NODES if _wave(WORSE_ID, n) == 0)
    before = w.snapshot()
    _release(f, f.root / "worse", WORSE_ID)
    halted = _feed_until(f, lambda: w.manifest(WORSE_ID, lambda m: m.state == "halted"), 120, "the halt")
    assert halted.wave == 0
    (listing, *_) = _edge(f, "releases")
    assert listing["release"] == WORSE_ID and listing["state"] == "halted" and "worse" in listing["note"]
    assert [(r["node"], r["state"], r["reason"]) for r in listing["reports"]] == [(first, "refused", "worse")]
    assert listing["reports"][0]["evidence"]["labels"] >= 20
    assert listing["ever_switched"] == []
    # every device kept serving the current model, and only it, throughout and after
    mid = w.snapshot()
    _feed_until(f, lambda: all(w.snapshot()[n].get("tiny@0.0.1", 0) > mid[n].get("tiny@0.0.1", 0) for n in NODES),
                30, "predictions after the halt")
    after = w.snapshot()
    for n in NODES:
        assert set(after[n]) - set(before[n]) == set(), f"{n} served another model: {after[n]}"
        assert after[n].get("tiny@0.0.3", 0) == 0 and after[n].get("tiny@0.0.2", 0) == before[n].get("tiny@0.0.2", 0)
        assert after[n]["tiny@0.0.1"] > mid[n]["tiny@0.0.1"] > before[n].get("tiny@0.0.1", 0)
