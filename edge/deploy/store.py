"""The deploy part's files under ``<state_dir>/deploy/``: crash-safe JSON, the quota, the active pointer.

Layout::

    deploy/agent.json           last manifest seq accepted, report seq, releases refused (and why), and the
                                manifest seq of each disk_full refusal (a newer manifest tries it again)
    deploy/active.json          the release now served: folder, digest, version, previous, switched_at
    deploy/<release>/part       the bundle as downloaded, each verified chunk at its offset
    deploy/<release>/held.json  which chunks ``part`` holds (so a restart asks only for the rest)
    deploy/<release>/model/     the unpacked model folder, written only after the bundle verified

Every JSON file is written whole (temp file, fsync, rename, fsync of the folder), so
``kill -9`` at any instant leaves the old content or the new one.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


class Refused(Exception):
    """A release this device will not take; ``reason`` is one of RELEASE_FORMAT.md's report reasons."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail[:300]
        self.manifest = None  # the release refused, where the raiser knows it (else the one in hand)


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as JSON atomically (temp, fsync, rename, fsync of the folder)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(json.dumps(obj, sort_keys=True).encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: Path, default):
    """The JSON in ``path``, or ``default`` when it is missing or unreadable (a torn temp file never is)."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return default


def used_bytes(root: Path) -> int:
    """Bytes of the regular files under ``root`` (what counts against ``[deploy] max_disk_bytes``)."""
    total = 0
    for dirpath, _, names in os.walk(root):
        for n in names:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_size
            except OSError:
                pass
    return total


class DeployStore:
    """``<state_dir>/deploy``: the folders of releases and the two JSON files of the part."""

    def __init__(self, root: str | Path):
        from edge.state import private_dir

        self.root = Path(root)
        private_dir(self.root)

    def release_dir(self, release: str) -> Path:
        return self.root / release

    def agent_state(self) -> dict:
        s = read_json(self.root / "agent.json", {})
        return {"manifest_seq": int(s.get("manifest_seq", 0)), "report_seq": int(s.get("report_seq", 0)),
                "refused": dict(s.get("refused", {})), "pending_report": s.get("pending_report"),
                "disk_full_seq": {str(k): int(v) for k, v in dict(s.get("disk_full_seq", {})).items()}}

    def save_agent_state(self, s: dict) -> None:
        write_json(self.root / "agent.json", s)

    def active(self) -> dict | None:
        a = read_json(self.root / "active.json", None)
        return a if isinstance(a, dict) and a.get("folder") else None

    def set_active(self, a: dict | None) -> None:
        """The atomic switch: the next start serves ``a`` (None: the configured model)."""
        if a is None:
            try:
                os.unlink(self.root / "active.json")
            except FileNotFoundError:
                pass
            return
        write_json(self.root / "active.json", a)

    def remove_release(self, release: str) -> None:
        shutil.rmtree(self.release_dir(release), ignore_errors=True)

    def releases(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and len(p.name) == 16)
