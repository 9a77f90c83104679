"""Simulated release-taking devices and the two demo releases, shared by `edge bench deploy`
and `edge demo --fleet` (one copy: STYLE 15).

``SimDevice`` is one device as the daemon wires its deploy part (``edge.deploy.part.DeployPart``:
its own MQTT connection, deploy and shadow threads), serving a model with ONNX Runtime int8
and fed labelled windows through its shadow tap exactly as the pipeline calls it. A switch is
the daemon's restart, done here in process: the part is stopped and built again on the folder
``active.json`` names (``maybe_restart``).

``release_folders`` makes the two releases of the shipped model: **good**, the folder with its
version raised (same weights), and **worse**, its head's class rows rotated by one (a
mislabelled head: backbone and int8/fp32 class agreement, so parity, unchanged; the graph
exported again, since a graph records the weights it came from).
"""
from __future__ import annotations

import collections
import json
import shutil
import threading
from pathlib import Path
from typing import Callable

import numpy as np


def mqtt5_bytes(topic: str, payload_len: int, *, qos: int = 1) -> int:
    """Bytes of one MQTT 5 PUBLISH (no properties) and its PUBACK on the wire.

    >>> mqtt5_bytes("a/b", 10)  # 1 + 1 + (2 + 3 + 2 + 1 + 10) + PUBACK 4
    24
    """
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + 1 + payload_len
    varint = 1 if remaining < 128 else 2 if remaining < 16_384 else 3 if remaining < 2_097_152 else 4
    return 1 + varint + remaining + (4 if qos else 0)


def release_folders(root: Path, *, model: str = "vibration", base_version: str = "1.0.0",
                    versions: tuple = ("1.0.1", "1.0.2")) -> dict:
    """``{"current", "good", "worse"}`` folders: the shipped ``model``, it re-versioned, it with a rotated head."""
    from safetensors.numpy import load, save

    from edge.serve.export import write_folder_graph
    from edge.zoo import ModelFolder, resolve_model

    shipped = resolve_model(model).path
    out = {"current": Path(shipped)}
    for name, version in zip(("good", "worse"), versions):
        d = Path(root) / name
        shutil.copytree(shipped, d, ignore=shutil.ignore_patterns("__pycache__"))
        mp = d / "manifest.toml"
        mp.write_text(mp.read_text().replace(f'version = "{base_version}"', f'version = "{version}"'))
        if name == "worse":
            w = dict(load((d / "weights.safetensors").read_bytes()))
            k = w["head.weight"].shape[0]
            rot = [(i + 1) % k for i in range(k)]  # each class's head row moved to the next class
            w["head.weight"], w["head.bias"] = w["head.weight"][rot].copy(), w["head.bias"][rot].copy()
            (d / "weights.safetensors").write_bytes(save(w))
            # its graph again, from these weights: here, once, because torch.export is not
            # thread-safe and all simulated devices share one process
            write_folder_graph(ModelFolder(d))
        out[name] = d
    return out


class Wire:
    """What one device received and sent on the release topics: payload bytes and framing."""

    def __init__(self):
        self.lock = threading.Lock()
        self.by_release = collections.Counter()  # (release, "payload"|"framed"|"duplicate") -> bytes
        self.messages = collections.Counter()
        self._chunks: set[tuple[str, int]] = set()  # (release, index) of the chunk frames received

    def add(self, release: str, topic: str, n: int) -> None:
        with self.lock:
            self.by_release[(release, "payload")] += n
            self.by_release[(release, "framed")] += mqtt5_bytes(topic, n)
            self.messages[release] += 1

    def add_received(self, topic: str, payload: bytes) -> None:
        """A message in; a chunk frame of an index received before counts its framed bytes as
        ``duplicate`` too (the bytes a re-ask cost on the wire; the device writes it once)."""
        release = release_of(topic, payload)
        self.add(release, topic, len(payload))
        if "/chunk/" in topic and len(payload) >= 17:
            key = (release, int.from_bytes(payload[13:17], "little"))
            with self.lock:
                if key in self._chunks:
                    self.by_release[(release, "duplicate")] += mqtt5_bytes(topic, len(payload))
                self._chunks.add(key)


def release_of(topic: str, payload: bytes) -> str:
    """The release a release-topic message belongs to (for the per-release byte count)."""
    from edge.fleet import release_codec as rc

    try:
        if "/chunk/" in topic:
            return rc.unpack_chunk(payload).release
        n = int.from_bytes(payload[5:9], "little")
        return json.loads(payload[9:9 + n])["release"]
    except Exception:  # noqa: BLE001  only for accounting: a message it cannot read counts as unknown
        return "?"


def softmax_scores(z: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Softmax of ``z @ w.T + b`` per row: the scores a linear head publishes.

    >>> softmax_scores(np.zeros((1, 2)), np.zeros((2, 2)), np.zeros(2)).tolist()
    [[0.5, 0.5]]
    """
    logits = z @ w.T + b
    s = np.exp(logits - logits.max(1, keepdims=True))
    return s / s.sum(1, keepdims=True)


class SimDevice:
    """One device: a ``DeployPart`` over the model it serves now, restarted on a switch.

    ``keys``: ``model`` (the folder it starts on), ``release_dir`` (trusted release keys) and
    one ``edge.fleet.keys`` key per node; ``backends`` and ``lock`` share one int8 build per
    model among all devices of a process; ``deploy`` adds ``[deploy]`` settings."""

    def __init__(self, node: str, *, root: Path, broker, keys: dict, cache: Path, backends: dict, lock,
                 fleet: str = "bench", deploy: dict | None = None):
        from edge.config import parse_config

        self.node, self.backends, self.lock = node, backends, lock
        self.cfg = parse_config({
            "node": {"name": node, "state_dir": str(Path(root) / "state")},
            "mqtt": {"host": broker.host, "port": broker.port, "protocol": getattr(broker, "protocol", "5"),
                     "reconnect_min_s": 0.1, "reconnect_max_s": 0.5, "max_payload_bytes": 2 << 20},
            # a cache of its own, as on a real device: gates building the same artifact at once in
            # one shared cache folder race (a FileNotFoundError on golden.npz was seen here)
            "model": {"path": str(keys["model"]), "cache_dir": str(Path(root) / "cache")},
            "fleet": {"fleet": fleet, "key_file": str(keys[node].private_path)},
            "deploy": {"enabled": True, "shadow_share": 1.0, "request_timeout_s": 5.0,
                       "release_keys_dir": str(keys["release_dir"]), **(deploy or {})}})
        self.cache, self.wire, self.restarts, self.served = cache, Wire(), [], []
        self.t = 0.0
        self._start()

    def _backend(self, model):
        from edge.serve.cache import ArtifactCache
        from edge.serve.compile import obtain

        with self.lock:  # one build per model for all devices (the artifact cache would give the same)
            if model.content_hash not in self.backends:
                self.backends[model.content_hash] = obtain(model, "onnxruntime", "int8", cache=ArtifactCache(self.cache))[0]
            return self.backends[model.content_hash]

    def _start(self) -> None:
        from edge.deploy.active import active_model
        from edge.deploy.part import DeployPart
        from edge.zoo import ModelFolder, digest_files

        model = active_model(self.cfg) or ModelFolder(self.cfg.model.path)
        self.model, self.backend = model, self._backend(model)
        self.served.append(digest_files(model.files))
        self.part = DeployPart(cfg=self.cfg, model=model, features=self.backend.features, on_window=None,
                               on_label=None, request_restart=self.restarts.append)
        self.part.attach(self.backend)
        inner, publish = self.part.link._handler, self.part.agent.publish_fn

        def received(topic, payload, *a):
            self.wire.add_received(topic, bytes(payload))
            return inner(topic, payload, *a)

        def sent(topic, payload):
            self.wire.add(release_of(topic, payload), topic, len(payload))
            return publish(topic, payload)

        self.part.link._handler, self.part.agent.publish_fn = received, sent
        _, head = model.arrays()
        self.head_w, self.head_b = head["weight"], head["bias"]
        self.part.start()

    def maybe_restart(self) -> bool:
        """The daemon's restart after a switch or a rollback: a new part on the active folder."""
        if len(self.restarts) == 0:
            return False
        self.restarts.clear()
        self.part.stop()
        self._start()
        return True

    @property
    def phase(self) -> str:
        return self.status().get("phase", "")

    def status(self) -> dict:
        """The deploy part's status (``edge status``'s ``deploy`` field)."""
        return self.part.status().get("deploy", {})

    def feed(self, x: np.ndarray, y: np.ndarray | None, *, scores_of: Callable | None = None,
             stream: tuple = ("vib", "s")) -> int:
        """Windows through the tap as the pipeline serves them, each labelled after (none when
        ``y`` is None). The published scores are the served model's shipped head's, or
        ``scores_of(z)``'s (a device's adapted head)."""
        tap = self.part.tap
        for i in range(0, len(x), 8):
            xb = x[i:i + 8]
            z = tap.features(xb)
            scores = scores_of(z) if scores_of is not None else softmax_scores(z, self.head_w, self.head_b)
            for j in range(len(xb)):
                t0 = self.t
                self.t += 1.0
                tap.on_window(stream, t0, t0 + 0.5, z[j], scores[j])
                if y is not None:
                    tap.on_label(stream, t0 + 0.25, int(y[i + j]))
        return len(x)

    def stop(self) -> None:
        self.part.stop()
