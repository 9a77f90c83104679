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

A store given a ``ModelIdentity`` (name, version, content hash, classes, outputs, head)
wraps each state as ``{"__edge_checkpoint__": 2, "identity": ..., "state": ...}`` and
restores only checkpoints of the same identity; others are moved aside, never applied.
Saves survive a tight disk (prune first, never the last good one) and resume by
themselves once space returns. See ``CheckpointStore`` and docs/STATE.md.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import stat
import struct
import sys
import time
from dataclasses import asdict, dataclass, fields, replace  # noqa: F401 (replace: doctest)
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from edge.errors import StateError
from edge.observe import RateLimitedLog

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


def _cut(value, limit: int = 80) -> str:
    """A bounded, printable rendering of a value read from a file (any depth, any size).

    >>> _cut("x" * 100, 10)
    "'xxxxxx..."
    """
    try:
        text = repr(value) if not isinstance(value, (list, tuple)) or len(value) <= 64 else f"<{len(value)} items>"
    except Exception:  # noqa: BLE001 - RecursionError on deep values, a hostile __repr__
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _safe_name(value, limit: int = 40) -> str:
    """A folder-name-safe piece: ``[A-Za-z0-9._-]`` only, bounded, never empty.

    >>> _safe_name("../vib ration"), _safe_name(""), _safe_name(None)
    ('.._vib_ration', 'unknown', 'unknown')
    """
    text = re.sub(r"[^A-Za-z0-9._-]", "_", str(value)[:limit]) if value not in (None, "") else ""
    return text.strip(".") and text or "unknown"


@dataclass(frozen=True)
class ModelIdentity:
    """What a learner checkpoint belongs to; it is restored only into the same model and head.

    ``content_hash`` is ``ModelFolder.content_hash`` (manifest, model code, weights), so a
    retrained or replaced model is another identity even with the same name and shapes.
    ``head`` is the learner's adapter head kind (``[adapt] head``).

    >>> a = ModelIdentity(name="vib", version="1", content_hash="ab" * 32, task="classification",
    ...                   classes=("ok", "worn"), outputs=2, feature_size=32, head="linear")
    >>> a.mismatch(a) is None
    True
    >>> a.mismatch(replace(a, classes=("ok", "bad")))
    "classes ('ok', 'bad') != ('ok', 'worn')"
    >>> a.mismatch(ModelIdentity.from_dict(a.to_dict())) is None
    True
    >>> a.mismatch(None)
    'the checkpoint records no model identity (written before checkpoints were bound to their model)'
    """

    name: str
    version: str
    content_hash: str
    task: str
    classes: tuple[str, ...]
    outputs: int
    feature_size: int
    head: str

    @classmethod
    def of(cls, model, *, head: str) -> "ModelIdentity":
        """The identity of a model folder (``edge.zoo.ModelFolder``) learnt with ``head``."""
        m = model.manifest
        return cls(name=m.name, version=m.version, content_hash=model.content_hash, task=m.task,
                   classes=tuple(str(c) for c in m.classes), outputs=int(m.outputs),
                   feature_size=int(m.feature_size), head=str(head))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["classes"] = list(self.classes)
        return d

    @classmethod
    def from_dict(cls, d) -> "ModelIdentity":
        """Parse the identity recorded in a checkpoint; ``StateError`` if it is malformed."""
        try:
            return cls(name=str(d["name"]), version=str(d["version"]), content_hash=str(d["content_hash"]),
                       task=str(d["task"]), classes=tuple(str(c) for c in d["classes"]), outputs=int(d["outputs"]),
                       feature_size=int(d["feature_size"]), head=str(d["head"]))
        except (KeyError, TypeError, ValueError) as e:
            raise StateError(f"malformed model identity in checkpoint: {type(e).__name__}: {_cut(str(e))}") from None

    def mismatch(self, saved: "ModelIdentity | None") -> str | None:
        """Why a checkpoint of ``saved`` must not be restored into this model; None when it may."""
        if saved is None:
            return "the checkpoint records no model identity (written before checkpoints were bound to their model)"
        why = []
        for f in fields(self):
            have, want = getattr(saved, f.name), getattr(self, f.name)
            if have != want:
                if f.name == "content_hash":
                    have, want = str(have)[:12], str(want)[:12]
                why.append(f"{f.name} {_cut(have)} != {_cut(want)}")
        return "; ".join(why) or None


@dataclass(frozen=True)
class Restored:
    """What ``CheckpointStore.restore`` found: the state to apply, or why there is none."""

    state: dict | None
    path: Path | None = None
    mismatch: str | None = None  # set when a checkpoint of another model was found (and moved aside)
    saved_identity: dict | None = None  # that checkpoint's identity, as recorded
    moved_to: Path | None = None


_ENVELOPE = "__edge_checkpoint__"
_NOSPACE = {errno.ENOSPC, errno.EDQUOT}
_FREE_SLACK = 16 << 10  # directory entry, block rounding, the fs's own bookkeeping


def private_dir(path: Path) -> None:
    """Create ``path`` and every missing parent as 0700 (``mkdir(parents=True, mode=...)``
    gives the mode to the last folder only); make an existing ``path`` 0700. Parents that
    already exist keep their mode: they are not ours. The one helper for private folders."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:  # another process made it meanwhile
            pass
    _chmod(path, 0o700)


def _chmod(path: Path, mode: int) -> None:
    if path.is_symlink():
        return  # never follow a link planted in the state folder
    if stat.S_IMODE(path.stat().st_mode) != mode:
        os.chmod(path, mode)


def node_state_dir(cfg) -> Path:
    """The node's state folder: ``[node] state_dir / <node name>``."""
    return Path(cfg.node.state_dir).expanduser() / cfg.node.name


def runtime_dirs(cfg, env=None, uid: int | None = None) -> list[Path]:
    """Where the node's runtime files (``status.json``, ``edge.sock``) may be, in the order
    ``edge status`` looks; the daemon writes to the first one (``runtime_dir``). They are
    rewritten every few seconds, so they belong on a RAM file system, never on the flash
    that holds the state folder (docs/STATE.md, "Flash budget"):

    1. ``[node] runtime_dir / <node>`` when set (then the only place);
    2. ``$RUNTIME_DIRECTORY / <node>`` (systemd's ``RuntimeDirectory=``, the first of several);
    3. ``/run/edge-runtime / <node>``: the unit's, for an ``edge status`` run from a shell;
    4. ``$XDG_RUNTIME_DIR/edge-runtime / <node>-<h>``, else ``/tmp/edge-runtime-<uid> / <node>-<h>``
       (not under systemd), ``<h>`` from the state folder, so two configs of the same node
       name do not share a socket.

    >>> from edge.config import parse_config
    >>> c = parse_config({"node": {"name": "n1", "state_dir": "/var/lib/e"}})
    >>> [str(p) for p in runtime_dirs(c, env={"RUNTIME_DIRECTORY": "/run/edge-runtime"}, uid=7)][:2]
    ['/run/edge-runtime/n1', '/run/edge-runtime/n1']
    >>> str(runtime_dirs(c, env={}, uid=7)[-1])
    '/tmp/edge-runtime-7/n1-d64fa996'
    >>> [str(p) for p in runtime_dirs(parse_config({"node": {"name": "n1", "runtime_dir": "/r"}}), env={})]
    ['/r/n1']
    """
    env = os.environ if env is None else env
    name = cfg.node.name
    if cfg.node.runtime_dir:
        return [Path(cfg.node.runtime_dir).expanduser() / name]
    out = []
    if env.get("RUNTIME_DIRECTORY"):
        out.append(Path(env["RUNTIME_DIRECTORY"].split(":")[0]) / name)
    out.append(Path("/run/edge-runtime") / name)
    h = hashlib.sha256(str(Path(cfg.node.state_dir).expanduser().absolute()).encode()).hexdigest()[:8]
    xdg = env.get("XDG_RUNTIME_DIR")
    base = Path(xdg) / "edge-runtime" if xdg else Path("/tmp") / f"edge-runtime-{os.getuid() if uid is None else uid}"
    out.append(base / f"{name}-{h}")
    return out


def runtime_dir(cfg, env=None) -> Path:
    """The folder the daemon writes its runtime files to (see ``runtime_dirs``): the unit's
    or the configured one, else the per-user fallback (never ``/run/edge-runtime`` unasked)."""
    env = os.environ if env is None else env
    dirs = runtime_dirs(cfg, env)
    return dirs[0] if cfg.node.runtime_dir or env.get("RUNTIME_DIRECTORY") else dirs[-1]


def learner_store(cfg, model, *, keep: int = 3) -> "CheckpointStore":
    """The learner's checkpoint store of a node (``<state>/adapt``), bound to ``model`` and ``[adapt] head``."""
    return CheckpointStore(node_state_dir(cfg) / "adapt", keep=keep, identity=ModelIdentity.of(model, head=cfg.adapt.head))


class CheckpointStore:
    """Numbered checkpoints in one directory, newest last; keeps the last ``keep``.

    Bound to a model when given ``identity``: every checkpoint records it, and
    ``restore`` applies a checkpoint only when it was written for the same identity.
    A checkpoint of another model is never applied: the folder's checkpoints move,
    not deleted, into ``stale-<their model>-<hash8>-<UTC time>/`` beside them, with a
    ``WHY.txt``, and ``Restored.mismatch`` says why (the caller logs and emits an event).

    Tight disk: a save needs room for one new checkpoint beside the last good one. When
    free space is short before writing, or a write fails with ENOSPC/EDQUOT, older
    checkpoints are pruned first (never the last good one) and the write is retried
    once; the temp file of a failed save is always removed, and nothing is sticky: the
    next save simply tries again. Files are 0600, folders 0700 (fixed on start).

    >>> import tempfile
    >>> store = CheckpointStore(tempfile.mkdtemp(), keep=2)
    >>> _ = store.save({"step": 1, "w": np.ones(3, np.float32)})
    >>> store.load_latest()["w"].tolist()
    [1.0, 1.0, 1.0]
    """

    def __init__(self, dir: str | Path, *, keep: int = 3, identity: ModelIdentity | None = None,
                 clock: Callable[[], float] = time.time):
        self.dir = Path(dir)
        self.keep = max(1, int(keep))
        self.identity = identity
        self.clock = clock
        self.loaded_path: Path | None = None
        self.last_good: Path | None = None  # never pruned to make room
        self.counters = {"pruned_for_room": 0, "retried": 0, "set_aside": 0, "unchanged": 0}
        self._last_digest: bytes | None = None  # sha256 of the file last_good holds, when known
        self._disklog = RateLimitedLog(log)  # a tight disk prunes at every save: say so once a minute
        try:
            private_dir(self.dir)
            for tmp in self.dir.glob(".ckpt-*.tmp"):  # leftovers of a save killed mid-write
                tmp.unlink(missing_ok=True)
            for p in self.dir.iterdir():  # earlier versions wrote with the umask's modes
                if _NAME.match(p.name) or p.name.startswith("stale-"):
                    _chmod(p, 0o600 if p.is_file() else 0o700)
        except OSError as e:
            raise StateError(f"{self.dir}: cannot set up the checkpoint folder (0700, files 0600): {e}") from e
        existing = self.paths()
        self._seq = self._seq_of(existing[-1]) if existing else 0

    @staticmethod
    def _seq_of(p: Path) -> int:
        return int(_NAME.match(p.name).group(1))

    def paths(self) -> list[Path]:
        """Checkpoint files, oldest first."""
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found)]

    # ---- saving --------------------------------------------------------------------------
    def save(self, state: dict, *, skip_unchanged: bool = False) -> Path:
        """Write ``state`` as the next checkpoint, durably; prune beyond ``keep``.

        With ``skip_unchanged``, a state whose file would be byte-identical to the last good
        checkpoint (written or restored by this store, still there) is not written again:
        its path is returned and ``counters["unchanged"]`` counts it. Flash wears per write,
        and an idle learner's state does not change (docs/STATE.md, "Flash budget").
        ``StateError`` when it cannot be written even after pruning for room.
        """
        ident = self.identity.to_dict() if self.identity is not None else None
        data = encode_state({_ENVELOPE: 2, "identity": ident, "state": state})
        digest = hashlib.sha256(data).digest()
        if (skip_unchanged and digest == self._last_digest and self.last_good is not None
                and self.last_good.is_file()):
            self.counters["unchanged"] += 1
            return self.last_good
        try:
            if not self.dir.is_dir():  # removed under us (an operator's cleanup): make it again
                private_dir(self.dir)
            self._seq = max([self._seq] + [self._seq_of(p) for p in self.paths()[-1:]]) + 1
        except OSError as e:
            raise StateError(f"{self.dir}: cannot write checkpoint: {e}") from e
        final = self.dir / f"ckpt-{self._seq:010d}.edge"
        tmp = self.dir / f".ckpt-{self._seq:010d}-{os.getpid()}.tmp"
        if self._free_bytes() < len(data) + _FREE_SLACK:
            self._prune_for_room()
        try:
            self._write(tmp, final, data)
        except OSError as e:
            if e.errno not in _NOSPACE or not self._prune_for_room():
                raise StateError(f"{final}: cannot write checkpoint: {e}") from e
            self.counters["retried"] += 1
            try:
                self._write(tmp, final, data)
            except OSError as e2:
                raise StateError(f"{final}: cannot write checkpoint even after pruning: {e2}") from e2
        self.last_good, self._last_digest = final, digest
        try:
            for old in self.paths()[: -self.keep]:
                old.unlink(missing_ok=True)
        except OSError as e:  # the new checkpoint is safe; pruning is retried at the next save
            log.warning("could not prune old checkpoints in %s: %s", self.dir, e)
        return final

    def remember(self, state: dict) -> None:
        """Take ``state`` as what the last good checkpoint holds (its caller just restored it),
        so that ``save(state, skip_unchanged=True)`` of the same state writes nothing. The
        restored file's own bytes may differ from a re-encoding of what was applied (an
        empty array's shape, for one), which would cost a write after every restart."""
        if self.last_good is not None:
            ident = self.identity.to_dict() if self.identity is not None else None
            self._last_digest = hashlib.sha256(encode_state({_ENVELOPE: 2, "identity": ident, "state": state})).digest()

    def _write(self, tmp: Path, final: Path, data: bytes) -> None:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with open(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a failed save leaves nothing behind, whatever failed
            raise
        self._fsync_dir()

    def _free_bytes(self) -> int:
        try:
            st = os.statvfs(self.dir)
        except OSError:
            return 1 << 62  # unknown: just try, the write's error path still prunes
        return st.f_bavail * st.f_frsize

    def _prune_for_room(self) -> int:
        """Delete every checkpoint but the last good one (or the newest); how many went."""
        paths = self.paths()
        keep = self.last_good if self.last_good in paths else (paths[-1] if paths else None)
        gone = 0
        for p in paths:
            if p != keep:
                p.unlink(missing_ok=True)
                gone += 1
        if gone:
            self.counters["pruned_for_room"] += gone
            self._disklog.warn("prune", "disk short in %s: pruned %d older checkpoint(s) to make room, kept %s",
                               self.dir, gone, keep.name if keep else "none")
        return gone

    def _fsync_dir(self, d: Path | None = None) -> None:
        fd = os.open(d or self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # ---- restoring -----------------------------------------------------------------------
    def restore(self) -> Restored:
        """The newest readable checkpoint written for this identity, falling back past damaged
        ones. A readable checkpoint of another model sets the whole folder aside (see the class)."""
        paths = self.paths()
        for i, p in enumerate(reversed(paths)):
            try:
                data = p.read_bytes()
                raw = decode_state(data)
                saved, state = self._unwrap(raw)
            except (StateError, OSError, ValueError, KeyError, TypeError, RecursionError) as e:
                older = paths[-2 - i].name if i + 1 < len(paths) else None
                log.warning("checkpoint %s is damaged (%s); falling back to %s", p, _cut(str(e), 200),
                            older or "no checkpoint (starting fresh)")
                continue
            why = self.identity.mismatch(saved) if self.identity is not None else None
            if why is not None:
                saved_d = saved.to_dict() if saved is not None else None
                try:
                    moved = self.set_aside(why, saved_d)
                except OSError as e:  # still never applied; rotation may prune them later
                    log.error("could not move the checkpoints of another model out of %s: %s", self.dir, e)
                    moved = None
                log.warning("checkpoint %s is not for this model (%s); not applied, moved to %s; "
                            "starting from the shipped head", p.name, why, moved)
                return Restored(None, p, mismatch=why, saved_identity=saved_d, moved_to=moved)
            self.loaded_path = self.last_good = p
            self._last_digest = hashlib.sha256(data).digest()
            return Restored(state, p)
        return Restored(None)

    @staticmethod
    def _unwrap(raw) -> tuple[ModelIdentity | None, dict]:
        if isinstance(raw, dict) and raw.get(_ENVELOPE) == 2:
            ident = raw.get("identity")
            return (ModelIdentity.from_dict(ident) if ident is not None else None), raw["state"]
        return None, raw  # format of before checkpoints were bound to their model

    def load_latest(self) -> dict | None:
        """``restore().state``: the state to apply, or None (nothing usable, or another model's)."""
        return self.restore().state

    def set_aside(self, why: str, saved_identity: dict | None = None) -> Path | None:
        """Move every checkpoint into a new ``stale-...`` folder (with ``WHY.txt``); its path,
        or None when there was nothing to move. Renames only, so it needs no free space."""
        files = self.paths()
        if not files:
            return None
        sid = saved_identity or {}
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self.clock()))
        base = f"stale-{_safe_name(sid.get('name'))}-{_safe_name(sid.get('content_hash'))[:8]}-{stamp}"
        dest, n = self.dir / base, 1
        while dest.exists():
            n += 1
            dest = self.dir / f"{base}-{n}"
        os.mkdir(dest, 0o700)
        for p in files:
            os.replace(p, dest / p.name)
        try:
            fd = os.open(dest / "WHY.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with open(fd, "w") as f:
                f.write(f"set aside {stamp}: {why}\nrecorded identity: {_cut(sid, 2000)}\n")
        except OSError:  # a full disk must not stop the move; the log line says why too
            pass
        self._fsync_dir(dest)
        self._fsync_dir()
        self.loaded_path = self.last_good = self._last_digest = None
        self.counters["set_aside"] += 1
        return dest
