"""The fleet server's typed, closed configuration (its own TOML file).

Sections: ``[server]`` (this file's own), and ``[mqtt]`` / ``[metrics]``, the same
sections as the daemon's (``edge.config``).

>>> cfg = parse_server_config({"server": {"fleet": "plant-a", "k": 4}})
>>> cfg.server.fleet, cfg.server.k, cfg.server.rule, cfg.mqtt.port
('plant-a', 4, 'clip', 1883)
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.config import (MetricsConfig, MqttConfig, _fix, _opt, _section, _Section, check_section_name, load_toml,
                         resolve_mqtt)
from edge.errors import ConfigError


@dataclass(frozen=True)
class ServerSection(_Section):
    _name = "server"
    name: str = _opt("fleet-server", doc="this instance's name (MQTT client id, global heads' node field)")
    fleet: str = _opt("default", doc="fleet name")
    topic_prefix: str = _opt("fleet", doc="first level of the fleet topics")
    model: str = _opt("vibration", doc="a shipped model's name or a model folder (its hash is checked on every delta)")
    head: str = _opt("linear", choices=("linear", "lowrank", "mlp"), doc="head kind the devices run ([adapt] head)")
    head_rank: int = _opt(4, lo=1, hi=1024, doc="as the devices' [adapt] head_rank")
    head_hidden: int = _opt(32, lo=1, hi=4096, doc="as the devices' [adapt] head_hidden")
    store: str = _opt("~/.local/state/edge-fleet/fleet.db", doc="sqlite:///PATH, a plain path, or postgresql://...[?schema=NAME]")
    key_file: str = _opt("", doc="the server's Ed25519 private key (edge keys create NAME --role server)")
    devices_dir: str = _opt("", doc="folder of trusted device public keys, <node>.pub (edge keys export)")
    group: str = _opt("", doc="MQTT shared-subscription group; set it on every instance that shares the delta stream")
    k: int = _opt(10, lo=1, hi=1_000_000, doc="apply the buffer when this many deltas wait")
    t_s: float = _opt(30.0, lo=0.01, hi=86400.0, doc="or when the oldest waiting delta is this old")
    rule: str = _opt("clip", choices=("clip", "trimmed_mean", "median"), doc="robust aggregation rule")
    clip_norm: float = _opt(0.0, lo=0.0, hi=1e9, doc="clip rule: L2 bound per delta; 0 takes the batch's median norm")
    trim: float = _opt(0.2, lo=0.0, hi=0.49, doc="trimmed_mean: share cut from each end")
    max_norm: float = _opt(100.0, lo=1e-9, hi=1e12, doc="deltas with a larger L2 norm are rejected (norm_too_large)")
    staleness_exponent: float = _opt(0.5, lo=0.0, hi=10.0, doc="weight (1 + versions behind) ** -exponent")
    server_lr: float = _opt(1.0, lo=1e-6, hi=100.0, doc="step applied to the aggregated delta")
    queue: int = _opt(100_000, lo=16, hi=10_000_000,
                      doc="received deltas waiting for validation; also the MQTT 5 Receive Maximum (at most 65,535): "
                          "a full queue leaves deliveries unacknowledged at the broker, none is dropped")
    commit_pause_s: float = _opt(0.0, lo=0.0, hi=60.0, doc="fault testing only: pause inside the version transaction")
    republish_s: float = _opt(30.0, lo=0.1, hi=86400.0,
                              doc="publish the latest signed head again (retained) this often, so that what sits "
                                  "retained never decides for long what a device starts from")
    max_samples: int = _opt(10_000, lo=1, hi=1 << 62, doc="aggregation weight cap: a device's claimed samples count at most this")
    samples_ratio: float = _opt(1.0, lo=1.0, hi=1000.0,
                                doc="and at most this many times the typical device's (the fleet's reference sample count)")
    reference_growth: float = _opt(1.25, lo=1.0, hi=10.0,
                                   doc="the fleet's reference norm and sample count move at most this factor per version")
    max_lanes: int = _opt(4, lo=0, hi=64,
                          doc="aggregation lanes for stored releases' models besides this server's own (FORMAT.md "
                              "'Lanes'): the newest releases get one, aborted ones last; 0: none")


@dataclass(frozen=True)
class ReleaseSection(_Section):
    """``[release]``: model releases and their rollout (edge/fleet/RELEASE_FORMAT.md)."""

    _name = "release"
    key_file: str = _opt("", doc="the release private key (edge keys create NAME --role release): signs every manifest, "
                                 "so the server needs it to open waves and halt; empty: releases are served, "
                                 "but waves open and halts happen only by a command run with the key")
    max_bundle_bytes: int = _opt(256 * 2**20, lo=4096, hi=2**34,
                                 doc="edge fleet-server release refuses a model folder whose bundle is larger")
    chunk_size: int = _opt(64 * 1024, lo=4096, hi=2**20, doc="bytes per chunk on the wire (the last may be shorter)")
    waves: str = _opt("5,25,100", doc="default wave plan: cumulative percents of devices, increasing, the last 100")
    min_labels: int = _opt(50, lo=0, hi=1 << 31, doc="default labels a device's shadow test needs to decide on evidence")
    margin: float = _opt(0.0, lo=0.0, hi=1e6, doc="default 'no worse by' margin of the shadow test, in loss units")
    switch_ratio: float = _opt(0.8, lo=0.01, hi=1.0,
                               doc="open the next wave when this share of the admitted registered devices switched")
    max_refusals: int = _opt(1, lo=0, hi=1_000_000,
                             doc="halt when this many admitted devices refused the release at their gate "
                                 "(worse, parity_failed, compile_failed, rolled_back); 0: never halt by itself")
    check_s: float = _opt(0.5, lo=0.01, hi=3600.0, doc="how often the server applies the rollout rule")
    queue: int = _opt(4096, lo=16, hi=1_000_000,
                      doc="chunk requests and reports waiting to be handled; one beyond it is left unacknowledged")


@dataclass(frozen=True)
class ServerConfig:
    server: ServerSection = field(default_factory=ServerSection)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    release: ReleaseSection = field(default_factory=ReleaseSection)


_SECTIONS = {f.name: f for f in dataclasses.fields(ServerConfig)}


def parse_server_config(data: dict[str, Any]) -> ServerConfig:
    """Validate a parsed TOML document; unknown sections and keys raise ``ConfigError``."""
    if not isinstance(data, dict):
        raise ConfigError("the fleet server configuration must be a TOML table")
    kw = {}
    for name, value in data.items():
        check_section_name(name, _SECTIONS)
        kw[name] = _section(name, typing.get_type_hints(ServerConfig)[name], value)
    cfg = ServerConfig(**kw)
    for key in ("name", "fleet", "topic_prefix", "group"):
        v = getattr(cfg.server, key)
        if any(c in v for c in "/+#") or (not v and key != "group"):
            raise _fix("server", key, v, "must be one non-empty MQTT topic level (no '/', '+', '#')")
    from edge.fleet.release_codec import check_waves

    try:
        check_waves(int(w) for w in cfg.release.waves.split(","))
    except ValueError as e:
        raise _fix("release", "waves", cfg.release.waves, str(e)) from None
    # the daemon's [mqtt] rules and password_file, by the same function
    return dataclasses.replace(cfg, mqtt=resolve_mqtt(cfg.mqtt))


def load_server_config(path: str | Path | None) -> ServerConfig:
    """Read and validate the server's TOML file (the daemon's reader); ``None`` gives the defaults."""
    if path is None:
        return ServerConfig()
    return load_toml(path, parse_server_config)
