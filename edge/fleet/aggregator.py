"""The fleet server's core: validate deltas, store them, commit new global versions.

No sockets or threads: ``ingest`` takes received ``(topic, payload)`` pairs and returns
their verdicts; ``maybe_commit`` applies the buffered deltas when FedBuff's rule says so
(``k`` waiting or the oldest ``t_s`` old) in one store transaction. The MQTT shell is
``edge.fleet.server``; ``edge bench fleet`` drives this class directly to measure the
server's throughput.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
from collections import OrderedDict
import time
from typing import Callable, Mapping

from edge.fleet.aggregate import Aggregate, Bounds, Contribution, Reference, aggregate, apply_delta, should_apply
from edge.fleet.codec import Header, encode_tensor, pack_message, unpack_message
from edge.fleet.receipts import Receipt
from edge.fleet.store import REPLAYED, RESENT, STORED, DeltaRecord, Store, VersionRecord
from edge.fleet.trust import DeviceRegistry, TrustSnapshot
from edge.fleet.validate import Expected, Verdict, check_delta
from edge.observe import RateLimitedLog

log = logging.getLogger("edge.fleet")
UNKNOWN_NODE = "(unknown)"  # rejections no trusted key signed share one row: bounded, and blame nobody
# verdicts given before (or instead of) a signature check with the named node's key: no
# receipt, because nobody proved to be that node (blame by signature, not by topic or header)
UNVERIFIED = frozenset({"truncated", "garbage", "bad_header", "wrong_kind", "node_mismatch", "unknown_key",
                        "bad_signature", "revoked"})
MAX_CLAIMED_BASE = 1 << 53  # a base version above this is garbage, never a reason to renumber


def receipted_node(v: Verdict) -> str | None:
    """The node a verdict is answered to: the signer of a delta whose signature verified
    with that node's trusted key, else None (no receipt).

    >>> receipted_node(Verdict(ok=False, reason="bad_signature")) is None
    True
    >>> receipted_node(Verdict(ok=False, reason="node_mismatch", signer="n1")) is None  # replayed onto another topic
    True
    """
    if v.reason in UNVERIFIED or v.header is None:
        return None
    return v.signer or None


def receipt_for(v: Verdict, *, fleet: str, model: str, stored_seq: int, latest_version: int, epoch: str,
                issued: float) -> Receipt | None:
    """The receipt that answers a verdict (None for one that gets none: ``receipted_node``).
    An ok verdict (stored now, or an identical resend of a stored delta) is ``accepted``;
    any other is ``refused`` with its reason."""
    node = receipted_node(v)
    if node is None:
        return None
    return Receipt(fleet=fleet, model=model, node=node, seq=v.header.seq, status="accepted" if v.ok else "refused",
                   reason="" if v.ok else v.reason, stored_seq=stored_seq, latest_version=latest_version, epoch=epoch,
                   digest=v.digest, issued=issued)


class Aggregator:
    """Validation, storage and FedBuff aggregation for one fleet and model."""

    def __init__(self, *, store: Store, expected: Expected, key, registry: DeviceRegistry | None = None,
                 trusted: Callable[[], Mapping[str, object]] | None = None,
                 name: str = "fleet-server", k: int = 10, t_s: float = 30.0, rule: str = "clip", clip_norm: float = 0.0,
                 trim: float = 0.2, max_norm: float = 100.0, staleness_exponent: float = 0.5, server_lr: float = 1.0,
                 commit_pause_s: float = 0.0, initial: dict | None = None, clock=time.time,
                 max_samples: int = 10_000, samples_ratio: float = 1.0, reference_growth: float = 1.25):
        self.store, self.expected, self.key, self.name = store, expected, key, name
        # the one owner of which device keys count (edge.fleet.trust); ``trusted`` (fixed keys,
        # the benchmark's) is the same registry without a folder
        self.trust = registry if registry is not None else DeviceRegistry.from_keys(dict(trusted()) if trusted else {})
        self.k, self.t_s, self.rule, self.clip_norm, self.trim = k, t_s, rule, clip_norm, trim
        self.max_norm, self.staleness_exponent, self.server_lr = max_norm, staleness_exponent, server_lr
        self.commit_pause_s = commit_pause_s
        self.bounds = Bounds(max_samples=max_samples, samples_ratio=samples_ratio, growth=reference_growth,
                             clip_norm=clip_norm)
        self.last_aggregate: Aggregate | None = None  # what the last built version's aggregation saw (diagnostics)
        self.clock = clock
        self.counters = collections.Counter()
        self.rejected = collections.Counter()
        self._rl = RateLimitedLog(log)
        # tensors of deltas this instance validated, so its own commit need not decode them
        # again; bounded in bytes (oldest out), a miss decodes from the stored message
        self._decoded: OrderedDict[str, dict] = OrderedDict()
        self._decoded_bytes, self.decoded_max_bytes = 0, 64 << 20
        if initial is not None:
            self.store.ensure_version0(self.pack_global(initial, version=0, parent=0, n=0))
        latest = self.store.latest()
        self.current = latest.version if latest else 0

    def pack_global(self, arrays: dict, *, version: int, parent: int, n: int, metrics: dict | None = None) -> bytes:
        """A signed global head; ``metrics`` is what its header carries for the next
        aggregation (the fleet's reference norm and samples, ``_build``)."""
        e = self.expected
        h = Header(kind="global", fleet=e.fleet, model=e.model, model_hash=e.model_hash, head_kind=e.head_kind,
                   node=self.name, base_version=parent, version=version, samples=n, encoding="fp32",
                   metrics=dict(metrics or {}))
        return pack_message(h, {k: encode_tensor(v, "fp32") for k, v in arrays.items()}, self.key)

    @staticmethod
    def reference_metrics(message: bytes) -> dict:
        """The fleet's reference (``ref_norm``, ``ref_samples``) a stored version's header carries."""
        m = unpack_message(message).header.metrics
        return {k: float(m[k]) for k in ("ref_norm", "ref_samples") if isinstance(m.get(k), (int, float))}

    def _keys(self) -> TrustSnapshot:
        """The keys trusted now: the registry re-reads its folder (at most once a second) when
        anything in it changed, so added, removed, rotated and revoked keys count within ~1 s."""
        return self.trust.current()

    def ingest(self, items: list[tuple[str, bytes]]) -> list[Verdict]:
        """Validate and store a batch; returns a verdict per item (an identical resend of a
        stored delta stays ok; other content under a stored seq becomes ``replayed_seq``).
        A trusted device's delta on a version this store never made starts a new epoch
        (``start_epoch``). A store error propagates with nothing half-done that a retry of
        the same batch would not redo: storing is one transaction, and a resend is told apart."""
        latest = self.store.latest()
        if latest is not None:
            self.current = latest.version
        verdicts, accepted, rejections = [], [], []
        keys = self._keys()
        for topic, payload in items:
            node = topic.rsplit("/", 1)[-1] if topic else None
            v = check_delta(payload, expected=self.expected, keys=keys, max_norm=self.max_norm,
                            current_version=self.current, seen=lambda n, s: False, topic_node=node)
            verdicts.append(v)
            if v.ok:
                self._remember(v.message.digest, v.message.tensors)
                h = v.message.header
                accepted.append((len(verdicts) - 1, DeltaRecord(node=h.node, seq=h.seq, base_version=h.base_version,
                                                                samples=h.samples, norm=v.norm, digest=v.message.digest,
                                                                message=payload, received=self.clock())))
            else:
                who = v.signer or UNKNOWN_NODE  # blame by signature: the topic proves nothing
                rejections.append((who, v.reason))
                self.rejected[v.reason] += 1
                self._rl.warn(v.reason, "delta rejected (%s) from %s: %s", v.reason, who, v.detail)
        if accepted:
            stored = self.store.add_deltas([r for _, r in accepted])
            for (i, _), what in zip(accepted, stored):
                if what == STORED:
                    self.counters["accepted"] += 1
                elif what == RESENT:  # its earlier copy is stored: the device only missed the answer
                    self.counters["resent"] += 1
                elif what == REPLAYED:
                    verdicts[i] = dataclasses.replace(verdicts[i], ok=False, reason="replayed_seq",
                                                      detail="this (node, seq) is stored with other content")
                    self.rejected["replayed_seq"] += 1
        self._maybe_start_epoch(verdicts)
        self.store.count_rejections(rejections)
        return verdicts

    def _maybe_start_epoch(self, verdicts: list[Verdict]) -> None:
        # a trusted device holds a version this store never made: the store was restored from
        # an older backup. Renumber past its claim so devices take the next head as newer.
        claims = [v.header.base_version for v in verdicts
                  if v.reason == "future_base" and receipted_node(v) is not None]
        sane = [c for c in claims if c <= MAX_CLAIMED_BASE]
        if len(sane) < len(claims):
            self._rl.warn("future_base_garbage", "a delta claims base version above 2**53: refused, no new epoch")
        if not sane:
            return
        claim = max(sane)
        rec = self.store.start_epoch(claim, self._resign, f"new epoch: a device holds version {claim}, "
                                                           f"this store's latest was below it (restored from a backup?)")
        if rec is not None:
            self.current = rec.version
            self.counters["epochs"] += 1
            log.warning("new epoch %s: version %d re-signs version %d (a device claimed base %d)",
                        self.store.epoch(), rec.version, rec.parent, claim)

    def _resign(self, latest: VersionRecord, version: int) -> bytes:
        # the same head under a new number, with what its header carries for the next
        # aggregation (the fleet's reference norm and samples: the clip bound stays the fleet's)
        return self.pack_global(unpack_message(latest.message).tensors, version=version, parent=latest.version, n=0,
                                metrics=self.reference_metrics(latest.message))

    def receipts(self, verdicts: list[Verdict]) -> list[Receipt]:
        """One receipt per verdict of a signature-verified delta, in order: where the store
        stands after the batch (each node's stored seq, the latest version, the epoch)."""
        nodes = sorted({n for n in map(receipted_node, verdicts) if n is not None})
        if not nodes:
            return []
        seqs = self.store.stored_seqs(nodes)
        latest = self.store.latest()
        latest_v, epoch, now = latest.version if latest else 0, self.store.epoch(), self.clock()
        e = self.expected
        out = (receipt_for(v, fleet=e.fleet, model=e.model, stored_seq=seqs.get(receipted_node(v) or "", 0),
                           latest_version=latest_v, epoch=epoch, issued=now) for v in verdicts)
        return [r for r in out if r is not None]

    def _remember(self, digest: str, tensors: dict) -> None:
        if digest in self._decoded:
            return
        self._decoded[digest] = tensors
        self._decoded_bytes += sum(a.nbytes for a in tensors.values())
        while self._decoded_bytes > self.decoded_max_bytes and self._decoded:
            _, old = self._decoded.popitem(last=False)
            self._decoded_bytes -= sum(a.nbytes for a in old.values())

    def _tensors(self, d: DeltaRecord) -> dict:
        t = self._decoded.pop(d.digest, None)
        if t is None:
            return unpack_message(d.message).tensors  # stored by another instance, or evicted
        self._decoded_bytes -= sum(a.nbytes for a in t.values())
        return t

    def maybe_commit(self, *, force: bool = False) -> VersionRecord | None:
        """Commit a new version if the buffer is due (or ``force`` and not empty)."""
        p = self.store.pending()
        age = self.clock() - p.oldest if p.oldest is not None else 0.0
        if not (p.count and force) and not should_apply(p.count, age, k=self.k, t_s=self.t_s):
            return None
        rec = self.store.commit_version(self._build, pause_s=self.commit_pause_s)
        if rec is not None:
            self.current = rec.version
            self.counters["versions"] += 1
            self.counters["applied"] += rec.n_deltas
            log.info("global version %d from %d deltas (%s)", rec.version, rec.n_deltas, rec.note)
        return rec

    def _build(self, latest: VersionRecord, deltas: list[DeltaRecord]) -> tuple[bytes, str]:
        prev = unpack_message(latest.message)
        # the clip bound and the typical sample count come from the fleet's history, carried in
        # the signed header of each version, so no delta of this batch sets the bound it is held to
        m = prev.header.metrics
        ref = Reference(norm=float(m.get("ref_norm") or 0.0), samples=float(m.get("ref_samples") or 0.0))
        contribs = [Contribution(arrays=self._tensors(d), samples=d.samples, node=d.node,
                                 staleness=max(0, latest.version - d.base_version)) for d in deltas]
        agg = aggregate(contribs, rule=self.rule, reference=ref, bounds=self.bounds, trim=self.trim,
                        staleness_exponent=self.staleness_exponent)
        self.last_aggregate = agg
        new = apply_delta(prev.tensors, agg.delta, server_lr=self.server_lr)
        msg = self.pack_global(new, version=latest.version + 1, parent=latest.version, n=len(deltas),
                               metrics={"ref_norm": agg.reference.norm, "ref_samples": agg.reference.samples})
        stale = sum(c.staleness for c in contribs) / len(contribs)
        return msg, (f"{self.rule} of {len(deltas)} deltas from {agg.devices} devices, mean staleness {stale:.2f}, "
                     f"clip {agg.tau:.4g}, weight cap {agg.weight_cap:.4g}")
