"""The harness under libfaketime (tests/fakeclock.py, issue 19): with the monotonic clock faked,
this Python's timed waits never time out, and the harness's shim makes them time out again."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakeclock import build_shim

ROOT = Path(__file__).resolve().parents[1]
_LIBS = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1") + glob.glob("/usr/lib/faketime/libfaketime.so.1"))
pytestmark = [pytest.mark.skipif(not _LIBS or not shutil.which("cc"), reason="needs libfaketime and a C compiler "
                                                                             "(.ci/run installs both)"),
              pytest.mark.timeout(60)]
_PROBE = ("import sys, time; sys.path.insert(0, sys.argv[1]); from tests.fakeclock import timed_waits_hang; "
          "print(timed_waits_hang(), time.monotonic() > 1e9)")


def _probe(preload: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKETIME") and k != "LD_PRELOAD"}
    env.update(LD_PRELOAD=preload, FAKETIME="-1h")
    return subprocess.run([sys.executable, "-c", _PROBE, str(ROOT)], env=env, capture_output=True, text=True,
                          timeout=30, check=True).stdout.split()


def test_a_faked_monotonic_clock_hangs_timed_waits_and_the_shim_mends_them():
    assert _probe(_LIBS[0]) == ["True", "True"]  # monotonic faked (to about Unix time): timed waits hang
    assert _probe(f"{build_shim()}:{_LIBS[0]}") == ["False", "True"]  # the same faked clock: timed waits return
