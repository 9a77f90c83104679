"""Flash budget (issue 19): an idle learner writes no checkpoint, runtime files are not on flash."""
from __future__ import annotations

import numpy as np

from edge.adapt.heads import HeadSnapshot
from edge.adapt.worker import AdaptWorker
from edge.config import parse_config
from edge.ingest.types import StreamKey
from edge.state import CheckpointStore, ModelIdentity
from edge.supervise import wait_until
from edge.zoo import resolve_model

KEY = StreamKey("m1", "vib")
CLASSES = ("normal", "imbalance", "misalignment", "bearing_wear")


class _Clock:
    """A monotonic clock the test moves by hand (the worker's ``clock``)."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _worker(tmp_path, clock=None, interval_s=30.0):
    model = resolve_model("vibration")
    m = model.manifest
    _, head_sd = model.state_dicts()
    ghead = HeadSnapshot.from_arrays({k: v.numpy() for k, v in head_sd.items()}, kind="linear", task=m.task, version="g")
    cfg = parse_config({"node": {"name": "w", "state_dir": str(tmp_path)},
                        "adapt": {"checkpoint_interval_s": interval_s}})
    store = CheckpointStore(tmp_path / "adapt", identity=ModelIdentity.of(model, head=cfg.adapt.head))
    kw = {"clock": clock} if clock is not None else {}
    return AdaptWorker(cfg=cfg, model=model, global_head=ghead, store=store,
                       publish_event=lambda kind, **f: None, **kw)


def _teach(w, start: int, n: int) -> None:
    for i in range(start, start + n):
        z = np.random.default_rng(i).normal(size=64).astype(np.float32)
        w.offer_window(KEY, float(i), float(i) + 1.0, z, np.full(4, 0.25, np.float32))
        w.offer_label(KEY, i + 0.5, CLASSES[i % 4])


def test_an_unchanged_learner_is_not_checkpointed_again(tmp_path):
    w = _worker(tmp_path)
    _teach(w, 0, 8)
    w.start()
    try:
        assert wait_until(lambda: w.counters["learned"] == 8, timeout=60)
        assert w.offer_call(lambda wk: wk.checkpoint())  # on the learner thread, as the loop does
        assert wait_until(lambda: w.counters["checkpoints"] == 1, timeout=30)
        first = w.store.paths()
        for _ in range(3):  # idle: nothing learned, nothing matched since
            assert w.checkpoint() is True  # "on disk" (the fleet's write-ahead relies on it)
        assert w.store.paths() == first and w.counters["checkpoints"] == 1
        assert w.store.counters["unchanged"] == 3
        _teach(w, 8, 4)  # a change is written
        assert wait_until(lambda: w.counters["learned"] == 12, timeout=60)
        assert w.checkpoint() and w.counters["checkpoints"] == 2 and w.store.paths() != first
    finally:
        w.stop()  # the stop's checkpoint is unchanged too
    assert w.counters["checkpoints"] == 2


def test_a_restart_with_nothing_new_writes_no_checkpoint(tmp_path):
    w = _worker(tmp_path)
    _teach(w, 0, 8)
    w.start()
    assert wait_until(lambda: w.counters["learned"] == 8, timeout=60)
    w.stop()
    saved = [(p.name, p.stat().st_mtime_ns) for p in w.store.paths()]
    # the restored file's bytes differ from a re-encoding of what was applied (the label
    # cache's empty feature block comes back (0, 0), not (0, 64)): the state as applied is
    # what counts, so not even the first restart writes
    for _ in range(2):
        again = _worker(tmp_path)
        again.start()
        again.stop()
        assert [(p.name, p.stat().st_mtime_ns) for p in again.store.paths()] == saved
        assert again.counters["checkpoints"] == 0 and again.store.counters["unchanged"] == 1


def test_the_idle_loop_writes_nothing_interval_after_interval(tmp_path):
    clock = _Clock()
    w = _worker(tmp_path, clock=clock, interval_s=30.0)
    _teach(w, 0, 4)
    w.start()
    try:
        assert wait_until(lambda: w.counters["learned"] == 4, timeout=60)
        clock.t += 31  # the loop's next look at the clock checkpoints the change
        assert wait_until(lambda: w.counters["checkpoints"] == 1, timeout=30)
        for k in range(1, 5):  # four idle intervals, each seen by the loop
            clock.t += 31
            assert wait_until(lambda: w.store.counters["unchanged"] == k, timeout=30)
        assert w.counters["checkpoints"] == 1 and len(w.store.paths()) == 1
    finally:
        w.stop()


# ---- runtime files live in the runtime folder, not on the state folder's flash -------------

import json  # noqa: E402
import os  # noqa: E402
import stat  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from edge.daemon import Daemon  # noqa: E402
from edge.state import runtime_dir  # noqa: E402


def test_status_file_and_socket_are_in_the_runtime_folder_and_edge_status_finds_them(broker, tmp_path, monkeypatch):
    run = tmp_path / "run"  # what systemd's RuntimeDirectory= gives the unit (a tmpfs under /run)
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(run))
    state = tmp_path / "state"
    conf = tmp_path / "edge.toml"
    conf.write_text(f'[node]\nname = "rt"\nstate_dir = "{state}"\n[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
                    f'[model]\ncache_dir = "{tmp_path / "cache"}"\n')
    d = Daemon(parse_config({"node": {"name": "rt", "state_dir": str(state)},
                             "mqtt": {"host": broker.host, "port": broker.port},
                             "model": {"cache_dir": str(tmp_path / "cache")}}))
    d.start(connect_timeout=20)
    try:
        d.write_status()
        assert runtime_dir(d.cfg) == run / "rt"
        assert (run / "rt" / "edge.sock").is_socket() and (run / "rt" / "status.json").is_file()
        assert stat.S_IMODE((run / "rt").stat().st_mode) == 0o700
        live = json.loads(subprocess.run([sys.executable, "-m", "edge.cli", "status", "-c", str(conf), "--json"],
                                         capture_output=True, text=True, timeout=60, env=dict(os.environ)).stdout)
        assert live["source"] == "live"
    finally:
        d.stop()
    d.write_status()  # as run() does after the stop
    on_flash = {p.name for p in state.rglob("*")}
    assert not on_flash & {"status.json", "status.json.tmp", "edge.sock"}, on_flash
    js = json.loads(subprocess.run([sys.executable, "-m", "edge.cli", "status", "-c", str(conf), "--json"],
                                   capture_output=True, text=True, timeout=60, env=dict(os.environ)).stdout)
    assert js["source"].startswith(f"from {run / 'rt' / 'status.json'}") and js["daemon"] is not None
