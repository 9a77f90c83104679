"""The PostgreSQL fleet store (psycopg 3), for several server instances sharing one database.

Same interface and tables as ``edge.fleet.store.SQLiteStore``. ``commit_version`` takes a
transaction-scoped advisory lock, so version commits are serialised across instances (an
instance that finds it taken does not wait: the one holding it commits);
it claims the unapplied deltas with ``FOR UPDATE SKIP LOCKED`` and marks them applied in
the same transaction that inserts the version. An instance killed inside it loses its
connection; PostgreSQL rolls the transaction back and frees the lock, and the deltas go
into the next version another instance commits. The URL may carry ``?schema=NAME``
(created if absent) to keep several fleets, or tests, apart in one database.

Several instances store at once without deadlocks: ``add_deltas`` inserts a batch's
deltas in one canonical order (``(node, seq)``), and the per-device statistics are
upserted after the delta transaction, in a short transaction of their own, in node order
(two instances' batches used to upsert the same ``devices`` rows in arrival order and
deadlock). A deadlock or serialization failure that happens anyway (an operator's
transaction, a future change) is retried here with backoff (``retries`` counts them);
one that persists is raised, and the server keeps the batch unacknowledged. Publishing
the global head is serialised across instances by ``publishing()`` (another advisory
lock), so that the retained head never goes back.
"""
from __future__ import annotations

import collections
import contextlib
import threading
import time
from typing import Callable, Iterator
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from edge.errors import EdgeError
from edge.fleet.store import (_DCOLS, _VCOLS, REPLAYED, RESENT, STORED, Build, DeltaRecord, Pending, Resign, StoreReads,
                              VersionRecord, _delta, _version, epoch_in, new_epoch_id)
from edge.fleet.release_store import ReleaseRows

try:
    import psycopg
except ImportError:  # the feature is optional: say what to install when it is asked for
    psycopg = None

_LOCK_KEY = 0x6564676566  # "edgef": the advisory lock id of version commits
_PUBLISH_KEY = 0x6564676570  # "edgep": the advisory lock id of publishing the global head
_RELEASE_KEY = 0x6564676572  # "edger": the advisory lock id of release state changes and reports
_RETRIES = 6  # attempts of a transaction that hit a deadlock or a serialization failure


def _transient(e: Exception) -> bool:
    """A deadlock or a serialization failure: PostgreSQL rolled the transaction back, and
    running it again is the documented answer (SQLSTATE class 40).

    >>> class Deadlock(Exception):
    ...     sqlstate = "40P01"
    >>> _transient(Deadlock()), _transient(ValueError("not a database error"))
    (True, False)
    """
    return getattr(e, "sqlstate", None) in ("40001", "40P01")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (version BIGINT PRIMARY KEY, parent BIGINT NOT NULL, created DOUBLE PRECISION NOT NULL,
    n_deltas INTEGER NOT NULL, note TEXT NOT NULL, message BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS deltas (id BIGSERIAL PRIMARY KEY, node TEXT NOT NULL, seq BIGINT NOT NULL,
    received DOUBLE PRECISION NOT NULL, base_version BIGINT NOT NULL, samples BIGINT NOT NULL, norm DOUBLE PRECISION NOT NULL,
    digest TEXT NOT NULL, message BYTEA NOT NULL, applied_version BIGINT, UNIQUE (node, seq));
CREATE INDEX IF NOT EXISTS deltas_pending ON deltas (id) WHERE applied_version IS NULL;
CREATE TABLE IF NOT EXISTS devices (node TEXT PRIMARY KEY, last_seen DOUBLE PRECISION NOT NULL,
    accepted BIGINT NOT NULL DEFAULT 0, rejected BIGINT NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS rejections (node TEXT NOT NULL, reason TEXT NOT NULL, n BIGINT NOT NULL, PRIMARY KEY (node, reason));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS releases (release TEXT PRIMARY KEY, fleet TEXT NOT NULL, model TEXT NOT NULL,
    version TEXT NOT NULL, digest TEXT NOT NULL, size BIGINT NOT NULL, created DOUBLE PRECISION NOT NULL,
    seq BIGINT NOT NULL, wave INTEGER NOT NULL, state TEXT NOT NULL, forgiven INTEGER NOT NULL, plan TEXT NOT NULL,
    manifest BYTEA NOT NULL, note TEXT NOT NULL, bundle BYTEA NOT NULL);
CREATE INDEX IF NOT EXISTS releases_seq ON releases (fleet, model, seq);
CREATE TABLE IF NOT EXISTS release_reports (release TEXT NOT NULL, node TEXT NOT NULL, seq BIGINT NOT NULL,
    state TEXT NOT NULL, reason TEXT NOT NULL, evidence TEXT NOT NULL, progress TEXT NOT NULL,
    received DOUBLE PRECISION NOT NULL, wave INTEGER NOT NULL, ever TEXT NOT NULL, PRIMARY KEY (release, node));
"""


class PostgresStore(StoreReads, ReleaseRows):
    """A fleet store in PostgreSQL; one connection per instance, guarded by a lock."""

    _PARAM = "%s"
    _PUBLISH_HOLDS_LOCK = True

    @contextlib.contextmanager
    def _release_tx(self):
        """A write transaction for ``ReleaseRows``, serialised across instances by its own
        advisory lock (rollout steps are rare: waiting for it is fine)."""
        with self._lock, self._db.transaction():
            self._db.execute("SELECT pg_advisory_xact_lock(%s)", (_RELEASE_KEY,))
            yield self._db

    def __init__(self, url: str):
        if psycopg is None:
            raise EdgeError("the PostgreSQL fleet store needs psycopg: pip install 'edge-runtime[postgres]'")
        parts = urlsplit(url)
        q = parse_qs(parts.query)
        self.schema = (q.pop("schema", ["public"]) or ["public"])[0]
        if not self.schema.replace("_", "").isalnum():
            raise EdgeError(f"schema {self.schema[:64]!r} must be letters, digits and '_'")
        self._dsn, self._where = urlunsplit(parts._replace(query=urlencode(q, doseq=True))), f"{parts.hostname}:{parts.port}"
        self._closing, self.reconnects, self.retries, self.commit_busy = False, 0, 0, 0
        self._conn = self._connect()
        self._lock = threading.Lock()
        with self._lock:
            # CREATE ... IF NOT EXISTS is not safe against a concurrent create (two instances
            # starting together race on the catalog's unique index): serialise it, schema included
            with self._db.transaction():
                self._db.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                self._db.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
                self._db.execute(f'SET search_path TO "{self.schema}"')
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        self._db.execute(stmt)
                # made with the store; a store from before epochs gets its first one here
                self._db.execute("INSERT INTO meta VALUES ('epoch', %s) ON CONFLICT DO NOTHING", (new_epoch_id(),))
            self._db.execute(f'SET search_path TO "{self.schema}"')

    def _connect(self):
        try:
            return psycopg.connect(self._dsn, autocommit=True)
        except psycopg.Error as e:
            raise EdgeError(f"cannot connect to PostgreSQL at {self._where}: {str(e)[:200]}") from None

    @property
    def _db(self):
        # a connection that PostgreSQL or the network broke (a restart, a failover, a killed
        # backend) fails the operation in flight; the next one opens a new connection, so the
        # server's retry resumes storing without a restart (callers hold self._lock)
        c = self._conn
        if (c.broken or c.closed) and not self._closing:
            c = self._conn = self._connect()
            c.execute(f'SET search_path TO "{self.schema}"')
            self.reconnects += 1
        return c

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._conn.close()

    def _one(self, sql, args=()):
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def ensure_version0(self, message: bytes) -> None:
        with self._lock:
            self._db.execute("INSERT INTO versions VALUES (0, 0, %s, 0, 'initial', %s) ON CONFLICT DO NOTHING",
                             (time.time(), message))

    def latest(self) -> VersionRecord | None:
        return _version(self._one(f"SELECT {_VCOLS} FROM versions ORDER BY version DESC LIMIT 1"))

    def version(self, v: int) -> VersionRecord | None:
        return _version(self._one(f"SELECT {_VCOLS} FROM versions WHERE version = %s", (v,)))

    def seen(self, node: str, seq: int) -> bool:
        return self._one("SELECT 1 FROM deltas WHERE node = %s AND seq = %s", (node, seq)) is not None

    def _retrying(self, fn):
        """``fn()`` (one transaction), run again after a deadlock or a serialization failure:
        10 ms doubling, ``_RETRIES`` attempts; what persists is raised to the caller."""
        for attempt in range(_RETRIES):
            try:
                return fn()
            except psycopg.Error as e:
                if not _transient(e) or attempt == _RETRIES - 1:
                    raise
                self.retries += 1
                time.sleep(0.01 * 2 ** attempt)

    def add_deltas(self, records: list[DeltaRecord]) -> list[str]:
        """Store what is new; one of ``STORED``, ``RESENT``, ``REPLAYED`` per record, in order."""
        if not records:
            return []
        out = self._retrying(lambda: self._add_deltas(records))
        per_node: dict = {}
        for r, what in zip(records, out):
            acc, rej = per_node.get(r.node, (0, 0))
            per_node[r.node] = (acc + (what == STORED), rej + (what == REPLAYED))
        # statistics outside the delta transaction: it holds no devices row lock, so two
        # instances' batches cannot deadlock on them or wait on each other for them
        self._retrying(lambda: self._count_devices(per_node))
        return out

    def _add_deltas(self, records: list[DeltaRecord]) -> list[str]:
        # one pipelined executemany per statement: a batch costs a few round trips, not two per
        # delta; rows in (node, seq) order, so two batches lock index entries in the same order
        now = time.time()
        ordered = sorted(records, key=lambda r: (r.node, r.seq))
        with self._lock, self._db.transaction():
            cur = self._db.cursor()
            cur.executemany("INSERT INTO deltas (node, seq, received, base_version, samples, norm, digest, message) "
                            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (node, seq) DO NOTHING RETURNING node, seq",
                            [(r.node, r.seq, r.received or now, r.base_version, r.samples, r.norm, r.digest, r.message)
                             for r in ordered], returning=True)
            inserted = set()
            while True:
                inserted.update((row[0], row[1]) for row in cur.fetchall())
                if not cur.nextset():
                    break
            # the stored digest of each (node, seq) that was there already: a resend or a replay
            others = [(r.node, r.seq) for r in records if (r.node, r.seq) not in inserted]
            stored = {}
            if others:
                rows = self._db.execute("SELECT node, seq, digest FROM deltas WHERE (node, seq) IN "
                                        "(SELECT * FROM unnest(%s::text[], %s::bigint[]))",
                                        ([n for n, _ in others], [q for _, q in others])).fetchall()
                stored = {(n, q): d for n, q, d in rows}
        out = []
        for r in records:
            key = (r.node, r.seq)
            if key in inserted:
                out.append(STORED)
                inserted.discard(key)  # a second copy in the same batch is a resend or a replay
                stored[key] = r.digest
            else:
                out.append(RESENT if stored.get(key) == r.digest else REPLAYED)
        return out

    def _count_devices(self, per_node: dict) -> None:
        now = time.time()
        nodes = sorted(per_node)  # node order: upserts of the same rows never cross
        with self._lock, self._db.transaction():
            cur = self._db.cursor()
            cur.executemany("INSERT INTO devices (node, last_seen, accepted, rejected) VALUES (%s, %s, %s, %s) "
                            "ON CONFLICT (node) DO UPDATE SET last_seen = excluded.last_seen, "
                            "accepted = devices.accepted + excluded.accepted, rejected = devices.rejected + excluded.rejected",
                            [(n, now, *per_node[n]) for n in nodes])
            dup = [(n, per_node[n][1]) for n in nodes if per_node[n][1]]
            if dup:
                cur.executemany("INSERT INTO rejections VALUES (%s, 'replayed_seq', %s) "
                                "ON CONFLICT (node, reason) DO UPDATE SET n = rejections.n + excluded.n", dup)

    def count_rejections(self, items: list[tuple[str, str]]) -> None:
        if items:
            self._retrying(lambda: self._count_rejections(items))

    def _count_rejections(self, items: list[tuple[str, str]]) -> None:
        now = time.time()
        by_reason = collections.Counter(items)
        by_node = collections.Counter(node for node, _ in items)
        with self._lock, self._db.transaction():  # rows in one order (rejections, then devices, sorted)
            cur = self._db.cursor()
            cur.executemany("INSERT INTO rejections VALUES (%s, %s, %s) ON CONFLICT (node, reason) "
                            "DO UPDATE SET n = rejections.n + excluded.n",
                            [(node, reason, n) for (node, reason), n in sorted(by_reason.items())])
            cur.executemany("INSERT INTO devices (node, last_seen, rejected) VALUES (%s, %s, %s) ON CONFLICT (node) "
                            "DO UPDATE SET last_seen = excluded.last_seen, rejected = devices.rejected + excluded.rejected",
                            [(node, now, n) for node, n in sorted(by_node.items())])

    @contextlib.contextmanager
    def publishing(self) -> Iterator[VersionRecord | None]:
        """Hold the fleet's publish lock (across instances) and yield the latest version: the
        caller publishes it and waits for the broker's PUBACK before leaving, so that no
        instance publishes after it anything older (the lock is the transaction's)."""
        with self._lock, self._db.transaction():
            db = self._db
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_PUBLISH_KEY,))
            yield _version(db.execute(f"SELECT {_VCOLS} FROM versions ORDER BY version DESC LIMIT 1").fetchone())

    def pending(self) -> Pending:
        n, oldest = self._one("SELECT COUNT(*), MIN(received) FROM deltas WHERE applied_version IS NULL")
        return Pending(count=int(n), oldest=oldest)

    def commit_version(self, build: Build, *, max_deltas: int = 100_000, pause_s: float = 0.0) -> VersionRecord | None:
        """As ``SQLiteStore.commit_version``; None also when another instance is committing
        right now (``commit_busy``): it takes the waiting deltas, and what it leaves the next
        check commits, so no instance stops storing to wait for another's commit."""
        with self._lock, self._db.transaction():
            db = self._db
            (got,) = db.execute("SELECT pg_try_advisory_xact_lock(%s)", (_LOCK_KEY,)).fetchone()
            if not got:
                self.commit_busy += 1
                return None
            latest = _version(db.execute(f"SELECT {_VCOLS} FROM versions ORDER BY version DESC LIMIT 1").fetchone())
            rows = db.execute(f"SELECT id, {_DCOLS} FROM deltas WHERE applied_version IS NULL ORDER BY id LIMIT %s "
                              "FOR UPDATE SKIP LOCKED", (max_deltas,)).fetchall()
            if not rows or latest is None:
                return None
            deltas = [_delta(r[1:]) for r in rows]
            message, note = build(latest, deltas)
            if pause_s:
                time.sleep(pause_s)  # fault tests: a window to kill the process inside the transaction
            rec = VersionRecord(version=latest.version + 1, parent=latest.version, created=time.time(),
                                n_deltas=len(deltas), note=note, message=message)
            db.execute(f"INSERT INTO versions ({_VCOLS}) VALUES (%s, %s, %s, %s, %s, %s)",
                       (rec.version, rec.parent, rec.created, rec.n_deltas, rec.note, rec.message))
            db.execute("UPDATE deltas SET applied_version = %s WHERE id = ANY(%s)", (rec.version, [r[0] for r in rows]))
            return rec

    def add_version(self, message_for: Callable[[int], bytes], note: str) -> VersionRecord:
        with self._lock, self._db.transaction():
            db = self._db
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            (latest,) = db.execute("SELECT MAX(version) FROM versions").fetchone()
            v = int(latest) + 1
            rec = VersionRecord(version=v, parent=int(latest), created=time.time(), n_deltas=0, note=note, message=message_for(v))
            db.execute(f"INSERT INTO versions ({_VCOLS}) VALUES (%s, %s, %s, %s, %s, %s)",
                       (rec.version, rec.parent, rec.created, rec.n_deltas, rec.note, rec.message))
            return rec

    def start_epoch(self, claimed_base: int, resign: Resign, note: str) -> VersionRecord | None:
        """As ``SQLiteStore.start_epoch``; under the commit lock, so that it and version commits are serialised."""
        with self._lock, self._db.transaction():
            db = self._db
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            return epoch_in(db, "%s", claimed_base, resign, note)
