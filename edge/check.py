"""Every start-up check of ``edge run`` and ``edge fleet-server run``, and what ``--check`` adds.

``edge run`` and ``edge run --check`` call the one function ``check_startup``; ``edge
fleet-server run`` and its ``--check`` call ``check_server_startup``. So ``--check`` fails,
with the documented exit code and one line naming the fault, wherever start-up would, and
passes only where start-up would pass. Each check raises an ``EdgeError`` (config 2,
model 3, state 7, key file 9):

- the broker address policy (``check_broker_policy``, pure): no plaintext to a broker
  that is not on loopback unless ``[mqtt] allow_plaintext = true``;
- the TLS files (``check_tls_files``): readable and parseable by the ssl module;
- the model folder: its files (``check_model_files``: manifest, ``model.py``, a readable
  weights file with backbone and head tensors; without importing torch) and its pin
  (``[model] sha256`` over the bytes that will run, ``edge.zoo.check_pin``), before any of
  its code runs; with ``--check`` also its code (``check_model``: ``model.py`` runs, the
  weights load, one window of zeros runs through backbone and head with the manifest's
  shapes), from the same verified bytes;
- the key material start-up loads (``check_keys``): ``[labels] keys_dir`` and, with fleet
  sync, ``[fleet] key_file`` and ``server_key``;
- the state folder (``check_state_dir``): writable by this user, or creatable.

The daemon makes these checks itself (``Daemon.start``), in the main process, so that
their exit codes reach systemd's ``RestartPreventExitStatus=``, which looks at the main
process only: a failing ``ExecStartPre=`` is restarted whatever its exit code.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.config import Config, MqttConfig
from edge.errors import ConfigError, EdgeError, ModelError, StateError
from edge.zoo import ModelFolder, check_pin, resolve_model  # no torch: zoo imports it only to build modules

log = logging.getLogger("edge.check")


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback addresses; a name is not resolved (DNS can change).

    >>> [is_loopback_host(h) for h in ("127.0.0.1", "127.8.0.1", "::1", "localhost", "10.0.0.2", "broker.lan")]
    [True, True, True, True, False, False]
    """
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_broker_policy(mqtt: MqttConfig) -> None:
    """Refuse plaintext MQTT to a broker off this machine unless the config allows it.

    >>> check_broker_policy(MqttConfig(host="127.0.0.1", username="u", password="p"))
    >>> check_broker_policy(MqttConfig(host="10.0.0.2", tls=True))
    >>> check_broker_policy(MqttConfig(host="10.0.0.2"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    edge.errors.ConfigError: [mqtt] host = '10.0.0.2' is not on loopback and tls = false: ...
    """
    if mqtt.tls or is_loopback_host(mqtt.host):
        return
    what = "the connection and its username/password would travel" if mqtt.username else "the connection would travel"
    if not mqtt.allow_plaintext:
        raise ConfigError(f"[mqtt] host = {mqtt.host[:100]!r} is not on loopback and tls = false: {what} in clear; "
                          "set tls = true (README, \"TLS policy\"), or allow_plaintext = true on a network you trust")
    if mqtt.username:
        log.warning("[mqtt] allow_plaintext = true: %s in clear to %s", what, mqtt.host[:100])


def _readable(key: str, path: str) -> Path:
    p = Path(path).expanduser()
    try:
        with open(p, "rb") as f:
            f.read(1)
    except OSError as e:
        raise ConfigError(f"[mqtt] {key} = {str(p)!r}: cannot read it: {e.strerror}") from None
    return p


def _ssl_reason(e: ssl.SSLError) -> str:
    return str(e.reason or e.strerror or type(e).__name__)[:100]


def check_tls_files(mqtt: MqttConfig) -> None:
    """Load the CA bundle and the client certificate and key as the MQTT client will.

    A file that is missing, unreadable, not PEM, or a key that does not match its
    certificate is one ``ConfigError`` naming the key and the file (never its content).
    """
    if not mqtt.tls:
        return
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if mqtt.ca_file:
        ca = _readable("ca_file", mqtt.ca_file)
        try:
            ctx.load_verify_locations(cafile=str(ca))
        except (ssl.SSLError, ValueError) as e:
            reason = _ssl_reason(e) if isinstance(e, ssl.SSLError) else "no certificate in it"
            raise ConfigError(f"[mqtt] ca_file = {str(ca)!r}: not a PEM CA bundle ({reason})") from None
    if not (mqtt.cert_file or mqtt.key_file):
        return
    if not (mqtt.cert_file and mqtt.key_file):
        missing = "key_file" if mqtt.cert_file else "cert_file"
        raise ConfigError(f"[mqtt] {missing} is empty: mutual TLS needs both cert_file and key_file")
    cert, key = _readable("cert_file", mqtt.cert_file), _readable("key_file", mqtt.key_file)
    try:
        ssl.PEM_cert_to_DER_cert(cert.read_text("ascii", errors="replace"))
    except ValueError:
        raise ConfigError(f"[mqtt] cert_file = {str(cert)!r}: not a PEM certificate") from None
    if b"PRIVATE KEY-----" not in key.read_bytes():
        raise ConfigError(f"[mqtt] key_file = {str(key)!r}: not a PEM private key")

    def no_passphrase() -> bytes:  # an encrypted key would make the daemon prompt on a tty it lacks
        raise ConfigError(f"[mqtt] key_file = {str(key)!r}: the key is encrypted; the daemon needs an unencrypted key (mode 0600)")

    try:
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key), password=no_passphrase)
    except ssl.SSLError as e:
        raise ConfigError(f"[mqtt] key_file = {str(key)!r} cannot be used with cert_file = {str(cert)!r} "
                          f"(ssl: {_ssl_reason(e)}): a corrupt key or one that does not match the certificate") from None


@dataclass(frozen=True)
class ModelCheck:
    """What ``check_model`` found: the model and the shapes one window produced."""

    name: str
    version: str
    window_shape: tuple[int, ...]
    feature_shape: tuple[int, ...]
    output_shape: tuple[int, ...]


def check_model(ref) -> ModelCheck:
    """Run the folder's ``model.py``, load its weights and one window of zeros through it.

    ``ref`` is a ``ModelFolder`` (one ``check_startup`` verified: its pinned bytes run) or
    a model reference."""
    folder = ref if isinstance(ref, ModelFolder) else resolve_model(ref)
    m = folder.manifest
    from edge.serve.export import torch_available

    if not torch_available():  # a serving-only install: the folder's exported graph instead
        return check_model_graph(folder)
    backbone, head = folder.build()  # ModelError for a bad model.py or weights
    import torch

    x = torch.zeros(1, m.channels, m.window)
    try:
        with torch.no_grad():
            feats = backbone(x)
            out = head(feats)
    except Exception as e:  # a model folder's code may fail in any way
        raise ModelError(f"{folder.path}: one window {tuple(x.shape)} does not run through the model: "
                         f"{type(e).__name__}: {str(e)[:200]}") from None
    if tuple(feats.shape) != (1, m.feature_size):
        raise ModelError(f"{folder.path}: the backbone gives features of shape {tuple(feats.shape)}, "
                         f"the manifest says (1, {m.feature_size}) (features.size)")
    if tuple(out.shape) != (1, m.outputs):
        raise ModelError(f"{folder.path}: the head gives outputs of shape {tuple(out.shape)}, "
                         f"the manifest says (1, {m.outputs})")
    return ModelCheck(name=m.name, version=m.version, window_shape=tuple(x.shape),
                      feature_shape=tuple(feats.shape), output_shape=tuple(out.shape))


def check_model_graph(folder: ModelFolder) -> ModelCheck:
    """``check_model`` without torch: one window of zeros through the folder's ``model.onnx``
    (ONNX Runtime) and its linear head (numpy). ``ModelError`` if there is no graph."""
    from edge.serve.export import no_graph_error, run_graph

    m = folder.manifest
    graph = folder.graph()  # ModelError for a stale or malformed graph
    if graph is None:
        raise ModelError(str(no_graph_error(folder)))
    x = np.zeros((1, m.channels, m.window), np.float32)
    try:
        feats = run_graph(graph, x)
    except Exception as e:  # onnxruntime raises its own kinds for a graph that does not run
        raise ModelError(f"{folder.path}/model.onnx: one window {x.shape} does not run through it: "
                         f"{type(e).__name__}: {str(e)[:200]}") from None
    _, head = folder.arrays()
    if set(head) != {"weight", "bias"}:
        raise ModelError(f"{folder.path}: the head's weights are {sorted(head)[:4]}, not a linear layer "
                         f"(weight, bias): serving without torch needs the linear head INTERNALS.md describes")
    if tuple(feats.shape) != (1, m.feature_size):
        raise ModelError(f"{folder.path}: model.onnx gives features of shape {tuple(feats.shape)}, "
                         f"the manifest says (1, {m.feature_size}) (features.size)")
    out = feats @ head["weight"].T + head["bias"]
    if tuple(out.shape) != (1, m.outputs):
        raise ModelError(f"{folder.path}: the head gives outputs of shape {tuple(out.shape)}, "
                         f"the manifest says (1, {m.outputs})")
    return ModelCheck(name=m.name, version=m.version, window_shape=x.shape, feature_shape=tuple(feats.shape),
                      output_shape=tuple(out.shape))


def check_model_files(ref: str):
    """The model folder's manifest, ``model.py`` and weights are there and readable (no torch)."""
    from safetensors import SafetensorError, safe_open

    folder = resolve_model(ref)  # parses the manifest
    if not (folder.path / "model.py").is_file():
        raise ModelError(f"{folder.path}: model folder has no model.py")
    wp = folder.path / "weights.safetensors"
    if not wp.is_file():
        raise ModelError(f"{folder.path}: model folder has no weights.safetensors (run its train.py)")
    try:
        with safe_open(str(wp), framework="numpy") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"{wp}: cannot read weights: {str(e)[:200]}") from None
    if not any(k.startswith("backbone.") for k in keys) or not any(k.startswith("head.") for k in keys):
        raise ModelError(f"{wp}: weights need keys prefixed 'backbone.' and 'head.'")
    return folder


def check_state_dir(path: str) -> Path:
    """The state folder exists and is writable, or its nearest existing parent is."""
    p = Path(path).expanduser()
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise StateError(f"[node] state_dir = {str(p)!r}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise StateError(f"[node] state_dir = {str(p)!r}: {probe} is not writable by this user")
    return p


def check_keys(cfg: Config) -> None:
    """Load every key the daemon loads at start-up, as it loads them: the labellers' keys
    (``ConfigError``, 2) and, with fleet sync, the device key and the server's public key
    (``KeyFileError``, 9)."""
    if cfg.labels.keys_dir:
        from edge.ingest.labelauth import load_label_keys

        load_label_keys(cfg.labels.keys_dir)
    if cfg.fleet_sync:
        from edge.fleet.keys import load_private, load_public

        load_private(cfg.fleet.key_file)
        load_public(cfg.fleet.server_key)


@dataclass(frozen=True)
class Startup:
    """What ``check_startup`` verified: the model folder whose pinned bytes are to run."""

    model: ModelFolder


def check_startup(cfg: Config) -> Startup:
    """Every check ``edge run`` makes before it starts, and ``--check`` first: no torch, and
    no code of the model folder runs (``check_model`` does that, for ``--check`` only)."""
    check_broker_policy(cfg.mqtt)
    check_tls_files(cfg.mqtt)
    check_state_dir(cfg.node.state_dir)
    folder = check_model_files(cfg.model.path)
    check_pin(folder, cfg.model.sha256)
    check_keys(cfg)
    return Startup(model=folder)


def check_all(cfg: Config) -> ModelCheck:
    """Everything ``edge run --check`` checks; returns what the model check found."""
    return check_model(check_startup(cfg).model)


# ---- the fleet server --------------------------------------------------------------------------

@dataclass(frozen=True)
class ServerStartup:
    """What ``check_server_startup`` found: the model folder and the store's latest version."""

    model: ModelFolder
    latest_version: int | None
    devices: int
    release_key: str = ""  # key id (hex) of [release] key_file; "" without one


def check_devices_dir(path: str) -> int:
    """``[server] devices_dir`` is a folder this user can list; returns its ``.pub`` count."""
    d = Path(path).expanduser()
    try:
        return sum(1 for p in d.iterdir() if p.name.endswith(".pub"))
    except NotADirectoryError:
        raise ConfigError(f"[server] devices_dir = {str(d)!r}: not a folder") from None
    except FileNotFoundError:
        raise ConfigError(f"[server] devices_dir = {str(d)!r}: no such folder (edge keys export NAME --to DIR)") from None
    except OSError as e:
        raise ConfigError(f"[server] devices_dir = {str(d)!r}: cannot list it: {e.strerror}") from None


def check_store(url: str) -> int | None:
    """The store opens (it is created when missing, as the server would); its latest version.
    A store that cannot be opened is a ``StateError`` (7), except PostgreSQL's own
    connection errors (1: the database may come up later, so systemd restarts)."""
    import sqlite3

    from edge.fleet.store import open_store

    shown = url.split("@")[-1][:200]  # never a password in a URL
    try:
        store = open_store(url)
    except EdgeError:
        raise
    except (sqlite3.Error, OSError) as e:
        raise StateError(f"[server] store = {shown!r} cannot be opened: {type(e).__name__}: {str(e)[:200]}") from None
    try:
        latest = store.latest()
        return None if latest is None else latest.version
    finally:
        store.close()


def check_server_startup(cfg) -> ServerStartup:
    """Every check ``edge fleet-server run`` makes before it starts, and its ``--check``:
    broker policy, TLS files, the model folder, the server key, ``devices_dir`` and the store."""
    from edge.fleet.keys import load_private

    s = cfg.server
    check_broker_policy(cfg.mqtt)
    check_tls_files(cfg.mqtt)
    folder = check_model_files(s.model)
    if not s.key_file:
        raise ConfigError("[server] key_file is required: the server signs every global head (edge keys create NAME --role server)")
    server_key = load_private(s.key_file)
    devices = check_devices_dir(s.devices_dir) if s.devices_dir else 0
    latest = check_store(s.store)
    release_key = check_release_key(cfg, folder.manifest.name, server_key) if cfg.release.key_file else ""
    return ServerStartup(model=folder, latest_version=latest, devices=devices, release_key=release_key)


def check_release_key(cfg, model: str, server_key) -> str:
    """``[release] key_file`` is a readable Ed25519 key of the release role, not the aggregation
    key, the key of the ``.pub`` beside it (the one exported to devices), and the signer of the
    rollout in progress (``KeyFileError``, 9); returns its key id.

    Why each: the server signs every manifest of a rollout (a wave opening, a halt) with this
    key. A key the devices do not trust makes them refuse the next manifest as ``bad_signature``
    and remember the release as refused, so the rollout is lost, not only stalled; and the
    aggregation key must never sign code for devices (RELEASE_FORMAT.md, "Keys")."""
    from edge.fleet.codec import key_id
    from edge.fleet.keys import KeyFileError, load_private, load_public

    p = Path(cfg.release.key_file).expanduser()
    if not p.name.endswith(".release.key"):
        raise KeyFileError(f"[release] key_file = {str(p)[:200]!r} is not a release-role key (NAME.release.key): "
                           "create one with edge keys create NAME --role release")
    kid = key_id(load_private(p).public_key())
    if kid == key_id(server_key.public_key()):
        raise KeyFileError(f"[release] key_file = {str(p)[:200]!r} is the same key as [server] key_file: keep the "
                           "release key apart from the aggregation key (edge keys create NAME --role release)")
    pub = p.with_name(p.name[: -len(".key")] + ".pub")
    if pub.exists() and key_id(load_public(pub)) != kid:
        raise KeyFileError(f"[release] key_file = {str(p)[:200]!r} does not match {pub.name} beside it: devices trust "
                           "the .pub exported from there, so they would refuse manifests signed by this key")
    _check_rollout_signer(cfg, model, kid.hex(), p)
    return kid.hex()


def _check_rollout_signer(cfg, model: str, kid: str, path: Path) -> None:
    """A rollout in progress (rolling or halted) must go on under the key its devices trust:
    the one that signed its manifest so far."""
    from edge.fleet.keys import KeyFileError
    from edge.fleet.release_codec import envelope_key_id
    from edge.fleet.store import open_store

    store = open_store(cfg.server.store)
    try:
        cur = store.current_release(cfg.server.fleet, model)
    finally:
        store.close()
    if cur is None or cur.state not in ("rolling", "halted"):
        return
    signer = envelope_key_id(cur.manifest)
    if signer and signer != kid:
        raise KeyFileError(f"[release] key_file = {str(path)[:200]!r} (key id {kid}) did not sign the release rolled "
                           f"out now ({cur.release}, {cur.state}, signed by key id {signer}): its devices trust that "
                           "key and would refuse this one's manifests; set key_file to that key, or abort the "
                           "release (edge fleet-server rollout abort) before changing keys")
