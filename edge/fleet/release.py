"""Model releases on the fleet server: the ``release`` and ``rollout`` commands, and the
service inside ``FleetServer`` that serves chunks, takes reports and runs the rollout.

A release is made once (``make_release``: pack the folder, check its size, sign, store,
publish the retained manifest) and then lives in the fleet store (``release_store``):
every state change (a wave opened, a halt, a resume, an abort, done) is one transaction
that draws the next manifest ``seq`` and signs the new manifest with the release key,
so a restarted server, or another instance, goes on from the store. ``ReleaseService``
(thread ``fleet-release``, its own bounded queue and store connection) answers a chunk
request only when it verifies with the requesting node's registered key (the topic's
node, the body's node and the signer must agree), the node is admitted and the release
is the one published; it keeps each verified report as the device's last, and applies
the rollout rule (``edge.fleet.rollout``) after each report and every ``[release] check_s``.
Refusals are counted by reason (``edge_fleet_release_messages_total``) and logged,
rate-limited. Layouts: ``edge/fleet/RELEASE_FORMAT.md``.
"""
from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
from dataclasses import replace
from pathlib import Path

from edge.errors import ConfigError, DecodeError, EdgeError
from edge.fleet import release_codec as rc
from edge.fleet.publish import publish_retained_acked
from edge.fleet.release_ledger import ChunkLedger
from edge.fleet.release_store import ReleaseRecord, ReportRecord
from edge.fleet.rollout import decide
from edge.observe import RateLimitedLog

log = logging.getLogger("edge.fleet")


def release_topic(prefix: str, fleet: str, model: str, sub: str = "", node: str = "") -> str:
    """``<p>/<f>/<m>/release`` and its ``get``/``chunk``/``report`` levels per node.

    >>> release_topic("fleet", "f", "m"), release_topic("fleet", "f", "m", "get", "n1")
    ('fleet/f/m/release', 'fleet/f/m/release/get/n1')
    """
    base = f"{prefix}/{fleet}/{model}/release"
    return f"{base}/{sub}/{node}" if sub else base


# ---- making a release and changing its state (commands and the service alike) ---------------

def _sign_with(key):
    """``sign(record)``: the record's manifest, built from its stored plan and signed with ``key``."""
    def sign(rec: ReleaseRecord) -> bytes:
        p = rec.plan
        m = rc.Manifest(fleet=rec.fleet, model=rec.model, release=rec.release, seq=rec.seq, version=rec.version,
                        digest=rec.digest, bundle_sha256=p["bundle_sha256"], size=rec.size, chunk_size=p["chunk_size"],
                        chunks=tuple(p["chunks"]), waves=tuple(p["waves"]), wave=rec.wave, state=rec.state,
                        min_labels=p["min_labels"], margin=p["margin"], previous=p["previous"])
        return rc.pack_manifest(m, key)
    return sign


def parse_waves(text: str) -> tuple:
    """``"5,25,100"`` as a checked wave plan (``ConfigError`` naming what is wrong).

    >>> parse_waves("5,25,100")
    (5, 25, 100)
    """
    try:
        return rc.check_waves(int(w) for w in str(text).split(","))
    except ValueError as e:
        raise ConfigError(f"--waves {text!r} is invalid: {e}") from None


def previous_of(cfg, store, model: str) -> dict:
    """What a new release replaces (``abort`` returns devices to it): the newest release of
    this fleet and model that reached ``done``, else the server's own ``[server] model``."""
    for r in store.releases(cfg.server.fleet, model):
        if r.state == "done":
            return {"version": r.version, "digest": r.digest}
    from edge.zoo import digest_files, resolve_model

    base = resolve_model(cfg.server.model)
    return {"version": base.manifest.version, "digest": digest_files(base.files)}


def make_release(cfg, store, folder: str | Path, key, *, waves=None, min_labels: int | None = None,
                 margin: float | None = None, note: str = "", release_id: str | None = None) -> ReleaseRecord:
    """Pack ``folder``, check it, sign and store it as a new release (rolling, wave 0).

    Refused (``ConfigError``) when the folder is not a model folder, is not the server's
    model (its name), or its bundle is over ``[release] max_bundle_bytes``: a device
    would refuse it anyway, after the whole fleet had been told of it."""
    from edge.zoo import ModelFolder, resolve_model

    r = cfg.release
    model = ModelFolder(folder)  # ModelError unless it is a model folder with a valid manifest
    own = resolve_model(cfg.server.model).manifest.name
    if model.manifest.name != own:
        raise ConfigError(f"{folder}: model {model.manifest.name!r} is not this fleet server's [server] model {own!r}")
    files = model.files
    bundle = rc.pack_bundle(files)
    if len(bundle) > r.max_bundle_bytes:
        raise ConfigError(f"{folder}: its bundle is {len(bundle):,} bytes, over [release] max_bundle_bytes "
                          f"{r.max_bundle_bytes:,}; raise it (devices refuse over their [deploy] max_bundle_bytes too)")
    rid = release_id or secrets.token_hex(8)  # a given id: reproducible waves (the benchmark)
    w = parse_waves(waves) if isinstance(waves, str) else tuple(waves) if waves else parse_waves(r.waves)
    m = rc.make_manifest(fleet=cfg.server.fleet, model=own, release=rid, seq=1, version=model.manifest.version,
                         files=files, bundle=bundle, chunk_size=r.chunk_size, waves=w,
                         min_labels=r.min_labels if min_labels is None else min_labels,
                         margin=r.margin if margin is None else margin, previous=previous_of(cfg, store, own))
    plan = {"bundle_sha256": m.bundle_sha256, "chunk_size": m.chunk_size, "chunks": list(m.chunks),
            "waves": list(m.waves), "min_labels": m.min_labels, "margin": m.margin, "previous": m.previous,
            "switch_ratio": r.switch_ratio, "max_refusals": r.max_refusals}
    rec = ReleaseRecord(release=rid, fleet=m.fleet, model=own, version=m.version, digest=m.digest, size=m.size,
                        created=0.0, seq=0, wave=0, state="rolling", forgiven=0, plan=plan, manifest=b"", note=note)
    return store.add_release(rec, bundle, _sign_with(key))


_ALLOWED = {"halt": ("rolling",), "resume": ("halted",), "abort": ("rolling", "halted", "done")}


def operate(store, release: str, action: str, key, *, note: str = "") -> ReleaseRecord:
    """``rollout halt|resume|abort``: the state change as one stored, signed manifest.
    ``resume`` forgives the gate refusals counted so far. ``EdgeError`` naming the state
    when the action does not apply."""
    reports = store.release_reports(release)
    from edge.fleet.rollout import gate_refusal

    def change(cur: ReleaseRecord):
        if cur.state not in _ALLOWED[action]:
            raise EdgeError(f"release {release} is {cur.state}: {action} applies to {', '.join(_ALLOWED[action])} only")
        if action == "halt":
            return replace(cur, state="halted", note=note or "halted by the operator")
        if action == "abort":
            return replace(cur, state="aborted", note=note or "aborted by the operator")
        counted = sum(1 for p in reports if gate_refusal(*_counted(p)))
        return replace(cur, state="rolling", forgiven=counted, note=note or f"resumed; {counted} refusal(s) forgiven")

    rec = store.change_release(release, change, _sign_with(key))
    if rec is None:
        raise EdgeError(f"no release {release} in the store")
    return rec


def _counted(p: ReportRecord) -> tuple:
    """A report as the rollout rule reads it: a ``rolled_back`` of a device that never
    switched is its answer to a halt (it stopped downloading or shadowing), not a failure
    of the new model after a switch, so it is not a refusal."""
    if p.state == "rolled_back" and "switched" not in p.ever:
        return ("stopped", p.reason)
    return (p.state, p.reason)


def step(store, rec: ReleaseRecord, registered, key) -> ReleaseRecord | None:
    """Apply the rollout rule once to ``rec``: the new record when it opened a wave,
    finished or halted, else None. Decided again inside the transaction (another
    instance, or an operator, may have changed its state since ``rec`` was read; the
    reports are read just before it, and a report that comes meanwhile counts next time)."""
    latest = {p.node: _counted(p) for p in store.release_reports(rec.release)}

    def change(cur: ReleaseRecord):
        d = decide(release=cur.release, waves=cur.plan["waves"], wave=cur.wave, state=cur.state, forgiven=cur.forgiven,
                   registered=registered, latest=latest, switch_ratio=cur.plan["switch_ratio"],
                   max_refusals=cur.plan["max_refusals"])
        if not d.action:
            return None
        log.info("release %s: %s (%s)", cur.release, d.action, d.reason)
        state = {"open": "rolling", "done": "done", "halt": "halted"}[d.action]
        return replace(cur, state=state, wave=d.wave, note=d.reason)

    if rec.state != "rolling":
        return None
    return store.change_release(rec.release, change, _sign_with(key))


def publish_manifest(client, cfg, store, model: str, *, timeout_s: float = 2.0) -> tuple[ReleaseRecord | None, bool]:
    """Publish the current release's manifest retained (QoS 1), under the store's publish
    lock and held until the PUBACK, so that no publisher's older manifest follows a newer one."""
    topic = release_topic(cfg.server.topic_prefix, cfg.server.fleet, model)
    with store.publishing_release(cfg.server.fleet, model) as cur:
        if cur is None:
            return None, False
        return cur, publish_retained_acked(client, topic, cur.manifest, timeout_s=timeout_s)


def publish_manifest_once(cfg, store, model: str, *, timeout_s: float = 10.0) -> tuple[ReleaseRecord | None, bool]:
    """The commands' publish: a clean connection of their own, the current manifest."""
    import os

    from edge.mqttconn import make_client

    conn = make_client(cfg.mqtt, client_id=f"{cfg.mqtt.client_id or cfg.server.name}-release-{os.getpid()}",
                       session_expiry_s=0)
    up = threading.Event()
    conn.client.on_connect = lambda c, u, f, rcode, p=None: None if rcode.is_failure else up.set()
    conn.connect_async(cfg.mqtt)
    conn.client.loop_start()
    try:
        if not up.wait(timeout_s):
            return store.current_release(cfg.server.fleet, model), False
        return publish_manifest(conn.client, cfg, store, model, timeout_s=timeout_s)
    finally:
        conn.client.disconnect()
        conn.client.loop_stop()


def load_release_key(cfg, *, name: str | None = None, keys_dir: str = "~/.config/edge-runtime/keys"):
    """The release private key: ``--key NAME`` (``<keys_dir>/NAME.release.key``) or ``[release] key_file``."""
    from edge.fleet.keys import load_private

    if name:
        return load_private(Path(keys_dir).expanduser() / f"{name}.release.key")
    if not cfg.release.key_file:
        raise ConfigError("[release] key_file is empty and no --key given: a release is signed by a release key "
                          "(edge keys create NAME --role release)")
    return load_private(cfg.release.key_file)


# ---- the service inside the server -------------------------------------------------------------

class ReleaseService:
    """Chunk serving, report intake and the rollout rule, on thread ``fleet-release``.

    ``offer(msg)`` (paho's thread) takes the messages of the release topics into a bounded
    queue; each is acknowledged once handled (the client uses manual acks). The service
    has a store connection of its own, so a rollout never waits on the aggregator's."""

    def __init__(self, cfg, *, client, registry, model: str, share: str = "", store=None):
        from edge.fleet.store import open_store

        s = cfg.server
        self.cfg, self.client, self.registry, self.model = cfg, client, registry, model
        self.store = store or open_store(s.store)
        self.key = None
        if cfg.release.key_file:
            from edge.fleet.keys import load_private

            self.key = load_private(cfg.release.key_file)
        self.get_prefix = release_topic(s.topic_prefix, s.fleet, model, "get", "")
        self.report_prefix = release_topic(s.topic_prefix, s.fleet, model, "report", "")
        self.filters = [share + self.get_prefix + "+", share + self.report_prefix + "+"]
        self.queue: collections.deque = collections.deque()
        self.counters = collections.Counter()  # (kind, outcome) -> n
        self.bytes_sent = 0
        # (node, "in"|"out") -> payload bytes of verified traffic, (node, "in_n"|"out_n") -> messages
        self.wire = collections.Counter()
        self.published_seq = -1
        self._last_publish = float("-inf")
        self._bundles: dict[str, bytes] = {}
        self.ledger = ChunkLedger()  # per-device rate bound, no answer sent twice for one wait
        self._stop, self._wake = threading.Event(), threading.Event()
        self._rl = RateLimitedLog(log)
        self.thread = threading.Thread(target=self._run, name="fleet-release", daemon=True)

    # ---- lifecycle and paho's side ----
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.thread.join(10)
        self.store.close()

    def connected(self) -> None:
        """After every (re)connect: publish the current manifest again."""
        self.published_seq = -1
        self._wake.set()

    def offer(self, msg) -> bool:
        """True when ``msg`` is on a release topic (queued, or left unacknowledged when full)."""
        t = msg.topic
        if not t.startswith((self.get_prefix, self.report_prefix)):
            return False
        if len(self.queue) >= self.cfg.release.queue:
            self.counters[("queue", "full")] += 1  # unacknowledged: the broker sends it again
            return True
        self.queue.append(msg)
        self._wake.set()
        return True

    # ---- the thread ----
    def _run(self) -> None:
        last = 0.0
        while not self._stop.is_set():
            self._wake.wait(self.cfg.release.check_s)
            self._wake.clear()
            try:
                stepped = self._drain()
                now = time.monotonic()
                if stepped or now - last >= self.cfg.release.check_s:
                    last = now
                    self.check()
                self._maybe_publish()
            except Exception as e:  # a store hiccup must not end the service: tried again next round
                self.counters[("store", "error")] += 1
                self._rl.warn("release_store", "release service: %s: %s", type(e).__name__, str(e)[:200])
                self._stop.wait(0.5)

    def _drain(self) -> bool:
        reported = False
        while self.queue:
            msg = self.queue[0]
            node = msg.topic.rsplit("/", 1)[-1]
            if msg.topic.startswith(self.get_prefix):
                self._count("request", self.handle_request(node, msg.payload, received=getattr(msg, "timestamp", None)))
            else:
                outcome = self.handle_report(node, msg.payload)
                self._count("report", outcome)
                reported |= outcome == "stored"
            self.queue.popleft()
            if msg.qos:
                self.client.ack(msg.mid, msg.qos)
        return reported

    def _count(self, kind: str, outcome: str) -> None:
        self.counters[(kind, outcome)] += 1
        if outcome not in ("served", "stored", "replayed"):
            self._rl.warn(f"release_{kind}_{outcome}", "release %s refused: %s", kind, outcome)

    def _device_key(self, node: str):
        snap = self.registry.current()
        dk = snap.keys.get(node)
        if dk is None:
            return None, "unknown_node"
        if snap.is_revoked(dk):
            return None, "revoked"
        return dk.public_key, ""

    def _verify(self, node: str, payload: bytes, unpack):
        key, why = self._device_key(node)
        if key is None:
            return None, why
        try:
            body = unpack(payload, [key])
        except DecodeError as e:
            return None, e.kind
        s = self.cfg.server
        if body.node != node:
            return None, "node_mismatch"
        if body.fleet != s.fleet or body.model != self.model:
            return None, "wrong_fleet"
        return body, ""

    def handle_request(self, node: str, payload: bytes, *, received: float | None = None) -> str:
        """Serve the asked chunks of the published release to ``node``; the outcome's name.
        ``received``: when the request reached this server (paho's monotonic receive time; now
        if unknown), to skip chunks sent after it was asked (``edge.fleet.release_ledger``)."""
        now = time.monotonic()
        req, why = self._verify(node, payload, rc.unpack_request)
        if req is None:
            return why
        self.wire[(node, "in")] += len(payload)
        self.wire[(node, "in_n")] += 1
        cur = self.store.current_release(self.cfg.server.fleet, self.model)
        if cur is None or cur.release != req.release:
            return "unknown_release"
        if not self._may_download(cur, node):
            return "not_admitted"
        bundle = self._bundle(cur.release)
        cs, n = cur.plan["chunk_size"], len(cur.plan["chunks"])
        topic = release_topic(self.cfg.server.topic_prefix, self.cfg.server.fleet, self.model, "chunk", node)
        if req.start >= n:
            return "past_end"
        asked = list(range(req.start, min(req.start + req.count, n)))
        send, dup, limited = self.ledger.plan(node, cur.release, asked, asked_at=now if received is None else received,
                                              now=now)
        self.counters[("chunk", "duplicate_skipped")] += dup
        self.counters[("chunk", "rate_limited")] += limited
        for i in send:
            frame = rc.pack_chunk(cur.release, i, rc.chunk_bytes(bundle, i, cs))
            self.client.publish(topic, frame, qos=1)
            self.ledger.sent(node, cur.release, i, time.monotonic())
            self.bytes_sent += len(frame)
            self.wire[(node, "out")] += len(frame)
            self.wire[(node, "out_n")] += 1
            self.counters[("chunk", "sent")] += 1
        return "served" if send or dup else "rate_limited"

    def _may_download(self, cur: ReleaseRecord, node: str) -> bool:
        if cur.state == "done":
            return True
        if cur.state != "rolling":
            return False  # halted or aborted: a device downloading stops on the manifest
        return rc.wave_of(cur.release, node, cur.plan["waves"]) <= cur.wave

    def _bundle(self, release: str) -> bytes:
        if release not in self._bundles:
            self._bundles = {release: self.store.release_bundle(release)}  # one cached: the published one
        return self._bundles[release]

    def handle_report(self, node: str, payload: bytes) -> str:
        """Keep a verified report as ``node``'s last on its release; the outcome's name."""
        rep, why = self._verify(node, payload, rc.unpack_report)
        if rep is None:
            return why
        self.wire[(node, "in")] += len(payload)
        self.wire[(node, "in_n")] += 1
        rel = self.store.release(rep.release)
        if rel is None:
            return "unknown_release"
        rec = ReportRecord(release=rep.release, node=node, seq=rep.seq, state=rep.state, reason=rep.reason,
                           evidence=rep.evidence, progress=rep.progress, received=time.time(),
                           wave=rc.wave_of(rep.release, node, rel.plan["waves"]), ever=())
        if not self.store.add_release_report(rec):
            return "replayed"
        log.info("release %s: %s reports %s%s", rep.release, node, rep.state, f" ({rep.reason})" if rep.reason else "")
        return "stored"

    def check(self) -> ReleaseRecord | None:
        """The rollout rule once on the current release (needs the release key to sign)."""
        cur = self.store.current_release(self.cfg.server.fleet, self.model)
        if cur is None or cur.state != "rolling":
            return None
        if self.key is None:
            self._rl.warn("release_no_key", "release %s: [release] key_file is empty, so this server cannot open "
                          "waves or halt; run edge fleet-server rollout with the key", cur.release)
            return None
        out = step(self.store, cur, list(self.registry.current().keys), self.key)
        if out is not None:
            self.counters[("rollout", out.state if out.state != "rolling" else "wave_opened")] += 1
            self._wake.set()
        return out

    def _maybe_publish(self) -> None:
        now = time.monotonic()
        cur = self.store.current_release(self.cfg.server.fleet, self.model)
        if cur is None or not self.client.is_connected():
            return
        if cur.seq == self.published_seq and now - self._last_publish < self.cfg.server.republish_s:
            return
        rec, ok = publish_manifest(self.client, self.cfg, self.store, self.model)
        if rec is not None and ok:
            self.published_seq, self._last_publish = rec.seq, now
            self.counters[("manifest", "published")] += 1

    def metric_families(self) -> list[tuple]:
        """``(name, kind, help, read)`` for the server's registry."""
        def by(kind):
            return [({"outcome": o}, n) for (k, o), n in list(self.counters.items()) if k == kind]

        return [
            ("edge_fleet_release_messages_total", "counter", "release messages handled, by kind and outcome",
             lambda: [({"kind": k, "outcome": o}, n) for (k, o), n in list(self.counters.items())
                      if k in ("request", "report", "queue")]),
            ("edge_fleet_release_chunks_sent_total", "counter", "chunk frames published", lambda: self.counters[("chunk", "sent")]),
            ("edge_fleet_release_chunks_skipped_total", "counter",
             "asked chunks not sent, by reason (duplicate: sent after the ask; rate_limited: the device's bound)",
             lambda: [({"reason": r}, self.counters[("chunk", k)]) for r, k in (("duplicate", "duplicate_skipped"),
                                                                                  ("rate_limited", "rate_limited"))]),
            ("edge_fleet_release_chunk_bytes_total", "counter", "bytes of chunk frames published", lambda: self.bytes_sent),
            ("edge_fleet_release_rollout_steps_total", "counter", "rollout steps the server took, by what they did",
             lambda: by("rollout")),
            ("edge_fleet_release_manifest_seq", "gauge", "seq of the manifest this instance last published",
             lambda: float(self.published_seq)),
        ]
