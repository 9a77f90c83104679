"""Checks on a received delta or global head, each failure with one exact reason.

Pure: the caller hands in the bytes, what it expects (``Expected``), the trusted keys
and, for deltas, a ``seen(node, seq)`` lookup; the answer is a ``Verdict``. The order of
the checks is fixed (FORMAT.md "Validation") so a reason is reproducible, and it is
verify-first: the envelope (bounded), then the signature over the raw bytes with the
key trusted for the header's node (``edge.fleet.trust.authenticate``), and only then
what the signed content says, the tensors decoded last, against the expected shapes
before any array is allocated. ``Verdict.signer`` is the node whose key verified the
signature, or ``None``: a rejection is blamed on it and on nothing else.

Reasons: ``truncated``, ``garbage``, ``bad_header``, ``wrong_kind``, ``unknown_key``,
``bad_signature``, ``revoked``, ``node_mismatch``, ``wrong_fleet``, ``wrong_model``,
``wrong_model_hash``, ``wrong_head_kind``, ``wrong_shapes``, ``non_finite``,
``norm_too_large``, ``replayed_seq``, ``future_base`` (a delta on a version the server
never made), ``not_newer`` (a global head that does not move the version forward).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from edge.errors import DecodeError
from edge.fleet.codec import MAX_ELEMENTS, Envelope, Header, Message, decode_tensors, read_envelope, verify_signature
from edge.fleet.feedback import l2_norm
from edge.fleet.trust import TrustSnapshot, authenticate

REASONS = ("truncated", "garbage", "bad_header", "wrong_kind", "node_mismatch", "unknown_key", "bad_signature",
           "revoked", "wrong_fleet", "wrong_model", "wrong_model_hash", "wrong_head_kind", "wrong_shapes", "non_finite",
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
    """The answer for one message. ``signer``: the node whose trusted key verified its
    signature (``None`` before or without that): the only node a rejection may be counted
    against. ``envelope``: its header and digest, once its envelope parsed; ``message``:
    the decoded message, once its tensors were decoded."""

    ok: bool
    reason: str = ""
    message: Message | None = None
    norm: float = 0.0
    detail: str = ""
    signer: str | None = None
    envelope: Envelope | None = field(default=None, repr=False)

    @property
    def header(self) -> Header | None:
        """The message's header once its envelope parsed (also for a refusal before decoding)."""
        return self.envelope.header if self.envelope is not None else None

    @property
    def digest(self) -> str:
        """sha256 of the whole message (``Message.digest``) once its envelope parsed, else ""."""
        return self.envelope.digest if self.envelope is not None else ""


def _reject(reason: str, detail: str = "", message: Message | None = None, *, env: Envelope | None = None,
            signer: str | None = None, norm: float = 0.0) -> Verdict:
    return Verdict(ok=False, reason=reason, message=message, detail=detail[:200], signer=signer, envelope=env, norm=norm)


def _header_content(h: Header, exp: Expected) -> tuple[str, str] | None:
    for reason, got, want in (("wrong_fleet", h.fleet, exp.fleet), ("wrong_model", h.model, exp.model),
                              ("wrong_model_hash", h.model_hash, exp.model_hash),
                              ("wrong_head_kind", h.head_kind, exp.head_kind)):
        if got != want:
            return reason, f"{got[:64]!r} is not {want!r}"
    return None


def _decode(env: Envelope, exp: Expected) -> Message | tuple[str, str]:
    """The message with its tensors, decoded against the expected shapes (nothing else is
    allocated), or ``(reason, detail)``."""
    max_elements = min(MAX_ELEMENTS, sum(math.prod(s) for s in exp.shapes.values()))
    try:
        tensors = decode_tensors(env, shapes=exp.shapes, max_elements=max_elements)
    except DecodeError as e:
        return e.kind, str(e)
    if not all(np.isfinite(v).all() for v in tensors.values()):
        return "non_finite", "a value is NaN or infinite"
    return Message(header=env.header, tensors=tensors, key_id=env.key_id, signature=env.signature, signed=env.signed)


def _snapshot(keys) -> TrustSnapshot:
    return keys if isinstance(keys, TrustSnapshot) else TrustSnapshot.from_keys(keys)


def check_delta(data: bytes, *, expected: Expected, keys: TrustSnapshot | Mapping[str, object], max_norm: float,
                current_version: int, seen: Callable[[str, int], bool], topic_node: str | None = None) -> Verdict:
    """Validate a device's delta; ``keys`` is the registry's ``TrustSnapshot`` (or a plain
    ``{node: Ed25519 public key}``).

    ``seen(node, seq)`` says whether that sequence number of that node was already
    accepted (a resend after a lost acknowledgement is one: it is refused, never counted
    twice). ``topic_node`` is the last level of the topic it came on, when known; a
    mismatch is blamed on the signer, never on the topic's node.
    """
    try:
        env = read_envelope(data)
    except DecodeError as e:
        return _reject(e.kind, str(e))
    h = env.header
    if h.kind != "delta":
        return _reject("wrong_kind", f"a {h.kind} message on the delta path", env=env)
    auth = authenticate(env, _snapshot(keys))
    if not auth.ok:
        return _reject(auth.reason, auth.detail, env=env, signer=auth.signer)
    who = auth.signer
    if topic_node is not None and topic_node != h.node:
        return _reject("node_mismatch", f"topic node {topic_node[:64]!r}, header node {h.node[:64]!r}", env=env, signer=who)
    bad = _header_content(h, expected)
    if bad is not None:
        return _reject(*bad, env=env, signer=who)
    msg = _decode(env, expected)
    if not isinstance(msg, Message):
        return _reject(*msg, env=env, signer=who)
    norm = l2_norm(msg.tensors)
    if norm > max_norm:
        return _reject("norm_too_large", f"norm {norm:.4g} > {max_norm:g}", msg, env=env, signer=who, norm=norm)
    if h.base_version > current_version:
        return _reject("future_base", f"base version {h.base_version} > current {current_version}", msg, env=env, signer=who)
    if seen(h.node, h.seq):
        return _reject("replayed_seq", f"seq {h.seq} of {h.node[:64]!r} was already accepted", msg, env=env, signer=who)
    return Verdict(ok=True, message=msg, norm=norm, signer=who, envelope=env)


def check_global(data: bytes, *, expected: Expected, server_keys: list, current_version: int) -> Verdict:
    """Validate a global head for a device: a trusted server's signature (checked first,
    over the raw bytes), its model, a version above ``current_version``, then its shapes
    and finite values."""
    try:
        env = read_envelope(data)
    except DecodeError as e:
        return _reject(e.kind, str(e))
    h = env.header
    if h.kind != "global":
        return _reject("wrong_kind", f"a {h.kind} message on the global topic", env=env)
    if not server_keys:
        return _reject("unknown_key", "no server key is trusted", env=env)
    if not any(verify_signature(env, k) for k in server_keys):
        return _reject("bad_signature", "not signed by a trusted server key", env=env)
    who = h.node
    bad = _header_content(h, expected)
    if bad is not None:
        return _reject(*bad, env=env, signer=who)
    if h.version <= current_version:
        return _reject("not_newer", f"version {h.version} is not above {current_version}", env=env, signer=who)
    msg = _decode(env, expected)
    if not isinstance(msg, Message):
        return _reject(*msg, env=env, signer=who)
    return Verdict(ok=True, message=msg, signer=who, envelope=env)
