"""What a release carries: the LICENSE, the Arduino sketch the README points to (in the
wheel and the sdist), the deploy files (in the sdist), and a build without warning walls."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKETCH = "firmware_bridge/c/examples/arduino_accel/arduino_accel.ino"
pytestmark = pytest.mark.timeout(300)

# One process per artifact: setuptools keeps state between the two builds.
_BUILD = "import sys; from setuptools import build_meta as b; print(getattr(b, sys.argv[1])(sys.argv[2]))"


def _copy_tree(root: Path, dest: Path) -> None:
    """The files a clean clone would have (tracked, plus new ones git does not ignore), so that
    ignored folders (a container rootfs in cache/, venvs, reports) are never copied: copying the
    whole folder once filled the disk."""
    r = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                       capture_output=True, timeout=60)
    if r.returncode != 0:  # not a git checkout (an unpacked sdist): everything but the usual litter
        shutil.copytree(root, dest, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                                  ".pytest_cache", ".hypothesis", "cache", "out"))
        return
    for rel in filter(None, r.stdout.decode().split("\0")):
        p = root / rel
        if p.is_file() and not p.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dest / rel)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Wheel and sdist built from a clean copy of the tree, with every warning shown."""
    src = tmp_path_factory.mktemp("src") / "tree"
    _copy_tree(ROOT, src)
    out = tmp_path_factory.mktemp("dist")
    log = ""
    for hook in ("build_wheel", "build_sdist"):
        r = subprocess.run([sys.executable, "-W", "always", "-c", _BUILD, hook, str(out)], cwd=src,
                           capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
        log += r.stdout + r.stderr
    return next(out.glob("*.whl")), next(out.glob("*.tar.gz")), log


def test_license_is_apache_2_and_declared():
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()


def test_wheel_carries_the_sketch_and_the_license(built):
    wheel, _, _ = built
    names = zipfile.ZipFile(wheel).namelist()
    assert SKETCH in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_sdist_carries_the_sketch_license_and_deploy_files(built):
    _, sdist, _ = built
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    for f in (SKETCH, "LICENSE", "deploy/install.sh", "scripts/lib/torch.sh", "deploy/systemd/edge-runtime.service",
              "deploy/docker/Dockerfile.cpu"):
        assert f in names, f


def test_building_prints_no_setuptools_warnings(built):
    _, _, log = built
    assert "BuildBackendWarning" not in log and "absent from the `packages`" not in log, log[-3000:]
    assert "SetuptoolsDeprecationWarning" not in log and "warning: no previously-included" not in log, log[-3000:]


def test_library_info_lines_show_only_at_debug_level():
    import logging

    from edge.observe import setup_logging

    try:
        setup_logging("info")
        assert not logging.getLogger("onnxscript.optimizer").isEnabledFor(logging.INFO)
        assert logging.getLogger("onnxruntime.quantization").isEnabledFor(logging.WARNING)
        assert logging.getLogger("edge.serve").isEnabledFor(logging.INFO)
        setup_logging("debug")
        assert logging.getLogger("onnx_ir.passes").isEnabledFor(logging.INFO)
    finally:
        setup_logging("warning")


def test_compile_quiet_prints_the_summary_line_only(tmp_path):
    r = subprocess.run([sys.executable, "-m", "edge.cli", "compile", str(ROOT / "models" / "vibration"),
                        "--backend", "onnxruntime", "--cache-dir", str(tmp_path / "cache"), "--quiet"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=280,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("\n") == 1 and r.stdout.startswith("onnxruntime"), r.stdout
    assert " INFO " not in r.stderr and "onnx" not in r.stderr, r.stderr[-3000:]
