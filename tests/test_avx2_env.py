"""scripts/avx2-env.sh: the emulated venv view that scripts/check-avx2.sh runs the suite in.

What the AVX2 command promises is that every Python process of the run sees the emulated CPU,
children included; qemu-user alone emulates only the process it starts.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import slowdown

ROOT = Path(__file__).resolve().parents[1]
needs_qemu = pytest.mark.skipif(not shutil.which("qemu-x86_64") or sys.platform != "linux",
                                reason="qemu-x86_64 is not installed (apt-get install qemu-user)")

# CPUID as LLVM reads it (as ONNX Runtime and numba do), and the interpreter path a child sees
_PROBE = ("import json, sys, llvmlite.binding as ll; f = ll.get_host_cpu_features(); "
          "print(json.dumps({'exe': sys.executable, 'prefix': sys.prefix, 'cpu': ll.get_host_cpu_name(), "
          "'avx2': bool(f['avx2']), 'fma': bool(f['fma']), 'avx512f': bool(f.get('avx512f', 0)), "
          "'vnni': bool(f.get('avxvnni', 0) or f.get('avx512vnni', 0))}))")
# the parent starts its child the way the tests start theirs: sys.executable, an empty environment
_PARENT = ("import subprocess, sys; r = subprocess.run([sys.executable, '-c', sys.argv[1]], env={}, "
           "capture_output=True, text=True, timeout=120); sys.stdout.write(r.stdout); sys.stderr.write(r.stderr)")


@pytest.fixture(scope="module")
def view(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("avx2") / "env"
    subprocess.run([str(ROOT / "scripts" / "avx2-env.sh"), str(d)], check=True, timeout=60)
    return d


@needs_qemu
def test_a_child_of_the_emulated_python_runs_on_the_emulated_cpu(view):
    r = subprocess.run([str(view / "bin" / "python"), "-c", _PARENT, _PROBE], capture_output=True, text=True,
                       timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    child = json.loads(r.stdout)
    assert child["exe"] == str(view / "bin" / "python") and child["prefix"] == str(view)
    assert (child["cpu"], child["avx2"], child["fma"], child["avx512f"], child["vnni"]) == \
        ("haswell", True, True, False, False), child
    assert r.stderr == "", "qemu must print nothing on a child's stderr (tests read it)"


@needs_qemu
def test_console_scripts_of_the_view_run_the_emulated_python(view):
    edge = view / "bin" / "edge"
    assert edge.read_text().splitlines()[0] == f"#!{view / 'bin' / 'python'}"
    r = subprocess.run([str(edge), "--version"], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.startswith("edge-runtime "), r.stderr


@needs_qemu
def test_the_emulated_python_names_a_haswell_cpuinfo_unless_told_otherwise(view, tmp_path):
    code = "import os; print(os.environ['EDGE_CPUINFO'])"
    own = subprocess.run([str(view / "bin" / "python"), "-c", code], env={}, capture_output=True, text=True,
                         timeout=120)
    assert Path(own.stdout.strip()) == view / "cpuinfo" and " avx2 " in (view / "cpuinfo").read_text()
    given = subprocess.run([str(view / "bin" / "python"), "-c", code], env={"EDGE_CPUINFO": str(tmp_path / "x")},
                           capture_output=True, text=True, timeout=120)
    assert given.stdout.strip() == str(tmp_path / "x")


@needs_qemu
def test_a_preloaded_libfaketime_offsets_the_emulated_clock_once(view):
    lib = next(iter(sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))), None)
    if "faketime" in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("this run is itself under libfaketime: the baseline here is not the kernel's clock, "
                    "so one day ahead of it cannot be told from the test's own FAKETIME replacing the outer one")
    if lib is None:
        pytest.skip("libfaketime is not installed (apt-get install faketime); .ci/run installs it")
    code = "import time; print(time.time())"
    env = {"LD_PRELOAD": str(lib), "FAKETIME": "+1d", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    before = time.time()
    r = subprocess.run([str(view / "bin" / "python"), "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # one day ahead, not two (qemu preloaded too would fake the host clock it answers the guest's with)
    assert 86400 - 5 < float(r.stdout) - before < 86400 + 300


def test_slowdown_is_one_on_the_host_and_refuses_what_is_not_a_factor(monkeypatch):
    monkeypatch.delenv("EDGE_TEST_SLOWDOWN", raising=False)
    assert slowdown() == 1.0
    monkeypatch.setenv("EDGE_TEST_SLOWDOWN", "10")
    assert slowdown() == 10.0
    for bad in ("fast", "0.5", "nan"):
        monkeypatch.setenv("EDGE_TEST_SLOWDOWN", bad)
        with pytest.raises(ValueError, match="EDGE_TEST_SLOWDOWN"):
            slowdown()
