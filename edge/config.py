"""TOML -> typed, closed configuration.

Every section is a frozen dataclass; every field says its type and, where it matters,
its allowed values or range in ``field(metadata=...)``. Unknown sections and keys are
errors, and every error names the section, the key, the bad value and what is allowed,
so that ``edge run --check`` can tell a user exactly what to fix.

>>> cfg = parse_config({"node": {"name": "press-7"}})
>>> cfg.node.name, cfg.mqtt.port, cfg.sources[0].topic
('press-7', 1883, 'sensors/{device}/{stream}')
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.errors import ConfigError
from edge.ingest.names import NAME_RULE, is_valid_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


@functools.lru_cache(maxsize=None)
def _type_hints(cls: type) -> dict:
    """``typing.get_type_hints`` once per section class: it costs ~1 ms a call, and every
    config object (the library builds one per model) coerces each of its fields."""
    return typing.get_type_hints(cls)


log = logging.getLogger("edge.config")


def _opt(default, *, choices=None, lo=None, hi=None, doc="", secret=False):
    # A secret is kept out of repr() too, so that logging a config cannot leak it.
    return field(default=default, repr=not secret,
                 metadata={"choices": choices, "lo": lo, "hi": hi, "doc": doc, "secret": secret})


def _fix(where: str, key: str, value: Any, allowed: str, *, secret: bool = False) -> ConfigError:
    """The error for a bad value; a secret's value is never shown, whatever its type.

    >>> str(_fix("mqtt", "password", 123, "expected a string", secret=True))
    '[mqtt] password = <hidden> is invalid: expected a string'
    """
    shown = "<hidden>" if secret else repr(value)
    return ConfigError(f"[{where}] {key} = {shown} is invalid: {allowed}")


def _coerce(where: str, cls: type, f: dataclasses.Field, value: Any) -> Any:
    hint = _type_hints(cls)[f.name]
    md = f.metadata
    secret = bool(md.get("secret"))
    if hint is bool:
        if not isinstance(value, bool):
            raise _fix(where, f.name, value, "expected true or false", secret=secret)
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fix(where, f.name, value, "expected an integer", secret=secret)
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fix(where, f.name, value, "expected a number", secret=secret)
        value = float(value)
    elif hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and md.get("choices"):
            value = str(value)  # protocol = 5 reads as the string "5"
        if not isinstance(value, str):
            raise _fix(where, f.name, value, "expected a string", secret=secret)
    elif hint == tuple[str, ...]:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise _fix(where, f.name, value, "expected a list of strings", secret=secret)
        value = tuple(value)
    if md.get("choices") and value not in md["choices"]:
        raise _fix(where, f.name, value, f"allowed: {', '.join(map(str, md['choices']))}", secret=secret)
    if md.get("lo") is not None and value < md["lo"]:
        raise _fix(where, f.name, value, f"must be >= {md['lo']}", secret=secret)
    if md.get("hi") is not None and value > md["hi"]:
        raise _fix(where, f.name, value, f"must be <= {md['hi']}", secret=secret)
    return value


class _Section:
    """Validates every field on construction, from TOML or from code alike."""

    _name = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(self._name, type(self), f, getattr(self, f.name)))


@dataclass(frozen=True)
class NodeConfig(_Section):
    _name = "node"
    name: str = _opt("edge-01", doc="this device's name; used in topics edge/<name>/...")
    log_level: str = _opt("info", choices=("debug", "info", "warning", "error"), doc="logging level")
    state_dir: str = _opt("~/.local/state/edge-runtime", doc="where checkpoints live")
    runtime_dir: str = _opt("", doc="where status.json and the status socket live (tmpfs, not flash); "
                                    "empty: $RUNTIME_DIRECTORY, else $XDG_RUNTIME_DIR or /tmp (docs/STATE.md)")


@dataclass(frozen=True)
class MqttConfig(_Section):
    _name = "mqtt"
    host: str = _opt("127.0.0.1", doc="broker host")
    port: int = _opt(1883, lo=1, hi=65535, doc="broker port")
    protocol: str = _opt("5", choices=("5", "3.1.1"), doc="MQTT protocol version")
    client_id: str = _opt("", doc="client id; empty means edge-<node name>")
    username: str = _opt("", doc="user name; empty for none")
    password: str = _opt("", doc="password (prefer password_file)", secret=True)
    password_file: str = _opt("", doc="file holding the password (mode 0600; a group- or world-readable one is warned about)")
    allow_plaintext: bool = _opt(False, doc="allow a connection without TLS to a broker that is not on loopback")
    tls: bool = _opt(False, doc="connect with TLS")
    ca_file: str = _opt("", doc="CA bundle for TLS; empty uses the system's")
    cert_file: str = _opt("", doc="client certificate for mutual TLS")
    key_file: str = _opt("", doc="client key for mutual TLS")
    keepalive_s: int = _opt(30, lo=5, hi=3600, doc="MQTT keepalive")
    qos: int = _opt(0, lo=0, hi=1, doc="QoS of sensor subscriptions and predictions")
    reconnect_min_s: float = _opt(0.5, lo=0.05, hi=60.0, doc="first reconnect delay")
    reconnect_max_s: float = _opt(30.0, lo=0.1, hi=3600.0, doc="reconnect backoff cap")
    max_payload_bytes: int = _opt(1 << 20, lo=64, hi=256 << 20, doc="larger payloads are rejected")
    topic_prefix: str = _opt("edge", doc="prefix of the node's own topics: <prefix>/<node>/...")
    retain_latest_s: float = _opt(1.0, lo=0.0, hi=86400.0, doc="a stream's prediction is published retained at most this often, so a new subscriber sees its latest (at most this old) at once; 0: never retained")
    ha_discovery: bool = _opt(False, doc="announce each stream to Home Assistant (MQTT discovery, retained)")
    ha_prefix: str = _opt("homeassistant", doc="Home Assistant's discovery prefix")
    session_expiry_s: int = _opt(3600, lo=0, hi=0xFFFFFFFF,
                                 doc="how long the broker keeps the node's sessions and their QoS 1 messages "
                                     "while disconnected (MQTT 5; 3.1.1 keeps them until the broker expires them); "
                                     "0: clean sessions")


@dataclass(frozen=True)
class ModelConfig(_Section):
    _name = "model"
    path: str = _opt("vibration", doc="a shipped model's name or a model folder")
    sha256: str = _opt("", doc="pin: the folder's content digest (`edge pin MODEL`); another content is refused; empty: no pin")
    backend: str = _opt("auto", choices=("auto", "onnxruntime", "tensorrt", "torch"), doc="serving backend")
    precision: str = _opt("auto", choices=("auto", "int8", "fp16", "fp32"), doc="backbone precision")
    cache_dir: str = _opt("", doc="compiled-artifact cache; empty uses ~/.cache/edge-runtime")
    threads: int = _opt(1, lo=1, hi=64, doc="inference threads")
    max_batch: int = _opt(32, lo=1, hi=4096, doc="largest micro-batch of windows")
    max_wait_ms: float = _opt(2.0, lo=0.0, hi=1000.0, doc="longest wait to fill a micro-batch")


@dataclass(frozen=True)
class WindowConfig(_Section):
    _name = "window"
    length: int = _opt(0, lo=0, hi=1 << 20, doc="samples per window; 0 takes the model's")
    hop: int = _opt(0, lo=0, hi=1 << 20, doc="samples between window starts; 0 means length")
    sample_rate: float = _opt(0.0, lo=0.0, hi=1e7, doc="expected rate in Hz; 0 takes the model's")
    rate_tolerance: float = _opt(0.1, lo=0.0, hi=1.0, doc="relative rate error before a rate warning")
    max_fill: int = _opt(2, lo=0, hi=1000, doc="missing samples filled by interpolation; larger gaps restart the window")
    max_clock_skew_s: float = _opt(86400.0, lo=0.0, hi=1e10, doc="a timed stream whose clock is further than this from the median of the timed streams' clocks (the node's own clock before any) is rejected as absurd_time; 0 disables")
    max_streams: int = _opt(10_000, lo=1, hi=10_000_000, doc="streams beyond this many are rejected (bounds memory against stray topics)")
    max_fill_share: float = _opt(0.05, lo=0.0, hi=1.0, doc="recent share of filled samples above which a stream is flagged (fill)")
    resync_s: float = _opt(1.0, lo=0.001, hi=3600.0, doc="samples without t: exact spacing while within this of the receive time, never beyond twice it")
    rate_window_s: float = _opt(2.0, lo=0.1, hi=3600.0, doc="samples without t: span over which their arrival rate is measured")


#: deploy/systemd/edge-runtime.service's TimeoutStopSec: a stop (2 x ``[queues] shutdown_drain_s``
#: plus the final checkpoint, STOP_CHECKPOINT_S at most on an SD card) must end before it
STOP_TIMEOUT_S = 20.0
STOP_CHECKPOINT_S = 4.0


@dataclass(frozen=True)
class QueueConfig(_Section):
    _name = "queues"
    ingest_bytes: int = _opt(64 << 20, lo=1 << 16, hi=1 << 36, doc="sensor lane: bytes of raw messages waiting to be decoded (drop oldest)")
    labels_bytes: int = _opt(8 << 20, lo=1 << 12, hi=1 << 34, doc="each label lane (the pipeline's and the learner's): bytes of labels waiting; never shed by sensor or window overload")
    control_bytes: int = _opt(1 << 20, lo=1 << 12, hi=1 << 30, doc="control lane: bytes of stream resets waiting")
    max_lag_s: float = _opt(2.0, lo=0.0, hi=86400.0, doc="sensor data that waited longer is shed when taken (fresh data first after an overload); 0 disables")
    # hi: the stop drains the pipeline and then the learner, each up to this long, and then
    # checkpoints; all of it must end before the unit's TimeoutStopSec (STOP_TIMEOUT_S) kills it
    shutdown_drain_s: float = _opt(2.0, lo=0.0, hi=8.0, doc="at stop, serve and learn what is queued for up to this long (twice: the pipeline, then the learner; at most 8 so that a stop fits the unit's TimeoutStopSec=20); the rest is counted")
    learner_bytes: int = _opt(16 << 20, lo=1 << 16, hi=1 << 34, doc="learner lane: served windows and forecast samples waiting for the learner, in bytes (drop oldest)")
    publish: int = _opt(10_000, lo=16, hi=10_000_000,
                        doc="publishes the node's MQTT client may hold, QoS 1 (in flight or awaiting a reconnect) "
                            "and QoS 0 (not yet written) each; beyond it a publish is refused and counted (queue_full)")


@dataclass(frozen=True)
class AdaptConfig(_Section):
    """Online adaptation: the daemon's keys and the learner's (``Learner(config=...)``).

    Champion/challenger: the challenger is promoted when its mean prequential loss over
    the last ``eval_window`` labels is below the champion's by the relative
    ``promote_margin`` and by at least ``promote_floor`` times the global head's loss (so
    that noise between two near-perfect heads does not swap them every few labels), with
    at least ``eval_min`` labels since the last swap, and only when an anytime-valid
    sequential test on the paired per-label loss differences (``promote_*``, by betting:
    ``edge.adapt.promotion.BettingTest``) says the gain beyond the margin is clear; the
    champion is rolled back to the global head when the same test says its loss exceeds
    the global head's by ``rollback_margin``. Budget: labels past ``budget_steps_per_s`` / ``budget_cpu_share``
    are still scored and kept for replay; only their training steps are skipped (and
    counted). Drift: for ``boost_labels`` labels after a detected drift, the learning rate
    is multiplied by ``boost_lr`` and the steps per label by ``boost_steps`` (see
    docs/LEARNING.md, "Drift policy").
    """

    _name = "adapt"

    enabled: bool = _opt(True, doc="learn the head online from labels")
    label_tolerance_s: float = _opt(0.25, lo=0.0, hi=3600.0, doc="a label matches a window whose span, widened by this, contains its time")
    label_max_future_s: float = _opt(10.0, lo=0.0, hi=3600.0, doc="labels this far ahead of the newest window wait for it; later ones are rejected")
    label_cache_windows: int = _opt(512, lo=8, hi=1_000_000, doc="recent windows per stream whose features are kept for late labels")
    label_cache_bytes: int = _opt(64 << 20, lo=64 << 10, hi=1 << 40,
                                  doc="all streams' cached windows together (features + ~320 B each); the oldest are evicted beyond it")
    # 1800 s: a checkpoint is mostly the full replay buffer (~1.1 MB at the defaults), so this
    # is ~55 MB/day of flash while the learner changes, nothing while it does not (docs/STATE.md)
    checkpoint_interval_s: float = _opt(1800.0, lo=1.0, hi=86400.0,
                                        doc="the shortest time between checkpoints; written only when the learner changed, and at shutdown")
    head: str = _opt("linear", choices=("linear", "lowrank", "mlp"), doc="adapter head kind")
    head_rank: int = _opt(4, lo=1, hi=1024, doc="rank of the lowrank head")
    head_hidden: int = _opt(32, lo=1, hi=4096, doc="hidden units of the mlp head")
    optimizer: str = _opt("adam", choices=("adam", "sgd"), doc="optimizer of the head")
    lr: float = _opt(0.005, lo=1e-9, hi=10.0, doc="learning rate")
    batch: int = _opt(32, lo=1, hi=4096, doc="samples per step: the new one plus replayed ones")
    steps_per_label: int = _opt(1, lo=1, hi=100, doc="optimizer steps per label")
    replay_bytes: int = _opt(1 << 20, lo=1, hi=1 << 34, doc="bound of the latent replay buffer (too small for one sample: no replay)")
    recent_share: float = _opt(0.25, lo=0.0, hi=1.0, doc="share of each step drawn from the most recent labels")
    anchor: float = _opt(1e-3, lo=0.0, hi=100.0, doc="L2 pull toward the global head")
    promote_margin: float = _opt(0.05, lo=0.0, hi=10.0, doc="relative loss margin for the challenger to be promoted")
    promote_floor: float = _opt(0.01, lo=0.0, hi=10.0, doc="and it must gain at least this share of the global head's loss (no churn near zero loss)")
    rollback_margin: float = _opt(0.10, lo=0.0, hi=10.0, doc="relative loss margin by which the global head must beat the champion to roll back")
    eval_window: int = _opt(100, lo=2, hi=100_000, doc="labels over which heads are compared")
    eval_min: int = _opt(40, lo=1, hi=100_000, doc="labels since the last swap before another")
    budget_steps_per_s: float = _opt(500.0, lo=0.001, hi=1e6, doc="training budget: steps per second")
    budget_cpu_share: float = _opt(0.5, lo=0.01, hi=1.0, doc="training budget: share of one core")
    drift_detector: str = _opt("both", choices=("page_hinkley", "adwin", "both", "none"), doc="drift detector(s)")
    drift_on: str = _opt("error", choices=("loss", "error"), doc="what the detectors watch")
    ph_threshold: float = _opt(4.0, lo=1e-6, hi=1e6, doc="Page-Hinkley threshold")
    ph_delta: float = _opt(0.03, lo=0.0, hi=1e6, doc="Page-Hinkley tolerated change")
    adwin_delta: float = _opt(0.002, lo=1e-9, hi=0.999, doc="ADWIN confidence")
    boost_labels: int = _opt(200, lo=0, hi=1_000_000, doc="after a drift: labels of faster adaptation")
    boost_lr: float = _opt(3.0, lo=1e-6, hi=100.0, doc="after a drift: learning-rate factor")
    boost_steps: int = _opt(2, lo=1, hi=100, doc="after a drift: steps per label")
    guard: bool = _opt(True, doc="hold promotions while labels mostly contradict what the serving and global heads are both sure of (label_anomaly)")
    guard_confidence: float = _opt(0.9, lo=0.5, hi=1.0, doc="guard: a prediction this sure, by both heads, that a label contradicts")
    guard_share: float = _opt(0.5, lo=0.0, hi=1.0, doc="guard: trips when more of the recent labels than this contradict")
    guard_ratio: float = _opt(10.0, lo=1.0, hi=1e6, doc="guard: ... and that share is this many times the stream's history")
    seed: int = _opt(0, lo=0, hi=2**31, doc="seed of replay sampling and head init")
    # -- issue 10: promotion test, plasticity, scaling (docs/LEARNING.md) --
    # -- issue 18: promotion, refresh and rollback by one anytime-valid sequential test (docs/LEARNING.md) --
    promote_alpha: float = _opt(0.01, lo=1e-9, hi=0.5, doc="promotion, refresh, rollback: level of the anytime-valid sequential test on the paired loss differences (a swap needs an e-value of 1 / this); every swap restarts the test")
    promote_alpha_drift: float = _opt(0.2, lo=1e-9, hi=0.5, doc="the same level while plastic after a drift (needs less evidence, never none); at least promote_alpha")
    promote_bound: float = _opt(1.0, lo=1e-6, hi=1e6, doc="the paired loss differences are clipped to +- this (nats for classification; times the reference's loss for regression)")
    promote_block: int = _opt(10, lo=1, hi=100_000, doc="labels the challenger is scored on before it may count as ahead of the champion (which head the library serves beside the reference)")
    class_evidence: int = _opt(20, lo=0, hi=1_000_000, doc="classification: labels of a class before the device's other labels may unlearn it at full strength; a class with n < this keeps (n + 0.1) / this of their pull (docs/LEARNING.md, \"Class evidence\"); 0: off")
    refresh_labels: int = _opt(100, lo=0, hi=1_000_000, doc="an adapted champion follows its own challenger (a refresh, not a promotion) after this many labels since the last swap when the sequential test says it is better by promote_floor (not promote_margin); 0: only promotions")
    boost_replay: float = _opt(0.25, lo=0.0, hi=1.0, doc="while boosting: share of the reservoir rows kept (the rest come from recent labels)")
    boost_anchor: float = _opt(0.1, lo=0.0, hi=1.0, doc="while boosting: anchor factor")
    plastic_ratio: float = _opt(3.0, lo=1.0, hi=1e6, doc="new-label error above this times the replayed rows' error (both faded, for plastic_min labels in a row) starts a boost")
    plastic_min: int = _opt(50, lo=1, hi=1_000_000, doc="labels before the loss-ratio trigger may fire, and between two firings")
    scale: bool = _opt(False, doc="standardise features online (running mean/variance) before the head")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eval_min > self.eval_window:
            raise _fix("adapt", "eval_min", self.eval_min, f"must not exceed eval_window ({self.eval_window})")
        if self.promote_alpha_drift < self.promote_alpha:
            raise _fix("adapt", "promote_alpha_drift", self.promote_alpha_drift,
                       f"must be at least promote_alpha ({self.promote_alpha}): a drift may lower the evidence needed, not raise it")

    @property
    def head_options(self) -> dict[str, int]:
        """Keyword options of ``edge.adapt.heads.make_head`` for this head kind."""
        return {"rank": self.head_rank} if self.head == "lowrank" else {"hidden": self.head_hidden} if self.head == "mlp" else {}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AdaptConfig":
        """From an ``[adapt]`` table; unknown keys and bad values raise ``ConfigError``."""
        return _section("adapt", cls, d)


@dataclass(frozen=True)
class LabelsConfig(_Section):
    """Who may teach the device. Labels are accepted only on the node's label topics; with
    ``keys_dir`` set, only when signed (HMAC-SHA256) by a labeller whose key is in it, for
    this node and the topic's stream, with a recent ``t``, once (docs/TRUST.md, "Labels that
    name their target")."""

    _name = "labels"
    keys_dir: str = _opt("", doc="folder of <labeller>.key files; when set, unsigned or badly signed labels are refused")
    max_per_s: float = _opt(0.0, lo=0.0, hi=1e6, doc="labels per second accepted from one labeller across all label topics (unsigned: from all unsigned labels together); 0: no limit")
    burst: int = _opt(100, lo=1, hi=1_000_000, doc="labels one labeller (unsigned: all unsigned labels) may send at once above max_per_s")
    max_age_s: float = _opt(600.0, lo=1.0, hi=1e7, doc="signed labels older than this by their t, or this far ahead, are refused; accepted ones are remembered this long against replays")


@dataclass(frozen=True)
class MetricsConfig(_Section):
    _name = "metrics"
    port: int = _opt(0, lo=0, hi=65535, doc="Prometheus /metrics, /healthz and /readyz port; 0 disables")
    host: str = _opt("127.0.0.1", doc="address to bind the metrics server")
    source_silent_s: float = _opt(120.0, lo=0.0, hi=86400.0,
                                  doc="/readyz turns false, with a source_silent event, when a connected source that was "
                                      "flowing receives nothing for this long (set it above the slowest sensor's period); 0: never")
    status_endpoint: bool = _opt(False, doc="also serve /status (what `edge status` shows: stream names, counters, paths) to anyone who can reach the port; the 0600 status socket is the private way")


@dataclass(frozen=True)
class SourceConfig(_Section):
    _name = "sources"
    type: str = _opt("mqtt", choices=("mqtt", "serial"), doc="source kind")
    # mqtt
    topic: str = _opt("sensors/{device}/{stream}", doc="subscription; {device} and {stream} name topic levels; + and # allowed")
    format: str = _opt("auto", choices=("auto", "json", "csv", "frame"), doc="payload format")
    # serial
    port: str = _opt("", doc="serial port path or pyserial URL")
    baud: int = _opt(115200, lo=300, hi=16_000_000, doc="serial baud rate")
    protocol: str = _opt("binary", choices=("binary", "text"), doc="serial protocol")
    # both
    device: str = _opt("", doc="device name when the topic has no {device} (serial: default from HELLO)")
    stream: str = _opt("", doc="stream name when the topic has no {stream}")
    channels: tuple[str, ...] = _opt((), doc="channel names to pick and order (serial: from HELLO)")
    sample_rate: float = _opt(0.0, lo=0.0, hi=1e7, doc="serial text mode rate in Hz; 0 detects it")


# ---- fleet sync (issue 9): the device side; the server's config is edge.fleet.config ----------
@dataclass(frozen=True)
class FleetConfig(_Section):
    _name = "fleet"
    enabled: bool = _opt(False, doc="sync the learned head with a fleet server (needs [adapt] enabled)")
    fleet: str = _opt("default", doc="fleet name; topics are <topic_prefix>/<fleet>/<model>/...")
    topic_prefix: str = _opt("fleet", doc="first level of the fleet topics")
    interval_s: float = _opt(60.0, lo=0.1, hi=86400.0, doc="how often a delta is sent (also on demand: any message on <prefix>/<node>/fleet/sync)")
    min_samples: int = _opt(1, lo=0, hi=1_000_000, doc="labels learned since the last delta before another is sent")
    encoding: str = _opt("topk8", choices=("fp32", "fp16", "topk8"), doc="delta encoding (topk8: sparse, 8-bit, error feedback)")
    topk_fraction: float = _opt(0.02, lo=1e-6, hi=1.0, doc="share of the head's entries a topk8 delta carries (0.02 met 50x fewer bytes within 0.5 points of dense in edge bench fleet)")
    key_file: str = _opt("", doc="this device's Ed25519 private key (edge keys create NAME --role device)")
    server_key: str = _opt("", doc="the fleet server's public key; a global head not signed by it is refused")


@dataclass(frozen=True)
class DeployConfig(_Section):
    """``[deploy]``: signed model releases taken from the fleet (edge/deploy/, edge/fleet/RELEASE_FORMAT.md)."""

    _name = "deploy"
    enabled: bool = _opt(False, doc="take signed model releases from the fleet server (needs [fleet] key_file)")
    release_keys_dir: str = _opt("", doc="folder of trusted release public keys (*.pub); default: <folder of [fleet] key_file>/releases")
    max_bundle_bytes: int = _opt(256 * 2**20, lo=4096, hi=2**34, doc="a release whose bundle is larger is refused (too_large) before any download")
    max_disk_bytes: int = _opt(1024 * 2**20, lo=4096, hi=2**40, doc="quota of <state_dir>/deploy (downloads and unpacked releases); a download that would pass it is refused (disk_full)")
    chunks_in_flight: int = _opt(4, lo=1, hi=16, doc="chunks asked for at once (each at most the manifest's chunk_size in memory)")
    request_timeout_s: float = _opt(10.0, lo=0.1, hi=3600.0, doc="chunks asked for and not come by then are asked for again")
    shadow_share: float = _opt(0.25, lo=0.0, hi=1.0, doc="share of live windows the candidate model also serves (unpublished) during its shadow test")
    shadow_max_windows: int = _opt(2000, lo=10, hi=10_000_000, doc="shadow windows after which a test without enough labels decides by agreement and confidence")
    min_agreement: float = _opt(0.9, lo=0.0, hi=1.0, doc="without labels: share of shadow windows on which both models must agree for a switch")
    alpha: float = _opt(0.05, lo=1e-6, hi=0.5, doc="level of the shadow test's sequential decisions (switch, or refuse as worse)")
    keep_previous_s: float = _opt(86400.0, lo=0.0, hi=31_536_000.0, doc="the previous model folder is kept until the new one has served this long (abort returns to it)")


@dataclass(frozen=True)
class Config:
    node: NodeConfig = field(default_factory=NodeConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    queues: QueueConfig = field(default_factory=QueueConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    sources: tuple[SourceConfig, ...] = (SourceConfig(),)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)

    @property
    def topic_base(self) -> str:
        return f"{self.mqtt.topic_prefix}/{self.node.name}"

    @property
    def fleet_sync(self) -> bool:
        """True when the daemon runs fleet sync: it needs the learner (``[adapt] enabled``)."""
        return self.fleet.enabled and self.adapt.enabled


SECTIONS = {f.name: f for f in dataclasses.fields(Config)}


def _section(where: str, cls: type, table: Any) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"[{where}] must be a table, got {table!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"[{where}] unknown key {key!r}{hint}")
        values[key] = _coerce(where, cls, fields[key], value)
    return cls(**values)


def _check_source(where: str, s: SourceConfig) -> None:
    if s.type == "serial" and not s.port:
        raise ConfigError(f"[{where}] port is required for a serial source (a path such as /dev/ttyUSB0 or a pyserial URL)")
    for key in ("device", "stream"):  # names become topic levels: the same rule as names from outside
        value = getattr(s, key)
        if value and not is_valid_name(value):
            raise ConfigError(f"[{where}] {key} = {value[:80]!r} is not a valid name: {NAME_RULE}")
    if s.type == "mqtt":
        levels = s.topic.split("/")
        if not s.topic or any(("#" in lv and lv != "#") or ("+" in lv and lv != "+") for lv in levels) or "#" in levels[:-1]:
            raise ConfigError(f"[{where}] topic = {s.topic!r} is not a valid MQTT filter: + and # must fill a whole level, # only last")
        if "{device}" not in s.topic and not s.device and "+" not in levels and "#" not in levels:
            pass  # a fixed topic: device defaults to the topic itself
        for lv in levels:
            if "{" in lv and lv not in ("{device}", "{stream}"):
                raise ConfigError(f"[{where}] topic level {lv!r} is not allowed: placeholders are {{device}} and {{stream}}, each a whole level")


def check_section_name(name: str, known) -> None:
    """``ConfigError`` for a section this file does not know, with the nearest known one."""
    if name not in known:
        near = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean [{near[0]}]?" if near else f"; known sections: {', '.join(known)}"
        raise ConfigError(f"unknown section [{name}]{hint}")


def parse_config(data: dict[str, Any]) -> Config:
    """Validate a parsed TOML document into a ``Config``; raise ``ConfigError`` naming the fault."""
    if not isinstance(data, dict):
        raise ConfigError("the configuration must be a TOML table")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        check_section_name(name, SECTIONS)
        if name == "sources":
            if not isinstance(value, list) or not value:
                raise ConfigError("[[sources]] must be a non-empty array of tables ([[sources]] blocks)")
            srcs = []
            for i, t in enumerate(value):
                s = _section(f"sources[{i}]", SourceConfig, t)
                _check_source(f"sources[{i}]", s)
                srcs.append(s)
            kwargs[name] = tuple(srcs)
        else:
            kwargs[name] = _section(name, typing.get_type_hints(Config)[name], value)
    cfg = Config(**kwargs)
    if not is_valid_name(cfg.node.name):  # a topic level and a folder: the one name rule (edge.ingest.names)
        raise _fix("node", "name", cfg.node.name, f"use letters, digits, '.', '_', ':' or '-' ({NAME_RULE}): it becomes an MQTT topic level and a folder")
    if cfg.window.hop and cfg.window.length and cfg.window.hop > cfg.window.length * 16:
        raise _fix("window", "hop", cfg.window.hop, "must be at most 16 x length")
    if cfg.fleet.enabled and not (cfg.fleet.key_file and cfg.fleet.server_key):
        raise _fix("fleet", "key_file", cfg.fleet.key_file, "fleet sync needs key_file and server_key (see `edge keys`)")
    if cfg.deploy.enabled and not cfg.fleet.key_file:
        raise _fix("deploy", "enabled", True, "model releases need [fleet] key_file (the device key that signs its reports)")
    return dataclasses.replace(cfg, mqtt=resolve_mqtt(cfg.mqtt))


def resolve_mqtt(mqtt: MqttConfig) -> MqttConfig:
    """The ``[mqtt]`` section as every MQTT connection uses it: checked, with the password
    read from ``password_file``. The one loader of ``[mqtt]`` for the daemon's config and the
    fleet server's (``edge.fleet.config``), so that both apply the same rules.

    >>> resolve_mqtt(MqttConfig(password="p")).password
    'p'
    >>> resolve_mqtt(MqttConfig(cert_file="c.pem"))
    Traceback (most recent call last):
    edge.errors.ConfigError: [mqtt] tls = False is invalid: cert_file/key_file are set, so tls must be true
    """
    if mqtt.reconnect_max_s < mqtt.reconnect_min_s:
        raise _fix("mqtt", "reconnect_max_s", mqtt.reconnect_max_s, f"must be >= reconnect_min_s ({mqtt.reconnect_min_s})")
    if (mqtt.cert_file or mqtt.key_file) and not mqtt.tls:
        raise _fix("mqtt", "tls", mqtt.tls, "cert_file/key_file are set, so tls must be true")
    for key in ("ca_file", "cert_file", "key_file"):
        p = getattr(mqtt, key)
        if p and not Path(p).expanduser().is_file():
            raise _fix("mqtt", key, p, "no such file")
    if not mqtt.password_file:
        return mqtt
    if mqtt.password:
        raise ConfigError("[mqtt] password and password_file are both set: keep only password_file")
    return dataclasses.replace(mqtt, password=read_secret_file("mqtt", "password_file", mqtt.password_file))


def read_secret_file(where: str, key: str, path: str) -> str:
    """A secret from a file (one line; the trailing newline is dropped), warning when others can read it.

    The message names the file, never its content.
    """
    p = Path(path).expanduser()
    try:
        st = p.stat()
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"[{where}] {key} = {str(p)!r}: cannot read it: {e.strerror}") from None
    if st.st_mode & 0o077:
        log.warning("[%s] %s %s is readable or writable by group or others (mode %04o): chmod 600 it",
                    where, key, p, st.st_mode & 0o7777)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"[{where}] {key} = {str(p)!r}: not UTF-8 text") from None
    return text.rstrip("\r\n")


def load_config(path: str | Path | None) -> Config:
    """Read and validate a TOML file; ``None`` gives the defaults."""
    if path is None:
        return Config()
    return load_toml(path, parse_config)


def load_toml(path: str | Path, parse: typing.Callable[[dict], Any]) -> Any:
    """Read a TOML file and ``parse`` it; every error is a ``ConfigError`` naming the file.
    The one reader of the daemon's and the fleet server's config files."""
    p = Path(path).expanduser()
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        # TOML is UTF-8 by definition; the bytes themselves are not shown (they may be a secret).
        raise ConfigError(f"{p}: not UTF-8 text (invalid byte at offset {e.start}); save it as UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
    try:
        return parse(data)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v + '"'
    if isinstance(v, tuple):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return repr(v)


def reference_table() -> str:
    """The configuration reference (Markdown), generated from the dataclasses for the README."""
    lines = []
    for sec, f in SECTIONS.items():
        cls = SourceConfig if sec == "sources" else typing.get_type_hints(Config)[sec]
        head = "[[sources]]" if sec == "sources" else f"[{sec}]"
        lines += [f"#### `{head}`", "", "| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        hints = _type_hints(cls)
        for g in dataclasses.fields(cls):
            md = g.metadata
            allowed = ", ".join(map(str, md["choices"])) if md.get("choices") else (
                f"{md['lo']} .. {md['hi']}" if md.get("lo") is not None else "")
            tname = getattr(hints[g.name], "__name__", "list of strings")
            lines.append(f"| `{g.name}` | {tname} | `{_toml(g.default)}` | {allowed} | {md.get('doc', '')} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_table())
