"""Checkpoints: round trip, fallback past damage, and survival of kill -9 mid-save."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from edge.state import CheckpointStore, decode_state, encode_state
from edge.errors import StateError


def _state(step: int) -> dict:
    p = torch.nn.Parameter(torch.ones(3, 4) * step)
    opt = torch.optim.Adam([p], lr=0.01)
    p.grad = torch.ones(3, 4)
    opt.step()
    return {"step": step, "head": {"weight": p.detach().clone()}, "optimizer": opt.state_dict(),
            "replay": {"z": np.full((5, 4), step, np.float32), "y": np.arange(5)}, "version": "1.0+a2",
            "loss": float("nan"), "rng": np.random.default_rng(step).bit_generator.state}


def test_round_trip_keeps_tensors_arrays_and_int_keys(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(_state(7))
    got = store.load_latest()
    assert got["step"] == 7 and got["version"] == "1.0+a2" and np.isnan(got["loss"])
    assert isinstance(got["head"]["weight"], torch.Tensor) and torch.allclose(got["head"]["weight"], _state(7)["head"]["weight"])
    assert isinstance(got["replay"]["z"], np.ndarray) and got["replay"]["y"].dtype == np.int64
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3, 4))], lr=0.01)
    opt.load_state_dict(got["optimizer"])  # int keys of the optimizer state survived
    assert got["rng"] == np.random.default_rng(7).bit_generator.state


def test_keeps_only_the_last_n(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for i in range(5):
        store.save({"step": i})
    assert [p.name for p in store.paths()] == ["ckpt-0000000004.edge", "ckpt-0000000005.edge"]
    assert store.load_latest()["step"] == 4


def test_no_checkpoint_means_none(tmp_path):
    assert CheckpointStore(tmp_path).load_latest() is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_damaged_latest_falls_back_to_previous_with_a_log_line(tmp_path, caplog, damage):
    store = CheckpointStore(tmp_path)
    store.save(_state(1))
    latest = store.save(_state(2))
    data = latest.read_bytes()
    if damage == "truncate":
        latest.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        latest.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    else:
        latest.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="edge.state"):
        got = store.load_latest()
    assert got["step"] == 1
    assert "damaged" in caplog.text and "falling back to ckpt-0000000001.edge" in caplog.text


def test_all_damaged_starts_fresh(tmp_path, caplog):
    store = CheckpointStore(tmp_path)
    store.save({"a": 1}).write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="edge.state"):
        assert store.load_latest() is None
    assert "starting fresh" in caplog.text


def test_decode_rejects_foreign_bytes():
    with pytest.raises(StateError, match="magic"):
        decode_state(b"x" * 100)
    assert decode_state(encode_state({"k": [1, 2]})) == {"k": [1, 2]}


def test_unsupported_values_are_refused(tmp_path):
    with pytest.raises(StateError, match="object"):
        CheckpointStore(tmp_path).save({"x": object()})


CHILD = textwrap.dedent("""
    import sys, numpy as np, torch
    from edge.adapt.learner import Learner
    from edge.state import CheckpointStore
    store = CheckpointStore(sys.argv[1], keep=2)
    rng = np.random.default_rng(int(sys.argv[2]))
    lr = Learner(task="classification", feature_size=32, classes=range(4))
    prev = store.load_latest()
    if prev is not None:
        lr.load_state_dict(prev)
    print("ready", lr.metrics()["labels_total"], flush=True)
    while True:
        for _ in range(20):
            lr.learn_one(rng.normal(size=32), int(rng.integers(0, 4)))
        store.save(lr.state_dict())
""")


def test_kill_9_during_training_and_checkpointing_never_loses_the_checkpoint(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rng = np.random.default_rng(0)
    seen = []
    for round_ in range(4):
        p = subprocess.Popen([sys.executable, str(script), str(tmp_path / "ckpt"), str(round_)],
                             stdout=subprocess.PIPE, text=True, env=env)
        line = p.stdout.readline().split()
        assert line[0] == "ready"
        seen.append(int(line[1]))
        ckpts = lambda: sorted((tmp_path / "ckpt").glob("ckpt-*.edge"))  # noqa: E731 (no sweeping under the child)
        before = ckpts()
        deadline = time.monotonic() + 30
        while ckpts() == before and time.monotonic() < deadline:
            time.sleep(0.01)  # let it save at least once, then kill it at a random moment
        time.sleep(float(rng.uniform(0.0, 0.3)))
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)
    assert seen[0] == 0 and all(b > a for a, b in zip(seen, seen[1:])), seen  # each restart resumed further on
    store = CheckpointStore(tmp_path / "ckpt")
    state = store.load_latest()
    assert state is not None and store.loaded_path == store.paths()[-1]
    assert not list((tmp_path / "ckpt").glob(".ckpt-*.tmp"))  # leftovers of a torn save are swept


# ---- bound to the model, permissions (issue 8) ------------------------------------------------

import dataclasses  # noqa: E402
import stat  # noqa: E402

from edge.state import ModelIdentity  # noqa: E402

IDENT = ModelIdentity(name="vibration", version="1.0.0", content_hash="a1" * 32, task="classification",
                      classes=("normal", "imbalance", "misalignment", "bearing_wear"), outputs=4,
                      feature_size=64, head="linear")


@pytest.mark.parametrize("change", [
    {"content_hash": "b2" * 32},  # retrained: same shapes, other weights
    {"classes": ("normal", "imbalance", "misalignment", "cavitation")},  # same count, other classes
    {"name": "pump"}, {"version": "1.1.0"}, {"head": "mlp"},
])
def test_a_checkpoint_of_another_model_is_set_aside_not_applied(tmp_path, caplog, change):
    old = CheckpointStore(tmp_path, identity=dataclasses.replace(IDENT, **change))
    old.save(_state(3))
    old.save(_state(4))
    store = CheckpointStore(tmp_path, identity=IDENT)
    with caplog.at_level(logging.WARNING, logger="edge.state"):
        r = store.restore()
    field = next(iter(change))
    assert r.state is None and r.mismatch.startswith(field) and r.saved_identity[field] != getattr(IDENT, field)
    assert store.paths() == [] and r.moved_to.parent == tmp_path
    assert r.moved_to.name.startswith(f"stale-{change.get('name', 'vibration')}-") and len(list(r.moved_to.glob("ckpt-*.edge"))) == 2
    assert field in (r.moved_to / "WHY.txt").read_text() and "not for this model" in caplog.text
    assert stat.S_IMODE(r.moved_to.stat().st_mode) == 0o700
    store.save({"step": 9})  # the new lineage starts beside the stale folder
    assert CheckpointStore(tmp_path, identity=IDENT).load_latest() == {"step": 9}


def test_a_checkpoint_without_identity_is_not_applied_to_a_bound_store(tmp_path):
    CheckpointStore(tmp_path).save({"step": 1})  # as written before checkpoints were bound to their model
    r = CheckpointStore(tmp_path, identity=IDENT).restore()
    assert r.state is None and "no model identity" in r.mismatch and r.moved_to.name.startswith("stale-unknown-")


def test_same_identity_restores_and_unbound_stores_read_anything(tmp_path):
    CheckpointStore(tmp_path, identity=IDENT).save({"step": 2})
    assert CheckpointStore(tmp_path, identity=ModelIdentity.from_dict(IDENT.to_dict())).load_latest() == {"step": 2}
    assert CheckpointStore(tmp_path).load_latest() == {"step": 2}


def test_a_hostile_identity_in_a_file_is_cut_in_messages_and_names(tmp_path):
    evil = dataclasses.replace(IDENT, name="../" + "x" * 5000, content_hash="/" * 64)
    CheckpointStore(tmp_path, identity=evil).save({"step": 1})
    r = CheckpointStore(tmp_path, identity=IDENT).restore()
    assert r.state is None and len(r.mismatch) < 400 and r.moved_to.parent == tmp_path
    assert len(r.moved_to.name) < 100 and "/" not in r.moved_to.name


def test_modes_are_0600_and_0700_and_existing_ones_are_fixed(tmp_path):
    old_umask = os.umask(0o022)
    try:
        d = tmp_path / "a" / "b" / "adapt"
        p = CheckpointStore(d).save({"k": 1})
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
        for folder in (d, d.parent, d.parent.parent):  # the folders it created
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
        os.chmod(p, 0o644)
        os.chmod(d, 0o755)
        CheckpointStore(d)
        assert stat.S_IMODE(p.stat().st_mode) == 0o600 and stat.S_IMODE(d.stat().st_mode) == 0o700
    finally:
        os.umask(old_umask)


def test_pruning_for_room_never_removes_the_last_good_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    for i in range(3):
        store.save({"step": i})
    newest = store.paths()[-1]
    newest.write_bytes(b"torn")  # damaged by something else: the last good one is the one before
    assert store.restore().state == {"step": 1}
    good = store.last_good
    assert store._prune_for_room() == 2 and store.paths() == [good]


def test_saves_resume_after_the_folder_was_removed_under_the_store(tmp_path):
    import shutil

    store = CheckpointStore(tmp_path / "adapt", keep=2)
    store.save({"step": 1})
    shutil.rmtree(tmp_path / "adapt")
    store.save({"step": 2})
    assert store.load_latest() == {"step": 2} and stat.S_IMODE((tmp_path / "adapt").stat().st_mode) == 0o700
