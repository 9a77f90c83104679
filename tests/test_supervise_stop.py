"""A stop fits the unit's stop timeout: ``[queues] shutdown_drain_s`` is bounded by
``TimeoutStopSec`` of deploy/systemd/edge-runtime.service (read here, not copied)."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from edge.config import STOP_CHECKPOINT_S, STOP_TIMEOUT_S, QueueConfig, load_config
from edge.errors import ConfigError

UNIT = Path(__file__).resolve().parent.parent / "deploy" / "systemd" / "edge-runtime.service"


def _unit_stop_timeout() -> float:
    [value] = re.findall(r"^TimeoutStopSec=(\d+)s?$", UNIT.read_text(), re.M)
    return float(value)


def test_the_longest_drain_and_the_final_checkpoint_fit_the_units_stop_timeout():
    hi = next(f for f in dataclasses.fields(QueueConfig) if f.name == "shutdown_drain_s").metadata["hi"]

    assert STOP_TIMEOUT_S == _unit_stop_timeout()
    # the pipeline drains, then the learner, each up to shutdown_drain_s, then the checkpoint
    assert 2 * hi + STOP_CHECKPOINT_S <= STOP_TIMEOUT_S


def test_a_drain_longer_than_the_stop_timeout_allows_is_a_config_error(tmp_path):
    cfg = tmp_path / "edge.toml"
    cfg.write_text('[node]\nname = "n1"\n[model]\npath = "vibration"\n[queues]\nshutdown_drain_s = 600\n')

    with pytest.raises(ConfigError, match=r"\[queues\] shutdown_drain_s"):
        load_config(cfg)
