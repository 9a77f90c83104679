"""Shared fixtures: a real broker per test module, on a free loopback port."""
from __future__ import annotations

import shutil

import pytest
from hypothesis import HealthCheck, settings

from edge.broker import BrokerProcess
from tests.fakeclock import ensure_timed_waits


# scripts/check-avx2.sh runs the suite under qemu (several times slower than the host) with
# --hypothesis-profile=emulated: a per-example deadline there measures the emulator, not the code.
settings.register_profile("emulated", deadline=None, suppress_health_check=[HealthCheck.too_slow])


def pytest_configure(config):
    """Under libfaketime with a faked monotonic clock, this Python's timed waits never time out
    (tests/fakeclock.py): the run is re-executed once with the harness's shim first."""
    ensure_timed_waits(config)


@pytest.fixture(scope="module")
def broker():
    """A fresh mosquitto (the tests can kill and restart it without touching anyone else's)."""
    if not shutil.which("mosquitto"):
        pytest.skip("mosquitto is not installed (apt-get install mosquitto); .ci/run installs it")
    with BrokerProcess(kind="mosquitto") as b:
        yield b
