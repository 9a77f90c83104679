"""`edge fleet-server run --check` checks `[release] key_file` as `run` does (the one function,
``edge.check.check_release_key``): readable, of the release role, not the aggregation key, the
key of the `.pub` beside it (what devices were given), and the signer of the rollout now in
progress. Real processes, a real SQLite store; --check never connects to a broker.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from edge.fleet.keys import create_key, load_private
from tests.fleet_helpers import make_keys, server_toml

ROOT = Path(__file__).resolve().parent.parent
NOWHERE = SimpleNamespace(host="127.0.0.1", port=1)
pytestmark = pytest.mark.timeout(180)


def _edge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge.cli", *args], capture_output=True, text=True, timeout=100,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _server(tmp_path: Path, key_file: Path) -> Path:
    keys = make_keys(tmp_path, ["d1"])
    p = server_toml(tmp_path, keys, NOWHERE, store=str(tmp_path / "fleet.db"))
    p.write_text(p.read_text() + f'\n[release]\nkey_file = "{key_file}"\nchunk_size = 4096\n')
    return p


def test_check_names_the_release_key_it_checked(tmp_path):
    rel = create_key(tmp_path / "keys", "rel", role="release")
    r = _edge("fleet-server", "run", "--check", "--config", str(_server(tmp_path, rel.private_path)), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"release key {rel.key_id}" in r.stdout


def _store_a_rollout(cfg_path: Path, key_path: Path) -> str:
    """A release signed with ``key_path``, stored rolling (as `edge fleet-server release` stores it)."""
    from edge.fleet.config import load_server_config as load
    from edge.fleet.release import make_release
    from edge.fleet.store import open_store
    from edge.zoo import resolve_model

    cfg = load(cfg_path)
    store = open_store(cfg.server.store)
    try:
        return make_release(cfg, store, resolve_model("vibration").path, load_private(key_path),
                            waves="50,100").release
    finally:
        store.close()


@pytest.mark.parametrize("fault, says", [
    ("missing", "cannot read the private key"),
    ("not_release_role", "is not a release-role key"),
    ("the_server_key", "is the same key as [server] key_file"),
    ("pub_mismatch", "does not match rel.release.pub beside it"),
    ("not_the_rollouts_signer", "did not sign the release rolled out now"),
])
def test_a_bad_release_key_fails_check_and_run_alike_with_exit_9(tmp_path, fault, says):
    rel = create_key(tmp_path / "keys", "rel", role="release")
    key_file = rel.private_path
    cfg = _server(tmp_path, key_file)
    if fault == "missing":
        key_file.unlink()
    elif fault == "not_release_role":
        dev = create_key(tmp_path / "keys", "other", role="device")
        cfg.write_text(cfg.read_text().replace(str(key_file), str(dev.private_path)))
    elif fault == "the_server_key":
        alias = tmp_path / "keys" / "srv-copy.release.key"  # the aggregation key under a release name
        shutil.copy(tmp_path / "keys" / "srv.server.key", alias)
        cfg.write_text(cfg.read_text().replace(str(key_file), str(alias)))
    elif fault == "pub_mismatch":
        other = create_key(tmp_path / "elsewhere", "rel", role="release")
        shutil.copy(other.public_path, rel.public_path)  # the .pub devices were given is another key's
    else:
        first = create_key(tmp_path / "old", "rel0", role="release")
        rid = _store_a_rollout(cfg, first.private_path)
        says = f"({rid}, rolling, signed by key id {first.key_id})"

    check = _edge("fleet-server", "run", "--check", "--config", str(cfg), cwd=tmp_path)
    run = _edge("fleet-server", "run", "--config", str(cfg), cwd=tmp_path)

    assert check.returncode == run.returncode == 9, (check.stderr[-1000:], run.stderr[-1000:])
    assert says in check.stderr.splitlines()[-1]
    assert check.stderr.splitlines()[-1] == run.stderr.splitlines()[-1]


def test_a_finished_rollout_signed_by_an_older_key_does_not_block_a_new_key(tmp_path):
    """Rotating the release key after a rollout ended (done or aborted) is allowed: the next
    release is signed by the new key, whose .pub the operator gives the devices first."""
    from edge.fleet.config import load_server_config as load
    from edge.fleet.release import operate
    from edge.fleet.store import open_store

    rel = create_key(tmp_path / "keys", "rel", role="release")
    cfg = _server(tmp_path, rel.private_path)
    first = create_key(tmp_path / "old", "rel0", role="release")
    rid = _store_a_rollout(cfg, first.private_path)
    store = open_store(load(cfg).server.store)
    try:
        operate(store, rid, "abort", load_private(first.private_path))
    finally:
        store.close()
    r = _edge("fleet-server", "run", "--check", "--config", str(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
