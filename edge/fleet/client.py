"""The device's fleet sync client: the ``sync`` thread and the state it checkpoints.

Every ``interval_s`` (and on demand, ``sync_now``) the ``sync`` thread asks the learner
thread, the one owner of the head, to *prepare* a delta: ``pending = head - base -
sent_since_base`` is compressed (error feedback: the rest stays pending), signed and
given the next sequence number. The next state is built first and checkpointed
(write-ahead); only when that checkpoint is on disk does the delta become the outbox,
so after ``kill -9`` at any instant the restarted device either resends the very same
bytes (same seq: the server stores it once) or never counted it as sent. A failed
checkpoint sends nothing (``checkpoint_failed``); the next round tries again.

Delivery. The sync thread publishes the outbox at QoS 1 and follows it to the broker's
PUBACK (``MqttLink.publish_tracked``): a success reason code means handed over (the
outbox clears); a failure code (MQTT 5, e.g. 0x87 Not authorized: an ACL without the
fleet topics) means *not* delivered: counted (``publish_refused``), logged, kept and
retried with backoff. Each delta handed over stays in the ``Ledger`` until the server's
signed receipt for it comes on ``<prefix>/<fleet>/<model>/receipt/<node>`` (``.../<lane>``
on a switched release's model: ``edge.fleet.lanes``); a refused
one puts its step back into the pending residual (``edge.fleet.reconcile``), so nothing
learned is lost, and its reason steers the device (seq past the server's, smaller
steps, ask for the head).

The global head's authority. A global head (retained ``.../global``, or republished) is
checked (``check_global``: the server's signature, fleet, model, head kind, shapes,
finite values, a version above the base); one that fails is refused, counted by reason
and reported as ``sync_refused``. One that passes is applied on the learner thread: the
head becomes the new global plus the residual not yet sent, and ``sent_since_base``
restarts. What sits retained is never trusted to be the latest: a device with base 0
(fresh, or its state lost), or told by a receipt that the server is ahead or in a new
epoch, publishes on ``.../request/<node>`` until a head comes after its request.
"""
from __future__ import annotations

import collections
import hashlib
import logging
import threading
from typing import Callable

import numpy as np

from edge.errors import DecodeError
from edge.fleet.codec import Header, pack_message, unpack_message
from edge.fleet.courier import Courier
from edge.fleet.feedback import add, encode_pending, l2_norm, subtract
from edge.fleet.heads import delta_topic, global_topic, receipt_topic, request_topic
from edge.fleet.receipts import unpack_receipt
from edge.fleet.reconcile import Ledger, Sent, judge
from edge.fleet.validate import Expected, check_global
from edge.observe import RateLimitedLog

log = logging.getLogger("edge.fleet")
# every counter of metrics() (``sync_<name>``), present from the start so that /metrics has them at 0
COUNTERS = ("prepared", "skipped", "checkpoint_failed", "clipped", "published", "publish_failed", "publish_refused",
            "acked", "unreceipted_evicted", "resent_unreceipted", "receipts", "receipts_accepted", "receipts_bad",
            "receipts_misaddressed", "receipts_unmatched", "returned", "returned_then_accepted", "seq_resumed",
            "epoch_changes", "requests", "rebased", "globals_not_newer", "errors")


class SyncClient:
    """Fleet sync for one device; ``worker`` is its ``AdaptWorker`` (learner thread and checkpoints).
    ``publish(topic, payload, qos=1)`` returns a ``Delivery`` (``MqttLink.publish_tracked``) or None."""

    def __init__(self, *, worker, node: str, fleet: str, model: str, model_hash: str, key, server_keys: list,
                 publish: Callable[..., object], topic_prefix: str = "fleet", interval_s: float = 60.0,
                 encoding: str = "topk8", fraction: float = 0.01, min_samples: int = 1,
                 on_event: Callable[..., None] | None = None, connected: Callable[[], bool] | None = None,
                 lane: str = ""):
        self.worker, self.node, self.key, self.server_keys = worker, node, key, list(server_keys)
        self.publish_fn, self.on_event, self.connected = publish, on_event, connected
        self.interval_s, self.encoding, self.fraction, self.min_samples = interval_s, encoding, fraction, min_samples
        learner = worker.learner
        self.head_kind = learner.head.kind
        base = learner.head.arrays()
        self.expected = Expected(fleet=fleet, model=model, model_hash=model_hash, head_kind=self.head_kind,
                                 shapes={k: tuple(v.shape) for k, v in base.items()})
        # ``lane``: "" on the server's own model; a switched release's model syncs in its own
        # lane (FORMAT.md "Lanes"): its head, receipts and head requests on topics ending in it
        self.lane = lane
        self.delta_topic = delta_topic(topic_prefix, fleet, model, node)
        self.global_topic = global_topic(topic_prefix, fleet, model, lane)
        self.receipt_topic = receipt_topic(topic_prefix, fleet, model, node, lane)
        self.request_topic = request_topic(topic_prefix, fleet, model, node, lane)
        # the state that is checkpointed with the learner (state_dict)
        self.base = base
        self.base_version = 0
        self.sent = {k: np.zeros_like(v) for k, v in base.items()}
        self.seq = 0
        self.outbox: tuple[int, bytes] | None = None
        self.labels_at_send = learner.counters["labels"]
        self.ledger = Ledger()
        self.step_cap = 0.0  # > 0 after a norm_too_large: the next steps' norm is clipped to it
        self.epoch, self.server_latest, self.server_stored_seq = "", 0, 0
        self.counters = collections.Counter(dict.fromkeys(COUNTERS, 0))
        self.refused = collections.Counter()  # global heads refused, by reason
        self.receipts_refused = collections.Counter()  # this device's deltas the server refused, by reason
        self._rl = RateLimitedLog(log)
        self._lock = threading.Lock()  # the outbox and the hand-overs from paho's thread
        self._staged: dict | None = None  # the next state while its checkpoint is written
        self._receipts: collections.deque = collections.deque(maxlen=256)
        self._global = None  # the newest verified global head not yet applied
        self._returned: collections.OrderedDict = collections.OrderedDict()  # (seq, digest) -> Sent put back: last 16
        self.courier = Courier(self)  # the sync thread: publishing, PUBACKs, head requests, resends
        self.thread = self.courier.thread
        worker.attach_state("fleet", self)

    # ---- checkpointed state -----------------------------------------------------------------
    def state_dict(self) -> dict:
        s = {"base": self.base, "base_version": self.base_version, "sent": self.sent, "seq": self.seq,
             "outbox": self.outbox, "labels_at_send": self.labels_at_send, "ledger": self.ledger,
             "step_cap": self.step_cap, **(self._staged or {})}  # write-ahead: the state about to be
        ob = s["outbox"]
        return {"format": 2, "base": dict(s["base"]), "base_version": s["base_version"], "sent": dict(s["sent"]),
                "seq": s["seq"], "outbox": None if ob is None else {"seq": ob[0], "message": np.frombuffer(ob[1], np.uint8)},
                "labels_at_send": s["labels_at_send"], "unreceipted": s["ledger"].state_dict(),
                "step_cap": float(s["step_cap"]), "epoch": self.epoch}

    def load_state_dict(self, s: dict) -> None:
        """Format 1 (before receipts) loads with an empty ledger."""
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
        try:
            self.ledger = Ledger.from_state(s.get("unreceipted"))
        except (KeyError, TypeError, ValueError) as e:  # a damaged ledger costs its receipts, not the start
            log.warning("the fleet state's un-receipted deltas were not restored (%s: %s)", type(e).__name__, str(e)[:200])
            self.ledger = Ledger()
        self.step_cap, self.epoch = float(s.get("step_cap", 0.0)), str(s.get("epoch", ""))
        if self.base_version > 0:  # the learner's checkpoint holds only weight/bias of its global head
            self.worker.learner.rebase(self.base, f"fleet-{self.base_version}")

    # ---- lifecycle (the sync thread is the Courier's) ---------------------------------------
    def start(self) -> None:
        self.courier.want_head("start")  # whatever sits retained may be forged, old or gone
        self.courier.start()

    def stop(self) -> None:
        self.courier.stop()

    def sync_now(self) -> None:
        """Prepare and send a delta now (also what any message on ``<prefix>/<node>/fleet/sync`` does)."""
        self.courier.sync_now()

    def want_head(self, why: str) -> None:
        """Ask the server for its latest head (again, with backoff, until one comes after the ask)."""
        self.courier.want_head(why)

    # ---- on the learner thread --------------------------------------------------------------
    def prepare_delta(self, worker) -> None:
        """On the learner thread: encode and sign the next delta, checkpoint the state it makes,
        and only then put it in the outbox."""
        try:
            learner = worker.learner
            labels = learner.counters["labels"]
            unsent = labels - self.labels_at_send
            if self.outbox is not None or (unsent < self.min_samples and self.step_cap <= 0):
                self.counters["skipped"] += 1  # (a clipped residual goes on without new labels)
                return
            pending = subtract(subtract(learner.fleet_arrays(), self.base), self.sent)
            step = encode_pending(pending, encoding=self.encoding, fraction=self.fraction)
            norm = l2_norm(step.sent)
            cap, samples = self.step_cap, max(0, unsent)
            if cap > 0 and norm > cap:  # the server refused a larger step: the rest stays pending
                scale = cap / norm
                step = encode_pending({k: v * np.float32(scale) for k, v in pending.items()},
                                      encoding=self.encoding, fraction=self.fraction)
                norm = l2_norm(step.sent)
                samples = min(unsent, max(1, round(unsent * scale))) if unsent > 0 else 0  # the rest go with the rest
                self.counters["clipped"] += 1
            elif cap > 0:
                cap = 0.0  # this step is all that was pending above the cap: it is through
            e = self.expected
            m = learner.metrics()
            seq = self.seq + 1
            h = Header(kind="delta", fleet=e.fleet, model=e.model, model_hash=e.model_hash, head_kind=e.head_kind,
                       node=self.node, seq=seq, base_version=self.base_version, samples=samples,
                       encoding=self.encoding, metrics={k: m.get(k) for k in ("champion_loss", "global_loss", "challenger_loss")
                                                        if isinstance(m.get(k), (int, float))})
            msg = pack_message(h, step.tensors, self.key)
            ledger, evicted = self.ledger.added(Sent(seq=seq, digest=hashlib.sha256(msg).hexdigest(),
                                                     base_version=self.base_version, norm=norm, message=msg,
                                                     samples=samples))
            nxt = {"sent": add(self.sent, step.sent), "seq": seq, "labels_at_send": self.labels_at_send + samples,
                   "outbox": (seq, msg),
                   "ledger": ledger, "step_cap": cap}
            self._staged = nxt
            try:
                ok = worker.checkpoint() is not False  # write-ahead: on disk before it can leave
            finally:
                self._staged = None
            if not ok:
                self.counters["checkpoint_failed"] += 1
                self._rl.warn("ckpt", "the checkpoint before delta seq %d failed: nothing sent, the next round "
                              "tries again", seq)
                return
            if evicted is not None:
                self.counters["unreceipted_evicted"] += 1
                self._rl.warn("evict", "no receipt for delta seq %d among the last %d: taken as delivered",
                              evicted.seq, ledger.max_entries)
            self.sent, self.seq, self.labels_at_send = nxt["sent"], seq, nxt["labels_at_send"]
            self.ledger, self.step_cap = ledger, cap
            with self._lock:
                self.outbox = (seq, msg)
            self.counters["prepared"] += 1
            self.courier.wake()
        except Exception as e:  # never let a sync bug stop the learner thread
            self.counters["errors"] += 1
            self._rl.warn("prepare", "preparing a delta failed: %s", str(e)[:200])

    def _checkpoint(self, worker) -> None:
        worker.checkpoint()

    # ---- receipts (paho's thread, then the learner thread) ----------------------------------
    def on_receipt(self, payload: bytes) -> None:
        """A message on this node's receipt topic: verify it here, act on it on the learner thread."""
        try:
            r = unpack_receipt(payload, self.server_keys)
        except DecodeError as e:
            self.counters["receipts_bad"] += 1
            self._rl.warn("receipt", "refused a receipt (%s): %s", e.kind, str(e)[:200])
            return
        e = self.expected
        if (r.fleet, r.model, r.node) != (e.fleet, e.model, self.node):
            self.counters["receipts_misaddressed"] += 1
            self._rl.warn("receipt-addr", "ignored a receipt for %r/%r/%r on this node's topic", r.fleet[:40],
                          r.model[:40], r.node[:40])
            return
        self._receipts.append(r)
        self.worker.offer_call(self._handle_receipts)

    def _handle_receipts(self, worker) -> None:
        changed = False
        while self._receipts:
            try:
                changed |= self._apply_receipt(self._receipts.popleft())
            except Exception as e:  # one bad receipt must not stop the rest
                self.counters["errors"] += 1
                self._rl.warn("receipt-apply", "handling a receipt failed: %s", str(e)[:200])
        if changed:
            worker.checkpoint()  # a step put back must not come back as sent after a restart

    def _apply_receipt(self, r) -> bool:
        """One verified receipt; True when it changed checkpointed state."""
        self.counters["receipts"] += 1
        entry = self.ledger.find(r.seq, r.digest)
        o = judge(r, entry=entry, base_version=self.base_version, epoch=self.epoch)
        if o.new_epoch:
            self.counters["epoch_changes"] += 1
            log.warning("fleet server is in a new store epoch (%s, was %s): following its history", r.epoch, self.epoch)
        changed = o.new_epoch or self.epoch != r.epoch
        self.epoch, self.server_latest, self.server_stored_seq = r.epoch, r.latest_version, r.stored_seq
        with self._lock:
            ob = self.outbox
            if ob is not None and entry is not None and ob[0] == r.seq:
                self.outbox = None  # the server has it whatever the PUBACK said
        back = self._returned.pop((r.seq, r.digest), None) if entry is None and r.accepted else None
        if back is not None:  # refused, then stored after all (a redelivery): it is not pending any more
            self.sent = add(self.sent, unpack_message(back.message).tensors)
            self.labels_at_send += back.samples
            self.counters["returned_then_accepted"] += 1
            changed = True
        elif not o.matched:
            self.counters["receipts_unmatched"] += 1
        else:
            self.ledger = self.ledger.without(r.seq)
            changed = True
        if r.accepted:
            self.counters["receipts_accepted"] += 1
        else:
            self.receipts_refused[r.reason] += 1
            self._rl.warn(f"refused:{r.reason}", "the fleet server refused delta seq %d (%s)", r.seq, r.reason)
        if o.put_back:
            self.sent = subtract(self.sent, unpack_message(entry.message).tensors)
            self.labels_at_send -= entry.samples  # they count again in the delta that carries the step
            self._returned[(r.seq, r.digest)] = entry
            while len(self._returned) > 16:
                self._returned.popitem(last=False)
            self.counters["returned"] += 1
            self._emit("sync_refused_delta", seq=r.seq, reason=r.reason)
        if o.seq_floor > self.seq:
            log.warning("fleet server holds seq %d of %s: resuming after it (was at %d)", o.seq_floor, self.node, self.seq)
            self.seq = o.seq_floor
            self.counters["seq_resumed"] += 1
            changed = True
        if o.step_cap is not None:
            self.step_cap = o.step_cap if self.step_cap <= 0 else min(self.step_cap, o.step_cap)
        if o.want_head:
            self.want_head(f"receipt: server at version {r.latest_version}, epoch {r.epoch}, {r.status} {r.reason}")
        return changed

    # ---- global heads (paho's thread, then the learner thread) ------------------------------
    def on_global(self, payload: bytes) -> None:
        """A message on the global topic: check it here, apply it on the learner thread."""
        if not payload:
            return  # a cleared retained topic: no global head, nothing to refuse
        v = check_global(payload, expected=self.expected, server_keys=self.server_keys, current_version=self.base_version)
        if not v.ok:
            if v.reason == "not_newer":
                self.counters["globals_not_newer"] += 1  # the retained copy of the version we have: normal
                self.courier.head_seen()
                return
            self.refused[v.reason] += 1
            self._rl.warn("refused", "refused a global head (%s): %s", v.reason, v.detail)
            self._emit("sync_refused", reason=v.reason, detail=v.detail)
            return
        self.courier.head_seen()
        with self._lock:
            if self._global is None or v.message.header.version > self._global.header.version:
                self._global = v.message
        self.worker.offer_call(self._apply_newest)

    def _apply_newest(self, worker) -> None:
        with self._lock:
            msg, self._global = self._global, None
        if msg is not None:
            self.apply_global(worker, msg)

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
        """Flat numbers (``sync_<counter>`` counters, the rest gauges) plus two dicts by reason:
        ``sync_refused`` (global heads this device refused) and ``sync_receipts_refused``
        (its deltas the server refused)."""
        out = {f"sync_{k}": v for k, v in self.counters.items()}
        out["sync_base_version"] = self.base_version
        out["sync_seq"] = self.seq
        out["sync_outbox"] = int(self.outbox is not None)
        out["sync_unreceipted"] = len(self.ledger)
        out["sync_step_cap"] = self.step_cap
        out["sync_want_head"] = int(self.courier.want)
        out["sync_server_latest_version"] = self.server_latest
        out["sync_server_stored_seq"] = self.server_stored_seq
        out["sync_epoch"] = epoch_number(self.epoch)
        out["sync_refused"] = dict(self.refused)
        out["sync_receipts_refused"] = dict(self.receipts_refused)
        return out


def epoch_number(epoch: str) -> int:
    """The store epoch as a number for a gauge (its first 8 hex digits; 0 when unknown).

    >>> epoch_number("9f3a00c1d2"), epoch_number(""), epoch_number("not-hex")
    (2671378625, 0, 0)
    """
    try:
        return int(epoch[:8], 16) if epoch else 0
    except ValueError:
        return 0
