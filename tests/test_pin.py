"""The model pin covers what runs: `--check` checks it, bytecode cannot bypass it, and the
bytes it was checked over are the bytes that run.

A model folder is code. Each case copies the shipped model, pins the pristine copy, then
changes it as an attacker who can write the folder would, and runs the real command.
"""
from __future__ import annotations

import importlib.util
import os
import py_compile
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge.errors import ModelError
from edge.zoo import ModelFolder, check_pin, folder_digest

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "vibration"
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def pinned(tmp_path):
    """(a pristine copy of the model, its pin)."""
    dst = tmp_path / "model"
    shutil.copytree(MODEL, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst, folder_digest(dst)


def _marker_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('ran')\n"


def _config(tmp_path: Path, model: Path, pin: str) -> Path:
    p = tmp_path / "edge.toml"
    p.write_text(f'[node]\nname = "pin"\nstate_dir = "{tmp_path / "state"}"\n'
                 f'[model]\npath = "{model}"\nsha256 = "{pin}"\ncache_dir = "{tmp_path / "cache"}"\n'
                 '[adapt]\nenabled = false\n')
    return p


def _edge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge.cli", *args], capture_output=True, text=True, timeout=100,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": ""})


def test_check_refuses_a_model_py_changed_under_the_pin_and_runs_none_of_it(tmp_path, pinned):
    folder, pin = pinned
    marker = tmp_path / "marker"
    src = folder / "model.py"
    src.write_text(_marker_code(marker) + src.read_text())
    r = _edge("run", "--config", str(_config(tmp_path, folder, pin)), "--check", cwd=tmp_path)
    assert r.returncode == 3, r.stderr[-2000:]
    assert "does not match [model] sha256" in r.stderr and r.stderr.count("\n") == 1
    assert not marker.exists()


def test_check_refuses_a_flipped_weights_byte(tmp_path, pinned):
    folder, pin = pinned
    w = folder / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0x01  # inside a tensor: the file still loads, with other numbers
    w.write_bytes(bytes(data))
    r = _edge("run", "--config", str(_config(tmp_path, folder, pin)), "--check", cwd=tmp_path)
    assert r.returncode == 3, r.stderr[-2000:]
    assert "does not match [model] sha256" in r.stderr


def _plant_bytecode(folder: Path, code: str) -> None:
    """Bytecode of ``code`` in ``__pycache__`` whose header matches the pristine model.py's
    mtime and size, so that Python's importer would take it instead of the source."""
    src = folder / "model.py"
    pristine = src.read_bytes()
    st = src.stat()
    evil = (code + "from math import *\n").encode()
    evil += b"#" * (len(pristine) - len(evil))  # the same size as the source
    assert len(evil) == len(pristine)
    src.write_bytes(evil)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    py_compile.compile(str(src), cfile=importlib.util.cache_from_source(str(src)), doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    src.write_bytes(pristine)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_planted_bytecode_never_runs_under_the_correct_pin(tmp_path, pinned):
    folder, pin = pinned
    marker = tmp_path / "marker"
    _plant_bytecode(folder, _marker_code(marker))
    assert folder_digest(folder) == pin  # the planted file is outside the digest
    r = _edge("run", "--config", str(_config(tmp_path, folder, pin)), "--check", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not marker.exists(), "the planted bytecode ran"


def test_model_code_is_executed_from_the_bytes_the_pin_was_checked_over(tmp_path, pinned):
    folder, _ = pinned
    marker = tmp_path / "marker"
    # content of its own: a module of the same content hash may be loaded already in this process
    (folder / "model.py").write_text((folder / "model.py").read_text() + f"# {tmp_path}\n")
    model = ModelFolder(folder)
    check_pin(model, folder_digest(folder))
    pristine_head = model.arrays()[1]
    # swapped after the check: neither the code nor the weights on disk now are what runs
    (folder / "model.py").write_text(_marker_code(marker) + (folder / "model.py").read_text())
    (folder / "weights.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    assert hasattr(model.module, "Backbone") and not marker.exists()
    assert all(np.array_equal(pristine_head[k], v) for k, v in model.arrays()[1].items())


def test_a_folder_changed_between_its_manifest_and_its_files_is_refused(tmp_path, pinned):
    folder, pin = pinned
    model = ModelFolder(folder)
    (folder / "manifest.toml").write_text((folder / "manifest.toml").read_text() + "\n# changed\n")
    with pytest.raises(ModelError, match="changed while"):
        check_pin(model, pin)


def test_edge_run_and_check_refuse_the_same_changed_folder_with_the_same_code(tmp_path, pinned):
    """Both commands call the one start-up check: a changed model is exit 3 for each."""
    folder, pin = pinned
    (folder / "train.py").write_text("# any file of the folder can be code\n")
    cfg = str(_config(tmp_path, folder, pin))
    check = _edge("run", "--config", cfg, "--check", cwd=tmp_path)
    run = _edge("run", "--config", cfg, cwd=tmp_path)
    assert check.returncode == run.returncode == 3, (check.stderr[-1000:], run.stderr[-1000:])
    assert check.stderr.splitlines()[-1] == run.stderr.splitlines()[-1]
