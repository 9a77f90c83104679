"""A plain (non-editable) install carries the shipped models, the protocol spec and the C reference."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(out)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"building the wheel failed: {r.stderr[-2000:]}")
    return next(out.glob("*.whl"))


def test_wheel_contains_models_spec_and_c_reference(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for model in ("vibration", "forecast"):
        for f in ("manifest.toml", "model.py", "weights.safetensors", "CARD.md", "train.py"):
            assert f"edge_models/{model}/{f}" in names
    assert "firmware_bridge/PROTOCOL.md" in names
    assert "firmware_bridge/c/edgeframe.c" in names and "firmware_bridge/c/edgeframe.h" in names
    assert not any(n.startswith("tests/") for n in names)


def test_installed_package_finds_the_shipped_model_outside_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], check=True)
    code = ("import edge, edge.zoo as z; m = z.resolve_model('vibration'); bb, hd = m.build(); "
            "print(edge.__file__); print(m.path)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    edge_file, model_path = r.stdout.split()
    assert edge_file.startswith(str(target)) and model_path.startswith(str(target)), r.stdout
