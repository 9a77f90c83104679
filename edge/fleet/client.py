"""The device's fleet sync client: the ``sync`` thread and the state it checkpoints.

Every ``interval_s`` (and on demand, ``sync_now``) the ``sync`` thread asks the learner
thread, the one owner of the head, to *prepare* a delta: ``pending = head - base -
sent_since_base`` is compressed (error feedback: the rest stays pending), signed, given
the next sequence number and put in the outbox; the learner's checkpoint is written
*before* the delta leaves (write-ahead), so after ``kill -9`` at any instant the
restarted device either resends the very same bytes (same seq: the server stores it
once) or had not yet counted it as sent. The sync thread publishes the outbox at QoS 1
and clears it when the broker acknowledges it; until then it resends it, so a device
that is offline keeps learning, its pending delta keeps growing, and it all goes out
when it is back.

A global head on the retained ``<prefix>/<fleet>/<model>/global`` is checked (the
server's signature, fleet, model hash, head kind, shapes, finite values, a version above
the current base); one that fails is refused, counted by reason and reported as a
``sync_refused`` event, never applied. One that passes is applied on the learner thread:
the head becomes the new global plus the residual not yet sent, the global becomes the
learner's anchor and reference (``Learner.rebase``), and ``sent_since_base`` restarts.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

import numpy as np

from edge.fleet.codec import Header, pack_message
from edge.fleet.feedback import add, encode_pending, subtract
from edge.fleet.heads import delta_topic, global_topic
from edge.fleet.validate import Expected, check_global
from edge.observe import RateLimitedLog

log = logging.getLogger("edge.fleet")


class SyncClient:
    """Fleet sync for one device; ``worker`` is its ``AdaptWorker`` (learner thread and checkpoints)."""

    def __init__(self, *, worker, node: str, fleet: str, model: str, model_hash: str, key, server_keys: list,
                 publish: Callable[..., object], topic_prefix: str = "fleet", interval_s: float = 60.0,
                 encoding: str = "topk8", fraction: float = 0.01, min_samples: int = 1,
                 on_event: Callable[..., None] | None = None, connected: Callable[[], bool] | None = None):
        self.worker, self.node, self.key, self.server_keys = worker, node, key, list(server_keys)
        self.publish_fn, self.on_event, self.connected = publish, on_event, connected
        self.interval_s, self.encoding, self.fraction, self.min_samples = interval_s, encoding, fraction, min_samples
        learner = worker.learner
        self.head_kind = learner.head.kind
        base = learner.head.arrays()
        self.expected = Expected(fleet=fleet, model=model, model_hash=model_hash, head_kind=self.head_kind,
                                 shapes={k: tuple(v.shape) for k, v in base.items()})
        self.delta_topic = delta_topic(topic_prefix, fleet, model, node)
        self.global_topic = global_topic(topic_prefix, fleet, model)
        # the state that is checkpointed with the learner (state_dict)
        self.base = base
        self.base_version = 0
        self.sent = {k: np.zeros_like(v) for k, v in base.items()}
        self.seq = 0
        self.outbox: tuple[int, bytes] | None = None
        self.labels_at_send = learner.counters["labels"]
        self.counters = collections.Counter()
        self.refused = collections.Counter()
        self._rl = RateLimitedLog(log)
        self._stop = threading.Event()
        self._now = threading.Event()
        self._inflight = None
        self.thread = threading.Thread(target=self._run, name="sync", daemon=True)
        worker.attach_state("fleet", self)

    # ---- checkpointed state -----------------------------------------------------------------
    def state_dict(self) -> dict:
        ob = self.outbox
        return {"format": 1, "base": dict(self.base), "base_version": self.base_version, "sent": dict(self.sent),
                "seq": self.seq, "outbox": None if ob is None else {"seq": ob[0], "message": np.frombuffer(ob[1], np.uint8)},
                "labels_at_send": self.labels_at_send}

    def load_state_dict(self, s: dict) -> None:
        if set(s.get("base", {})) != set(self.base) or any(
                tuple(np.shape(s["base"][k])) != tuple(v.shape) for k, v in self.base.items()):
            log.warning("fleet state in the checkpoint is for another head; starting fleet sync afresh")
            return
        self.base = {k: np.asarray(v, np.float32) for k, v in s["base"].items()}
        self.sent = {k: np.asarray(v, np.float32) for k, v in s["sent"].items()}
        self.base_version, self.seq = int(s["base_version"]), int(s["seq"])
        ob = s.get("outbox")
        self.outbox = None if ob is None else (int(ob["seq"]), bytes(np.asarray(ob["message"], np.uint8)))
        self.labels_at_send = int(s.get("labels_at_send", 0))
        if self.base_version > 0:  # the learner's checkpoint holds only weight/bias of its global head
            self.worker.learner.rebase(self.base, f"fleet-{self.base_version}")

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._now.set()
        self.thread.join(10)

    def sync_now(self) -> None:
        """Prepare and send a delta now (also what any message on ``<prefix>/<node>/fleet/sync`` does)."""
        self._now.set()

    def _run(self) -> None:
        next_at = time.monotonic() + self.interval_s
        while not self._stop.is_set():
            self._now.wait(max(0.0, min(1.0, next_at - time.monotonic())))
            if self._stop.is_set():
                break
            try:
                self._send_outbox()
                if self._now.is_set() or time.monotonic() >= next_at:
                    self._now.clear()
                    next_at = time.monotonic() + self.interval_s
                    if self.outbox is None:
                        self.worker.offer_call(self.prepare_delta)
            except Exception as e:  # one failed round must not end syncing
                self.counters["errors"] += 1
                self._rl.warn("sync", "fleet sync round failed: %s", str(e)[:200])

    def _send_outbox(self) -> None:
        """Publish the outbox (again, until the broker has acknowledged it)."""
        ob = self.outbox
        if ob is None:
            return
        info = self._inflight
        if self.connected is not None and not self.connected() and not (info is not None and info[1].is_published()):
            return  # offline: paho would only queue another copy; the outbox waits (and keeps its seq)
        if info is not None and info[0] == ob[0]:
            if info[1].is_published():
                self.outbox = None  # acknowledged by the broker at QoS 1; it is the server's now
                self._inflight = None
                self.counters["acked"] += 1
                self._emit("sync", seq=ob[0], base_version=self.base_version, bytes=len(ob[1]))
                self.worker.offer_call(lambda w: w.checkpoint())
                return
            if time.monotonic() - info[2] < max(5.0, self.interval_s):
                return
        res = self.publish_fn(self.delta_topic, ob[1], qos=1)
        if res is not None and getattr(res, "rc", 1) == 0:
            self._inflight = (ob[0], res, time.monotonic())
            self.counters["published"] += 1
        else:
            self.counters["publish_failed"] += 1

    # ---- on the learner thread --------------------------------------------------------------
    def prepare_delta(self, worker) -> None:
        """On the learner thread: encode, sign and checkpoint the next delta into the outbox."""
        try:
            learner = worker.learner
            labels = learner.counters["labels"]
            if self.outbox is not None or labels - self.labels_at_send < self.min_samples:
                self.counters["skipped"] += 1
                return
            pending = subtract(subtract(learner.fleet_arrays(), self.base), self.sent)
            step = encode_pending(pending, encoding=self.encoding, fraction=self.fraction)
            e = self.expected
            m = learner.metrics()
            h = Header(kind="delta", fleet=e.fleet, model=e.model, model_hash=e.model_hash, head_kind=e.head_kind,
                       node=self.node, seq=self.seq + 1, base_version=self.base_version, samples=labels - self.labels_at_send,
                       encoding=self.encoding, metrics={k: m.get(k) for k in ("champion_loss", "global_loss", "challenger_loss")
                                                        if isinstance(m.get(k), (int, float))})
            msg = pack_message(h, step.tensors, self.key)
            self.sent = add(self.sent, step.sent)
            self.seq += 1
            self.labels_at_send = labels
            self.outbox = (self.seq, msg)
            worker.checkpoint()  # write-ahead: the seq and what was sent are on disk before it leaves
            self.counters["prepared"] += 1
            self._now.set()
        except Exception as e:  # never let a sync bug stop the learner thread
            self.counters["errors"] += 1
            self._rl.warn("prepare", "preparing a delta failed: %s", str(e)[:200])

    # ---- global heads (paho's thread, then the learner thread) ------------------------------
    def on_global(self, payload: bytes) -> None:
        """A message on the global topic: check it here, apply it on the learner thread."""
        if not payload:
            return  # a cleared retained topic: no global head, nothing to refuse
        v = check_global(payload, expected=self.expected, server_keys=self.server_keys, current_version=self.base_version)
        if not v.ok:
            if v.reason == "not_newer":
                self.counters["globals_not_newer"] += 1  # the retained copy of the version we have: normal
                return
            self.refused[v.reason] += 1
            self._rl.warn("refused", "refused a global head (%s): %s", v.reason, v.detail)
            self._emit("sync_refused", reason=v.reason, detail=v.detail)
            return
        self.worker.offer_call(lambda w, m=v.message: self.apply_global(w, m))

    def apply_global(self, worker, msg) -> None:
        """On the learner thread: rebase on a verified global head (``on_global`` checked it)."""
        try:
            from edge.fleet.heads import set_head_arrays

            version = msg.header.version
            if version <= self.base_version:
                return
            learner = worker.learner
            g = {k: np.asarray(a, np.float32) for k, a in msg.tensors.items()}
            residual = subtract(subtract(learner.head.arrays(), self.base), self.sent)
            set_head_arrays(learner.head, add(g, residual))
            if self.head_kind == "linear":
                learner.head.set_base(g["weight"], g["bias"])  # the anchor pulls toward the fleet's head
            self.base, self.base_version = g, version
            self.sent = {k: np.zeros_like(a) for k, a in g.items()}
            learner.rebase(g, f"fleet-{version}")
            self.counters["rebased"] += 1
            self._emit("sync_rebased", version=version)
        except Exception as e:
            self.counters["errors"] += 1
            self._rl.warn("rebase", "applying a global head failed: %s", str(e)[:200])

    def _emit(self, kind: str, **fields) -> None:
        if self.on_event is not None:
            try:
                self.on_event(kind, **fields)
            except Exception:
                log.exception("fleet: event sink failed")

    def metrics(self) -> dict:
        out = {f"sync_{k}": v for k, v in self.counters.items()}
        out["sync_base_version"] = self.base_version
        out["sync_seq"] = self.seq
        out["sync_outbox"] = int(self.outbox is not None)
        out["sync_refused"] = dict(self.refused)
        return out
