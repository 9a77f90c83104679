"""Shared fixtures: a real broker per test module, on a free loopback port."""
from __future__ import annotations

import shutil

import pytest
from hypothesis import HealthCheck, settings

from edge.broker import BrokerProcess
from tests.fakeclock import ensure_timed_waits
from tests.helpers import slowdown


# scripts/check-avx2.sh runs the suite under qemu (several times slower than the host) with
# --hypothesis-profile=emulated: a per-example deadline there measures the emulator, not the code.
settings.register_profile("emulated", deadline=None, suppress_health_check=[HealthCheck.too_slow])


def pytest_collection_modifyitems(config, items):
    """A test's own timeout mark bounds it on the host; under scripts/check-avx2.sh (qemu's TCG,
    EDGE_TEST_SLOWDOWN times slower) the same bound is scaled, as tests.helpers.poll's are."""
    factor = slowdown()
    if factor == 1.0:
        return
    for item in items:
        mark = item.get_closest_marker("timeout")
        seconds = (mark.args[0] if mark.args else mark.kwargs.get("timeout")) if mark else None
        if seconds:
            item.add_marker(pytest.mark.timeout(float(seconds) * factor), append=False)


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
