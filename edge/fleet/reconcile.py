"""What a device does with the server's receipts: the pure core of delivery tracking.

A device keeps every delta it sent until the server's signed receipt for it comes
(``Ledger``: bounded, oldest first, checkpointed with the sync state). ``judge`` says
what one receipt means for the device, as an ``Outcome``:

- ``accepted``: the delta is the server's; it leaves the ledger.
- ``refused``: its step goes back into the pending residual (``put_back``), and its
  labels into the count of labels not yet sent, so nothing learned is lost: the next
  delta carries it again. Beside that, by reason:
  ``replayed_seq`` (the server holds that seq of this node with other content: a device
  that lost its state) moves the device's seq past the server's ``stored_seq``;
  ``future_base`` (the server's history is behind the device's base: a restored
  backup) asks for the server's latest head; ``norm_too_large`` caps the norm of the next
  steps at half the refused one's, so the residual goes through in smaller steps.
- Any receipt whose ``latest_version`` is above the device's base, or whose epoch differs
  from the last one seen, asks for the head (the device is stale, or the server's
  history was replaced).

A receipt for a delta the ledger does not hold (same seq and digest) is ``matched=False``:
only what it says about the server's state is used.

>>> r = Receipt(fleet="f", model="m", node="n1", seq=3, status="refused", reason="norm_too_large",
...             stored_seq=2, latest_version=5, epoch="ab", digest="d3")
>>> o = judge(r, entry=Sent(seq=3, digest="d3", base_version=5, norm=8.0, message=b""), base_version=5, epoch="ab")
>>> o.matched, o.put_back, o.step_cap, o.want_head
(True, True, 4.0, False)
>>> judge(r, entry=None, base_version=4, epoch="ab").want_head
True
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from edge.fleet.receipts import Receipt

MAX_UNRECEIPTED = 32  # deltas kept for their receipt; beyond, the oldest is taken as delivered (counted)


@dataclass(frozen=True)
class Sent:
    """One delta handed to the broker and not yet receipted: its signed bytes (the encoded
    step, decoded again only if it is refused), their sha256, the step's norm and the
    labels it counts (``samples``: they go back with the step if it is refused)."""

    seq: int
    digest: str
    base_version: int
    norm: float
    message: bytes
    samples: int = 0


@dataclass(frozen=True)
class Ledger:
    """The un-receipted deltas, oldest first, at most ``max_entries``.

    >>> led, out = Ledger(max_entries=2).added(Sent(1, "a", 0, 1.0, b"")); led, _ = led.added(Sent(2, "b", 0, 1.0, b""))
    >>> led, out = led.added(Sent(3, "c", 0, 1.0, b"")); [e.seq for e in led.entries], out.seq
    ([2, 3], 1)
    >>> led.find(2, "b").seq, led.find(2, "x"), [e.seq for e in led.without(2).entries]
    (2, None, [3])
    """

    entries: tuple = ()
    max_entries: int = MAX_UNRECEIPTED

    def added(self, e: Sent) -> tuple["Ledger", Sent | None]:
        """The ledger with ``e``, and the entry evicted to make room (or None)."""
        es = self.entries + (e,)
        if len(es) > self.max_entries:
            return replace(self, entries=es[1:]), es[0]
        return replace(self, entries=es), None

    def find(self, seq: int, digest: str) -> Sent | None:
        return next((e for e in self.entries if e.seq == seq and e.digest == digest), None)

    def without(self, seq: int) -> "Ledger":
        return replace(self, entries=tuple(e for e in self.entries if e.seq != seq))

    def __len__(self) -> int:
        return len(self.entries)

    def state_dict(self) -> list:
        return [{"seq": e.seq, "digest": e.digest, "base_version": e.base_version, "norm": e.norm,
                 "samples": e.samples, "message": np.frombuffer(e.message, np.uint8)} for e in self.entries]

    @classmethod
    def from_state(cls, rows, max_entries: int = MAX_UNRECEIPTED) -> "Ledger":
        es = tuple(Sent(seq=int(r["seq"]), digest=str(r["digest"]), base_version=int(r["base_version"]),
                        norm=float(r["norm"]), message=bytes(np.asarray(r["message"], np.uint8)),
                        samples=int(r.get("samples", 0))) for r in rows or ())
        return cls(entries=es[-max_entries:], max_entries=max_entries)


@dataclass(frozen=True)
class Outcome:
    """What one receipt asks of the device (``judge``)."""

    matched: bool = False  # it answers a delta in the ledger (same seq and digest)
    put_back: bool = False  # refused: the step goes back into the pending residual
    seq_floor: int = 0  # the device's seq must be at least this (replayed_seq: the server's stored_seq)
    want_head: bool = False  # ask the server for its latest head
    step_cap: float | None = None  # norm_too_large: cap the next steps' norm at this
    new_epoch: bool = False  # the server's store epoch differs from the last one seen


def judge(r: Receipt, *, entry: Sent | None, base_version: int, epoch: str) -> Outcome:
    """The device's answer to receipt ``r`` (verified, addressed to it); ``entry`` is the
    ledger's delta with the receipt's seq and digest, if any; ``epoch`` the last one seen."""
    new_epoch = bool(epoch) and r.epoch != epoch
    want = new_epoch or r.latest_version > base_version
    if entry is None or r.accepted:
        return Outcome(matched=entry is not None, want_head=want, new_epoch=new_epoch,
                       seq_floor=r.stored_seq if entry is None and r.reason == "replayed_seq" else 0)
    floor = r.stored_seq if r.reason == "replayed_seq" else 0
    cap = entry.norm / 2 if r.reason == "norm_too_large" and entry.norm > 0 else None
    return Outcome(matched=True, put_back=True, seq_floor=floor, step_cap=cap, new_epoch=new_epoch,
                   want_head=want or r.reason == "future_base")
