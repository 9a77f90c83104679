"""The one owner of fleet trust: which device keys the server trusts now, and who signed a message.

Three parts:

* ``TrustSnapshot`` (immutable): the trusted keys, ``{node: DeviceKey}``, and the
  revocation list, as read at one moment. ``authenticate(envelope, snapshot)`` (pure)
  says who signed a message: the node whose trusted key verifies the signature over the
  raw signed bytes, or nobody. That answer is the only thing a rejection is blamed on
  (``Authentication.signer``): what the topic or the header claims counts for nothing
  until the signature says so.
* ``parse_revoked`` (pure): the revocation list, ``<devices_dir>/revoked``: one node
  name or 16-hex-digit key id (``edge keys list``) a line, ``#`` starts a comment. A
  revoked node, or a key whose id is listed, is refused (``revoked``) even while its
  ``.pub`` is still in the folder; a listed key id stays refused if that key comes back.
* ``DeviceRegistry`` (the thin shell over the folder): ``current()`` returns the
  snapshot, re-reading ``devices_dir`` when anything in it changed. It looks at most once
  a second (``check_every_s``), with one ``stat`` per file (inode, size, mtime_ns), so an
  added, removed or rotated key, or an edited revocation list, takes effect within about
  a second without a restart. A file modified within the last 2 s is re-read at the next
  look even if its stat did not change (file times are coarse: a key replaced within the
  same clock tick, on a reused inode, has the same stat; git calls such entries "racy").

>>> from edge.fleet.keys import generate_key
>>> k = generate_key()
>>> snap = TrustSnapshot.from_keys({"n1": k.public_key()})
>>> sorted(snap.keys), snap.keys["n1"].key_id == key_id(k.public_key())
(['n1'], True)
"""
from __future__ import annotations

import collections
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping

from edge.fleet.codec import KEY_ID_LEN, Envelope, key_id, verify_signature
from edge.fleet.keys import load_public
from edge.observe import RateLimitedLog

log = logging.getLogger("edge.fleet")
REVOKED_FILE = "revoked"
_KEY_ID_RE = re.compile(r"^[0-9a-fA-F]{%d}$" % (2 * KEY_ID_LEN))
_RACY_NS = 2_000_000_000  # a file this recent may change again without its stat changing


@dataclass(frozen=True)
class DeviceKey:
    """One trusted device: its key, the key's id, and since when (the key file's mtime)."""

    node: str
    public_key: object = field(repr=False)
    key_id: bytes
    since: float = 0.0


@dataclass(frozen=True)
class TrustSnapshot:
    """What is trusted at one moment; never changed, replaced whole (one atomic swap)."""

    keys: Mapping[str, DeviceKey] = field(default_factory=dict)
    revoked_nodes: frozenset = frozenset()
    revoked_key_ids: frozenset = frozenset()

    @classmethod
    def from_keys(cls, keys: Mapping[str, object], *, revoked: str = "") -> "TrustSnapshot":
        """A snapshot of given public keys (``{node: key}``), and a revocation list's text."""
        nodes, ids = parse_revoked(revoked)
        return cls(keys=MappingProxyType({n: DeviceKey(node=n, public_key=k, key_id=key_id(k)) for n, k in keys.items()}),
                   revoked_nodes=nodes, revoked_key_ids=ids)

    def is_revoked(self, dk: DeviceKey) -> bool:
        return dk.node in self.revoked_nodes or dk.key_id in self.revoked_key_ids


@dataclass(frozen=True)
class Authentication:
    """Who signed a message. ``signer`` is set only when a trusted key of that node verified
    the signature (also for ``revoked``: the holder of that key sent it); ``reason`` is
    empty when the message may go on to be checked."""

    signer: str | None
    reason: str = ""
    detail: str = ""

    @property
    def ok(self) -> bool:
        return not self.reason


def authenticate(env: Envelope, snapshot: TrustSnapshot) -> Authentication:
    """Check the signature of a message (its envelope) against the key trusted for the node
    its header names: ``unknown_key``, ``bad_signature``, ``revoked``, or ok.

    >>> from edge.fleet.codec import Header, pack_message, read_envelope
    >>> from edge.fleet.keys import generate_key
    >>> a, b = generate_key(), generate_key()
    >>> h = Header(kind="delta", fleet="f", model="m", model_hash="h", head_kind="linear", node="n1", seq=1)
    >>> env = read_envelope(pack_message(h, {}, a))
    >>> authenticate(env, TrustSnapshot.from_keys({"n1": a.public_key()}))
    Authentication(signer='n1', reason='', detail='')
    >>> authenticate(env, TrustSnapshot.from_keys({"n1": b.public_key()})).reason  # nobody to blame
    'bad_signature'
    >>> authenticate(env, TrustSnapshot.from_keys({"n1": a.public_key()}, revoked="n1\\n")).signer
    'n1'
    """
    node = env.header.node
    dk = snapshot.keys.get(node)
    if dk is None:
        return Authentication(None, "unknown_key", f"no trusted key for node {node[:64]!r}")
    if not verify_signature(env, dk.public_key, known_key_id=dk.key_id):
        return Authentication(None, "bad_signature", f"signature does not verify with {node[:64]!r}'s key")
    if snapshot.is_revoked(dk):
        return Authentication(node, "revoked", f"node {node[:64]!r} or its key {dk.key_id.hex()} is revoked")
    return Authentication(node)


def parse_revoked(text: str) -> tuple[frozenset, frozenset]:
    """``(node names, key ids)`` of a revocation list. A line of 16 hex digits is a key id
    and, in case a node has such a name, a node name too.

    >>> nodes, ids = parse_revoked("press-7   # stolen 2026-12-01\\n\\n00112233aabbccdd\\n")
    >>> sorted(nodes), sorted(i.hex() for i in ids)
    (['00112233aabbccdd', 'press-7'], ['00112233aabbccdd'])
    """
    nodes, ids = set(), set()
    for line in text.splitlines():
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        nodes.add(entry)
        if _KEY_ID_RE.match(entry):
            ids.add(bytes.fromhex(entry))
    return frozenset(nodes), frozenset(ids)


def _stamp(devices_dir: Path) -> tuple[tuple, bool]:
    """The folder's fingerprint (what a change of any key file or the list changes) and
    whether a file in it is recent enough to change again unseen."""
    now = time.time_ns()
    st = devices_dir.stat()
    entries, racy = [], False
    with os.scandir(devices_dir) as it:
        for e in it:
            if not (e.name.endswith(".pub") or e.name == REVOKED_FILE):
                continue
            try:
                s = e.stat()
            except FileNotFoundError:
                continue  # removed between the listing and the stat: the next look sees it gone
            entries.append((e.name, s.st_ino, s.st_size, s.st_mtime_ns))
            racy = racy or s.st_mtime_ns > now - _RACY_NS
    return (st.st_ino, st.st_mtime_ns, tuple(sorted(entries))), racy


class DeviceRegistry:
    """The device keys of ``devices_dir`` (``<node>.pub``) and its revocation list, kept current.

    ``current()`` is called by the one thread that validates (the aggregator's); readers
    on other threads (metrics) read ``snapshot`` and ``counters``, which are replaced or
    only incremented, never changed under them.
    """

    def __init__(self, devices_dir: str | Path | None, *, check_every_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.devices_dir = Path(devices_dir).expanduser() if devices_dir else None
        self.check_every_s, self.clock = check_every_s, clock
        self.counters: collections.Counter = collections.Counter()
        self.snapshot = TrustSnapshot()
        self._stamp: tuple | None = None
        self._racy = False
        self._checked = -float("inf")
        self._rl = RateLimitedLog(log)
        self.refresh(force=True)

    @classmethod
    def from_keys(cls, keys: Mapping[str, object], *, revoked: str = "") -> "DeviceRegistry":
        """A registry of fixed keys (no folder): for the benchmark and unit tests."""
        reg = cls(None)
        reg.snapshot = TrustSnapshot.from_keys(keys, revoked=revoked)
        return reg

    def current(self) -> TrustSnapshot:
        """The trusted keys now: the folder is looked at if ``check_every_s`` has passed."""
        if self.devices_dir is not None and self.clock() - self._checked >= self.check_every_s:
            self.refresh()
        return self.snapshot

    def refresh(self, *, force: bool = False) -> bool:
        """Look at the folder now; re-read it if anything changed (or ``force``). True when
        it was re-read."""
        if self.devices_dir is None:
            return False
        self._checked = self.clock()
        try:
            stamp, racy = _stamp(self.devices_dir)
        except FileNotFoundError:
            stamp, racy = None, False  # no folder: nothing is trusted (removing it revokes every key)
        except OSError as e:  # unreadable: keep what was trusted, and say so
            self.counters["error_folder"] += 1
            self._rl.warn("trust_dir", "cannot read the device keys folder %s: %s", self.devices_dir, str(e)[:200])
            return False
        if not force and not self._racy and stamp == self._stamp:
            return False
        try:
            snap = self._load() if stamp is not None else TrustSnapshot()
        except OSError as e:  # e.g. a revocation list that cannot be read: never ignore it, keep the old state
            kind = "revoked" if getattr(e, "filename", None) == str(self.devices_dir / REVOKED_FILE) else "folder"
            self.counters[f"error_{kind}"] += 1
            self._rl.warn(f"trust_{kind}", "cannot reload the device keys of %s: %s; the last ones stay",
                          self.devices_dir, str(e)[:200])
            return False
        self._stamp, self._racy = stamp, racy
        if snap != self.snapshot:
            log.info("device keys: %d trusted, %d revocation entries", len(snap.keys),
                     len(snap.revoked_nodes | {i.hex() for i in snap.revoked_key_ids}))
        self.snapshot = snap
        self.counters["reloads"] += 1
        return True

    def _load(self) -> TrustSnapshot:
        d = self.devices_dir
        rp = d / REVOKED_FILE
        try:
            revoked = rp.read_text("utf-8", errors="replace")
        except FileNotFoundError:
            revoked = ""
        nodes, ids = parse_revoked(revoked)
        keys = {}
        for p in sorted(d.glob("*.pub")):
            try:
                k = load_public(p)
                keys[p.name[:-4]] = DeviceKey(node=p.name[:-4], public_key=k, key_id=key_id(k), since=p.stat().st_mtime)
            except Exception as e:  # half-written, broken, or a key type the library refuses: not trusted, and said
                self.counters["error_key"] += 1
                self._rl.warn(f"trust_key:{p.name[:64]}", "skipping device key: %s", str(e)[:200])
        return TrustSnapshot(keys=MappingProxyType(keys), revoked_nodes=nodes, revoked_key_ids=ids)

    def devices(self) -> list[dict]:
        """Per device: its key id, since when, and whether it is revoked (``fleet-server devices``)."""
        s = self.snapshot
        return [{"node": n, "key_id": dk.key_id.hex(), "since": dk.since, "revoked": s.is_revoked(dk)}
                for n, dk in sorted(s.keys.items())]

    def metric_families(self) -> list[tuple]:
        """``(name, type, help, read)`` for ``edge.observe.Registry.add``."""
        c = self.counters
        return [
            ("edge_fleet_trust_reloads_total", "counter", "times the device keys folder was re-read", lambda: c["reloads"]),
            ("edge_fleet_trust_errors_total", "counter", "device key files or folders that could not be read, by kind",
             lambda: [({"kind": k[len("error_"):]}, v) for k, v in c.items() if k.startswith("error_")]),
            ("edge_fleet_trusted_keys", "gauge", "device keys trusted now (revoked ones included)",
             lambda: len(self.snapshot.keys)),
            ("edge_fleet_revoked_keys", "gauge", "trusted device keys refused now because they are revoked",
             lambda: sum(self.snapshot.is_revoked(dk) for dk in self.snapshot.keys.values())),
        ]
