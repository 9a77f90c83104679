"""Fleet configuration: the device's [fleet] section and the server's own file are typed and closed."""
from __future__ import annotations

from pathlib import Path

import pytest

from edge.config import parse_config
from edge.errors import ConfigError
from edge.fleet.config import load_server_config, parse_server_config

ROOT = Path(__file__).resolve().parent.parent


def test_fleet_sync_is_off_by_default():
    assert parse_config({}).fleet.enabled is False


def test_enabled_fleet_sync_needs_its_keys():
    with pytest.raises(ConfigError, match=r"\[fleet\] key_file"):
        parse_config({"fleet": {"enabled": True}})


def test_unknown_fleet_keys_are_named():
    with pytest.raises(ConfigError, match="interval_s"):
        parse_config({"fleet": {"interval": 5}})
    with pytest.raises(ConfigError, match=r"\[server\] unknown key 'kk'"):
        parse_server_config({"server": {"kk": 1}})


def test_server_names_must_be_one_topic_level():
    with pytest.raises(ConfigError, match="group"):
        parse_server_config({"server": {"group": "a/b"}})


def test_the_shipped_example_server_config_is_valid():
    cfg = load_server_config(ROOT / "deploy" / "config" / "fleet-server.toml")
    assert cfg.server.rule == "clip" and cfg.metrics.port == 9101
