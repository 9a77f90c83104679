"""The fleet server's core: validate deltas, store them, commit new global versions.

No sockets or threads: ``ingest`` takes received ``(topic, payload)`` pairs and returns
their verdicts; ``maybe_commit`` applies the buffered deltas when FedBuff's rule says so
(``k`` waiting or the oldest ``t_s`` old) in one store transaction. The MQTT shell is
``edge.fleet.server``; ``edge bench fleet`` drives this class directly to measure the
server's throughput.
"""
from __future__ import annotations

import collections
import logging
from collections import OrderedDict
import time
from typing import Callable, Mapping

from edge.fleet.aggregate import Aggregate, Bounds, Contribution, Reference, aggregate, apply_delta, should_apply
from edge.fleet.codec import Header, encode_tensor, pack_message, unpack_message
from edge.fleet.store import DeltaRecord, Store, VersionRecord
from edge.fleet.validate import Expected, Verdict, check_delta
from edge.observe import RateLimitedLog

log = logging.getLogger("edge.fleet")
UNKNOWN_NODE = "(unknown)"  # rejections from nodes without a trusted key share one row: bounded


class Aggregator:
    """Validation, storage and FedBuff aggregation for one fleet and model."""

    def __init__(self, *, store: Store, expected: Expected, key, trusted: Callable[[], Mapping[str, object]],
                 name: str = "fleet-server", k: int = 10, t_s: float = 30.0, rule: str = "clip", clip_norm: float = 0.0,
                 trim: float = 0.2, max_norm: float = 100.0, staleness_exponent: float = 0.5, server_lr: float = 1.0,
                 commit_pause_s: float = 0.0, initial: dict | None = None, clock=time.time,
                 max_samples: int = 10_000, samples_ratio: float = 2.0, reference_growth: float = 1.25):
        self.store, self.expected, self.key, self.name = store, expected, key, name
        self._trusted_fn = trusted
        self.trusted = dict(trusted())
        self._trusted_at = clock()
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

    def pack_global(self, arrays: dict, *, version: int, parent: int, n: int) -> bytes:
        e = self.expected
        h = Header(kind="global", fleet=e.fleet, model=e.model, model_hash=e.model_hash, head_kind=e.head_kind,
                   node=self.name, base_version=parent, version=version, samples=n, encoding="fp32")
        return pack_message(h, {k: encode_tensor(v, "fp32") for k, v in arrays.items()}, self.key)

    def _keys(self) -> Mapping[str, object]:
        return self.trusted

    def _reload_keys(self) -> None:
        now = self.clock()
        if now - self._trusted_at >= 5.0:  # a new device's key appears without a restart, at most every 5 s
            self._trusted_at = now
            try:
                self.trusted = dict(self._trusted_fn())
            except Exception as e:  # an unreadable folder must not stop validation
                self._rl.warn("keys", "cannot reload device keys: %s", str(e)[:200])

    def ingest(self, items: list[tuple[str, bytes]]) -> list[Verdict]:
        """Validate and store a batch; returns a verdict per item (a stored resend becomes
        ``replayed_seq``)."""
        latest = self.store.latest()
        if latest is not None:
            self.current = latest.version
        verdicts, accepted, rejections = [], [], []
        for topic, payload in items:
            node = topic.rsplit("/", 1)[-1] if topic else None
            v = check_delta(payload, expected=self.expected, keys=self.trusted, max_norm=self.max_norm,
                            current_version=self.current, seen=lambda n, s: False, topic_node=node)
            if v.reason == "unknown_key":
                self._reload_keys()
                v = check_delta(payload, expected=self.expected, keys=self.trusted, max_norm=self.max_norm,
                                current_version=self.current, seen=lambda n, s: False, topic_node=node)
            verdicts.append(v)
            if v.ok:
                self._remember(v.message.digest, v.message.tensors)
                h = v.message.header
                accepted.append((len(verdicts) - 1, DeltaRecord(node=h.node, seq=h.seq, base_version=h.base_version,
                                                                samples=h.samples, norm=v.norm, digest=v.message.digest,
                                                                message=payload, received=self.clock())))
            else:
                who = node if node in self.trusted else UNKNOWN_NODE
                rejections.append((who, v.reason))
                self.rejected[v.reason] += 1
                self._rl.warn(v.reason, "delta rejected (%s) from %s: %s", v.reason, who, v.detail)
        if accepted:
            stored = self.store.add_deltas([r for _, r in accepted])
            for (i, _), ok in zip(accepted, stored):
                if ok:
                    self.counters["accepted"] += 1
                else:
                    verdicts[i] = Verdict(ok=False, reason="replayed_seq", message=verdicts[i].message,
                                          detail="this (node, seq) is already stored")
                    self.rejected["replayed_seq"] += 1
        self.store.count_rejections(rejections)
        return verdicts

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
        v = latest.version + 1
        e = self.expected
        h = Header(kind="global", fleet=e.fleet, model=e.model, model_hash=e.model_hash, head_kind=e.head_kind,
                   node=self.name, base_version=latest.version, version=v, samples=len(deltas), encoding="fp32",
                   metrics={"ref_norm": agg.reference.norm, "ref_samples": agg.reference.samples})
        msg = pack_message(h, {k: encode_tensor(a, "fp32") for k, a in new.items()}, self.key)
        stale = sum(c.staleness for c in contribs) / len(contribs)
        return msg, (f"{self.rule} of {len(deltas)} deltas from {agg.devices} devices, mean staleness {stale:.2f}, "
                     f"clip {agg.tau:.4g}, weight cap {agg.weight_cap:.4g}")
