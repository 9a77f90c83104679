"""Where the fleet server keeps every accepted delta and every global version.

Two stores share one interface: ``SQLiteStore`` (one file, WAL; the default) here and
``PostgresStore`` (``edge.fleet.pgstore``) for several server instances. The one
operation that must be serialised is ``commit_version``: in one transaction it claims
the deltas not yet applied, hands them with the latest version to ``build`` (the
aggregation, pure), inserts the new version and marks the deltas applied by it. A
process that dies inside it leaves the transaction rolled back: the deltas stay
unapplied, and the next commit (by any instance) takes them. A delta is stored once per
``(node, seq)`` (a unique key), so a resend is never counted twice: ``add_deltas`` tells
apart a delta stored now (``STORED``), an identical resend of a stored one (``RESENT``,
same digest: the device's earlier copy was ours, it only missed the answer) and another
content under a stored seq (``REPLAYED``).

The ``meta`` table holds the store's **epoch**, a random id made with the store (and
added to a store made before it existed). A server restored from an older backup learns
it from a trusted device's delta on a version it never made (``future_base``):
``start_epoch`` then, in one transaction, draws a new epoch id and commits the latest
head again as a version numbered past the device's claim, so that versions stay
monotonic for every device and sync resumes without a person (docs/TRUST.md).
"""
from __future__ import annotations

import contextlib
import fcntl
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

from edge.fleet.release_store import ReleaseRows


@dataclass(frozen=True)
class DeltaRecord:
    node: str
    seq: int
    base_version: int
    samples: int
    norm: float
    digest: str
    message: bytes
    received: float = 0.0
    applied_version: int | None = None


@dataclass(frozen=True)
class VersionRecord:
    version: int
    parent: int
    created: float
    n_deltas: int
    note: str
    message: bytes


@dataclass(frozen=True)
class DeviceRecord:
    node: str
    last_seen: float
    accepted: int
    rejected: int
    reasons: dict


@dataclass(frozen=True)
class Pending:
    count: int
    oldest: float | None


Build = Callable[[VersionRecord, list[DeltaRecord]], tuple[bytes, str]]
"""``build(latest, deltas) -> (signed global message for latest.version + 1, note)``."""

Resign = Callable[[VersionRecord, int], bytes]
"""``resign(latest, version) -> the latest head's arrays signed as ``version``."""

STORED, RESENT, REPLAYED = "stored", "resent", "replayed"  # what add_deltas did with each record


def new_epoch_id() -> str:
    """A fresh random epoch id (16 hex digits).

    >>> len(new_epoch_id()), new_epoch_id() != new_epoch_id()
    (16, True)
    """
    return secrets.token_hex(8)


def epoch_version(latest: int, claimed_base: int) -> int:
    """The version a new epoch is committed as: past both the store's latest and what a
    trusted device says it already has, so every device takes it as newer.

    >>> epoch_version(3, 115), epoch_version(7, 2)
    (116, 8)
    """
    return max(latest + 1, claimed_base + 1)


class Store(Protocol):
    def ensure_version0(self, message: bytes) -> None: ...
    def latest(self) -> VersionRecord | None: ...
    def version(self, v: int) -> VersionRecord | None: ...
    def seen(self, node: str, seq: int) -> bool: ...
    def stored_seqs(self, nodes: list[str]) -> dict[str, int]: ...
    def stored_seq(self, node: str) -> int: ...
    def epoch(self) -> str: ...
    def start_epoch(self, claimed_base: int, resign: Resign, note: str) -> VersionRecord | None: ...
    def add_deltas(self, records: list[DeltaRecord]) -> list[str]: ...
    def count_rejections(self, items: list[tuple[str, str]]) -> None: ...
    def pending(self) -> Pending: ...
    def commit_version(self, build: Build, *, max_deltas: int = 100_000, pause_s: float = 0.0) -> VersionRecord | None: ...
    def add_version(self, message_for: Callable[[int], bytes], note: str) -> VersionRecord: ...
    def publishing(self) -> contextlib.AbstractContextManager[VersionRecord | None]: ...
    def versions(self, limit: int = 100) -> list[VersionRecord]: ...
    def deltas(self) -> list[DeltaRecord]: ...
    def devices(self) -> list[DeviceRecord]: ...
    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (version INTEGER PRIMARY KEY, parent INTEGER NOT NULL, created REAL NOT NULL,
    n_deltas INTEGER NOT NULL, note TEXT NOT NULL, message BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS deltas (id INTEGER PRIMARY KEY AUTOINCREMENT, node TEXT NOT NULL, seq INTEGER NOT NULL,
    received REAL NOT NULL, base_version INTEGER NOT NULL, samples INTEGER NOT NULL, norm REAL NOT NULL,
    digest TEXT NOT NULL, message BLOB NOT NULL, applied_version INTEGER, UNIQUE (node, seq));
CREATE INDEX IF NOT EXISTS deltas_pending ON deltas (applied_version) WHERE applied_version IS NULL;
CREATE TABLE IF NOT EXISTS devices (node TEXT PRIMARY KEY, last_seen REAL NOT NULL, accepted INTEGER NOT NULL DEFAULT 0,
    rejected INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS rejections (node TEXT NOT NULL, reason TEXT NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (node, reason));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS releases (release TEXT PRIMARY KEY, fleet TEXT NOT NULL, model TEXT NOT NULL,
    version TEXT NOT NULL, digest TEXT NOT NULL, size INTEGER NOT NULL, created REAL NOT NULL, seq INTEGER NOT NULL,
    wave INTEGER NOT NULL, state TEXT NOT NULL, forgiven INTEGER NOT NULL, plan TEXT NOT NULL, manifest BLOB NOT NULL,
    note TEXT NOT NULL, bundle BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS releases_seq ON releases (fleet, model, seq);
CREATE TABLE IF NOT EXISTS release_reports (release TEXT NOT NULL, node TEXT NOT NULL, seq INTEGER NOT NULL,
    state TEXT NOT NULL, reason TEXT NOT NULL, evidence TEXT NOT NULL, progress TEXT NOT NULL, received REAL NOT NULL,
    wave INTEGER NOT NULL, ever TEXT NOT NULL, PRIMARY KEY (release, node));
"""

_DCOLS = "node, seq, base_version, samples, norm, digest, message, received, applied_version"
_VCOLS = "version, parent, created, n_deltas, note, message"


def _delta(row) -> DeltaRecord:
    return DeltaRecord(node=row[0], seq=row[1], base_version=row[2], samples=row[3], norm=row[4], digest=row[5],
                       message=bytes(row[6]), received=row[7], applied_version=row[8])


def _version(row) -> VersionRecord | None:
    if row is None:
        return None
    return VersionRecord(version=row[0], parent=row[1], created=row[2], n_deltas=row[3], note=row[4], message=bytes(row[5]))


class StoreReads:
    """The read side both stores share (the same SQL; ``_PARAM`` is the driver's placeholder)."""

    _PARAM = "?"

    def versions(self, limit: int = 100) -> list[VersionRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_VCOLS} FROM versions ORDER BY version DESC LIMIT {self._PARAM}", (limit,)).fetchall()
        return [_version(r) for r in rows]

    def deltas(self) -> list[DeltaRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_DCOLS} FROM deltas ORDER BY id").fetchall()
        return [_delta(r) for r in rows]

    def stored_seqs(self, nodes: list[str]) -> dict[str, int]:
        """The highest seq stored for each of ``nodes`` (0 for a node with none)."""
        out = dict.fromkeys(nodes, 0)
        names = list(out)
        with self._lock:  # one query per 500 nodes, not one per node (a batch's receipts name hundreds)
            for i in range(0, len(names), 500):
                part = names[i: i + 500]
                marks = ", ".join([self._PARAM] * len(part))
                for n, m in self._db.execute(f"SELECT node, MAX(seq) FROM deltas WHERE node IN ({marks}) GROUP BY node",
                                             part).fetchall():
                    out[n] = int(m or 0)
        return out

    def stored_seq(self, node: str) -> int:
        return self.stored_seqs([node])[node]

    def epoch(self) -> str:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        return row[0] if row else ""

    def devices(self) -> list[DeviceRecord]:
        with self._lock:
            devs = self._db.execute("SELECT node, last_seen, accepted, rejected FROM devices ORDER BY node").fetchall()
            rej = self._db.execute("SELECT node, reason, n FROM rejections").fetchall()
        reasons: dict = {}
        for node, reason, n in rej:
            reasons.setdefault(node, {})[reason] = n
        return [DeviceRecord(node=d[0], last_seen=d[1], accepted=d[2], rejected=d[3], reasons=reasons.get(d[0], {})) for d in devs]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class SQLiteStore(StoreReads, ReleaseRows):
    """One SQLite file in WAL mode; ``BEGIN IMMEDIATE`` serialises version commits across processes."""

    @contextlib.contextmanager
    def _release_tx(self):
        """A write transaction for ``ReleaseRows`` (serialised across processes)."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def __init__(self, path: str | Path, *, timeout: float = 30.0):
        self.path = Path(path).expanduser()
        if not self.path.parent.exists():  # a folder given to it (even ".") keeps its mode; a new one is private
            from edge.state import private_dir

            private_dir(self.path.parent)
        # timeout: how long a write waits for another process's lock before it raises
        self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            # made with the store; a store from before epochs gets its first one here
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('epoch', ?)", (new_epoch_id(),))

    def _one(self, sql, args=()):
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def ensure_version0(self, message: bytes) -> None:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO versions VALUES (0, 0, ?, 0, 'initial', ?)", (time.time(), message))

    @contextlib.contextmanager
    def publishing(self) -> Iterator[VersionRecord | None]:
        """Hold the store's publish lock (a file lock next to it, so a server and a
        ``rollback`` process take turns) and yield the latest version: the caller publishes
        it and waits for the broker's PUBACK before leaving, so nothing older follows it."""
        with open(self.path.with_name(self.path.name + ".publish"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield self.latest()  # the lock goes with the file's close

    def latest(self) -> VersionRecord | None:
        return _version(self._one(f"SELECT {_VCOLS} FROM versions ORDER BY version DESC LIMIT 1"))

    def version(self, v: int) -> VersionRecord | None:
        return _version(self._one(f"SELECT {_VCOLS} FROM versions WHERE version = ?", (v,)))

    def seen(self, node: str, seq: int) -> bool:
        return self._one("SELECT 1 FROM deltas WHERE node = ? AND seq = ?", (node, seq)) is not None

    def add_deltas(self, records: list[DeltaRecord]) -> list[str]:
        """Store what is new; one of ``STORED``, ``RESENT``, ``REPLAYED`` per record, in order."""
        out = []
        now = time.time()
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                for r in records:
                    cur = db.execute("INSERT OR IGNORE INTO deltas (node, seq, received, base_version, samples, norm, digest, "
                                     "message) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                     (r.node, r.seq, r.received or now, r.base_version, r.samples, r.norm, r.digest, r.message))
                    if cur.rowcount == 1:
                        what = STORED
                    else:
                        (digest,) = db.execute("SELECT digest FROM deltas WHERE node = ? AND seq = ?", (r.node, r.seq)).fetchone()
                        what = RESENT if digest == r.digest else REPLAYED
                    out.append(what)
                    db.execute("INSERT INTO devices (node, last_seen, accepted, rejected) VALUES (?, ?, ?, ?) "
                               "ON CONFLICT (node) DO UPDATE SET last_seen = excluded.last_seen, "
                               "accepted = accepted + excluded.accepted, rejected = rejected + excluded.rejected",
                               (r.node, now, int(what == STORED), int(what == REPLAYED)))
                    if what == REPLAYED:
                        db.execute("INSERT INTO rejections VALUES (?, 'replayed_seq', 1) "
                                   "ON CONFLICT (node, reason) DO UPDATE SET n = n + 1", (r.node,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return out

    def count_rejections(self, items: list[tuple[str, str]]) -> None:
        if not items:
            return
        now = time.time()
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                for node, reason in items:
                    db.execute("INSERT INTO rejections VALUES (?, ?, 1) ON CONFLICT (node, reason) DO UPDATE SET n = n + 1",
                               (node, reason))
                    db.execute("INSERT INTO devices (node, last_seen, rejected) VALUES (?, ?, 1) ON CONFLICT (node) "
                               "DO UPDATE SET last_seen = excluded.last_seen, rejected = rejected + 1", (node, now))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def pending(self) -> Pending:
        n, oldest = self._one("SELECT COUNT(*), MIN(received) FROM deltas WHERE applied_version IS NULL")
        return Pending(count=int(n), oldest=oldest)

    def commit_version(self, build: Build, *, max_deltas: int = 100_000, pause_s: float = 0.0) -> VersionRecord | None:
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                latest = _version(db.execute(f"SELECT {_VCOLS} FROM versions ORDER BY version DESC LIMIT 1").fetchone())
                rows = db.execute(f"SELECT id, {_DCOLS} FROM deltas WHERE applied_version IS NULL ORDER BY id LIMIT ?",
                                  (max_deltas,)).fetchall()
                if not rows or latest is None:
                    db.execute("ROLLBACK")
                    return None
                deltas = [_delta(r[1:]) for r in rows]
                message, note = build(latest, deltas)
                if pause_s:
                    time.sleep(pause_s)  # fault tests: a window to kill the process inside the transaction
                v = latest.version + 1
                rec = VersionRecord(version=v, parent=latest.version, created=time.time(), n_deltas=len(deltas),
                                    note=note, message=message)
                db.execute(f"INSERT INTO versions ({_VCOLS}) VALUES (?, ?, ?, ?, ?, ?)",
                           (rec.version, rec.parent, rec.created, rec.n_deltas, rec.note, rec.message))
                db.executemany("UPDATE deltas SET applied_version = ? WHERE id = ?", [(v, r[0]) for r in rows])
                db.execute("COMMIT")
                return rec
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def add_version(self, message_for: Callable[[int], bytes], note: str) -> VersionRecord:
        """A new version made outside aggregation (a rollback): ``message_for(version)`` signs it."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                (latest,) = db.execute("SELECT MAX(version) FROM versions").fetchone()
                v = int(latest) + 1
                rec = VersionRecord(version=v, parent=int(latest), created=time.time(), n_deltas=0, note=note,
                                    message=message_for(v))
                db.execute(f"INSERT INTO versions ({_VCOLS}) VALUES (?, ?, ?, ?, ?, ?)",
                           (rec.version, rec.parent, rec.created, rec.n_deltas, rec.note, rec.message))
                db.execute("COMMIT")
                return rec
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def start_epoch(self, claimed_base: int, resign: Resign, note: str) -> VersionRecord | None:
        """A new epoch id and the latest head re-signed as ``epoch_version(latest, claimed_base)``,
        in one transaction; None when the latest already reaches the claim (another
        instance, or an earlier batch, started the epoch)."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                rec = epoch_in(db, "?", claimed_base, resign, note)
                db.execute("COMMIT" if rec is not None else "ROLLBACK")
                return rec
            except BaseException:
                db.execute("ROLLBACK")
                raise


def epoch_in(db, param: str, claimed_base: int, resign: Resign, note: str) -> VersionRecord | None:
    """Inside the caller's transaction (and commit lock): the latest head re-signed as
    ``epoch_version(latest, claimed_base)`` and a new epoch id, or None when the latest
    already reaches the claim. Both stores' ``start_epoch``; ``param`` is the driver's
    placeholder."""
    latest = _version(db.execute(f"SELECT {_VCOLS} FROM versions ORDER BY version DESC LIMIT 1").fetchone())
    if latest is None or claimed_base <= latest.version:
        return None
    v = epoch_version(latest.version, claimed_base)
    rec = VersionRecord(version=v, parent=latest.version, created=time.time(), n_deltas=0, note=note,
                        message=resign(latest, v))
    marks = ", ".join([param] * 6)
    db.execute(f"INSERT INTO versions ({_VCOLS}) VALUES ({marks})",
               (rec.version, rec.parent, rec.created, rec.n_deltas, rec.note, rec.message))
    db.execute(f"INSERT INTO meta VALUES ('epoch', {param}) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
               (new_epoch_id(),))
    return rec


def open_store(url: str) -> Store:
    """A store from a URL: ``sqlite:///path/to/file.db`` (or a plain path), or
    ``postgresql://...`` (optionally ``?schema=NAME``; needs ``psycopg``)."""
    if url.startswith(("postgresql://", "postgres://")):
        from edge.fleet.pgstore import PostgresStore

        return PostgresStore(url)
    return SQLiteStore(url[len("sqlite://"):] if url.startswith("sqlite://") else url)
