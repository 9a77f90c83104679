"""Who may teach the device: signed labels and per-labeller rate limits. Pure (the clock is handed in).

Anyone who can publish on the broker could otherwise retrain the device with wrong
labels. With ``[labels] keys_dir`` set, a label is accepted only inside a signed
envelope::

    {"by": "<labeller>", "msg": "<the label message, a JSON string>", "sig": "<hex HMAC-SHA256>"}

where ``sig = HMAC-SHA256(key of <labeller>, UTF-8 bytes of msg)``. Signing the exact
bytes of ``msg`` (not a re-serialised object) makes it easy to get right in any
language. Refusals are counted by kind: ``unsigned_label``, ``unknown_labeller``,
``bad_signature``, ``label_replay`` (the same signature seen again, or a label whose
``t`` is older than ``max_age_s``), ``label_rate`` (over the labeller's rate limit).
Without keys, labels pass unsigned and the rate limit applies per label topic.

>>> key = b"k" * 32
>>> gate = LabelGate(keys={"op1": key})
>>> inner, by = gate.open(sign_label(key, "op1", {"t": 5.0, "label": "normal"}), topic="edge/n/labels", now=5.0)
>>> by, inner
('op1', b'{"t":5.0,"label":"normal"}')
>>> gate.open(b'{"t": 5.0, "label": "normal"}', topic="edge/n/labels", now=5.0)
Traceback (most recent call last):
...
edge.errors.DecodeError: label is not signed: expected {"by", "msg", "sig"} (labels keys_dir is set)
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import stat
from collections import OrderedDict
from pathlib import Path

import orjson

from edge.errors import ConfigError, DecodeError, brief
from edge.ingest.names import is_valid_name

log = logging.getLogger("edge.labels")
_SEEN_MAX = 100_000
_BUCKETS_MAX = 10_000


def sign_label(key: bytes, by: str, label: dict) -> bytes:
    """The signed envelope of ``label`` from labeller ``by`` (for labelling tools, the demo, tests)."""
    msg = orjson.dumps(label).decode()
    sig = hmac.new(key, msg.encode(), hashlib.sha256).hexdigest()
    return orjson.dumps({"by": by, "msg": msg, "sig": sig})


class LabelGate:
    """Opens signed envelopes and enforces rate limits; ``open`` returns (label bytes, labeller)."""

    def __init__(self, *, keys: dict[str, bytes] | None = None, max_per_s: float = 0.0, burst: int = 100,
                 max_age_s: float = 600.0):
        self.keys = keys
        self.max_per_s, self.burst, self.max_age_s = max_per_s, burst, max_age_s
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()  # who -> [tokens, last time]

    def open(self, payload: bytes, *, topic: str, now: float) -> tuple[bytes, str]:
        """The label message inside ``payload`` and who sent it; ``DecodeError`` when refused."""
        if self.keys is None:
            self._limit(topic, now)
            return payload, ""
        try:
            env = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise DecodeError("unsigned_label", "label is not a signed envelope (invalid JSON)") from None
        if type(env) is not dict or not all(type(env.get(k)) is str for k in ("by", "msg", "sig")):
            raise DecodeError("unsigned_label", 'label is not signed: expected {"by", "msg", "sig"} (labels keys_dir is set)')
        by, msg, sig = env["by"], env["msg"], env["sig"]
        key = self.keys.get(by)
        if key is None:
            raise DecodeError("unknown_labeller", f"labeller {brief(by, 40)} has no key in keys_dir")
        raw = msg.encode("utf-8", "surrogatepass")
        good = hmac.new(key, raw, hashlib.sha256).hexdigest()
        if len(sig) != 64 or not sig.isascii() or not hmac.compare_digest(good, sig.lower()):
            raise DecodeError("bad_signature", f"label signature from {brief(by, 40)} does not verify")
        if sig in self._seen:
            raise DecodeError("label_replay", f"label from {brief(by, 40)} was already accepted once (replayed)")
        inner = raw
        try:
            t = orjson.loads(inner).get("t", now)
        except (orjson.JSONDecodeError, AttributeError):
            t = now  # the label decoder says what is wrong with it
        if type(t) in (int, float):
            try:
                age = now - float(t)
            except OverflowError:  # an int beyond a float: the label decoder would refuse it too
                raise DecodeError("bad_label", f"signed label from {brief(by, 40)} has an absurd time") from None
            if age > self.max_age_s:
                raise DecodeError("label_replay", f"signed label from {brief(by, 40)} is {age:.4g} s old "
                                                  f"(labels max_age_s = {self.max_age_s:g})")
        self._limit(by, now)
        self._seen[sig] = None
        if len(self._seen) > _SEEN_MAX:
            self._seen.popitem(last=False)
        return inner, by

    def _limit(self, who: str, now: float) -> None:
        if not self.max_per_s:
            return
        b = self._buckets.get(who)
        if b is None:
            b = self._buckets[who] = [float(self.burst), now]
            if len(self._buckets) > _BUCKETS_MAX:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(who)
        tokens = min(float(self.burst), b[0] + max(0.0, now - b[1]) * self.max_per_s)
        b[1] = now
        if tokens < 1.0:
            b[0] = tokens
            raise DecodeError("label_rate", f"labels from {brief(who, 60)} exceed labels max_per_s = {self.max_per_s:g}")
        b[0] = tokens - 1.0


def load_label_keys(folder: str | Path) -> dict[str, bytes]:
    """``{labeller: key}`` from ``<labeller>.key`` files; warns about files others can read."""
    d = Path(folder).expanduser()
    if not d.is_dir():
        raise ConfigError(f"[labels] keys_dir = {str(d)!r} is invalid: no such folder")
    keys: dict[str, bytes] = {}
    for p in sorted(d.glob("*.key")):
        name = p.stem
        if not is_valid_name(name):
            raise ConfigError(f"[labels] keys_dir: {p.name} is not a valid labeller name (1-64 of A-Z a-z 0-9 _ . : -)")
        mode = stat.S_IMODE(p.stat().st_mode)
        if mode & 0o077:
            log.warning("labeller key %s is readable by group or others (mode %o); chmod 600 it", p, mode)
        key = p.read_bytes().strip()
        if len(key) < 16:
            raise ConfigError(f"[labels] keys_dir: {p.name} holds {len(key)} bytes; a key needs at least 16")
        keys[name] = key
    if not keys:
        raise ConfigError(f"[labels] keys_dir = {str(d)!r} has no <labeller>.key file: every label would be refused")
    return keys


def create_label_key(folder: str | Path, name: str) -> Path:
    """Write a new random key for labeller ``name`` (0600 in a 0700 folder); refuses to overwrite."""
    import os
    import secrets

    if not is_valid_name(name):
        raise ConfigError(f"labeller name {brief(name, 40)} is not valid (1-64 of A-Z a-z 0-9 _ . : -)")
    d = Path(folder).expanduser()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    p = d / f"{name}.key"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return p
