"""The PostgreSQL fleet store (psycopg 3), for several server instances sharing one database.

Same interface and tables as ``edge.fleet.store.SQLiteStore``. ``commit_version`` takes a
transaction-scoped advisory lock, so version commits are serialised across instances;
it claims the unapplied deltas with ``FOR UPDATE SKIP LOCKED`` and marks them applied in
the same transaction that inserts the version. An instance killed inside it loses its
connection; PostgreSQL rolls the transaction back and frees the lock, and the deltas go
into the next version another instance commits. The URL may carry ``?schema=NAME``
(created if absent) to keep several fleets, or tests, apart in one database.
"""
from __future__ import annotations

import threading
import time
from typing import Callable
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from edge.errors import EdgeError
from edge.fleet.store import (_DCOLS, _VCOLS, REPLAYED, RESENT, STORED, Build, DeltaRecord, Pending, Resign, StoreReads,
                              VersionRecord, _delta, _version, epoch_version, new_epoch_id)

try:
    import psycopg
except ImportError:  # the feature is optional: say what to install when it is asked for
    psycopg = None

_LOCK_KEY = 0x6564676566  # "edgef": the advisory lock id of version commits

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
"""


class PostgresStore(StoreReads):
    """A fleet store in PostgreSQL; one connection per instance, guarded by a lock."""

    _PARAM = "%s"

    def __init__(self, url: str):
        if psycopg is None:
            raise EdgeError("the PostgreSQL fleet store needs psycopg: pip install 'edge-runtime[postgres]'")
        parts = urlsplit(url)
        q = parse_qs(parts.query)
        self.schema = (q.pop("schema", ["public"]) or ["public"])[0]
        if not self.schema.replace("_", "").isalnum():
            raise EdgeError(f"schema {self.schema[:64]!r} must be letters, digits and '_'")
        self._dsn, self._where = urlunsplit(parts._replace(query=urlencode(q, doseq=True))), f"{parts.hostname}:{parts.port}"
        self._closing, self.reconnects = False, 0
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

    def add_deltas(self, records: list[DeltaRecord]) -> list[str]:
        """Store what is new; one of ``STORED``, ``RESENT``, ``REPLAYED`` per record, in order."""
        # one pipelined executemany per statement: a batch costs a few round trips, not two per delta
        if not records:
            return []
        now = time.time()
        with self._lock, self._db.transaction():
            cur = self._db.cursor()
            cur.executemany("INSERT INTO deltas (node, seq, received, base_version, samples, norm, digest, message) "
                            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (node, seq) DO NOTHING RETURNING node, seq",
                            [(r.node, r.seq, r.received or now, r.base_version, r.samples, r.norm, r.digest, r.message)
                             for r in records], returning=True)
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
            out, per_node = [], {}
            for r in records:
                key = (r.node, r.seq)
                if key in inserted:
                    what = STORED
                    inserted.discard(key)  # a second copy in the same batch is a resend or a replay
                    stored[key] = r.digest
                else:
                    what = RESENT if stored.get(key) == r.digest else REPLAYED
                out.append(what)
                acc, rej = per_node.get(r.node, (0, 0))
                per_node[r.node] = (acc + (what == STORED), rej + (what == REPLAYED))
            cur.executemany("INSERT INTO devices (node, last_seen, accepted, rejected) VALUES (%s, %s, %s, %s) "
                            "ON CONFLICT (node) DO UPDATE SET last_seen = excluded.last_seen, "
                            "accepted = devices.accepted + excluded.accepted, rejected = devices.rejected + excluded.rejected",
                            [(n, now, a, j) for n, (a, j) in per_node.items()])
            dup = [(n,) for n, (a, j) in per_node.items() for _ in range(j)]
            if dup:
                cur.executemany("INSERT INTO rejections VALUES (%s, 'replayed_seq', 1) "
                                "ON CONFLICT (node, reason) DO UPDATE SET n = rejections.n + 1", dup)
        return out

    def count_rejections(self, items: list[tuple[str, str]]) -> None:
        if not items:
            return
        now = time.time()
        with self._lock, self._db.transaction():
            for node, reason in items:
                self._db.execute("INSERT INTO rejections VALUES (%s, %s, 1) ON CONFLICT (node, reason) "
                                 "DO UPDATE SET n = rejections.n + 1", (node, reason))
                self._db.execute("INSERT INTO devices (node, last_seen, rejected) VALUES (%s, %s, 1) ON CONFLICT (node) "
                                 "DO UPDATE SET last_seen = excluded.last_seen, rejected = devices.rejected + 1", (node, now))

    def pending(self) -> Pending:
        n, oldest = self._one("SELECT COUNT(*), MIN(received) FROM deltas WHERE applied_version IS NULL")
        return Pending(count=int(n), oldest=oldest)

    def commit_version(self, build: Build, *, max_deltas: int = 100_000, pause_s: float = 0.0) -> VersionRecord | None:
        with self._lock, self._db.transaction():
            db = self._db
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
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
            latest = _version(db.execute(f"SELECT {_VCOLS} FROM versions ORDER BY version DESC LIMIT 1").fetchone())
            if latest is None or claimed_base <= latest.version:
                return None
            v = epoch_version(latest.version, claimed_base)
            rec = VersionRecord(version=v, parent=latest.version, created=time.time(), n_deltas=0, note=note,
                                message=resign(latest, v))
            db.execute(f"INSERT INTO versions ({_VCOLS}) VALUES (%s, %s, %s, %s, %s, %s)",
                       (rec.version, rec.parent, rec.created, rec.n_deltas, rec.note, rec.message))
            db.execute("INSERT INTO meta VALUES ('epoch', %s) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                       (new_epoch_id(),))
            return rec
