"""The fleet message container: a header, tensors, a key id and an Ed25519 signature.

Pure: bytes in, records out (and back). One container carries both directions: a
device's delta (``kind = "delta"``) and the server's global head (``kind = "global"``).
The byte layout, every field and the test vectors are in ``edge/fleet/FORMAT.md``.

Tensors are encoded one by one as dense fp32, dense fp16, or sparse top-k with 8-bit
values (``topk8``). ``encode_tensor`` returns the bytes *and* the array the receiver
will decode from them, so that the sender can keep what was not sent as its residual
(error feedback, ``edge.fleet.feedback``).

Receiving is in two steps, so that nothing unsigned costs more than its header:
``read_envelope`` parses the bounded part (magic, format, kind, header, key id, signature
range), the caller checks the signature over the raw signed bytes (``verify_signature``),
and only then ``decode_tensors`` decodes the tensors, each claimed size checked against
the receiver's expected shapes before any array is allocated (``edge.fleet.validate``
does both in that order). Decoding never raises anything but ``DecodeError`` (its
``kind`` is the rejection reason): it is fuzzed with hypothesis, allocation included, in
``tests/test_fleet_codec.py`` and ``tests/test_fleet_trust.py``.

>>> import numpy as np
>>> from edge.fleet.keys import generate_key
>>> key = generate_key()
>>> h = Header(kind="delta", fleet="f", model="vibration", model_hash="ab", head_kind="linear",
...            node="n1", seq=1, base_version=0, samples=10, encoding="topk8")
>>> t = encode_tensor(np.array([0.5, -2.0, 0.0, 1.0], np.float32), "topk8", fraction=0.5)
>>> data = pack_message(h, {"bias": t}, key)
>>> msg = unpack_message(data)
>>> msg.header.node, [round(float(x), 1) for x in msg.tensors["bias"]]
('n1', [0.0, -2.0, 0.0, 1.0])
>>> verify_signature(msg, key.public_key())
True
"""
from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from edge.errors import DecodeError

MAGIC = b"EDFL"
FORMAT_VERSION = 1
KINDS = {"delta": 1, "global": 2}
ENCODINGS = {"fp32": 0, "fp16": 1, "topk8": 2}
MAX_HEADER = 4096
MAX_TENSORS = 64
MAX_NAME = 64
MAX_NDIM = 4
MAX_ELEMENTS = 1 << 24  # 16 M parameters in all tensors together: far beyond any head, bounds a forged size
SIG_LEN = 64
KEY_ID_LEN = 8

_PRE = struct.Struct("<4sBBH")  # magic, format, kind, header length
_TENSOR = struct.Struct("<BI")  # encoding, body length
_TOPK = struct.Struct("<If")  # k, scale
_NAMES = {v: k for k, v in ENCODINGS.items()}
_KIND_NAMES = {v: k for k, v in KINDS.items()}


class _Reader:
    """Reads a byte string front to back; running out raises ``DecodeError(short)``."""

    def __init__(self, data: bytes, *, short: str = "truncated"):
        self.data, self.pos, self.short = data, 0, short

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise DecodeError(self.short, f"ends at byte {len(self.data)}, needed {self.pos + n}")
        out = self.data[self.pos: self.pos + n]
        self.pos += n
        return out

    def unpack(self, st: struct.Struct):
        return st.unpack(self.take(st.size))

    def uvarint(self) -> int:
        v = 0
        for i in range(9):  # 9 x 7 bits hold every value below 2**63
            (b,) = self.unpack(_B)
            v |= (b & 0x7F) << (7 * i)
            if b < 0x80:
                if v >= 1 << 63:
                    break
                return v
        raise DecodeError(self.short, "a header integer is too long")


_B, _H, _F = struct.Struct("<B"), struct.Struct("<H"), struct.Struct("<f")


@dataclass(frozen=True)
class Header:
    """What a message is about; see FORMAT.md "Header" for each field."""

    kind: str
    fleet: str
    model: str
    model_hash: str
    head_kind: str
    node: str
    seq: int = 0
    base_version: int = 0
    version: int = 0
    samples: int = 0
    encoding: str = "fp32"
    metrics: dict = field(default_factory=dict)

    _STR = ("fleet", "model", "model_hash", "head_kind", "node")
    _INT = ("seq", "base_version", "version", "samples")

    def to_bytes(self) -> bytes:
        """The binary header (FORMAT.md "Header"); ``kind`` travels in the container's kind byte.

        >>> len(Header(kind="delta", fleet="f", model="m", model_hash="h", head_kind="linear", node="n").to_bytes())
        21
        """
        out = bytearray()
        for k in self._STR:
            b = getattr(self, k).encode("utf-8")
            if len(b) > 255:
                raise ValueError(f"header field {k} is longer than 255 bytes")
            out += bytes([len(b)]) + b
        out.append(ENCODINGS[self.encoding])
        for k in self._INT:
            v = int(getattr(self, k))
            if not 0 <= v < 1 << 63:
                raise ValueError(f"header field {k} = {v} is out of range")
            out += _uvarint(v)
        if len(self.metrics) > 32:
            raise ValueError("at most 32 metrics")
        out.append(len(self.metrics))
        for name, v in sorted(self.metrics.items()):
            b = str(name).encode("utf-8")[:255]
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            out += bytes([len(b)]) + b + struct.pack("<f", float(v) if ok else math.nan)
        return bytes(out)

    @classmethod
    def from_bytes(cls, raw: bytes, kind: str) -> "Header":
        """Parse ``to_bytes``; anything else raises ``DecodeError("bad_header")``."""
        r = _Reader(raw, short="bad_header")
        d: dict = {"kind": kind}
        try:
            for k in cls._STR:
                d[k] = r.take(r.unpack(_B)[0]).decode("utf-8")
            enc = r.unpack(_B)[0]
            if enc not in _NAMES:
                raise DecodeError("bad_header", f"unknown encoding {enc}")
            d["encoding"] = _NAMES[enc]
            for k in cls._INT:
                d[k] = r.uvarint()
            metrics = {}
            for _ in range(r.unpack(_B)[0]):
                name = r.take(r.unpack(_B)[0]).decode("utf-8")
                (v,) = r.unpack(_F)
                metrics[name] = None if math.isnan(v) else float(v)
            d["metrics"] = metrics
        except UnicodeDecodeError:
            raise DecodeError("bad_header", "a header string is not UTF-8") from None
        if r.pos != len(raw):
            raise DecodeError("bad_header", f"{len(raw) - r.pos} bytes left over after the header")
        return cls(**d)


def _uvarint(v: int) -> bytes:
    """LEB128 of one non-negative integer.

    >>> _uvarint(300).hex()
    'ac02'
    """
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


@dataclass(frozen=True)
class Message:
    """A decoded message. ``signed`` is the byte range the signature covers."""

    header: Header
    tensors: dict
    key_id: bytes
    signature: bytes
    signed: bytes = field(repr=False)

    @property
    def digest(self) -> str:
        """sha256 of the whole message (payload and signature), hex: what a store dedups by."""
        return hashlib.sha256(self.signed + self.signature).hexdigest()


def key_id(public_key) -> bytes:
    """The 8-byte id of an Ed25519 public key: the first bytes of sha256 of its raw form."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).digest()[:KEY_ID_LEN]


# ---- varints (LEB128) for the gaps between sorted top-k indices ------------------------------

def _varint_encode(v: np.ndarray) -> bytes:
    """LEB128 of non-negative integers < 2**32, vectorised.

    >>> _varint_encode(np.array([0, 127, 128, 300])).hex()
    '007f8001ac02'
    """
    v = np.asarray(v, dtype=np.uint64)
    if v.size == 0:
        return b""
    nb = 1 + sum((v >= (1 << (7 * i))).astype(np.int64) for i in range(1, 5))
    owner = np.repeat(np.arange(v.size), nb)
    pos = np.arange(int(nb.sum())) - np.repeat(np.cumsum(nb) - nb, nb)
    byte = (v[owner] >> (7 * pos).astype(np.uint64)) & np.uint64(0x7F)
    last = pos == nb[owner] - 1
    return (byte | np.where(last, 0, 0x80).astype(np.uint64)).astype(np.uint8).tobytes()


def _varint_decode(buf: bytes, k: int) -> tuple[np.ndarray, int]:
    """The first ``k`` LEB128 values of ``buf`` and the bytes they took.

    >>> [int(x) for x in _varint_decode(bytes.fromhex("007f8001ac02"), 4)[0]]
    [0, 127, 128, 300]
    """
    if k == 0:
        return np.zeros(0, np.int64), 0
    b = np.frombuffer(buf, dtype=np.uint8)
    ends = np.flatnonzero(b < 0x80)
    if ends.size < k:
        raise DecodeError("truncated", "sparse indices end early")
    ends = ends[:k]
    starts = np.concatenate(([0], ends[:-1] + 1))
    lens = ends - starts + 1
    if (lens > 5).any():
        raise DecodeError("garbage", "a sparse index is longer than 5 bytes")
    used = int(ends[-1]) + 1
    owner = np.repeat(np.arange(k), lens)
    pos = np.arange(used) - starts[owner]
    contrib = (b[:used] & 0x7F).astype(np.float64) * np.exp2(7.0 * pos)
    vals = np.bincount(owner, weights=contrib, minlength=k)
    if (vals >= 2.0**32).any():
        raise DecodeError("garbage", "a sparse index gap does not fit 32 bits")
    return vals.astype(np.int64), used


# ---- one tensor ------------------------------------------------------------------------------

@dataclass(frozen=True)
class EncodedTensor:
    """One tensor ready for ``pack_message``: its encoding, body and shape, and ``decoded``,
    exactly the array the receiver will get back from it."""

    encoding: str
    body: bytes
    shape: tuple
    decoded: np.ndarray


def encode_tensor(a: np.ndarray, encoding: str, *, fraction: float = 0.01, k: int | None = None) -> EncodedTensor:
    """The tensor encoded, with exactly what a receiver decodes from it.

    ``topk8`` keeps the ``k`` (default ``ceil(fraction * size)``, at least 1) entries of
    largest magnitude, as 8-bit values on one symmetric scale, indices as LEB128 gaps.

    >>> t = encode_tensor(np.array([3.0, 0.1, -1.0], np.float32), "topk8", fraction=0.6)
    >>> [round(x, 2) for x in t.decoded.tolist()]  # -1.0 comes back on the 8-bit grid of 3.0 / 127
    [3.0, 0.0, -0.99]
    """
    a = np.ascontiguousarray(a, dtype=np.float32)
    flat = a.reshape(-1)
    shape = tuple(int(x) for x in a.shape)
    if encoding == "fp32":
        return EncodedTensor("fp32", flat.tobytes(), shape, a.copy())
    if encoding == "fp16":
        h = flat.astype(np.float16)
        return EncodedTensor("fp16", h.tobytes(), shape, h.astype(np.float32).reshape(shape))
    if encoding != "topk8":
        raise ValueError(f"unknown encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")
    if k is None:
        k = max(1, math.ceil(fraction * flat.size))
    k = min(flat.size, max(0, int(k)))
    idx = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:]) if k else np.zeros(0, np.int64)
    v = flat[idx]
    amax = float(np.abs(v).max()) if k else 0.0
    scale = np.float32(amax / 127.0) if amax > 0 else np.float32(0.0)
    q = np.clip(np.rint(v / scale), -127, 127).astype(np.int8) if scale > 0 else np.zeros(k, np.int8)
    keep = q != 0
    idx, q = idx[keep], q[keep]
    gaps = np.diff(idx, prepend=-1) - 1
    body = _TOPK.pack(idx.size, float(scale)) + _varint_encode(gaps) + q.tobytes()
    dec = np.zeros(flat.size, np.float32)
    dec[idx] = q.astype(np.float32) * scale
    return EncodedTensor("topk8", body, shape, dec.reshape(shape))


def decode_tensor(body: bytes, encoding: int, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 array ``shape`` from an encoded body; ``DecodeError`` if it does not fit."""
    n = math.prod(shape)
    if encoding == 0 or encoding == 1:
        width = 4 if encoding == 0 else 2
        if len(body) != n * width:
            raise DecodeError("wrong_shapes", f"dense body has {len(body)} bytes for {n} values")
        dt = np.float32 if encoding == 0 else np.float16
        return np.frombuffer(body, dtype=dt).astype(np.float32).reshape(shape)
    if encoding != 2:
        raise DecodeError("garbage", f"unknown tensor encoding {encoding}")
    if len(body) < _TOPK.size:
        raise DecodeError("truncated", "sparse body shorter than its header")
    k, scale = _TOPK.unpack_from(body)
    if k > n:
        raise DecodeError("wrong_shapes", f"sparse body has {k} entries for {n} values")
    gaps, used = _varint_decode(body[_TOPK.size:], k)
    rest = body[_TOPK.size + used:]
    if len(rest) != k:
        raise DecodeError("truncated" if len(rest) < k else "garbage", "sparse values do not match the count")
    idx = np.cumsum(gaps + 1) - 1
    if k and idx[-1] >= n:
        raise DecodeError("wrong_shapes", "a sparse index is outside the tensor")
    out = np.zeros(n, np.float32)
    out[idx] = np.frombuffer(rest, dtype=np.int8).astype(np.float32) * np.float32(scale)
    return out.reshape(shape)


# ---- the container ---------------------------------------------------------------------------

def pack_message(header: Header, tensors: dict, private_key) -> bytes:
    """Sign and serialise; ``tensors`` maps a name to an ``EncodedTensor``."""
    hj = header.to_bytes()
    if len(hj) > MAX_HEADER or len(tensors) > MAX_TENSORS:
        raise ValueError("header or tensor table too large for the format")
    parts = [_PRE.pack(MAGIC, FORMAT_VERSION, KINDS[header.kind], len(hj)), hj, struct.pack("<H", len(tensors))]
    for name in sorted(tensors):
        t = tensors[name]
        body, shape = t.body, t.shape
        nb = name.encode()
        if not 0 < len(nb) <= MAX_NAME or len(shape) > MAX_NDIM:
            raise ValueError(f"tensor name or rank out of the format's bounds: {name!r} {shape}")
        tenc = ENCODINGS[t.encoding]
        parts += [struct.pack("<B", len(nb)), nb, struct.pack("<B", len(shape)),
                  struct.pack(f"<{len(shape)}I", *shape), _TENSOR.pack(tenc, len(body)), body]
    parts.append(key_id(private_key.public_key()))
    payload = b"".join(parts)
    return payload + private_key.sign(payload)


@dataclass(frozen=True)
class Envelope:
    """What a message says about itself before anything large is decoded: its header, the
    signer's key id, the signature and the signed bytes (``table_at`` is where the tensor
    table starts in them). Reading it costs at most the header's 4096 bytes of parsing,
    whatever the message claims, so the signature can be checked first (``verify_signature``)."""

    header: Header
    key_id: bytes
    signature: bytes
    signed: bytes = field(repr=False)
    table_at: int = 0

    @property
    def digest(self) -> str:
        """sha256 of the whole message, as ``Message.digest``."""
        return hashlib.sha256(self.signed + self.signature).hexdigest()


def read_envelope(data: bytes) -> Envelope:
    """The envelope of a message (magic, format, kind, header, key id, signature range);
    the tensor table is not read. Raises only ``DecodeError`` (``truncated``, ``garbage``,
    ``bad_header``).

    >>> from edge.fleet.keys import generate_key
    >>> k = generate_key()
    >>> h = Header(kind="global", fleet="f", model="m", model_hash="h", head_kind="linear", node="srv", version=3)
    >>> env = read_envelope(pack_message(h, {"b": encode_tensor(np.zeros(2, np.float32), "fp32")}, k))
    >>> env.header.version, verify_signature(env, k.public_key()), verify_signature(env, generate_key().public_key())
    (3, True, False)
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError("garbage", "message is not bytes")
    data = bytes(data)
    if len(data) < _PRE.size + KEY_ID_LEN + SIG_LEN:
        raise DecodeError("truncated", f"message of {len(data)} bytes is shorter than the smallest one")
    signed = data[:-SIG_LEN]
    r = _Reader(signed[:-KEY_ID_LEN])
    magic, fmt, kind, hlen = r.unpack(_PRE)
    if magic != MAGIC:
        raise DecodeError("garbage", "not a fleet message (bad magic)")
    if fmt != FORMAT_VERSION:
        raise DecodeError("garbage", f"format version {fmt} is not {FORMAT_VERSION}")
    if kind not in _KIND_NAMES or hlen > MAX_HEADER:
        raise DecodeError("garbage", "unknown message kind or oversized header")
    header = Header.from_bytes(r.take(hlen), _KIND_NAMES[kind])
    return Envelope(header=header, key_id=signed[-KEY_ID_LEN:], signature=data[-SIG_LEN:], signed=signed,
                    table_at=r.pos)


def decode_tensors(env: Envelope, *, shapes: Mapping[str, tuple] | None = None,
                   max_elements: int = MAX_ELEMENTS) -> dict[str, np.ndarray]:
    """The tensors of a message, each size checked before its array is allocated.

    With ``shapes`` (the receiver's head: every array's name and shape), a tensor whose
    name or claimed shape differs, or a missing one, is ``wrong_shapes`` before anything
    is allocated, so the arrays take exactly what the receiver expects. Without it (a
    stored message), the claimed elements of all tensors together are bounded by
    ``max_elements``. Raises only ``DecodeError``. Call it after ``verify_signature``:
    nothing unsigned should cost a decode.

    >>> from edge.fleet.keys import generate_key
    >>> h = Header(kind="global", fleet="f", model="m", model_hash="h", head_kind="linear", node="srv")
    >>> env = read_envelope(pack_message(h, {"b": encode_tensor(np.ones(2, np.float32), "fp32")}, generate_key()))
    >>> decode_tensors(env, shapes={"b": (2,)})["b"].tolist()
    [1.0, 1.0]
    >>> decode_tensors(env, shapes={"b": (3,)})
    Traceback (most recent call last):
    edge.errors.DecodeError: tensor 'b' claims shape (2,), expected (3,)
    """
    r = _Reader(env.signed[:-KEY_ID_LEN])
    r.pos = env.table_at
    (count,) = r.unpack(_H)
    if count > MAX_TENSORS:
        raise DecodeError("garbage", f"{count} tensors is more than {MAX_TENSORS}")
    if shapes is not None and count != len(shapes):
        raise DecodeError("wrong_shapes", f"{count} tensors, expected {len(shapes)}")
    tensors, total = {}, 0
    for _ in range(count):
        (nlen,) = r.unpack(_B)
        try:
            name = r.take(nlen).decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError("garbage", "tensor name is not UTF-8") from None
        (ndim,) = r.unpack(_B)
        if not name or ndim > MAX_NDIM or name in tensors:
            raise DecodeError("garbage", "empty or repeated tensor name, or rank too high")
        shape = struct.unpack(f"<{ndim}I", r.take(4 * ndim))
        if shapes is not None and (name not in shapes or tuple(shapes[name]) != shape):
            want = tuple(shapes[name]) if name in shapes else "no such array"
            raise DecodeError("wrong_shapes", f"tensor {name[:64]!r} claims shape {shape}, expected {want}")
        total += math.prod(shape)
        if total > max_elements:
            raise DecodeError("wrong_shapes", f"tensors claim {total} elements, more than {max_elements}")
        enc, blen = r.unpack(_TENSOR)
        tensors[name] = decode_tensor(r.take(blen), enc, tuple(shape))
    if r.pos != len(r.data):
        raise DecodeError("garbage", f"{len(r.data) - r.pos} unexpected bytes before the signature")
    return tensors


def unpack_message(data: bytes, *, max_elements: int = MAX_ELEMENTS) -> Message:
    """Parse a whole message without checking its signature: for messages already checked
    (the store's). What comes from outside goes through ``edge.fleet.validate``, which
    verifies first. Raises only ``DecodeError``, with ``kind`` one of ``truncated``,
    ``garbage``, ``bad_header``, ``wrong_shapes``.
    """
    env = read_envelope(data)
    tensors = decode_tensors(env, max_elements=max_elements)
    return Message(header=env.header, tensors=tensors, key_id=env.key_id, signature=env.signature, signed=env.signed)


def verify_signature(msg: Message | Envelope, public_key, *, known_key_id: bytes | None = None) -> bool:
    """True when ``msg`` (a ``Message`` or an ``Envelope``) was signed by the private half
    of ``public_key``: the key id matches and the signature verifies over the raw bytes.
    ``known_key_id``: ``key_id(public_key)`` when the caller keeps it (the registry does),
    so that it is not computed again for every message."""
    from cryptography.exceptions import InvalidSignature

    if msg.key_id != (known_key_id if known_key_id is not None else key_id(public_key)):
        return False
    try:
        public_key.verify(msg.signature, msg.signed)
        return True
    except InvalidSignature:
        return False
