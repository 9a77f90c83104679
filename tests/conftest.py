"""Shared fixtures: a real broker per test module, on a free loopback port."""
from __future__ import annotations

import shutil

import pytest

from edge.broker import BrokerProcess
from tests.fakeclock import ensure_timed_waits


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
