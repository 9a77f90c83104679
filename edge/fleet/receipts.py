"""The server's signed answer to each delta: accepted or refused, and where the server stands.

Pure: a ``Receipt`` in, signed bytes out, and back. The server publishes one on
``<prefix>/<fleet>/<model>/receipt/<node>`` (QoS 1) for every delta it handled, so that a
device learns what became of each: an accepted one is the server's, a refused one stays
in the device's residual (``reason`` says why), ``stored_seq`` is the highest sequence
number the server has stored for that node (a device that lost its state resumes after
it), ``latest_version`` and ``epoch`` say where the server's history stands (a server
restored from an older backup starts a new epoch, and devices follow it).

Layout (FORMAT.md "Receipt"): ``EDRC``, one format byte (1), a two-byte length, that
many bytes of canonical JSON (sorted keys, no spaces, UTF-8), the 8-byte key id and the
64-byte Ed25519 signature over everything before it. ``unpack_receipt`` checks the size,
the layout and the signature over the raw bytes *before* it parses the JSON, and never
raises anything but ``DecodeError``.

>>> from edge.fleet.keys import generate_key
>>> k = generate_key()
>>> r = Receipt(fleet="f", model="m", node="n1", seq=4, status="refused", reason="norm_too_large",
...             stored_seq=3, latest_version=12, epoch="a1b2", digest="", issued=1.5)
>>> unpack_receipt(pack_receipt(r, k), [k.public_key()]) == r
True
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass, fields

from edge.errors import DecodeError
from edge.fleet.codec import KEY_ID_LEN, SIG_LEN, key_id

MAGIC = b"EDRC"
FORMAT_VERSION = 1
MAX_RECEIPT = 2048  # bytes, whole message: a receipt is a few hundred
STATUSES = ("accepted", "refused")
_PRE = struct.Struct("<4sBH")
_MAX_STR = 200


@dataclass(frozen=True)
class Receipt:
    """What the server did with one delta of ``node`` (``seq``, its message ``digest``)."""

    fleet: str
    model: str
    node: str
    seq: int
    status: str
    reason: str
    stored_seq: int
    latest_version: int
    epoch: str
    digest: str = ""
    issued: float = 0.0

    @property
    def accepted(self) -> bool:
        return self.status == "accepted"


_INTS = ("seq", "stored_seq", "latest_version")
_STRS = ("fleet", "model", "node", "status", "reason", "epoch", "digest")


def pack_receipt(r: Receipt, private_key) -> bytes:
    """Sign and serialise a receipt."""
    if r.status not in STATUSES:
        raise ValueError(f"receipt status {r.status!r} is not one of {', '.join(STATUSES)}")
    body = json.dumps(asdict(r), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    payload = _PRE.pack(MAGIC, FORMAT_VERSION, len(body)) + body + key_id(private_key.public_key())
    out = payload + private_key.sign(payload)
    if len(out) > MAX_RECEIPT:
        raise ValueError(f"a receipt of {len(out)} bytes is over the format's {MAX_RECEIPT}")
    return out


def unpack_receipt(data: bytes, server_keys: list, *, max_bytes: int = MAX_RECEIPT) -> Receipt:
    """Verify then parse. ``DecodeError`` kinds: ``truncated``, ``garbage``, ``unknown_key``,
    ``bad_signature``, ``bad_header`` (signed, but not a receipt this version understands)."""
    from cryptography.exceptions import InvalidSignature

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError("garbage", "receipt is not bytes")
    if len(data) > max_bytes:
        raise DecodeError("garbage", f"a {len(data)}-byte receipt is over {max_bytes} bytes")
    data = bytes(data)
    if len(data) < _PRE.size + KEY_ID_LEN + SIG_LEN:
        raise DecodeError("truncated", f"receipt of {len(data)} bytes is shorter than the smallest one")
    magic, fmt, n = _PRE.unpack_from(data)
    if magic != MAGIC or fmt != FORMAT_VERSION:
        raise DecodeError("garbage", "not a receipt (bad magic or format version)")
    if _PRE.size + n + KEY_ID_LEN + SIG_LEN != len(data):
        raise DecodeError("truncated" if _PRE.size + n + KEY_ID_LEN + SIG_LEN > len(data) else "garbage",
                          "receipt length does not match its body")
    signed, sig = data[:-SIG_LEN], data[-SIG_LEN:]
    kid = signed[-KEY_ID_LEN:]
    key = next((k for k in server_keys if key_id(k) == kid), None)
    if key is None:
        raise DecodeError("unknown_key", "receipt not signed by a trusted server key")
    try:
        key.verify(sig, signed)
    except InvalidSignature:
        raise DecodeError("bad_signature", "receipt signature does not verify") from None
    try:
        d = json.loads(signed[_PRE.size:_PRE.size + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise DecodeError("bad_header", "receipt body is not JSON") from None
    names = {f.name for f in fields(Receipt)}
    if not isinstance(d, dict) or set(d) != names:
        raise DecodeError("bad_header", "receipt fields are not the expected ones")
    if any(not isinstance(d[k], str) or len(d[k]) > _MAX_STR for k in _STRS) or d["status"] not in STATUSES:
        raise DecodeError("bad_header", "a receipt text field is not a short string")
    if any(isinstance(d[k], bool) or not isinstance(d[k], int) or not 0 <= d[k] < 1 << 63 for k in _INTS):
        raise DecodeError("bad_header", "a receipt counter is not a non-negative integer")
    if isinstance(d["issued"], bool) or not isinstance(d["issued"], (int, float)) or not math.isfinite(d["issued"]):
        raise DecodeError("bad_header", "receipt time is not a finite number")
    d["issued"] = float(d["issued"])
    return Receipt(**d)
