"""Shared pieces of the fleet tests: keys on disk, a server config, signed deltas."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.fleet.codec import Header, pack_message
from edge.fleet.feedback import encode_pending
from edge.fleet.keys import create_key, export_public, load_private
from edge.zoo import resolve_model


def make_keys(root: Path, nodes) -> dict:
    """A server key and one key per node; device public keys exported to ``root/devices``."""
    kd = root / "keys"
    out = {"server": create_key(kd, "srv", role="server"), "devices_dir": root / "devices"}
    for n in nodes:
        out[n] = create_key(kd, n, role="device")
        export_public(kd, n, to=root / "devices")
    return out


def server_toml(root: Path, keys: dict, broker, *, store: str, name: str = "srv", k: int = 2, t_s: float = 1.0,
                group: str = "", pause: float = 0.0, head: str = "linear", model: str | None = None) -> Path:
    model = model or str(resolve_model("vibration").path)
    p = root / f"{name}.toml"
    p.write_text(f'''[server]
name = "{name}"
fleet = "test"
model = "{model}"
head = "{head}"
store = "{store}"
key_file = "{keys['server'].private_path}"
devices_dir = "{keys['devices_dir']}"
group = "{group}"
k = {k}
t_s = {t_s}
commit_pause_s = {pause}
max_norm = 50.0

[mqtt]
host = "{broker.host}"
port = {broker.port}
client_id = "{name}"
reconnect_min_s = 0.1
reconnect_max_s = 1.0
''')
    return p


def signed_delta(key_path, *, node: str, seq: int, base_version: int = 0, scale: float = 0.01, seed: int = 0,
                 encoding: str = "topk8", samples: int = 10, model=None) -> bytes:
    model = model or resolve_model("vibration")
    m = model.manifest
    r = np.random.default_rng(seed)
    arrays = {"weight": r.standard_normal((len(m.classes), m.feature_size)).astype(np.float32) * scale,
              "bias": r.standard_normal(len(m.classes)).astype(np.float32) * scale}
    step = encode_pending(arrays, encoding=encoding, fraction=0.1)
    h = Header(kind="delta", fleet="test", model=m.name, model_hash=model.content_hash, head_kind="linear", node=node,
               seq=seq, base_version=base_version, samples=samples, encoding=encoding)
    return pack_message(h, step.tensors, load_private(key_path))


def acl_broker(*deny: str):
    """A mosquitto (not started: use it as a context manager) whose ACL lets anonymous
    clients read and write everything except the ``deny`` topic filters; an MQTT 5
    publish to one of those is answered with PUBACK reason 0x87 (Not authorized)."""
    import os

    from edge.broker import BrokerProcess

    b = BrokerProcess(kind="mosquitto")
    os.chmod(b._dir, 0o755)  # mosquitto reads the ACL after dropping root to its own user
    acl = b._dir / "deny.acl"
    acl.write_text("topic readwrite #\n" + "".join(f"topic deny {t}\n" for t in deny))
    os.chmod(acl, 0o644)
    b.extra_conf = f"acl_file {acl}"
    return b
