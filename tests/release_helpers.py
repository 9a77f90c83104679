"""A test-side release publisher built from ``edge.fleet.release_codec`` and a release key.

It publishes a signed retained manifest and answers each signed chunk request on the
device's chunk topic, as RELEASE_FORMAT.md says the server does; its knobs break it in
the ways the device must refuse (a tampered or truncated chunk, silence after N chunks),
and it counts every chunk index asked for, so a test can prove a resume asks only for
the rest.
"""
from __future__ import annotations

import collections
import threading
from dataclasses import replace

import paho.mqtt.client as mqtt

from edge.fleet import release_codec as rc
from edge.zoo import read_folder


class ReleasePublisher:
    def __init__(self, broker, *, key, device_keys: list, fleet: str, model: str, prefix: str = "fleet"):
        self.key, self.device_keys, self.fleet, self.model = key, list(device_keys), fleet, model
        self.base = f"{prefix}/{fleet}/{model}/release"
        self.asked: collections.Counter = collections.Counter()  # (release, index) -> times asked
        self.reports: list = []
        self.bundles: dict[str, bytes] = {}
        self.tamper: set[int] = set()  # chunk indices sent with one byte flipped
        self.truncate: set[int] = set()  # chunk indices sent short
        self.answer_limit: int | None = None  # answer at most this many chunks in all
        self.answered = 0
        self.seq = 0
        self.lock = threading.Lock()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.c.on_connect = lambda c, *a: c.subscribe([(f"{self.base}/get/+", 1), (f"{self.base}/report/+", 1)])
        self.c.on_message = self._on_message
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()

    def release(self, folder, *, release: str, waves=(100,), min_labels: int = 20, margin: float = 0.05,
                chunk_size: int = 4096, size_override: int | None = None, key=None, state: str = "rolling"):
        """Publish a manifest for ``folder`` (retained) and serve its chunks; the manifest it signed."""
        files = read_folder(folder)
        bundle = rc.pack_bundle(files)
        version = [ln.split('"')[1] for ln in files["manifest.toml"].decode().splitlines() if ln.startswith("version")][0]
        with self.lock:
            self.seq += 1
            seq = self.seq
        m = rc.make_manifest(fleet=self.fleet, model=self.model, release=release, seq=seq, version=version,
                             files=files, bundle=bundle, chunk_size=chunk_size, waves=list(waves),
                             min_labels=min_labels, margin=margin, state=state)
        if size_override is not None:  # an oversized claim: chunk hashes to match the claimed size
            n = rc.n_chunks(size_override, chunk_size)
            m = replace(m, size=size_override, chunks=tuple(m.chunks[i % len(m.chunks)] for i in range(n)))
        self.bundles[release] = bundle
        self.manifest = m
        self._publish_manifest(m, key or self.key)
        return m

    def set_state(self, state: str, *, key=None):
        with self.lock:
            self.seq += 1
            m = replace(self.manifest, seq=self.seq, state=state)
        self.manifest = m
        self._publish_manifest(m, key or self.key)
        return m

    def _publish_manifest(self, m, key) -> None:
        self.c.publish(self.base, rc.pack_manifest(m, key), qos=1, retain=True).wait_for_publish(5)

    def clear(self) -> None:
        self.c.publish(self.base, b"", qos=1, retain=True).wait_for_publish(5)

    def _on_message(self, c, u, msg) -> None:
        try:
            if "/get/" in msg.topic:
                r = rc.unpack_request(msg.payload, self.device_keys)
                self._answer(r)
            elif "/report/" in msg.topic:
                self.reports.append(rc.unpack_report(msg.payload, self.device_keys))
        except Exception as e:  # noqa: BLE001  a test server: record, do not die
            self.reports.append(e)

    def _answer(self, r) -> None:
        bundle = self.bundles.get(r.release)
        if bundle is None:
            return
        cs = self.manifest.chunk_size
        for i in range(r.start, r.start + r.count):
            with self.lock:
                self.asked[(r.release, i)] += 1
                if self.answer_limit is not None and self.answered >= self.answer_limit:
                    continue
                self.answered += 1
            data = rc.chunk_bytes(bundle, i, cs)
            if i in self.tamper:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            if i in self.truncate:
                data = data[: len(data) // 2]
            topic = f"{self.base}/chunk/{r.node}"
            self.c.publish(topic, rc.pack_chunk(r.release, i, data), qos=1)

    def states(self, release: str) -> list[str]:
        return [r.state for r in self.reports if not isinstance(r, Exception) and r.release == release]

    def refusal(self, release: str) -> str | None:
        return next((r.reason for r in self.reports if not isinstance(r, Exception) and r.release == release
                     and r.state == "refused"), None)

    def close(self) -> None:
        self.clear()
        self.c.disconnect()
        self.c.loop_stop()


def device_toml(path, *, node: str, state, broker, model, cache, key_file, adapt: str) -> None:
    """The config of a small real device for the release tests: ``model`` served int8 by
    ONNX Runtime, fast reconnects, fleet sync with ``key_file``, [deploy] on with every window
    shadowed; ``adapt`` is the body of its [adapt] section."""
    from pathlib import Path

    state = Path(state)
    Path(path).write_text(f'''[node]
name = "{node}"
state_dir = "{state}"
runtime_dir = "{state / 'run'}"

[mqtt]
host = "{broker.host}"
port = {broker.port}
reconnect_min_s = 0.1
reconnect_max_s = 0.5

[model]
path = "{model}"
backend = "onnxruntime"
precision = "int8"
cache_dir = "{cache}"

[adapt]
{adapt}

[fleet]
fleet = "test"
key_file = "{key_file}"

[deploy]
enabled = true
shadow_share = 1.0
request_timeout_s = 2.0
''')
