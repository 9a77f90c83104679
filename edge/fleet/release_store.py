"""Model releases in the fleet store: each release (its bundle, its latest signed manifest,
its rollout state) and each device's last report on it. Shared by ``SQLiteStore`` and
``PostgresStore`` (the same SQL; ``_PARAM`` is the driver's placeholder, ``_release_tx``
the store's own write transaction: ``BEGIN IMMEDIATE`` in SQLite, an advisory lock in
PostgreSQL), so that every state change of a rollout, by any server instance or by an
operator's ``rollout halt``, is one serialised transaction and survives a restart.

The manifest ``seq`` is strictly increasing per (fleet, model) across every release and
state change (RELEASE_FORMAT.md): each change draws ``MAX(seq) + 1`` inside the
transaction that stores it, and signs the manifest with it there. The tables are created
``IF NOT EXISTS``, so a store made before releases existed gains them at its next open.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator


@dataclass(frozen=True)
class ReleaseRecord:
    """One release as stored; ``plan`` holds waves, chunking, min_labels, margin, previous,
    switch_ratio and max_refusals; ``manifest`` is the latest signed manifest."""

    release: str
    fleet: str
    model: str
    version: str
    digest: str
    size: int
    created: float
    seq: int
    wave: int
    state: str
    forgiven: int
    plan: dict
    manifest: bytes
    note: str = ""


@dataclass(frozen=True)
class ReportRecord:
    """A device's last report on a release, and every state it ever reported."""

    release: str
    node: str
    seq: int
    state: str
    reason: str
    evidence: dict
    progress: tuple
    received: float
    wave: int
    ever: tuple


_RCOLS = "release, fleet, model, version, digest, size, created, seq, wave, state, forgiven, plan, manifest, note"
_PCOLS = "release, node, seq, state, reason, evidence, progress, received, wave, ever"


def _release(row) -> ReleaseRecord | None:
    if row is None:
        return None
    return ReleaseRecord(*row[:11], plan=json.loads(row[11]), manifest=bytes(row[12]), note=row[13])


def _report(row) -> ReportRecord:
    return ReportRecord(release=row[0], node=row[1], seq=row[2], state=row[3], reason=row[4],
                        evidence=json.loads(row[5]), progress=tuple(json.loads(row[6])), received=row[7],
                        wave=row[8], ever=tuple(row[9].split(",")) if row[9] else ())


Sign = Callable[[ReleaseRecord], bytes]
"""``sign(record with its new seq, state and wave) -> the signed manifest of it``."""


class ReleaseRows:
    """The release methods of a store (mixed into both stores)."""

    _PARAM = "?"
    _PUBLISH_HOLDS_LOCK = False  # whether publishing() holds the store's thread lock (PostgreSQL)

    def _marks(self, n: int) -> str:
        return ", ".join([self._PARAM] * n)

    def _next_seq(self, db, fleet: str, model: str) -> int:
        p = self._PARAM
        (m,) = db.execute(f"SELECT COALESCE(MAX(seq), 0) FROM releases WHERE fleet = {p} AND model = {p}",
                          (fleet, model)).fetchone()
        return int(m) + 1

    def add_release(self, rec: ReleaseRecord, bundle: bytes, sign: Sign) -> ReleaseRecord:
        """Store a new release (``rec.seq`` is drawn here) with its bundle; returns it signed."""
        with self._release_tx() as db:
            rec = replace(rec, seq=self._next_seq(db, rec.fleet, rec.model), created=time.time())
            rec = replace(rec, manifest=sign(rec))
            db.execute(f"INSERT INTO releases ({_RCOLS}, bundle) VALUES ({self._marks(15)})",
                       (rec.release, rec.fleet, rec.model, rec.version, rec.digest, rec.size, rec.created, rec.seq,
                        rec.wave, rec.state, rec.forgiven, json.dumps(rec.plan, sort_keys=True), rec.manifest,
                        rec.note, bundle))
        return rec

    def change_release(self, release: str, change: Callable[[ReleaseRecord], ReleaseRecord | None],
                       sign: Sign) -> ReleaseRecord | None:
        """One state change: ``change(current)`` returns the record with its new state, wave
        or forgiven count, or None to leave it; it gets the next seq and a new signed manifest."""
        p = self._PARAM
        with self._release_tx() as db:
            cur = _release(db.execute(f"SELECT {_RCOLS} FROM releases WHERE release = {p}", (release,)).fetchone())
            new = change(cur) if cur is not None else None
            if new is None:
                return None
            new = replace(new, seq=self._next_seq(db, cur.fleet, cur.model))
            new = replace(new, manifest=sign(new))
            db.execute(f"UPDATE releases SET seq = {p}, wave = {p}, state = {p}, forgiven = {p}, manifest = {p}, "
                       f"note = {p} WHERE release = {p}",
                       (new.seq, new.wave, new.state, new.forgiven, new.manifest, new.note, release))
        return new

    def releases(self, fleet: str | None = None, model: str | None = None) -> list[ReleaseRecord]:
        """Releases, newest manifest first (of one fleet and model when given)."""
        p = self._PARAM
        where, args = ("WHERE fleet = {p} AND model = {p}".format(p=p), (fleet, model)) if fleet is not None else ("", ())
        with self._lock:
            rows = self._db.execute(f"SELECT {_RCOLS} FROM releases {where} ORDER BY seq DESC, created DESC",
                                    args).fetchall()
        return [_release(r) for r in rows]

    def release(self, release: str) -> ReleaseRecord | None:
        with self._lock:
            return _release(self._db.execute(f"SELECT {_RCOLS} FROM releases WHERE release = {self._PARAM}",
                                             (release,)).fetchone())

    def current_release(self, fleet: str, model: str) -> ReleaseRecord | None:
        """The release whose manifest is the newest of (fleet, model): the one published."""
        p = self._PARAM
        with self._lock:
            return _release(self._db.execute(f"SELECT {_RCOLS} FROM releases WHERE fleet = {p} AND model = {p} "
                                             "ORDER BY seq DESC LIMIT 1", (fleet, model)).fetchone())

    @contextlib.contextmanager
    def publishing_release(self, fleet: str, model: str) -> Iterator[ReleaseRecord | None]:
        """The store's publish lock (as for heads: across processes and instances) and the
        current release read under it: the caller publishes its manifest and waits for the
        PUBACK before leaving, so that no publisher's older manifest follows a newer one."""
        p = self._PARAM
        sql = f"SELECT {_RCOLS} FROM releases WHERE fleet = {p} AND model = {p} ORDER BY seq DESC LIMIT 1"
        with self.publishing():
            if self._PUBLISH_HOLDS_LOCK:  # PostgreSQL: the lock is the connection's transaction
                yield _release(self._db.execute(sql, (fleet, model)).fetchone())
            else:
                yield self.current_release(fleet, model)

    def release_bundle(self, release: str) -> bytes | None:
        with self._lock:
            row = self._db.execute(f"SELECT bundle FROM releases WHERE release = {self._PARAM}", (release,)).fetchone()
        return None if row is None else bytes(row[0])

    def add_release_report(self, rec: ReportRecord) -> bool:
        """Keep ``rec`` as the device's last report on the release if its seq is above the
        stored one (a replayed or reordered older report is not); True when kept."""
        p = self._PARAM
        with self._release_tx() as db:
            row = db.execute(f"SELECT seq, ever FROM release_reports WHERE release = {p} AND node = {p}",
                             (rec.release, rec.node)).fetchone()
            if row is not None and row[0] >= rec.seq:
                return False
            ever = sorted(set(row[1].split(",") if row and row[1] else ()) | {rec.state})
            args = (rec.seq, rec.state, rec.reason, json.dumps(rec.evidence, sort_keys=True), json.dumps(list(rec.progress)),
                    rec.received or time.time(), rec.wave, ",".join(ever))
            if row is None:
                db.execute(f"INSERT INTO release_reports ({_PCOLS}) VALUES ({self._marks(10)})",
                           (rec.release, rec.node) + args)
            else:
                db.execute(f"UPDATE release_reports SET seq = {p}, state = {p}, reason = {p}, evidence = {p}, "
                           f"progress = {p}, received = {p}, wave = {p}, ever = {p} WHERE release = {p} AND node = {p}",
                           args + (rec.release, rec.node))
        return True

    def release_reports(self, release: str) -> list[ReportRecord]:
        """Each device's last report on ``release``, by node name."""
        with self._lock:
            rows = self._db.execute(f"SELECT {_PCOLS} FROM release_reports WHERE release = {self._PARAM} ORDER BY node",
                                    (release,)).fetchall()
        return [_report(r) for r in rows]
