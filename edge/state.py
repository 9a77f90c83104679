"""Crash-safe checkpoints: write, fsync, rename, fsync the directory; keep the last few.

A checkpoint is one file ``ckpt-<seq>.edge``::

    b"EDGECKPT" | u32 format | u64 body length | 32-byte sha256 of body | body
    body = u64 JSON length | JSON tree | safetensors blob

The JSON tree is the state with every tensor or array replaced by a reference into the
safetensors blob (numpy arrays come back as numpy, torch tensors as torch); dicts with
non-string keys (an optimizer's state) survive the trip. The file is complete before
it gets its final name, and the rename is atomic, so ``kill -9`` at any instant leaves
either the previous checkpoint or the new one, never a torn one under a final name.
Damage from elsewhere (a bad disk, a truncated copy) is caught by the checksum, and
``load_latest`` falls back to the previous checkpoint with a log line saying why.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from edge.errors import StateError

log = logging.getLogger("edge.state")
MAGIC = b"EDGECKPT"
FORMAT = 1
_HEAD = struct.Struct("<8sIQ32s")
_NAME = re.compile(r"^ckpt-(\d{10})\.edge$")


def _flatten(obj, blobs: dict):
    """The JSON-able tree of ``obj``, moving tensors and arrays into ``blobs``."""
    # torch only if loaded: a tensor cannot exist without it, and a lean daemon never loads it
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        key = f"t{len(blobs)}"
        blobs[key] = obj.detach().cpu().contiguous().numpy().copy()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"a{len(blobs)}"
        blobs[key] = np.ascontiguousarray(obj)
        return {"__array__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _flatten(v, blobs) for k, v in obj.items()}
        return {"__items__": [[k, _flatten(v, blobs)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, blobs) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise StateError(f"cannot checkpoint a value of type {type(obj).__name__}")


def _unflatten(tree, blobs: dict):
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            import torch

            return torch.from_numpy(blobs[tree["__tensor__"]].copy())
        if "__array__" in tree:
            return blobs[tree["__array__"]].copy()
        if "__items__" in tree:
            return {k: _unflatten(v, blobs) for k, v in tree["__items__"]}
        return {k: _unflatten(v, blobs) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_unflatten(v, blobs) for v in tree]
    return tree


def encode_state(state: dict) -> bytes:
    """The bytes of a checkpoint file holding ``state``."""
    blobs: dict = {}
    tree = json.dumps(_flatten(state, blobs), allow_nan=True).encode()
    body = struct.pack("<Q", len(tree)) + tree + st_save(blobs)
    return _HEAD.pack(MAGIC, FORMAT, len(body), hashlib.sha256(body).digest()) + body


def decode_state(data: bytes) -> dict:
    """``state`` back from a checkpoint file's bytes; ``StateError`` says what is wrong."""
    if len(data) < _HEAD.size:
        raise StateError(f"truncated: {len(data)} bytes, shorter than the header")
    magic, fmt, n, digest = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise StateError("not a checkpoint (bad magic)")
    if fmt != FORMAT:
        raise StateError(f"checkpoint format {fmt}, this version reads {FORMAT}")
    body = data[_HEAD.size:]
    if len(body) != n:
        raise StateError(f"truncated: body has {len(body)} of {n} bytes")
    if hashlib.sha256(body).digest() != digest:
        raise StateError("checksum mismatch")
    (tn,) = struct.unpack_from("<Q", body)
    try:
        tree = json.loads(body[8: 8 + tn])
        blobs = st_load(body[8 + tn:]) if len(body) > 8 + tn else {}
    except (ValueError, UnicodeDecodeError) as e:
        raise StateError(f"unreadable content: {e}") from None
    return _unflatten(tree, blobs)


class CheckpointStore:
    """Numbered checkpoints in one directory, newest last; keeps the last ``keep``.

    >>> import tempfile
    >>> store = CheckpointStore(tempfile.mkdtemp(), keep=2)
    >>> _ = store.save({"step": 1, "w": np.ones(3, np.float32)})
    >>> store.load_latest()["w"].tolist()
    [1.0, 1.0, 1.0]
    """

    def __init__(self, dir: str | Path, *, keep: int = 3):
        self.dir = Path(dir)
        self.keep = max(1, int(keep))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.loaded_path: Path | None = None
        for tmp in self.dir.glob(".ckpt-*.tmp"):  # leftovers of a save killed mid-write
            tmp.unlink(missing_ok=True)

    def paths(self) -> list[Path]:
        """Checkpoint files, oldest first."""
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found)]

    def save(self, state: dict) -> Path:
        """Write ``state`` as the next checkpoint, durably; prune beyond ``keep``."""
        data = encode_state(state)
        existing = self.paths()
        seq = int(_NAME.match(existing[-1].name).group(1)) + 1 if existing else 1
        final = self.dir / f"ckpt-{seq:010d}.edge"
        tmp = self.dir / f".ckpt-{seq:010d}-{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            self._fsync_dir()
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise StateError(f"{final}: cannot write checkpoint: {e}") from e
        for old in self.paths()[: -self.keep]:
            old.unlink(missing_ok=True)
        return final

    def _fsync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def load_latest(self) -> dict | None:
        """The newest readable checkpoint, falling back past damaged ones; None if there is none."""
        paths = self.paths()
        for i, p in enumerate(reversed(paths)):
            try:
                state = decode_state(p.read_bytes())
            except (StateError, OSError) as e:
                older = paths[-2 - i].name if i + 1 < len(paths) else None
                log.warning("checkpoint %s is damaged (%s); falling back to %s", p, e,
                            older or "no checkpoint (starting fresh)")
                continue
            self.loaded_path = p
            return state
        return None
