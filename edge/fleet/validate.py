"""Checks on a received delta or global head, each failure with one exact reason.

Pure: the caller hands in the bytes, what it expects (``Expected``), the trusted keys
and, for deltas, a ``seen(node, seq)`` lookup; the answer is a ``Verdict``. The order of
the checks is fixed (FORMAT.md "Validation") so a reason is reproducible: structure,
kind, key, signature, then what the signed content says.

Reasons: ``truncated``, ``garbage``, ``bad_header``, ``wrong_kind``, ``node_mismatch``,
``unknown_key``, ``bad_signature``, ``wrong_fleet``, ``wrong_model``,
``wrong_model_hash``, ``wrong_head_kind``, ``wrong_shapes``, ``non_finite``,
``norm_too_large``, ``replayed_seq``, ``future_base`` (a delta on a version the server
never made), ``not_newer`` (a global head that does not move the version forward).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from edge.errors import DecodeError
from edge.fleet.codec import Message, unpack_message, verify_signature
from edge.fleet.feedback import l2_norm

REASONS = ("truncated", "garbage", "bad_header", "wrong_kind", "node_mismatch", "unknown_key", "bad_signature",
           "wrong_fleet", "wrong_model", "wrong_model_hash", "wrong_head_kind", "wrong_shapes", "non_finite",
           "norm_too_large", "replayed_seq", "future_base", "not_newer")


@dataclass(frozen=True)
class Expected:
    """What a valid message must match: the fleet, the model and its head's arrays' shapes."""

    fleet: str
    model: str
    model_hash: str
    head_kind: str
    shapes: Mapping[str, tuple] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = ""
    message: Message | None = None
    norm: float = 0.0
    detail: str = ""


def _reject(reason: str, detail: str = "", message: Message | None = None) -> Verdict:
    return Verdict(ok=False, reason=reason, message=message, detail=detail[:200])


def _content(msg: Message, exp: Expected) -> Verdict | None:
    h = msg.header
    for reason, got, want in (("wrong_fleet", h.fleet, exp.fleet), ("wrong_model", h.model, exp.model),
                              ("wrong_model_hash", h.model_hash, exp.model_hash),
                              ("wrong_head_kind", h.head_kind, exp.head_kind)):
        if got != want:
            return _reject(reason, f"{got[:64]!r} is not {want!r}", msg)
    got_shapes = {k: tuple(v.shape) for k, v in msg.tensors.items()}
    if got_shapes != {k: tuple(v) for k, v in exp.shapes.items()}:
        return _reject("wrong_shapes", f"arrays {sorted(got_shapes.items())[:8]}", msg)
    if not all(np.isfinite(v).all() for v in msg.tensors.values()):
        return _reject("non_finite", "a value is NaN or infinite", msg)
    return None


def check_delta(data: bytes, *, expected: Expected, keys: Mapping[str, object], max_norm: float,
                current_version: int, seen: Callable[[str, int], bool], topic_node: str | None = None) -> Verdict:
    """Validate a device's delta; ``keys`` maps a node name to its Ed25519 public key.

    ``seen(node, seq)`` says whether that sequence number of that node was already
    accepted (a resend after a lost acknowledgement is one: it is refused, never counted
    twice). ``topic_node`` is the last level of the topic it came on, when known.
    """
    try:
        msg = unpack_message(data)
    except DecodeError as e:
        return _reject(e.kind, str(e))
    h = msg.header
    if h.kind != "delta":
        return _reject("wrong_kind", f"a {h.kind} message on the delta path", msg)
    if topic_node is not None and topic_node != h.node:
        return _reject("node_mismatch", f"topic node {topic_node[:64]!r}, header node {h.node[:64]!r}", msg)
    key = keys.get(h.node)
    if key is None:
        return _reject("unknown_key", f"no trusted key for node {h.node[:64]!r}", msg)
    if not verify_signature(msg, key):
        return _reject("bad_signature", f"signature does not verify with {h.node[:64]!r}'s key", msg)
    bad = _content(msg, expected)
    if bad is not None:
        return bad
    norm = l2_norm(msg.tensors)
    if norm > max_norm:
        return Verdict(ok=False, reason="norm_too_large", message=msg, norm=norm, detail=f"norm {norm:.4g} > {max_norm:g}")
    if h.base_version > current_version:
        return _reject("future_base", f"base version {h.base_version} > current {current_version}", msg)
    if seen(h.node, h.seq):
        return _reject("replayed_seq", f"seq {h.seq} of {h.node[:64]!r} was already accepted", msg)
    return Verdict(ok=True, message=msg, norm=norm)


def check_global(data: bytes, *, expected: Expected, server_keys: list, current_version: int) -> Verdict:
    """Validate a global head for a device: a trusted server's signature, its model, its
    shapes, finite values and a version above ``current_version``."""
    try:
        msg = unpack_message(data)
    except DecodeError as e:
        return _reject(e.kind, str(e))
    if msg.header.kind != "global":
        return _reject("wrong_kind", f"a {msg.header.kind} message on the global topic", msg)
    if not server_keys:
        return _reject("unknown_key", "no server key is trusted", msg)
    if not any(verify_signature(msg, k) for k in server_keys):
        return _reject("bad_signature", "not signed by a trusted server key", msg)
    bad = _content(msg, expected)
    if bad is not None:
        return bad
    if msg.header.version <= current_version:
        return _reject("not_newer", f"version {msg.header.version} is not above {current_version}", msg)
    return Verdict(ok=True, message=msg)
