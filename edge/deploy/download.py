"""A resumable chunked download into ``<state_dir>/deploy/<release>/part``, bounded in memory and disk.

Each chunk is checked against its sha256 in the signed manifest before it is written at
its offset; ``held.json`` then records it (after the data is synced), so a device killed
at any instant resumes with exactly the chunks it holds and asks only for the rest. At
most ``in_flight`` chunks are asked for at once, so memory holds at most that many
chunks; the disk holds at most the bundle once, checked against the quota before the
first byte is written, and a write that hits ENOSPC is refused as ``disk_full``.
"""
from __future__ import annotations

import errno
import hashlib
import os
import time

from edge.deploy.asks import Asks
from edge.deploy.store import Refused, read_json, used_bytes, write_json
from edge.errors import DecodeError
from edge.fleet.release_codec import Chunk, check_chunk


class Download:
    """The download of one release (``manifest``) in ``folder``; ``quota`` bounds the deploy folder."""

    def __init__(self, manifest, folder, *, root, quota: int, in_flight: int, timeout_s: float, clock=time.monotonic):
        self.m, self.folder, self.root = manifest, folder, root
        self.quota, self.in_flight, self.timeout_s, self.clock = quota, in_flight, timeout_s, clock
        self.part, self.held_path = folder / "part", folder / "held.json"
        h = read_json(self.held_path, {})
        same = h.get("bundle_sha256") == manifest.bundle_sha256 and self.part.exists()
        self.held: set[int] = {int(i) for i in h.get("held", ())} if same else set()
        self.resumed = len(self.held)
        self.asks = Asks(timeout_s=timeout_s, in_flight=in_flight)  # what is in flight, and when to ask again

    def prepare(self) -> None:
        """Make the folder and the part file; refuse (``disk_full``) a bundle the quota cannot hold."""
        have = self.part.stat().st_size if self.part.exists() else 0
        need = self.m.size * 2 - have  # the part, then the unpacked folder beside it
        used = used_bytes(self.root)
        if used + need > self.quota:
            raise Refused("disk_full", f"bundle of {self.m.size} bytes needs {need} more bytes; the deploy folder "
                          f"uses {used} of [deploy] max_disk_bytes = {self.quota}")
        free = _free_bytes(self.root)
        if free is not None and need > free:
            # The quota is what the operator allows, the filesystem what there is: a quota set
            # above the disk (or a disk others fill) is found here, before a byte is asked for,
            # not after most of the bundle came over the wire. Space taken by others meanwhile
            # still ends in ENOSPC at a write, refused the same way (``write``).
            raise Refused("disk_full", f"bundle of {self.m.size} bytes needs {need} more bytes; the filesystem of "
                          f"{self.root} has {free} free")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if not self.part.exists():
                self.part.touch(mode=0o600)
                write_json(self.held_path, {"bundle_sha256": self.m.bundle_sha256, "held": []})
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise Refused("disk_full", f"making {self.folder.name}/: {e.strerror}") from None
            raise

    @property
    def complete(self) -> bool:
        return len(self.held) == len(self.m.chunks)

    def progress(self) -> tuple[int, int]:
        return len(self.held), len(self.m.chunks)

    def next_asks(self) -> list[tuple[int, int]]:
        """Runs ``(from, count)`` to ask for now: missing chunks not in flight, up to ``in_flight``
        in all, and those to ask again (``edge.deploy.asks``: a late answer is not a lost one)."""
        missing = [i for i in range(len(self.m.chunks)) if i not in self.held]
        return _runs(self.asks.next_asks(missing, now=self.clock()))

    def write(self, index: int, data: bytes) -> bool:
        """Store chunk ``index`` if it is the one the manifest signed; True when it was new.
        A wrong chunk refuses the release (``chunk_mismatch``): the bytes were not the signed ones."""
        if 0 <= index < len(self.m.chunks) and index in self.held:
            return False  # a late answer to an ask made again: discarded, nothing rewritten
        try:
            data = check_chunk(self.m, Chunk(release=self.m.release, index=index, data=data))
        except DecodeError as e:
            raise Refused("chunk_mismatch", str(e)) from None
        try:
            fd = os.open(self.part, os.O_WRONLY)
            try:
                _pwrite_all(fd, data, index * self.m.chunk_size)
                os.fdatasync(fd)
            finally:
                os.close(fd)
            self.held.add(index)
            write_json(self.held_path, {"bundle_sha256": self.m.bundle_sha256, "held": sorted(self.held)})
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise Refused("disk_full", f"writing chunk {index}: {e.strerror}") from None
            raise
        self.asks.arrived(index, now=self.clock())
        return True

    def bundle(self) -> bytes:
        """The whole bundle, its sha256 checked against the manifest (``digest_mismatch`` otherwise)."""
        data = self.part.read_bytes()
        if len(data) != self.m.size or hashlib.sha256(data).hexdigest() != self.m.bundle_sha256:
            raise Refused("digest_mismatch", f"the bundle's {len(data)} bytes do not hash to the signed bundle_sha256")
        return data


def _free_bytes(path) -> int | None:
    """Bytes an unprivileged writer may still use on ``path``'s filesystem (None where unknown)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset``. ``pwrite`` may write less than asked when the disk
    fills mid-chunk; recording such a chunk as held would store a torn chunk that only the
    bundle's sha256 finds, much later (as digest_mismatch). A write that makes no progress
    is the full disk's ENOSPC."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view, offset = view[n:], offset + n


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of sorted indices as (from, count), each at most 16 long.

    >>> _runs([0, 1, 2, 5, 7, 8])
    [(0, 3), (5, 1), (7, 2)]
    """
    out: list[tuple[int, int]] = []
    for i in indices:
        if out and out[-1][0] + out[-1][1] == i and out[-1][1] < 16:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out
