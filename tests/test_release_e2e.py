"""Model releases on real ``edge run`` processes (real mosquitto, the test-side release publisher
of tests/release_helpers.py built from ``edge.fleet.release_codec`` and a release key).

- a good release is downloaded, verified, gated, shadowed on live windows and labels, and
  switched: the daemon restarts itself on it, its predictions name the new version, and
  the learner's checkpoints of the old model are set aside (a ``stale-*`` folder), not applied;
- ``kill -9`` in the middle of a download: the restarted device asks only for the chunks
  it does not hold (every ask is counted by the publisher).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from edge.fleet.keys import create_key, export_public, load_private, load_public
from edge.serve.testing import make_tiny_model, synthetic_dataset
from tests.helpers import Client, poll
from tests.release_helpers import ReleasePublisher, device_toml
from tests.test_deploy_device import _scale_head, _set_version

ROOT = Path(__file__).resolve().parent.parent
NODE = "rel-1"
pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, broker):
    root = tmp_path_factory.mktemp("e2e")
    make_tiny_model(root / "current", name="tiny")
    _scale_head(root / "current", 0.1)
    make_tiny_model(root / "good", name="tiny")
    _set_version(root / "good", "0.0.2")
    dev = create_key(root / "keys", NODE, role="device")
    rel = create_key(root / "keys", "rel", role="release")
    export_public(root / "keys", "rel", role="release", to=root / "keys" / "releases")
    return {"root": root, "device": dev, "release": load_private(rel.private_path),
            "device_pub": load_public(dev.public_path), "cache": root / "cache"}


def _config(setup, broker, state: Path) -> Path:
    p = state.parent / f"{state.name}.toml"
    device_toml(p, node=NODE, state=state, broker=broker, model=setup['root'] / 'current', cache=setup['cache'],
                key_file=setup['device'].private_path, adapt="checkpoint_interval_s = 1.0")
    return p


class Node:
    def __init__(self, cfg: Path, log: Path):
        self.cfg, self.log = cfg, log
        self.proc = None

    def start(self):
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", "-c", str(self.cfg)], cwd=ROOT,
                                         env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=out,
                                         stderr=subprocess.STDOUT)

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Feed:
    """Labelled windows of the tiny model's data on sensors/m1/acc, one window per message."""

    def __init__(self, broker):
        self.c = Client(broker, f"edge/{NODE}/predictions/#")
        self.t = time.time()
        self.i = 0

    def send(self, n: int) -> None:
        x, y = synthetic_dataset(n, seed=self.i)
        for k in range(n):
            t0 = self.t
            self.t += 128 * 0.002
            self.c.publish("sensors/m1/acc", {"t0": t0, "dt": 0.002, "v": x[k].T.round(5).tolist()}, qos=0)
            self.c.publish(f"edge/{NODE}/labels/m1/acc", {"t": t0 + 0.12, "label": ["low", "mid", "high"][y[k]]})
        self.i += 1

    def models(self) -> set[str]:
        with self.c.cond:
            return {orjson.loads(p).get("model") for t, p, _ in self.c.msgs}


def test_good_release_switches_a_running_daemon(setup, broker, tmp_path):
    pub = ReleasePublisher(broker, key=setup["release"], device_keys=[setup["device_pub"]], fleet="test", model="tiny")
    node = Node(_config(setup, broker, tmp_path / "state"), tmp_path / "node.log")
    feed = Feed(broker)
    try:
        node.start()
        poll(lambda: (feed.send(2) or "tiny@0.0.1" in feed.models()), 180, interval=0.5, what="the first predictions")
        m = pub.release(setup["root"] / "good", release="00000000000001a1")
        poll(lambda: "shadowing" in pub.states(m.release), 180, interval=0.5, what="the shadow test")
        poll(lambda: (feed.send(4) or "switched" in pub.states(m.release)), 180, interval=0.3,
             what="the switched report from the restarted daemon")
        assert "refused" not in pub.states(m.release)
        feed.c.msgs.clear()
        poll(lambda: (feed.send(2) or "tiny@0.0.2" in feed.models()), 120, interval=0.5, what="predictions of 0.0.2")
        assert feed.models() == {"tiny@0.0.2"}
        stale = list((tmp_path / "state" / NODE / "adapt").glob("stale-*"))
        assert stale, "the learner's checkpoints of the old model were not set aside"
        active = json.loads((tmp_path / "state" / NODE / "deploy" / "active.json").read_text())
        assert active["release"] == m.release and active["confirmed"]
    finally:
        node.stop()
        feed.c.close()
        pub.close()


def test_kill_9_mid_download_resumes_without_asking_again(setup, broker, tmp_path):
    pub = ReleasePublisher(broker, key=setup["release"], device_keys=[setup["device_pub"]], fleet="test", model="tiny")
    pub.answer_limit = 3
    state = tmp_path / "state"
    node = Node(_config(setup, broker, state), tmp_path / "node.log")
    held_file = state / NODE / "deploy" / "00000000000002b2" / "held.json"
    try:
        node.start()
        m = pub.release(setup["root"] / "good", release="00000000000002b2")
        poll(lambda: held_file.exists() and len(json.loads(held_file.read_text())["held"]) == 3, 180, interval=0.2,
             what="three chunks held")
        node.kill9()
        held = set(json.loads(held_file.read_text())["held"])
        before = dict(pub.asked)
        pub.answer_limit = None
        node.start()
        poll(lambda: "verified" in pub.states(m.release), 180, interval=0.3, what="the resumed download verified")
        again = {i for (r, i), n in pub.asked.items() if r == m.release and n > before.get((r, i), 0)}
        assert again == set(range(m.n_chunks)) - held, f"asked again: {sorted(again)}, held: {sorted(held)}"
    finally:
        node.stop()
        pub.close()
