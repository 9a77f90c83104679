"""Aggregation lanes: one per model content hash the fleet server knows (FORMAT.md "Lanes").

During a staged rollout the fleet is mixed: devices on the server's own ``[server] model``
and devices that switched to a release (``edge.deploy``) serve backbones of different
content hashes, and a head delta means something only on the backbone it was learned on.
So the server keeps a lane per hash: the **default lane** (its own model; its store is
``[server] store``, its topics those of before lanes) and one lane for the model of each
stored release, each an ``Aggregator`` with its own ``Expected`` (hash, head shapes), its
own version 0 (the release's shipped head), its own store (versions, deltas, epoch) and
its own topics (``<p>/<f>/<m>/global/<lane>``, ``receipt/<node>/<lane>``,
``request/<node>/<lane>``; ``<lane>`` = ``heads.lane_key``, 16 hex digits of the hash).

A delta is routed by its header's ``model_hash`` to that lane, which then checks it as
before (signature first): the header is only read to pick the lane. A hash no lane has
goes to the default lane and is refused there (``wrong_model_hash``), as before lanes.

Bounded: a lane is made only for a release in the store (``releases`` of this fleet and
model), never for a hash a device claims; at most ``[server] max_lanes`` of them, the
newest releases first and aborted ones last, so that the oldest aborted releases' lanes
are the ones dropped. The store is re-read every ``check_s``, and at once (at most once a
``check_s`` for this reason) when a delta names a hash no lane has, so a device that switched right after
a release was made is served without waiting. A lane's store is its own database: a
SQLite file beside ``[server] store`` (``fleet.lane-<lane>.db``) or a PostgreSQL schema
``<schema>_lane_<lane>``: the default store is unchanged (no migration), and a restarted
server finds every lane's history again.

Threads: ``split``, ``refresh`` and the lanes' publish state belong to the aggregator
thread; other threads (paho's for head requests, a metrics scrape) read ``snapshot()``,
an immutable tuple replaced whole.
"""
from __future__ import annotations

import logging
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from edge.errors import DecodeError, ModelError
from edge.fleet.aggregator import Aggregator
from edge.fleet.codec import read_envelope
from edge.fleet.heads import LANE_HEX, global_topic, initial_arrays, lane_key, receipt_topic
from edge.fleet.store import open_store
from edge.fleet.validate import Expected
from edge.observe import RateLimitedLog
from edge.zoo import Manifest, ModelFolder, digest_files

if TYPE_CHECKING:
    from edge.fleet.config import ServerConfig

log = logging.getLogger("edge.fleet")


class BundleModel(ModelFolder):
    """A model folder made from a stored release bundle's files, without a folder on disk:
    its manifest, ``content_hash`` and weights (``arrays``) come from those bytes, by
    ``ModelFolder``'s own code. The server never runs its ``model.py``."""

    def __init__(self, files: dict[str, bytes], *, where: str):
        self.path = Path(where)
        data = files.get("manifest.toml")
        if data is None:
            raise ModelError(f"{where}: the bundle has no manifest.toml")
        try:
            parsed = tomllib.loads(data.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ModelError(f"{where}/manifest.toml: invalid TOML: {e}") from None
        self.manifest = Manifest.from_dict(parsed, where=f"{where}/manifest.toml")
        self.__dict__["files"] = dict(files)  # ModelFolder.files is a cached property: these bytes are it


def lane_store_url(url: str, lane: str) -> str:
    """The store of a lane beside the default store ``url``: a SQLite file next to it, or
    a PostgreSQL schema named after the default one.

    >>> lane_store_url("/var/lib/edge/fleet.db", "0123456789abcdef")
    '/var/lib/edge/fleet.lane-0123456789abcdef.db'
    >>> lane_store_url("sqlite:///x/fleet.db", "ab")
    'sqlite:///x/fleet.lane-ab.db'
    >>> lane_store_url("postgresql://u@h:5432/db?schema=plant", "ab")
    'postgresql://u@h:5432/db?schema=plant_lane_ab'
    >>> lane_store_url("postgresql://u@h/db", "ab")
    'postgresql://u@h/db?schema=public_lane_ab'
    """
    if url.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(url)
        q = parse_qs(parts.query)
        schema = (q.pop("schema", ["public"]) or ["public"])[0]
        q["schema"] = [f"{schema}_lane_{lane}"]
        return urlunsplit(parts._replace(query=urlencode(q, doseq=True)))
    scheme = "sqlite://" if url.startswith("sqlite://") else ""
    path = Path(url[len(scheme):])
    return scheme + str(path.with_name(f"{path.stem}.lane-{lane}{path.suffix or '.db'}"))


def lane_order(records: Iterable) -> list:
    """Releases in the order they get lanes: the newest manifest first, aborted ones after
    every other (so the oldest aborted release is the first without a lane).

    >>> from types import SimpleNamespace as R
    >>> [r.release for r in lane_order([R(release="a", seq=1, state="done"), R(release="b", seq=2, state="aborted"),
    ...                                  R(release="c", seq=3, state="rolling"), R(release="d", seq=4, state="aborted")])]
    ['c', 'a', 'd', 'b']
    """
    return sorted(records, key=lambda r: (r.state == "aborted", -r.seq))


def _is_lane_key(text: str) -> bool:
    """16 lowercase hex digits (a content hash's lane key; any other claim is no topic level).

    >>> _is_lane_key("0123456789abcdef"), _is_lane_key("0123456789abcde/"), _is_lane_key("ab")
    (True, False, False)
    """
    return len(text) == LANE_HEX and all(c in "0123456789abcdef" for c in text)


def header_hash(payload: bytes) -> str | None:
    """The ``model_hash`` a delta's header claims (unverified: it only picks the lane that
    then checks it), or None when its envelope does not parse."""
    try:
        return read_envelope(payload).header.model_hash
    except DecodeError:
        return None


@dataclass(eq=False)
class Lane:
    """One lane: its aggregator, its topics' level (``""`` for the default lane) and what
    the aggregator thread tracks to publish its head (as ``FleetServer._publish_latest``)."""

    agg: object
    key: str
    release: str = ""  # the release that made it; "" for the default lane
    global_topic: str = ""
    published: int = -1
    last_publish: float = float("-inf")
    last_request_publish: float = float("-inf")
    head_requested: bool = False
    receipt_base: tuple = field(default=(), repr=False)  # (prefix, fleet, model) of its receipt topics

    @property
    def model_hash(self) -> str:
        return self.agg.expected.model_hash

    def receipt_topic(self, node: str) -> str:
        return receipt_topic(*self.receipt_base, node, self.key)

    def close(self) -> None:
        self.agg.store.close()


OpenLane = Callable[[BundleModel, str, str], object]
"""``open_lane(model, store_url, release) -> Aggregator`` for a release's model."""


class Lanes:
    """The server's lanes: the default one and those of the stored releases (module doc)."""

    def __init__(self, *, default: Lane, releases: Callable[[], list], bundle: Callable[[str], bytes | None],
                 open_lane: OpenLane, store_url: str, max_lanes: int, check_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.default = default
        self._releases, self._bundle, self._open = releases, bundle, open_lane
        self.store_url, self.max_lanes, self.check_s, self.clock = store_url, max_lanes, check_s, clock
        self._lanes: tuple[Lane, ...] = (default,)  # replaced whole: other threads read it as is
        self._hashes: dict[str, str | None] = {}  # release id -> its model's content hash (None: no lane)
        self._checked = self._asked = float("-inf")  # the last periodic read; the last read for an unknown hash
        self._dropped: list[Lane] = []
        self.counters = {"refreshes": 0, "opened": 0, "dropped": 0, "errors": 0}
        self._rl = RateLimitedLog(log)

    # ---- readers on any thread -----------------------------------------------------------
    def snapshot(self) -> tuple[Lane, ...]:
        return self._lanes

    def by_key(self, key: str) -> Lane | None:
        return next((lane for lane in self._lanes if lane.key == key), None)

    # ---- the aggregator thread -----------------------------------------------------------
    def split(self, items: list, payload_of: Callable[[object], bytes]) -> list[tuple[Lane, list]]:
        """``items`` grouped by lane, each group in arrival order (the default lane first).
        A hash no lane has makes the store be read again first (at most once a ``check_s``)."""
        hashes = [header_hash(payload_of(it)) for it in items]
        known = {lane.model_hash for lane in self._lanes}
        now = self.clock()
        if any(h is not None and h not in known for h in hashes) and now - self._asked >= self.check_s:
            self._asked = now  # its own stamp: the periodic read just before must not delay it
            self.refresh()
        by_hash = {lane.model_hash: lane for lane in self._lanes}
        groups: dict[int, tuple[Lane, list]] = {}
        for it, h in zip(items, hashes):
            lane = by_hash.get(h, self.default)
            groups.setdefault(id(lane), (lane, []))[1].append(it)
        return sorted(groups.values(), key=lambda g: g[0] is not self.default)

    def receipt_topic(self, lane: Lane, verdict) -> str:
        """Where the receipt of ``verdict`` (a delta ``lane`` judged) goes: its lane's receipt
        topic; for one refused on the default lane for a hash no lane has, the topic of the
        lane its (signature-verified) header names, where a device serving that model
        listens (a claim that is no lane key gets the default topic)."""
        node, claimed = verdict.header.node, lane_key(verdict.header.model_hash)
        if lane is self.default and claimed != lane_key(lane.model_hash) and _is_lane_key(claimed):
            return receipt_topic(*lane.receipt_base, node, claimed)
        return lane.receipt_topic(node)

    def maybe_refresh(self) -> None:
        """``refresh`` unless it ran less than ``check_s`` ago."""
        now = self.clock()
        if now - self._checked >= self.check_s:
            self._checked = now
            self.refresh()

    def take_dropped(self) -> list[Lane]:
        """The lanes dropped since the last call (the server clears their retained head)."""
        out, self._dropped = self._dropped, []
        return out

    def refresh(self) -> None:
        """Read the releases again; open lanes for the newest ones' models, drop those no
        longer among them. A failure keeps the lanes as they are (counted, logged)."""
        self.counters["refreshes"] += 1
        have = {lane.model_hash: lane for lane in self._lanes[1:]}
        new: list[Lane] = []
        try:
            wanted = self._wanted()
            for h, (rel, model) in wanted.items():
                lane = self._opened(h, rel, model) if h not in have and model is not None else None
                if lane is not None:
                    new.append(lane)
        except Exception as e:  # a store blip: the lanes stay as they are, the next refresh tries again
            for lane in new:
                lane.close()
            self.counters["errors"] += 1
            self._rl.warn("lanes", "reading the releases for lanes failed: %s: %s", type(e).__name__, str(e)[:200])
            return
        keep = [have[h] for h in wanted if h in have]
        dropped = [lane for h, lane in have.items() if h not in wanted]
        self._lanes = (self.default, *keep, *new)
        for lane in dropped:
            lane.close()
            self.counters["dropped"] += 1
            log.info("lane %s (release %s) dropped: its release is no longer among the newest %d",
                     lane.key, lane.release, self.max_lanes)
        self._dropped.extend(dropped)

    def _wanted(self) -> dict[str, tuple[str, BundleModel | None]]:
        """Content hash -> (release id, its model when a lane must be opened for it), for at
        most ``max_lanes`` distinct hashes other than the default lane's, in ``lane_order``."""
        records = lane_order(self._releases())
        self._hashes = {r.release: self._hashes[r.release] for r in records if r.release in self._hashes}
        have = {lane.model_hash for lane in self._lanes}
        out: dict[str, tuple[str, BundleModel | None]] = {}
        for r in records:
            if len(out) >= self.max_lanes:
                break
            model = None
            if r.release not in self._hashes:
                model = self._model(r)
                self._hashes[r.release] = model.content_hash if model is not None else None
            h = self._hashes[r.release]
            if h is None or h == self.default.model_hash or h in out:
                continue
            if h not in have and model is None:  # known hash, lane not open (dropped before): load again
                model = self._model(r)
            out[h] = (r.release, model)
        return out

    def _model(self, rec) -> BundleModel | None:
        """The release's model from its stored bundle, checked against its digest; None (logged)
        when it cannot give a lane."""
        from edge.fleet.release_codec import parse_bundle

        data = self._bundle(rec.release)
        try:
            if data is None:
                raise ModelError("its bundle is gone from the store")
            files = parse_bundle(data)
            if digest_files(files) != rec.digest:
                raise ModelError(f"its bundle's digest is not the stored {rec.digest[:16]}...")
            return BundleModel(files, where=f"release {rec.release}")
        except (DecodeError, ModelError) as e:
            self.counters["errors"] += 1
            self._rl.warn(f"lane-{rec.release}", "release %s gets no lane: %s", rec.release, str(e)[:200])
            return None

    def _opened(self, model_hash: str, release: str, model: BundleModel) -> Lane | None:
        key = lane_key(model_hash)
        try:
            agg = self._open(model, lane_store_url(self.store_url, key), release)
        except ModelError as e:  # e.g. a head kind the release's model cannot have
            self.counters["errors"] += 1
            self._rl.warn(f"lane-{release}", "release %s gets no lane: %s", release, str(e)[:200])
            return None
        d = self.default
        prefix, fleet, name = d.receipt_base
        self.counters["opened"] += 1
        log.info("lane %s for release %s (%s %s): version %d", key, release, model.manifest.name,
                 model.manifest.version, agg.current)
        return Lane(agg=agg, key=key, release=release, global_topic=global_topic(prefix, fleet, name, key),
                    receipt_base=d.receipt_base)


# ---- building lanes from a server config ---------------------------------------------------

def expected_for(cfg: ServerConfig, model) -> tuple[Expected, dict]:
    """What a delta for ``model`` (a ``ModelFolder``) must match, and its head's version 0."""
    s = cfg.server
    arrays = initial_arrays(model, kind=s.head, rank=s.head_rank, hidden=s.head_hidden)
    return Expected(fleet=s.fleet, model=model.manifest.name, model_hash=model.content_hash, head_kind=s.head,
                    shapes={k: tuple(v.shape) for k, v in arrays.items()}), arrays


def lane_aggregator(cfg: ServerConfig, model, *, store, key, registry) -> Aggregator:
    """The aggregator of one lane (``edge.fleet.lanes``): ``model``'s hash and head shapes, the
    config's aggregation rule, the one server key and device registry every lane shares."""
    s = cfg.server
    expected, arrays = expected_for(cfg, model)
    return Aggregator(store=store, expected=expected, key=key, registry=registry, name=s.name, k=s.k, t_s=s.t_s,
                      rule=s.rule, clip_norm=s.clip_norm, trim=s.trim, max_norm=s.max_norm,
                      staleness_exponent=s.staleness_exponent, server_lr=s.server_lr, commit_pause_s=s.commit_pause_s,
                      initial=arrays, max_samples=s.max_samples, samples_ratio=s.samples_ratio,
                      reference_growth=s.reference_growth)


def build_lanes(cfg: ServerConfig, agg: Aggregator) -> Lanes:
    """The default lane (``agg``) and the lanes of the releases in ``agg``'s store."""
    s = cfg.server
    model = agg.expected.model
    default = Lane(agg=agg, key="", global_topic=global_topic(s.topic_prefix, s.fleet, model),
                   receipt_base=(s.topic_prefix, s.fleet, model))
    rows = agg.store if hasattr(agg.store, "releases") else None  # a bench's in-memory store has no releases

    def open_lane(bundle_model, url: str, release: str) -> Aggregator:
        return lane_aggregator(cfg, bundle_model, store=open_store(url), key=agg.key, registry=agg.trust)

    return Lanes(default=default, releases=(lambda: rows.releases(s.fleet, model)) if rows else list,
                 bundle=rows.release_bundle if rows else (lambda r: None), open_lane=open_lane, store_url=s.store,
                 max_lanes=s.max_lanes)
