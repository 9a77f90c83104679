"""Who may teach the device: signed labels bound to their target, a replay window, per-labeller rate limits. Pure (the clock is handed in).

Anyone who can publish on the broker could otherwise retrain the device with wrong
labels. With ``[labels] keys_dir`` set, a label is accepted only inside a signed
envelope::

    {"by": "<labeller>", "msg": "<the label message, a JSON string>", "sig": "<hex HMAC-SHA256>"}

where ``sig = HMAC-SHA256(key of <labeller>, UTF-8 bytes of msg)``. Signing the exact
bytes of ``msg`` (not a re-serialised object) makes it easy to get right in any
language. The signed message names where the label applies and when, so that a captured
label cannot be moved::

    {"node": "<node name>", "device": "<device or "">", "stream": "<stream or "">", "t": <seconds>, "label": ...}

``node`` must be this node's name; on a topic ``labels/<device>[/<stream>]`` the signed
``device`` and ``stream`` must be the topic's ("" for a level the topic does not have); on
the bare ``labels`` topic they narrow the label as in an unsigned one ("" = any). ``t`` is
required: a label is refused once it is ``max_age_s`` old, and remembered (by its
signature, in one canonical form: the lower-case hex of the 32 raw bytes) until then, in a
window that is checkpointed with the learner (``state_dict``), so a restart does not
reopen it.

Refusals are counted by kind: ``unsigned_label``, ``unknown_labeller``, ``bad_signature``
(also a signature that is not 64 hex digits), ``label_target`` (no node/device/stream, or
another node's, device's or stream's), ``label_time`` (no numeric ``t``, or ``t`` more
than ``max_age_s`` ahead), ``label_replay`` (the same signature seen again, ``t`` older
than ``max_age_s``, or older than every label the bounded window still remembers),
``label_rate`` (over the labeller's rate limit, one bucket per labeller whatever the
topic). Without keys, labels pass unsigned and one rate-limit bucket holds them all.

>>> key = b"k" * 32
>>> gate = LabelGate(keys={"op1": key}, node="n")
>>> env = sign_label(key, "op1", {"t": 5.0, "label": "normal"}, node="n")
>>> inner, by = gate.open(env, target=None, now=5.0)
>>> by, inner
('op1', b'{"node":"n","device":"","stream":"","t":5.0,"label":"normal"}')
>>> gate.open(env, target=None, now=6.0)
Traceback (most recent call last):
...
edge.errors.DecodeError: label from 'op1' was already accepted once (replayed)
>>> gate.open(b'{"t": 5.0, "label": "normal"}', target=None, now=5.0)
Traceback (most recent call last):
...
edge.errors.DecodeError: label is not signed: expected {"by", "msg", "sig"} (labels keys_dir is set)
"""
from __future__ import annotations

import hashlib
import heapq
import hmac
import logging
import math
import stat
import string
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import orjson

from edge.errors import ConfigError, DecodeError, brief
from edge.ingest.names import is_valid_name

log = logging.getLogger("edge.labels")
# the replay window remembers at most this many signatures (40 bytes each in the
# checkpoint): beyond it the oldest is forgotten and labels at or before its t are refused
WINDOW_MAX = 20_000
_BUCKETS_MAX = 10_000
_HEX = frozenset(string.hexdigits)


def sign_label(key: bytes, by: str, label: dict, *, node: str) -> bytes:
    """The signed envelope of ``label`` (which needs ``t``) from labeller ``by`` for node
    ``node``; its own ``device`` / ``stream`` name the target ("" when absent: any). For
    labelling tools, the demo and tests."""
    if "t" not in label:
        raise ValueError("a signed label needs its time t (seconds since the epoch)")
    msg = orjson.dumps({"node": node, "device": label.get("device", ""), "stream": label.get("stream", ""),
                        **label}).decode()
    sig = hmac.new(key, msg.encode(), hashlib.sha256).hexdigest()
    return orjson.dumps({"by": by, "msg": msg, "sig": sig})


class ReplayWindow:
    """The signatures of accepted labels with their ``t``, bounded: a label is new when its
    signature is not here and its ``t`` is above ``floor`` (the newest ``t`` forgotten).

    Forgetting (by age, or past ``max_size``) always raises the floor to the forgotten
    ``t``, so a forgotten label can never pass again, even if the clock steps back.

    >>> w = ReplayWindow(max_size=2)
    >>> [w.add(bytes([i]) * 32, t, now=10.0) for i, t in enumerate([1.0, 2.0, 3.0])]
    [None, None, None]
    >>> w.fresh(bytes([0]) * 32, 1.0), w.fresh(bytes([1]) * 32, 2.0), w.fresh(b"x" * 32, 0.5), w.fresh(b"x" * 32, 1.5)
    (False, False, False, True)
    """

    def __init__(self, *, max_size: int = WINDOW_MAX, max_age_s: float = math.inf):
        self.max_size, self.max_age_s = int(max_size), float(max_age_s)
        self.floor = -math.inf
        self._t: dict[bytes, float] = {}
        self._heap: list[tuple[float, bytes]] = []
        # the pipeline thread adds, the learner thread checkpoints
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._t)

    def fresh(self, sig: bytes, t: float) -> bool:
        """True when a label of signature ``sig`` at time ``t`` was not accepted before."""
        with self._lock:
            return t > self.floor and sig not in self._t

    def add(self, sig: bytes, t: float, *, now: float) -> None:
        """Remember ``sig``; forget what is older than ``max_age_s`` or beyond ``max_size``."""
        with self._lock:
            self._t[sig] = t
            heapq.heappush(self._heap, (t, sig))
            h = self._heap
            while h and (len(h) > self.max_size or h[0][0] < now - self.max_age_s):
                t0, s0 = heapq.heappop(h)
                del self._t[s0]
                self.floor = max(self.floor, t0)

    def raise_floor(self, t: float) -> None:
        """Refuse every label at or before ``t`` from now on."""
        with self._lock:
            self.floor = max(self.floor, float(t))

    def state_dict(self) -> dict:
        with self._lock:
            items = list(self._t.items())
            floor = self.floor
        return {"format": 1, "floor": floor,
                "sigs": np.frombuffer(b"".join(s for s, _ in items), np.uint8).reshape(len(items), 32),
                "t": np.array([t for _, t in items], np.float64)}

    def load_state_dict(self, s: dict) -> None:
        """Restore what ``state_dict`` saved (``ValueError`` when it does not fit; nothing changed)."""
        if not isinstance(s, dict) or s.get("format") != 1:
            raise ValueError("label replay window state is not format 1")
        sigs, ts = np.asarray(s["sigs"], np.uint8), np.asarray(s["t"], np.float64).reshape(-1)
        if sigs.ndim != 2 or sigs.shape[1] != 32 or len(sigs) != len(ts) or np.isnan(ts).any():
            raise ValueError(f"label replay window has signatures {sigs.shape} and times {ts.shape}")
        floor = float(s["floor"])
        pairs = sorted(zip(ts.tolist(), (bytes(r) for r in sigs)))
        if len(pairs) > self.max_size:  # a smaller bound than the saver's: forget the oldest
            floor = max(floor, pairs[-self.max_size - 1][0])
            pairs = pairs[-self.max_size:]
        with self._lock:
            self.floor = floor
            self._t = {sig: t for t, sig in pairs}
            self._heap = list(pairs)  # sorted is a heap


class LabelGate:
    """Opens signed envelopes, checks their target and time, refuses replays and enforces
    rate limits; ``open`` returns (label bytes, labeller). ``state_dict`` is the replay
    window (checkpoint it: ``AdaptWorker.attach_state``)."""

    def __init__(self, *, keys: dict[str, bytes] | None = None, node: str = "", max_per_s: float = 0.0,
                 burst: int = 100, max_age_s: float = 600.0, window_max: int = WINDOW_MAX):
        if keys is not None and not node:
            raise ConfigError("signed labels need the node's name: a label is accepted only for its own node")
        self.keys, self.node = keys, node
        self.max_per_s, self.burst, self.max_age_s = max_per_s, burst, max_age_s
        self.window = ReplayWindow(max_size=window_max, max_age_s=max_age_s)
        self._distrust_past = False  # set when a checkpointed window could not be restored
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()  # who -> [tokens, last time]
        # the labellers' time line: the newest accepted t and the steady time it came at, so
        # that a step of this node's clock after it does not make every label too old or early
        self._line: tuple[float, float] | None = None

    def open(self, payload: bytes, *, target=None, now: float, steady: float | None = None) -> tuple[bytes, str]:
        """The label message inside ``payload`` and who sent it; ``DecodeError`` when refused.
        ``target`` is the (device, stream) the topic names, or None for the bare labels topic.
        ``now`` is this node's time (the pipeline's clock), ``steady`` the monotonic time (default
        ``now``): a label's age is judged by ``now`` or by the labellers' time line, the newest
        accepted ``t`` advanced by the steady clock since (docs/TIME_AND_NAMES.md)."""
        steady = now if steady is None else steady
        if self.keys is None:
            self._limit("(unsigned)", steady)  # one bucket: a new topic is no new budget
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
        who = brief(by, 40)
        if len(sig) != 64 or not _HEX.issuperset(sig):
            raise DecodeError("bad_signature", f"label signature from {who} is not 64 hex digits")
        raw_sig = bytes.fromhex(sig)  # the one canonical form: any spelling of it is the same label
        raw = msg.encode("utf-8", "surrogatepass")
        if not hmac.compare_digest(hmac.new(key, raw, hashlib.sha256).digest(), raw_sig):
            raise DecodeError("bad_signature", f"label signature from {who} does not verify")
        t, ref = self._check_target_and_time(raw, who, target, now, steady)
        if self._distrust_past:  # the window before the restart is unknown: nothing before it passes
            self.window.raise_floor(now - 1e-6)
            self._distrust_past = False
        if not self.window.fresh(raw_sig, t):
            if t <= self.window.floor:
                raise DecodeError("label_replay", f"signed label from {who} at t={t:.6g} is older than every label "
                                                  "the replay window still remembers")
            raise DecodeError("label_replay", f"label from {who} was already accepted once (replayed)")
        self._limit(by, steady)
        self.window.add(raw_sig, t, now=ref)
        line = self._line
        if line is None or t > line[0] + (steady - line[1]):
            self._line = (t, steady)
        return raw, by

    def _check_target_and_time(self, raw: bytes, who: str, target, now: float, steady: float) -> tuple[float, float]:
        """The signed label's ``t``, once its node, device and stream are this topic's, and the
        clock it was judged by (``now``, or the labellers' time line where ``now`` does not fit)."""
        try:
            d = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise DecodeError("bad_label", f"signed label from {who} is not valid JSON") from None
        if type(d) is not dict:
            raise DecodeError("bad_label", f"signed label from {who} is not a JSON object")
        node, dev, stm = d.get("node"), d.get("device"), d.get("stream")
        if type(node) is not str or type(dev) is not str or type(stm) is not str:
            raise DecodeError("label_target", f"signed label from {who} does not name its node, device and stream")
        if node != self.node:
            raise DecodeError("label_target", f"signed label from {who} is for node {brief(node, 64)}, not {self.node}")
        if target is not None and (dev, stm) != (target[0], target[1]):
            raise DecodeError("label_target", f"signed label from {who} is for {brief(dev, 64)}/{brief(stm, 64)}, "
                                              f"not this topic's {target[0]}/{target[1]}")
        t = d.get("t")
        if type(t) not in (int, float):
            raise DecodeError("label_time", f"signed label from {who} has no numeric t (a signed label needs its time)")
        try:
            t = float(t)
        except OverflowError:  # an int beyond a float
            raise DecodeError("label_time", f"signed label from {who} has an absurd time") from None
        if not math.isfinite(t):
            raise DecodeError("label_time", f"signed label from {who} has an absurd time")
        refs = [now] if self._line is None else [now, self._line[0] + (steady - self._line[1])]
        a = self.max_age_s
        for ref in refs:
            if -a <= ref - t <= a:
                return t, ref
        age = min(ref - t for ref in refs)
        if age < -a:
            raise DecodeError("label_time", f"signed label from {who} has t {-age:.4g} s ahead of this clock "
                                            f"(labels max_age_s = {self.max_age_s:g})")
        age = max(ref - t for ref in refs)
        raise DecodeError("label_replay", f"signed label from {who} is {age:.4g} s old "
                                          f"(labels max_age_s = {self.max_age_s:g})")

    def state_dict(self) -> dict:
        """The replay window: checkpointed, so that a restart does not accept old labels again."""
        return self.window.state_dict()

    def load_state_dict(self, s: dict) -> None:
        """Restore the replay window; one that does not fit is not applied (logged), and then
        no label signed for a time before the first one that comes after the restart passes."""
        try:
            self.window.load_state_dict(s)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            log.warning("the checkpoint's label replay window was not restored (%s: %s); signed labels "
                        "from before this start will be refused", type(e).__name__, str(e)[:200])
            self._distrust_past = True

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
    """Write a new random key for labeller ``name`` (0600 in a 0700 folder); refuses to
    overwrite one (``ConfigError``: exit code 2, one line), as ``edge keys create`` does."""
    import os
    import secrets

    if not is_valid_name(name):
        raise ConfigError(f"labeller name {brief(name, 40)} is not valid (1-64 of A-Z a-z 0-9 _ . : -)")
    d = Path(folder).expanduser()
    p = d / f"{name}.key"
    try:
        from edge.state import private_dir  # the one helper for private folders

        private_dir(d)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"a key for labeller {name!r} already exists in {d}; not overwriting it "
                          "(delete it first to replace it: labels it signed will then be refused)") from None
    except OSError as e:
        raise ConfigError(f"cannot write the key of labeller {name!r} in {d}: {e.strerror or e}") from None
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return p
