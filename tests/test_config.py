"""Config validation: every error path names the section, the key, the value and the fix."""
from __future__ import annotations

import pytest

from edge.config import Config, load_config, parse_config, reference_table
from edge.errors import ConfigError


def test_defaults_are_valid():
    cfg = parse_config({})
    assert cfg == Config()
    assert cfg.topic_base == "edge/edge-01"


@pytest.mark.parametrize("doc, message", [
    ({"nod": {}}, "unknown section [nod]; did you mean [node]?"),
    ({"mqtt": {"prot": 1}}, "[mqtt] unknown key 'prot'; did you mean 'port'?"),
    ({"mqtt": {"port": 0}}, "[mqtt] port = 0 is invalid: must be >= 1"),
    ({"mqtt": {"port": "1883"}}, "[mqtt] port = '1883' is invalid: expected an integer"),
    ({"mqtt": {"port": True}}, "[mqtt] port = True is invalid: expected an integer"),
    ({"mqtt": {"tls": "yes"}}, "[mqtt] tls = 'yes' is invalid: expected true or false"),
    ({"mqtt": {"protocol": "4"}}, "[mqtt] protocol = '4' is invalid: allowed: 5, 3.1.1"),
    ({"mqtt": {"reconnect_min_s": 5.0, "reconnect_max_s": 1.0}}, "[mqtt] reconnect_max_s = 1.0 is invalid: must be >= reconnect_min_s"),
    ({"mqtt": {"cert_file": "/nonexistent.pem", "tls": True}}, "[mqtt] cert_file = '/nonexistent.pem' is invalid: no such file"),
    ({"mqtt": {"ca_file": "/nonexistent.pem"}}, "[mqtt] ca_file = '/nonexistent.pem' is invalid: no such file"),
    ({"model": {"backend": "tflite"}}, "[model] backend = 'tflite' is invalid: allowed: auto, onnxruntime, tensorrt, torch"),
    ({"model": {"max_wait_ms": "fast"}}, "[model] max_wait_ms = 'fast' is invalid: expected a number"),
    ({"window": {"rate_tolerance": 2.0}}, "[window] rate_tolerance = 2.0 is invalid: must be <= 1.0"),
    ({"window": {"length": 4, "hop": 1000}}, "[window] hop = 1000 is invalid: must be at most 16 x length"),
    ({"node": {"name": "a/b"}}, "[node] name = 'a/b' is invalid: use letters, digits"),
    ({"node": {"log_level": "loud"}}, "[node] log_level = 'loud' is invalid: allowed: debug, info, warning, error"),
    ({"node": "x"}, "[node] must be a table"),
    ({"adapt": {"head": "transformer"}}, "[adapt] head = 'transformer' is invalid: allowed: linear, lowrank, mlp"),
    ({"adapt": {"lr": -1}}, "[adapt] lr = -1.0 is invalid: must be >= 1e-09"),
    ({"adapt": {"eval_min": 500}}, "[adapt] eval_min = 500 is invalid: must not exceed eval_window (100)"),
    ({"queues": {"ingest_bytes": 1}}, "[queues] ingest_bytes = 1 is invalid: must be >= 65536"),
    ({"metrics": {"port": 70000}}, "[metrics] port = 70000 is invalid: must be <= 65535"),
    ({"sources": []}, "[[sources]] must be a non-empty array of tables"),
    ({"sources": [{"type": "can"}]}, "[sources[0]] type = 'can' is invalid: allowed: mqtt, serial"),
    ({"sources": [{"type": "serial"}]}, "[sources[0]] port is required for a serial source"),
    ({"sources": [{"topic": "a/b#"}]}, "[sources[0]] topic = 'a/b#' is not a valid MQTT filter"),
    ({"sources": [{"topic": "a/#/b"}]}, "[sources[0]] topic = 'a/#/b' is not a valid MQTT filter"),
    ({"sources": [{"topic": "a/{machine}"}]}, "[sources[0]] topic level '{machine}' is not allowed"),
    ({"sources": [{"channels": "ax"}]}, "[sources[0]] channels = 'ax' is invalid: expected a list of strings"),
])
def test_bad_config_names_key_value_and_fix(doc, message):
    with pytest.raises(ConfigError) as e:
        parse_config(doc)
    assert message in str(e.value)


def test_load_config_reports_file_and_toml_error(tmp_path):
    p = tmp_path / "edge.toml"
    p.write_text("[mqtt\nport = 1")
    with pytest.raises(ConfigError, match=r"edge.toml: invalid TOML"):
        load_config(p)


def test_load_config_prefixes_path(tmp_path):
    p = tmp_path / "edge.toml"
    p.write_text("[mqtt]\nport = -3\n")
    with pytest.raises(ConfigError, match=r"edge.toml: \[mqtt\] port = -3"):
        load_config(p)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.toml")


def test_example_config_is_valid():
    from pathlib import Path

    cfg = load_config(Path(__file__).parent.parent / "deploy" / "config" / "edge.toml")
    assert cfg.node.name


def test_reference_table_lists_every_key():
    import dataclasses

    from edge.config import SECTIONS, SourceConfig

    text = reference_table()
    for sec in SECTIONS:
        cls = SourceConfig if sec == "sources" else type(getattr(Config(), sec))
        for f in dataclasses.fields(cls):
            assert f"`{f.name}`" in text


def test_readme_config_reference_is_current():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert reference_table() in readme, "README's configuration reference is stale: run python -m edge.config > ..."


def test_sections_validate_when_built_in_code_too():
    from edge.config import AdaptConfig, MqttConfig

    with pytest.raises(ConfigError, match=r"\[adapt\] batch = 0 is invalid: must be >= 1"):
        AdaptConfig(batch=0)
    with pytest.raises(ConfigError, match=r"\[mqtt\] qos = 2 is invalid: must be <= 1"):
        MqttConfig(qos=2)
    assert AdaptConfig(lr=1).lr == 1.0 and isinstance(AdaptConfig(lr=1).lr, float)
    assert AdaptConfig(head="lowrank", head_rank=8).head_options == {"rank": 8}
    assert AdaptConfig(head="mlp").head_options == {"hidden": 32} and AdaptConfig().head_options == {}
