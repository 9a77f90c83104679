"""Shared fixtures: a real broker per test module, on a free loopback port."""
from __future__ import annotations

import shutil

import pytest

from edge.broker import BrokerProcess


@pytest.fixture(scope="module")
def broker():
    """A fresh mosquitto (the tests can kill and restart it without touching anyone else's)."""
    if not shutil.which("mosquitto"):
        pytest.skip("mosquitto is not installed (apt-get install mosquitto); .ci/run installs it")
    with BrokerProcess(kind="mosquitto") as b:
        yield b
