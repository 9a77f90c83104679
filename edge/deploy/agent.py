"""The device's deploy part: take a signed release, download, verify, gate, shadow, switch; report each step.

Threads: paho's network thread of the deploy connection hands messages over (a bounded
queue); the ``deploy`` thread owns every step and all state, so no lock guards it, and
``status()`` reads an immutable snapshot it publishes. The candidate's shadow test runs on
``deploy-shadow`` (``edge.deploy.shadowrun``). A step that fails is a refusal with a
reason from RELEASE_FORMAT.md, reported signed by the device key, and the current model
serves throughout: nothing of a release is served before its switch.

The switch is a restart. ``active.json`` is replaced atomically (``DeployStore.set_active``)
and the daemon is asked to restart (``request_restart``); the next start serves the
folder it names (``edge.deploy.active.active_model``), and the learner's checkpoints,
bound to the old model's identity, are set aside by its checkpoint store, not applied
(the bundle's own head is what the new model starts from). A restart, not an in-place
swap, because the windower, the learner and fleet sync are all bound to one model: one
path builds them, so nothing half-switched can serve.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Callable

from edge.deploy.download import Download
from edge.deploy.store import DeployStore, Refused
from edge.errors import DecodeError
from edge.fleet import release_codec as rc

log = logging.getLogger("edge.deploy")
COUNTERS = ("manifests", "manifests_refused", "manifests_replayed", "chunks_requested", "chunks_received",
            "chunks_duplicate", "chunks_bad", "reports", "switches", "rollbacks", "errors")


class DeployAgent:
    """``start``/``stop``/``status``/``metrics`` for the daemon; ``on_message`` for its MQTT link."""

    def __init__(self, *, cfg, root: Path, node: str, fleet: str, model_name: str, current, served,
                 device_key, release_keys: list, publish: Callable[[str, bytes], object],
                 request_restart: Callable[[str], None], tap=None, clock=time.monotonic):
        self.cfg, self.node, self.fleet, self.model_name = cfg, node, fleet, model_name
        self.current, self.served = current, served  # the ModelFolder serving now and its backend
        self.key, self.release_keys, self.publish_fn = device_key, list(release_keys), publish
        self.request_restart, self.tap, self.clock = request_restart, tap, clock
        self.store = DeployStore(root)
        p = f"{cfg.fleet.topic_prefix}/{fleet}/{model_name}/release"
        self.manifest_topic, self.chunk_topic = p, f"{p}/chunk/{node}"
        self.get_topic, self.report_topic = f"{p}/get/{node}", f"{p}/report/{node}"
        self.state = self.store.agent_state()
        self.counters = collections.Counter(dict.fromkeys(COUNTERS, 0))
        self.refusals: collections.Counter = collections.Counter()
        self.shadow_totals: collections.Counter = collections.Counter()  # of the shadow runs ended
        self.manifest = None  # the newest manifest accepted
        self.shadow_m = None  # the manifest of the release under shadow test (a newer one may be of another)
        self.download: Download | None = None
        self.shadow = None
        self.phase, self.reason, self.evidence = "idle", "", {}
        self._inbox: queue.Queue = queue.Queue(maxsize=256)
        self._stop = threading.Event()
        self._snapshot: dict = {}
        self._metrics: dict = {}
        self._current_digest = ""
        self._quarter = 0  # quarters of the download reported
        self._shadow_reported = 0  # labels in the last shadowing report
        # The newest manifest paho handed over (one reference, set on paho's thread), and the
        # last one acted on: a compile holds the deploy thread, so right after it the newest
        # is read from here, not from behind the queue (see _verify_and_gate).
        self._newest_manifest: bytes | None = None
        self._handled_manifest: bytes | None = None
        self._gating: str | None = None  # the release whose compile and gate run now
        self.thread = threading.Thread(target=self._run, name="deploy", daemon=True)

    @property
    def subscriptions(self) -> list[tuple[str, int]]:
        return [(self.manifest_topic, 1), (self.chunk_topic, 1)]

    # ---- paho's thread --------------------------------------------------------------
    def on_message(self, topic: str, payload: bytes, received: float = 0.0) -> None:
        payload = bytes(payload)
        if topic == self.manifest_topic:
            self._newest_manifest = payload  # one reference assignment: atomic
        try:
            self._inbox.put_nowait((topic, payload))
        except queue.Full:
            self.counters["errors"] += 1  # chunks come again when asked again; a manifest is retained

    # ---- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        from edge.zoo import digest_files

        self._current_digest = digest_files(self.current.files)
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        try:
            self._inbox.put_nowait(None)
        except queue.Full:
            pass  # the thread sees _stop within its 0.5 s wait
        if self.shadow is not None:
            self._end_shadow()
        if self.thread.is_alive():
            self.thread.join(timeout=5.0)

    def _run(self) -> None:
        self._after_start()
        while not self._stop.is_set():
            try:
                item = self._inbox.get(timeout=0.5)
            except queue.Empty:
                item = ()
            if item is None:
                break
            try:
                if item:
                    self._handle(*item)
                self._tick()
            except Refused as r:
                self._refuse_safely(r)
            except Exception as e:  # noqa: BLE001  a loop that handles outside input never dies from one item
                self.counters["errors"] += 1
                log.warning("deploy: %s: %s", type(e).__name__, str(e)[:200])
            self._publish_snapshot()

    def _refuse_safely(self, r: Refused) -> None:
        """``_refuse`` itself writes (agent.json) and publishes: on a full disk or a lost link it
        may fail too, and an exception raised inside the ``except Refused`` handler would end
        the deploy thread (and the daemon with it). Counted and logged instead."""
        try:
            self._refuse(r)
        except Exception as e:  # noqa: BLE001
            self.counters["errors"] += 1
            log.warning("deploy: refusing %s: %s: %s", r.reason, type(e).__name__, str(e)[:200])

    def _after_start(self) -> None:
        """After a switch or a rollback the restarted daemon says so, once, and old folders go."""
        pending = self.state.get("pending_report")
        if pending:
            self._report(pending["release"], pending["state"], reason=pending.get("reason", ""))
            self.state["pending_report"] = None
            self._save()
            self.phase, self.reason = pending["state"], pending.get("reason", "")
        a = self.store.active()
        if a is not None and not a.get("confirmed"):
            self.store.set_active({**a, "confirmed": True, "attempts": 0})
        for rel in list(self.state["disk_full_seq"]):  # a restart (after space was freed) tries them again
            self.state["refused"].pop(rel, None)
            del self.state["disk_full_seq"][rel]
        self._prune()
        self._publish_snapshot()

    def _prune(self, *, taking: str | None = None) -> None:
        """Release folders neither served nor the previous (kept ``keep_previous_s`` after a switch) go.
        A partial download stays (a restart resumes it) until another release is taken (``taking``)."""
        a = self.store.active() or {}
        # the release under shadow test or gate stays too: its folder is what a switch will serve
        # (before, taking another release deleted it mid-test, and the switch pointed at nothing)
        keep = {a.get("release"), taking, self._gating, self.shadow_m.release if self.shadow_m is not None else None}
        prev = a.get("previous") or {}
        if time.time() - float(a.get("switched_at", 0)) < self.cfg.deploy.keep_previous_s:
            keep.add(prev.get("release"))
        for r in self.store.releases():
            partial = not (self.store.release_dir(r) / "model").exists()
            if r not in keep and not (partial and taking is None and r not in self.state["refused"]):
                self.store.remove_release(r)

    # ---- messages on the deploy thread ----------------------------------------------
    def _handle(self, topic: str, payload: bytes) -> None:
        if topic == "__decision__":
            self._handle_decision(*payload)
        elif topic == self.manifest_topic:
            self._on_manifest(payload)
        elif topic == self.chunk_topic:
            self._on_chunk(payload)

    def _on_manifest(self, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained topic
        if payload == self._handled_manifest:
            return  # acted on already, taken from the newest slot right after a compile
        self._handled_manifest = payload
        try:
            m = rc.unpack_manifest(payload, self.release_keys)
        except DecodeError as e:
            self.counters["manifests_refused"] += 1
            log.warning("refused a release manifest (%s): %s", e.kind, str(e)[:200])
            if e.kind in ("unknown_key", "bad_signature"):
                self._report_forged(payload)
            return
        if (m.fleet, m.model) != (self.fleet, self.model_name):
            self.counters["manifests_refused"] += 1
            return
        if m.seq <= self.state["manifest_seq"]:
            self.counters["manifests_replayed"] += 1
            if self.manifest is None and m.seq == self.state["manifest_seq"]:
                self._take(m)  # the retained copy of the one accepted before a restart
            return
        self.counters["manifests"] += 1
        self.state["manifest_seq"] = m.seq
        self._save()
        self._take(m)

    def _report_forged(self, payload: bytes) -> None:
        """A manifest not signed by a release key: reported under the release id it claims (unverified)."""
        import json

        try:
            body = json.loads(payload[9:9 + int.from_bytes(payload[5:9], "little")])
            rel = str(body.get("release", ""))
        except (ValueError, AttributeError, UnicodeDecodeError):
            return
        if len(rel) == 16 and all(c in "0123456789abcdef" for c in rel) and rel not in self.state["refused"]:
            self.state["refused"][rel] = "bad_signature"
            self._save()
            self.refusals["bad_signature"] += 1
            self.phase, self.reason = "refused", "bad_signature"
            self._report(rel, "refused", reason="bad_signature")

    def _take(self, m) -> None:
        """Act on an accepted manifest: stop, roll back or go on with its release."""
        self.manifest = m
        a = self.store.active() or {}
        if m.state == "aborted":
            if a.get("release") == m.release:
                self._roll_back(a, "aborted")
            elif self._busy_with(m.release):
                self._stop_release(m.release, "aborted")
            return
        if m.state == "halted":
            if self._busy_with(m.release):
                self._stop_release(m.release, "halted")
            return
        if not rc.admits(m, self.node) or not self._may_retry(m):
            return
        if m.digest == self._current_digest or a.get("release") == m.release:
            return  # serving it already
        if self._busy_with(m.release) or self.phase == "switching":
            # a newer manifest of the release this device downloads, gates or shadow-tests (a
            # wave opening): before, it began the download again from nothing while the
            # unpacked candidate was gated or shadowed (the bench saw a device's 4 chunks twice)
            return
        self._begin(m)

    def _may_retry(self, m) -> bool:
        """False for a release this device refused, except one refused for a full disk, which is
        taken again on a newer manifest (a wave opening, a resume, ``done``) and after a restart
        (``_after_start``): the disk was the device's, not the release's fault, and space may
        have freed since. Not on every retained copy of the same manifest, so a disk that stays
        full is not hammered."""
        if m.release not in self.state["refused"]:
            return True
        seq = self.state["disk_full_seq"].get(m.release)
        if seq is None or m.seq <= seq:
            return False
        del self.state["refused"][m.release], self.state["disk_full_seq"][m.release]
        self._save()
        log.info("release %s: refused for a full disk at manifest %d; manifest %d came, trying again", m.release,
                 seq, m.seq)
        return True

    def _busy_with(self, release: str) -> bool:
        return (self.download is not None and self.download.m.release == release) or self._gating == release or (
            self.shadow is not None and self.shadow_m is not None and self.shadow_m.release == release)

    def _stop_release(self, release: str, why: str) -> None:
        """A halted or aborted release stops here (its chunks stay: a resume goes on from them)."""
        self._drop(release)
        self.phase, self.reason = "stopped", why
        self._report(release, "rolled_back", reason=f"{why} before the switch: the current model serves")

    def _begin(self, m) -> None:
        if m.size > self.cfg.deploy.max_bundle_bytes:
            raise Refused("too_large", f"bundle of {m.size} bytes is over [deploy] max_bundle_bytes = "
                          f"{self.cfg.deploy.max_bundle_bytes}")
        self._prune(taking=m.release)
        d = Download(m, self.store.release_dir(m.release), root=self.store.root, quota=self.cfg.deploy.max_disk_bytes,
                     in_flight=self.cfg.deploy.chunks_in_flight, timeout_s=self.cfg.deploy.request_timeout_s,
                     clock=self.clock)
        self.download = d  # set first: a refusal names this release
        d.prepare()
        self.phase, self.reason = "downloading", ""
        if d.resumed:
            log.info("release %s: resuming the download with %d of %d chunks held", m.release, *d.progress())
        self._report(m.release, "downloading")
        self._quarter = len(d.held) * 4 // max(1, len(m.chunks))
        if d.complete:
            self._verify_and_gate()

    def _on_chunk(self, payload: bytes) -> None:
        d = self.download
        if d is None:
            return
        try:
            c = rc.unpack_chunk(payload, max_len=d.m.chunk_size)
        except DecodeError as e:
            self.counters["chunks_bad"] += 1
            raise Refused("chunk_mismatch", f"chunk frame refused ({e.kind}): {e}") from None
        if c.release != d.m.release:
            self.counters["chunks_bad"] += 1
            return  # a late chunk of a release given up: not this one's
        self.counters["chunks_received"] += 1
        if not d.write(c.index, c.data):
            self.counters["chunks_duplicate"] += 1
        q = len(d.held) * 4 // len(d.m.chunks)
        if q > self._quarter and not d.complete:
            self._quarter = q
            self._report(d.m.release, "downloading")
        if d.complete:
            self._verify_and_gate()

    def _tick(self) -> None:
        """Ask for the chunks due (in flight bounded), and prune old folders now and then."""
        s = self.shadow
        if s is not None and s.test.labels >= self._shadow_reported + 25:
            self._shadow_reported = s.test.labels
            self._report(self.shadow_m.release, "shadowing", evidence=s.test.evidence())
        d = self.download
        if d is None or d.complete:
            return
        if self._chunks_waiting():
            return  # answers are waiting here already: take them before anything is asked again
        for start, count in d.next_asks():
            req = rc.ChunkRequest(fleet=self.fleet, model=self.model_name, node=self.node, release=d.m.release,
                                  start=start, count=count)
            self.counters["chunks_requested"] += count
            self.publish_fn(self.get_topic, rc.pack_request(req, self.key))

    def _chunks_waiting(self) -> bool:
        """A chunk frame is queued for this thread (paho's thread appends: copied under the
        queue's own lock). Under load answers wait here behind others; asking again for them
        then would only bring them twice."""
        with self._inbox.mutex:
            items = list(self._inbox.queue)
        return any(isinstance(it, tuple) and it[0] == self.chunk_topic for it in items)

    # ---- verify, gate, shadow, switch ----------------------------------------------
    def _verify_and_gate(self) -> None:
        from edge.deploy.gate import gate, unpack_verified

        d = self.download
        m = d.m
        model = unpack_verified(d.bundle(), m, d.folder, current=self.current.manifest)
        d.part.unlink(missing_ok=True)  # the unpacked folder is what stays
        self.download = None
        self._report(m.release, "verified")
        self.phase, self._gating = "gating", m.release
        self._publish_snapshot()
        try:
            try:
                backend, result = gate(model, served=self.served, floors=self._floors(),
                                       cache_dir=self.cfg.model.cache_dir or None, threads=self.cfg.model.threads)
            except Refused as r:
                r.manifest = m  # the release gated, whatever manifest came meanwhile
                raise
            # The compile held this thread (seconds on a small board), and a halt or abort
            # published meanwhile waits in the inbox behind whatever came before it. The
            # newest manifest is acted on now, before the candidate serves one shadow
            # window: a halted or aborted release stops here (rolled_back, "... before the
            # switch") and its compiled candidate is dropped unused.
            newest = self._newest_manifest
            if newest is not None and newest != self._handled_manifest:
                self._on_manifest(newest)
        finally:
            self._gating = None
        if self.phase != "gating":
            log.info("release %s: stopped while it compiled (%s); its candidate is dropped", m.release, self.reason)
            return
        self._start_shadow(m, model, backend, result)

    def _floors(self) -> tuple:
        """The manifests whose ``[parity]`` tolerances the gate holds a bundle to at least: the
        model serving now and the configured ``[model]`` (edge.deploy.gate, "as a floor")."""
        from edge.errors import EdgeError
        from edge.zoo import resolve_model

        floors = [self.current.manifest]
        try:
            floors.append(resolve_model(self.cfg.model.path).manifest)
        except EdgeError as e:  # the configured folder is gone: the served one still holds the floor
            log.warning("release gate: the configured [model] path %r does not load (%s); the served model's "
                        "tolerances alone are the floor", self.cfg.model.path, str(e)[:200])
        return tuple(floors)

    def _start_shadow(self, m, model, backend, result) -> None:
        from edge.adapt.heads import HeadSnapshot
        from edge.deploy.shadow import ShadowTest
        from edge.deploy.shadowrun import Shadow
        from edge.serve.engine import Engine

        dc = self.cfg.deploy
        _, head = model.arrays()
        snap = HeadSnapshot.from_arrays(dict(head), kind="linear", task=model.manifest.task,
                                        version=f"{model.manifest.version}+shipped")
        # the reference: the current backbone with its own shipped head, not the adapted one
        # (edge.deploy.shadow: an adapted head has learnt from the labels the test scores on)
        _, ref_head = self.current.arrays()
        reference = HeadSnapshot.from_arrays(dict(ref_head), kind="linear", task=self.current.manifest.task,
                                             version=f"{self.current.manifest.version}+shipped")
        test = ShadowTest(min_labels=m.min_labels, margin=m.margin, alpha=dc.alpha, max_windows=dc.shadow_max_windows,
                          min_agreement=dc.min_agreement)
        if self.shadow is not None:  # one shadow test at a time: the newer release's replaces it
            self._end_shadow()
        self.candidate, self.shadow_m = model, m
        self.shadow = Shadow(engine=Engine(backend, max_batch=self.cfg.model.max_batch), head=snap, reference=reference,
                             classes=model.manifest.classes, test=test, share=dc.shadow_share,
                             on_decision=lambda d, ev: self._inbox.put(("__decision__", (d, ev))))
        self.shadow.start()
        if self.tap is not None:
            self.tap.sink = self.shadow
        self.phase, self.evidence = "shadowing", test.evidence()
        self._shadow_reported = 0
        self._report(m.release, "shadowing", evidence=self.evidence)
        log.info("release %s (%s %s) passed its gate (%s); shadow test on %.0f%% of windows", m.release,
                 model.manifest.name, model.manifest.version,
                 result.parity.summary() if result.parity else "reference", dc.shadow_share * 100)

    def _end_shadow(self) -> None:
        if self.tap is not None:
            self.tap.sink = None
        s, self.shadow, self.shadow_m = self.shadow, None, None
        if s is not None:
            s.stop()
            self.shadow_totals.update(s.counters)

    def _handle_decision(self, decision: str, evidence: dict) -> None:
        m = self.shadow_m  # not self.manifest: a manifest of another release may have come meanwhile
        if m is None:
            return  # the shadow test was stopped (a halt) after it decided
        self.evidence = evidence
        self._end_shadow()
        if decision == "worse":
            r = Refused("worse", f"shadow test: {evidence}")
            r.manifest = m
            raise r
        self._switch(m, self.candidate, evidence)

    def _switch(self, m, model, evidence: dict) -> None:
        """The atomic switch: the pointer, then the restart that serves it."""
        from edge.zoo import digest_files

        prev = self.store.active() or {"release": None, "folder": None, "version": self.current.manifest.version,
                                       "digest": digest_files(self.current.files)}
        prev = {k: prev.get(k) for k in ("release", "folder", "version", "digest")}
        self.store.set_active({"release": m.release, "folder": str(model.path), "digest": m.digest,
                               "version": m.version, "previous": prev, "switched_at": time.time(),
                               "confirmed": False, "attempts": 0})
        self.state["pending_report"] = {"release": m.release, "state": "switched", "reason": ""}
        self._save()
        self.counters["switches"] += 1
        self.phase = "switching"
        log.info("release %s: switching to %s %s (%s)", m.release, model.manifest.name, m.version, evidence)
        self.request_restart(f"switch to release {m.release} ({m.version})")

    def _roll_back(self, a: dict, why: str) -> None:
        prev = a.get("previous") or {}
        self.store.set_active(None if not prev.get("folder") else
                              {**prev, "previous": None, "switched_at": time.time(), "confirmed": True})
        self.state["pending_report"] = {"release": a["release"], "state": "rolled_back", "reason": why}
        self._save()
        self.counters["rollbacks"] += 1
        self.phase = "rolling_back"
        log.warning("release %s %s: back to the previous model %s", a["release"], why, prev.get("version"))
        self.request_restart(f"roll back release {a['release']} ({why})")

    def _drop(self, release: str) -> None:
        """Stop the download and the shadow test of ``release`` (not those of another release)."""
        if self.download is not None and self.download.m.release == release:
            self.download = None
        if self.shadow is not None and self.shadow_m is not None and self.shadow_m.release == release:
            self._end_shadow()

    def _refuse(self, r: Refused) -> None:
        m = getattr(r, "manifest", None) or (self.download.m if self.download is not None else self.manifest)
        if m is not None:
            self._drop(m.release)
        self.refusals[r.reason] += 1
        self.phase, self.reason = "refused", r.reason
        log.warning("refused release %s: %s", m.release if m else "?", r)
        if m is None:
            return
        self.store.remove_release(m.release)  # a refused release's bytes are of no use (and free the full disk)
        self.state["refused"][m.release] = r.reason
        if r.reason == "disk_full":
            self.state["disk_full_seq"][m.release] = self.manifest.seq if self.manifest is not None else m.seq
        self._save()
        self._report(m.release, "refused", reason=r.reason, evidence=self.evidence if r.reason == "worse" else {})

    # ---- reports and state ----------------------------------------------------------
    def _report(self, release: str, state: str, *, reason: str = "", evidence: dict | None = None) -> None:
        self.state["report_seq"] += 1
        try:
            self._save()
        except OSError as e:
            # A full disk must not silence the report that says so: the seq in memory is above
            # every one saved, so it still goes up within this run (after a restart the server
            # may take the first few as replays, until the seq passes the last one it stored).
            self.counters["errors"] += 1
            log.warning("deploy: could not save agent.json before a report (%s); reporting anyway", e.strerror or e)
        d = self.download
        prog = tuple(d.progress()) if d is not None and d.m.release == release else (0, 0)
        r = rc.Report(fleet=self.fleet, model=self.model_name, node=self.node, release=release,
                      seq=self.state["report_seq"], state=state, reason=reason[:200],
                      evidence={k: v for k, v in (evidence or {}).items()}, progress=prog)
        self.counters["reports"] += 1
        self.publish_fn(self.report_topic, rc.pack_report(r, self.key))

    def _save(self) -> None:
        self.store.save_agent_state(self.state)

    def _publish_snapshot(self) -> None:
        m, d = self.manifest, self.download
        a = self.store.active() or {}
        self._snapshot = {"phase": self.phase, "reason": self.reason, "release": m.release if m else None,
                          "version": m.version if m else None, "manifest_state": m.state if m else None,
                          "progress": list(d.progress()) if d is not None else None,
                          "evidence": dict(self.shadow.test.evidence()) if self.shadow is not None else dict(self.evidence),
                          "serving_release": a.get("release"), "serving_version": a.get("version")}
        self._metrics = self._count_snapshot()

    def status(self) -> dict:
        return dict(self._snapshot)

    def metrics(self) -> dict:
        """The counters as of the deploy thread's last step (an immutable snapshot, STYLE 19)."""
        return self._metrics

    def _count_snapshot(self) -> dict:
        out = {f"deploy_{k}": v for k, v in self.counters.items()}
        out["deploy_refused"] = dict(self.refusals)
        live = self.shadow.counters if self.shadow is not None else {}  # fixed keys: a copy is safe
        keys = set(self.shadow_totals) | set(live) | {"windows_offered", "windows_taken", "windows_dropped",
                                                      "labels_matched", "labels_unmatched"}
        out.update({f"deploy_shadow_{k}": self.shadow_totals.get(k, 0) + live.get(k, 0) for k in sorted(keys)})
        return out
