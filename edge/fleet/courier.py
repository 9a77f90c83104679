"""The device's ``sync`` thread: what fleet sync says on the broker, and how it knows it was taken.

``Courier`` is the I/O shell beside ``SyncClient`` (which owns the state and does the
learner-thread work). Each round (at most a second apart, or when woken) it:

- publishes the outbox at QoS 1 and follows it to the broker's PUBACK (``Delivery``): a
  success code hands it over (the outbox clears and a checkpoint is offered); a failure
  code (MQTT 5, e.g. 0x87 Not authorized) means not delivered: counted
  (``publish_refused``), logged with the code, kept, and retried after 1 s doubling to
  60 s. No answer within ``max(5 s, interval_s)`` sends it again (same bytes and seq);
- asks for the server's latest head on ``.../request/<node>`` while one is wanted, 2 s
  doubling to 30 s apart, until a verified head arrives after the broker acknowledged the
  request (the retained copy comes on subscribe, before the request is handled, so it is
  not taken as the answer);
- sends again, the same bytes, a delta of the ledger whose receipt did not come within
  ``max(10 s, 3 x interval_s)`` (doubling to 10 min): the server stores an identical
  resend once and receipts it, so a receipt lost with a crash does not keep it forever;
- every ``interval_s`` (or on ``sync_now``) asks the learner thread to prepare a delta.

While the connection is down nothing is published: paho would only queue more copies.
"""
from __future__ import annotations

import json
import logging
import threading
import time

log = logging.getLogger("edge.fleet")
_RETRY_MIN_S, _RETRY_MAX_S = 1.0, 60.0  # backoff after the broker refused the outbox
_ASK_MIN_S, _ASK_MAX_S = 2.0, 30.0  # between head requests while one is wanted
_RESEND_MAX_S = 600.0  # longest wait between resends of a delta whose receipt did not come


class Courier:
    """The ``sync`` thread of one ``SyncClient`` (``client``)."""

    def __init__(self, client):
        self.c = client
        self.want = False  # a head request is wanted
        self._asked = None  # the Delivery of the last request
        self._ask_at, self._ask_s = 0.0, _ASK_MIN_S
        self._head_at = 0.0  # when the last verified head arrived (time.monotonic)
        self._inflight = None  # (seq, Delivery, sent_at) of the outbox
        self._retry_at, self._retry_s = 0.0, _RETRY_MIN_S
        self._resend: dict[int, tuple[float, float]] = {}  # ledger seq -> (next resend at, wait)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._due = threading.Event()
        self.thread = threading.Thread(target=self._run, name="sync", daemon=True)

    # ---- from any thread --------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self.thread.ident is not None:
            self.thread.join(10)

    def wake(self) -> None:
        self._wake.set()

    def sync_now(self) -> None:
        self._due.set()
        self._wake.set()

    def want_head(self, why: str) -> None:
        if not self.want:
            self.want, self._ask_at, self._ask_s = True, 0.0, _ASK_MIN_S
            log.info("fleet: asking the server for its latest head (%s)", why)
        self._wake.set()

    def head_seen(self) -> None:
        """A verified global head arrived (newer, or the version the device has)."""
        self._head_at = time.monotonic()

    # ---- the sync thread --------------------------------------------------------------------
    def _run(self) -> None:
        c = self.c
        next_at = time.monotonic() + c.interval_s
        while not self._stop.is_set():
            self._wake.wait(max(0.0, min(1.0, next_at - time.monotonic())))
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.round()
                if self._due.is_set() or time.monotonic() >= next_at:
                    self._due.clear()
                    next_at = time.monotonic() + c.interval_s
                    if c.outbox is None:
                        c.worker.offer_call(c.prepare_delta)
            except Exception as e:  # one failed round must not end syncing
                c.counters["errors"] += 1
                c._rl.warn("sync", "fleet sync round failed: %s", str(e)[:200])

    def round(self) -> None:
        """One round's publishing: head request, outbox, one overdue resend."""
        self._ask()
        self._send_outbox()
        self._resend_unreceipted()

    def _online(self) -> bool:
        return self.c.connected is None or self.c.connected()

    def _send_outbox(self) -> None:
        c = self.c
        ob = c.outbox
        if ob is None:
            return
        now = time.monotonic()
        info = self._inflight
        if info is not None and info[0] == ob[0]:
            d = info[1]
            if d.done and d.ok:
                self._handed_over(ob)
                return
            if d.done:  # the broker answered with a failure code: not delivered
                self._inflight = None
                c.counters["publish_refused"] += 1
                self._retry_at, self._retry_s = now + self._retry_s, min(_RETRY_MAX_S, self._retry_s * 2)
                c._rl.warn("puback", "the broker refused delta seq %d (reason 0x%02X %s): kept, retrying in %.0f s",
                           ob[0], d.code, d.reason, self._retry_at - now)
                return
            if now - info[2] < max(5.0, c.interval_s):
                return
        if now < self._retry_at or not self._online():
            return  # offline: paho would only queue another copy; the outbox waits (and keeps its seq)
        d = c.publish_fn(c.delta_topic, ob[1], qos=1)
        if d is not None and hasattr(d, "done"):
            self._inflight = (ob[0], d, now)
            c.counters["published"] += 1
        else:
            c.counters["publish_failed"] += 1

    def _handed_over(self, ob) -> None:
        c = self.c
        with c._lock:
            if c.outbox is ob:
                c.outbox = None  # the broker has it at QoS 1; the receipt says what the server did
        self._inflight = None
        self._retry_s = _RETRY_MIN_S
        c.counters["acked"] += 1
        c._emit("sync", seq=ob[0], base_version=c.base_version, bytes=len(ob[1]))
        c.worker.offer_call(c._checkpoint)

    def _ask(self) -> None:
        if not self.want:
            return
        a = self._asked
        if a is not None and a.done and a.ok and self._head_at >= a.acked_at:
            self.want, self._asked = False, None  # answered
            return
        now = time.monotonic()
        if now < self._ask_at or not self._online():
            return
        c = self.c
        body = json.dumps({"node": c.node, "base_version": c.base_version}).encode()
        d = c.publish_fn(c.request_topic, body, qos=1)
        self._asked = d if hasattr(d, "done") else None
        self._ask_at, self._ask_s = now + self._ask_s, min(_ASK_MAX_S, self._ask_s * 2)
        c.counters["requests"] += 1

    def _resend_unreceipted(self) -> None:
        c = self.c
        entries = c.ledger.entries  # an immutable snapshot: the learner thread replaces it whole
        live = {e.seq for e in entries}
        for seq in [q for q in self._resend if q not in live]:
            del self._resend[seq]
        ob = c.outbox
        now = time.monotonic()
        first = max(10.0, 3 * c.interval_s)
        for e in entries:
            if ob is not None and e.seq == ob[0]:
                continue  # the outbox has its own resends
            at, wait = self._resend.setdefault(e.seq, (now + first, first))
            if now >= at and self._online():
                c.publish_fn(c.delta_topic, e.message, qos=1)
                self._resend[e.seq] = (now + wait * 2, min(_RESEND_MAX_S, wait * 2))
                c.counters["resent_unreceipted"] += 1
                return  # one a round
