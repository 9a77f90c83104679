"""The artifact cache: compiled backbones keyed by model hash, backend, precision and platform.

An entry is a directory ``<model>-<hash16>/<backend>-<precision>-<platform12>/`` with
the artifact files and ``meta.json`` recording each file's size and sha256. Entries are
staged in a temporary directory, fsynced and renamed into place, so a crash leaves
either no entry or a whole one. Every lookup re-hashes the files: a truncated or
flipped artifact is deleted, logged and reported as a miss, so it is rebuilt and never
served.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("edge.serve")

META = "meta.json"


def default_cache_dir() -> Path:
    """``$EDGE_CACHE_DIR``, else ``~/.cache/edge-runtime``."""
    env = os.environ.get("EDGE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edge-runtime"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(platform: dict[str, Any]) -> str:
    """Short stable hash of a platform description (versions, device, ISA)."""
    return hashlib.sha256(json.dumps(platform, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class CacheKey:
    model_name: str
    model_hash: str
    backend: str
    precision: str
    platform: dict = field(default_factory=dict, hash=False, compare=False)
    variant: str = ""  # e.g. an int8 quantization format; part of the path

    @property
    def relpath(self) -> Path:
        kind = f"{self.precision}-{self.variant}" if self.variant else self.precision
        return Path(f"{self.model_name}-{self.model_hash[:16]}") / (
            f"{self.backend}-{kind}-{fingerprint(self.platform)}")


@dataclass
class Entry:
    """A verified cache entry: its directory and its meta (files, hashes, parity at build)."""

    dir: Path
    meta: dict

    @property
    def artifact_hash(self) -> str:
        """One hash for the whole entry, shown by ``describe()`` and ``edge status``."""
        files = self.meta["files"]
        return hashlib.sha256("".join(files[n]["sha256"] for n in sorted(files)).encode()).hexdigest()


class ArtifactCache:
    """Artifacts on disk under ``root`` (default: ``default_cache_dir()``)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    def path(self, key: CacheKey) -> Path:
        return self.root / key.relpath

    def lookup(self, key: CacheKey) -> tuple[Entry | None, str]:
        """(entry, "hit") if present and intact; (None, why) otherwise, deleting a corrupt entry."""
        d = self.path(key)
        if not d.exists():
            return None, "miss"
        problem = self._verify(d)
        if problem is None:
            return Entry(d, json.loads((d / META).read_text())), "hit"
        log.warning("cached artifact %s is corrupt (%s); deleting it so it is rebuilt", d, problem)
        shutil.rmtree(d, ignore_errors=True)
        return None, f"corrupt ({problem}); deleted"

    def _verify(self, d: Path) -> str | None:
        try:
            meta = json.loads((d / META).read_text())
            files = meta["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"{META} unreadable: {type(e).__name__}: {e}"
        for name, info in files.items():
            p = d / name
            if not p.is_file():
                return f"{name} is missing"
            if p.stat().st_size != info["size"]:
                return f"{name} has {p.stat().st_size} bytes, expected {info['size']} (truncated?)"
            if sha256_file(p) != info["sha256"]:
                return f"{name} sha256 mismatch"
        return None

    def staging(self) -> Path:
        """A fresh private directory on the cache's filesystem (so ``commit`` can rename)."""
        base = self.root / ".staging"
        base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=base))

    def commit(self, key: CacheKey, staged: Path, files: list[str], extra: dict | None = None) -> Entry:
        """Hash, fsync and atomically rename a staged directory into place as ``key``'s entry."""
        staged = Path(staged)
        meta = {"backend": key.backend, "precision": key.precision, "variant": key.variant, "model": key.model_name,
                "model_hash": key.model_hash, "platform": key.platform, "created": time.time(),
                "files": {}, **(extra or {})}
        for name in files:
            p = staged / name
            _fsync(p)
            meta["files"][name] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        _write_synced(staged / META, json.dumps(meta, indent=2, sort_keys=True, default=str))
        _fsync_dir(staged)
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # stale or corrupt: the caller decided to rebuild
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(staged, final)
        except OSError:
            # Another process committed the same key first; keep theirs if intact.
            shutil.rmtree(staged, ignore_errors=True)
            entry, why = self.lookup(key)
            if entry is None:
                raise
            return entry
        _fsync_dir(final.parent)
        return Entry(final, meta)

    def discard(self, staged: Path) -> None:
        shutil.rmtree(staged, ignore_errors=True)

    def entries(self) -> list[Entry]:
        """Every committed entry (unverified), for ``edge status`` and cache listings."""
        out = []
        for meta in sorted(self.root.glob(f"*/*/{META}")):
            try:
                out.append(Entry(meta.parent, json.loads(meta.read_text())))
            except (OSError, ValueError) as e:
                log.warning("unreadable cache meta %s: %s", meta, e)
        return out


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:  # some filesystems do not allow opening directories
        log.debug("cannot fsync directory %s: %s", path, e)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
