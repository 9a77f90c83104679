"""Model releases on the wire: signed manifest, chunk request and report, chunk frames,
the bundle, and the wave admission rule. Shared by the fleet server (``edge.fleet.release``)
and the device (``edge.deploy``).

Pure: records in, bytes out, and back. Layouts and meanings are in
``edge/fleet/RELEASE_FORMAT.md``. Every ``unpack_*``/``parse_*`` bounds each length before
it reads past it, checks a signature over the raw bytes *before* the JSON is parsed, then
checks the body's keys and types exactly; it never raises anything but ``DecodeError``
(fuzzed in ``tests/test_release_codec.py``).

>>> from edge.fleet.keys import generate_key
>>> k = generate_key()
>>> files = {"manifest.toml": b"name = 'x'", "model.py": b"x = 1"}
>>> bundle = pack_bundle(files)
>>> parse_bundle(bundle) == files
True
>>> m = make_manifest(fleet="f", model="m", release="00ff00ff00ff00ff", seq=1, version="1.0",
...                   files=files, bundle=bundle, chunk_size=4096, waves=[5, 25, 100])
>>> unpack_manifest(pack_manifest(m, k), [k.public_key()]) == m
True
>>> frame = pack_chunk(m.release, 0, chunk_bytes(bundle, 0, m.chunk_size))
>>> c = unpack_chunk(frame, max_len=m.chunk_size)
>>> check_chunk(m, c) == bundle
True
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import asdict, dataclass, field, fields, replace

from edge.errors import DecodeError
from edge.fleet.codec import KEY_ID_LEN, SIG_LEN, key_id

FORMAT_VERSION = 1
MANIFEST_MAGIC, REQUEST_MAGIC, REPORT_MAGIC = b"EDRM", b"EDRQ", b"EDRP"
CHUNK_MAGIC, BUNDLE_MAGIC = b"EDCK", b"EDBN"
MAX_MANIFEST_BODY = 65_536
MAX_REQUEST_BODY = MAX_REPORT_BODY = 4_096
MIN_CHUNK, MAX_CHUNK = 4_096, 1 << 20
MAX_COUNT = 16  # chunks one request may ask for
MAX_FILES = 1_024
MAX_PATH = 1_024  # bytes of one path in a bundle
MAX_WAVES = 16
MAX_EVIDENCE = 16  # entries in a report's evidence
MAX_STR = 200

MANIFEST_STATES = ("rolling", "halted", "aborted", "done")
REPORT_STATES = ("downloading", "verified", "refused", "shadowing", "switched", "rolled_back")
REFUSE_REASONS = ("bad_signature", "digest_mismatch", "chunk_mismatch", "too_large", "disk_full",
                  "compile_failed", "parity_failed", "worse")
GATE_REFUSALS = ("worse", "parity_failed", "compile_failed")  # what the server's halt rule counts

_ENV = struct.Struct("<4sBI")  # magic, format, body length
_CHUNK = struct.Struct("<4sB8sII")  # magic, format, release id, index, length
_HEX16 = re.compile(r"^[0-9a-f]{16}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Manifest:
    """A release as the server announces it (retained on ``<p>/<f>/<m>/release``)."""

    fleet: str
    model: str
    release: str
    seq: int
    version: str
    digest: str
    bundle_sha256: str
    size: int
    chunk_size: int
    chunks: tuple
    waves: tuple
    wave: int = 0
    state: str = "rolling"
    min_labels: int = 50
    margin: float = 0.0
    previous: dict = field(default_factory=lambda: {"version": "", "digest": ""})

    @property
    def n_chunks(self) -> int:
        return len(self.chunks)


@dataclass(frozen=True)
class ChunkRequest:
    """A device asks for chunks ``from`` .. ``from + count - 1`` (``start`` on the wire is ``from``)."""

    fleet: str
    model: str
    node: str
    release: str
    start: int
    count: int


@dataclass(frozen=True)
class Report:
    """One step of a device's take of a release (``state``), signed by the device key."""

    fleet: str
    model: str
    node: str
    release: str
    seq: int
    state: str
    reason: str = ""
    evidence: dict = field(default_factory=dict)
    progress: tuple = (0, 0)


@dataclass(frozen=True)
class Chunk:
    """One chunk frame: ``data`` is chunk ``index`` of ``release`` (not yet checked)."""

    release: str
    index: int
    data: bytes


# ---- the signed envelope -------------------------------------------------------------

def _canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def pack_envelope(magic: bytes, body: dict, private_key, *, max_body: int) -> bytes:
    """Sign ``body`` (canonical JSON) in the release envelope; ``ValueError`` over ``max_body``."""
    raw = _canonical(body)
    if len(raw) > max_body:
        raise ValueError(f"a {magic.decode()} body of {len(raw)} bytes is over the format's {max_body}")
    signed = _ENV.pack(magic, FORMAT_VERSION, len(raw)) + raw + key_id(private_key.public_key())
    return signed + private_key.sign(signed)


def unpack_envelope(data, magic: bytes, keys: list, *, max_body: int) -> dict:
    """Verify then parse an envelope: the JSON object, not yet checked field by field.

    ``DecodeError`` kinds: ``garbage`` (not bytes, wrong magic or version, length mismatch),
    ``too_large`` (body over ``max_body``), ``truncated``, ``unknown_key`` (no key in
    ``keys`` has the envelope's key id), ``bad_signature``, ``bad_header`` (signed but not
    a JSON object).
    """
    from cryptography.exceptions import InvalidSignature

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError("garbage", "release message is not bytes")
    data = bytes(data)
    if len(data) < _ENV.size:
        raise DecodeError("truncated", f"release message of {len(data)} bytes is shorter than its header")
    m, fmt, n = _ENV.unpack_from(data)
    if m != magic or fmt != FORMAT_VERSION:
        raise DecodeError("garbage", f"not a {magic.decode()} message of format {FORMAT_VERSION}")
    if n > max_body:
        raise DecodeError("too_large", f"a {n}-byte {magic.decode()} body is over {max_body} bytes")
    want = _ENV.size + n + KEY_ID_LEN + SIG_LEN
    if want != len(data):
        raise DecodeError("truncated" if want > len(data) else "garbage",
                          f"{magic.decode()} of {len(data)} bytes does not match its body length {n}")
    signed, sig = data[:-SIG_LEN], data[-SIG_LEN:]
    kid = signed[-KEY_ID_LEN:]
    key = next((k for k in keys if key_id(k) == kid), None)
    if key is None:
        raise DecodeError("unknown_key", f"{magic.decode()} signed by key {kid.hex()}, not a trusted one")
    try:
        key.verify(sig, signed)
    except InvalidSignature:
        raise DecodeError("bad_signature", f"{magic.decode()} signature does not verify") from None
    try:
        body = json.loads(signed[_ENV.size:_ENV.size + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise DecodeError("bad_header", f"{magic.decode()} body is not JSON") from None
    if not isinstance(body, dict):
        raise DecodeError("bad_header", f"{magic.decode()} body is not a JSON object")
    return body


def envelope_key_id(data) -> str:
    """The signer's key id (hex) of an envelope, unverified: for logs, '' if there is none."""
    if not isinstance(data, (bytes, bytearray)) or len(data) < _ENV.size + KEY_ID_LEN + SIG_LEN:
        return ""
    return bytes(data[-SIG_LEN - KEY_ID_LEN:-SIG_LEN]).hex()


# ---- field checks --------------------------------------------------------------------

def _bad(what: str) -> DecodeError:
    return DecodeError("bad_header", what)


def _keys(d: dict, names: set, what: str) -> None:
    if set(d) != names:
        raise _bad(f"{what} fields are {sorted(d)[:20]}, expected {sorted(names)}")


def _str(d: dict, k: str, *, pattern=None, nonempty: bool = False) -> str:
    v = d[k]
    if not isinstance(v, str) or len(v) > MAX_STR or (nonempty and not v):
        raise _bad(f"field {k!r} is not a short{' non-empty' if nonempty else ''} string")
    if pattern is not None and not pattern.match(v):
        raise _bad(f"field {k!r} is not in its hex form")
    return v


def _int(d: dict, k: str, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
    v = d[k]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _bad(f"field {k!r} is not an integer in [{lo}, {hi}]")
    return v


def _num(d: dict, k: str) -> float:
    v = d[k]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(f"field {k!r} is not a finite number")
    return float(v)


# ---- manifest ------------------------------------------------------------------------

def check_waves(waves) -> tuple:
    """The wave plan as a tuple, or ``ValueError`` naming what is wrong with it.

    >>> check_waves([5, 25, 100])
    (5, 25, 100)
    """
    w = tuple(waves)
    if not 1 <= len(w) <= MAX_WAVES or any(isinstance(x, bool) or not isinstance(x, int) for x in w):
        raise ValueError(f"waves {list(w)[:20]} must be 1 to {MAX_WAVES} integers")
    if any(not 0 < x <= 100 for x in w) or any(a >= b for a, b in zip(w, w[1:])) or w[-1] != 100:
        raise ValueError(f"waves {list(w)} must be increasing percents in (0, 100] ending at 100, e.g. 5,25,100")
    return w


def n_chunks(size: int, chunk_size: int) -> int:
    """How many chunks a bundle of ``size`` bytes has (at least one)."""
    return max(1, -(-size // chunk_size))


def chunk_bytes(bundle: bytes, index: int, chunk_size: int) -> bytes:
    """Chunk ``index`` of ``bundle`` (the last may be shorter)."""
    return bundle[index * chunk_size:(index + 1) * chunk_size]


def make_manifest(*, fleet: str, model: str, release: str, seq: int, version: str, files: dict,
                  bundle: bytes, chunk_size: int, waves, wave: int = 0, state: str = "rolling",
                  min_labels: int = 50, margin: float = 0.0, previous: dict | None = None) -> Manifest:
    """The manifest of ``bundle`` (packed from ``files``): digests, chunk hashes, the plan."""
    from edge.zoo import digest_files

    if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        raise ValueError(f"chunk_size {chunk_size} is not in [{MIN_CHUNK}, {MAX_CHUNK}]")
    hashes = tuple(hashlib.sha256(chunk_bytes(bundle, i, chunk_size)).hexdigest()
                   for i in range(n_chunks(len(bundle), chunk_size)))
    return Manifest(fleet=fleet, model=model, release=release, seq=seq, version=version,
                    digest=digest_files(files), bundle_sha256=hashlib.sha256(bundle).hexdigest(),
                    size=len(bundle), chunk_size=chunk_size, chunks=hashes, waves=check_waves(waves),
                    wave=wave, state=state, min_labels=min_labels, margin=float(margin),
                    previous=dict(previous or {"version": "", "digest": ""}))


def _manifest_body(m: Manifest) -> dict:
    d = asdict(m)
    d["chunks"], d["waves"] = list(m.chunks), list(m.waves)
    return d


def pack_manifest(m: Manifest, private_key) -> bytes:
    """Sign a manifest with a release key (``ValueError`` if it does not check)."""
    body = _manifest_body(m)
    try:
        check_manifest_body(json.loads(_canonical(body)))
    except DecodeError as e:
        raise ValueError(f"manifest does not check: {e}") from None
    return pack_envelope(MANIFEST_MAGIC, body, private_key, max_body=MAX_MANIFEST_BODY)


def check_manifest_body(d: dict) -> Manifest:
    """A parsed manifest body to a ``Manifest``, every key and type checked (``DecodeError``)."""
    _keys(d, {f.name for f in fields(Manifest)}, "manifest")
    for k in ("fleet", "model"):
        _str(d, k, nonempty=True)
    _str(d, "release", pattern=_HEX16)
    _str(d, "version")
    _str(d, "digest", pattern=_HEX64)
    _str(d, "bundle_sha256", pattern=_HEX64)
    _int(d, "seq", 1)
    size, cs = _int(d, "size", 1), _int(d, "chunk_size", MIN_CHUNK, MAX_CHUNK)
    chunks, waves = d["chunks"], d["waves"]
    if not isinstance(chunks, list) or len(chunks) != n_chunks(size, cs):
        raise _bad(f"manifest lists {len(chunks) if isinstance(chunks, list) else '?'} chunk hashes, "
                   f"its size and chunk_size need {n_chunks(size, cs)}")
    if any(not isinstance(h, str) or not _HEX64.match(h) for h in chunks):
        raise _bad("a manifest chunk hash is not 64 hex digits")
    if not isinstance(waves, list):
        raise _bad("manifest waves is not a list")
    try:
        check_waves(waves)
    except ValueError as e:
        raise _bad(str(e)) from None
    _int(d, "wave", 0, len(waves) - 1)
    if d["state"] not in MANIFEST_STATES:
        raise _bad(f"manifest state {str(d['state'])[:40]!r} is not one of {', '.join(MANIFEST_STATES)}")
    _int(d, "min_labels", 0, 1 << 31)
    margin = _num(d, "margin")
    prev = d["previous"]
    if not isinstance(prev, dict) or set(prev) != {"version", "digest"}:
        raise _bad("manifest previous is not {version, digest}")
    _str(prev, "version")
    _str(prev, "digest")
    return Manifest(**{**d, "chunks": tuple(chunks), "waves": tuple(waves), "margin": margin,
                       "previous": dict(prev)})


def unpack_manifest(data, release_keys: list) -> Manifest:
    """Verify a manifest against the trusted release public keys, then check its body."""
    return check_manifest_body(unpack_envelope(data, MANIFEST_MAGIC, release_keys, max_body=MAX_MANIFEST_BODY))


# ---- chunk request -------------------------------------------------------------------

def pack_request(r: ChunkRequest, device_key) -> bytes:
    """Sign a chunk request with the device key."""
    if not 1 <= r.count <= MAX_COUNT or r.start < 0:
        raise ValueError(f"chunk request from {r.start} count {r.count}: count must be 1..{MAX_COUNT}")
    body = {"fleet": r.fleet, "model": r.model, "node": r.node, "release": r.release,
            "from": r.start, "count": r.count}
    return pack_envelope(REQUEST_MAGIC, body, device_key, max_body=MAX_REQUEST_BODY)


def unpack_request(data, device_keys: list) -> ChunkRequest:
    """Verify a chunk request against the device's key(s), then check its body."""
    d = unpack_envelope(data, REQUEST_MAGIC, device_keys, max_body=MAX_REQUEST_BODY)
    _keys(d, {"fleet", "model", "node", "release", "from", "count"}, "chunk request")
    for k in ("fleet", "model", "node"):
        _str(d, k, nonempty=True)
    _str(d, "release", pattern=_HEX16)
    return ChunkRequest(fleet=d["fleet"], model=d["model"], node=d["node"], release=d["release"],
                        start=_int(d, "from", 0, 1 << 31), count=_int(d, "count", 1, MAX_COUNT))


# ---- report --------------------------------------------------------------------------

def _check_evidence(ev) -> dict:
    if not isinstance(ev, dict) or len(ev) > MAX_EVIDENCE:
        raise _bad(f"report evidence is not an object of at most {MAX_EVIDENCE} entries")
    for k, v in ev.items():
        if not isinstance(k, str) or len(k) > 64:
            raise _bad("a report evidence key is not a short string")
        ok = (v is None or isinstance(v, bool) or (isinstance(v, str) and len(v) <= MAX_STR)
              or (isinstance(v, (int, float)) and math.isfinite(v) and abs(v) < 1e300))
        if not ok:
            raise _bad(f"report evidence {k!r} is not a finite number, short string, bool or null")
    return dict(ev)


def _report_body(r: Report) -> dict:
    d = asdict(r)
    d["progress"] = list(r.progress)
    return d


def check_report_body(d: dict) -> Report:
    """A parsed report body to a ``Report``, every key and type checked (``DecodeError``)."""
    _keys(d, {f.name for f in fields(Report)}, "report")
    for k in ("fleet", "model", "node"):
        _str(d, k, nonempty=True)
    _str(d, "release", pattern=_HEX16)
    _int(d, "seq", 0)
    if d["state"] not in REPORT_STATES:
        raise _bad(f"report state {str(d['state'])[:40]!r} is not one of {', '.join(REPORT_STATES)}")
    reason = _str(d, "reason")
    if d["state"] == "refused" and reason not in REFUSE_REASONS:
        raise _bad(f"refusal reason {reason[:40]!r} is not one of {', '.join(REFUSE_REASONS)}")
    p = d["progress"]
    if (not isinstance(p, list) or len(p) != 2 or any(isinstance(x, bool) or not isinstance(x, int) for x in p)
            or not 0 <= p[0] <= p[1] <= 1 << 31):
        raise _bad("report progress is not [held, of] with 0 <= held <= of")
    return Report(**{**d, "evidence": _check_evidence(d["evidence"]), "progress": tuple(p)})


def pack_report(r: Report, device_key) -> bytes:
    """Sign a report with the device key (``ValueError`` if it does not check)."""
    body = _report_body(r)
    try:
        check_report_body(json.loads(_canonical(body)))
    except DecodeError as e:
        raise ValueError(f"report does not check: {e}") from None
    return pack_envelope(REPORT_MAGIC, body, device_key, max_body=MAX_REPORT_BODY)


def unpack_report(data, device_keys: list) -> Report:
    """Verify a report against the device's key(s), then check its body."""
    return check_report_body(unpack_envelope(data, REPORT_MAGIC, device_keys, max_body=MAX_REPORT_BODY))


# ---- chunk frames --------------------------------------------------------------------

def pack_chunk(release: str, index: int, data: bytes) -> bytes:
    """One chunk frame (not signed: the manifest carries each chunk's sha256)."""
    if not _HEX16.match(release):
        raise ValueError(f"release id {release!r} is not 16 hex digits")
    return _CHUNK.pack(CHUNK_MAGIC, FORMAT_VERSION, bytes.fromhex(release), index, len(data)) + bytes(data)


def unpack_chunk(data, *, max_len: int = MAX_CHUNK) -> Chunk:
    """Parse a chunk frame whose length is at most ``max_len`` (the manifest's ``chunk_size``)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError("garbage", "chunk frame is not bytes")
    data = bytes(data)
    if len(data) < _CHUNK.size:
        raise DecodeError("truncated", f"chunk frame of {len(data)} bytes is shorter than its header")
    magic, fmt, rel, index, n = _CHUNK.unpack_from(data)
    if magic != CHUNK_MAGIC or fmt != FORMAT_VERSION:
        raise DecodeError("garbage", "not a chunk frame of format 1")
    if n > max_len:
        raise DecodeError("too_large", f"chunk of {n} bytes is over the manifest's chunk_size {max_len}")
    if _CHUNK.size + n != len(data):
        raise DecodeError("truncated" if _CHUNK.size + n > len(data) else "garbage",
                          f"chunk frame of {len(data)} bytes does not match its length {n}")
    return Chunk(release=rel.hex(), index=index, data=data[_CHUNK.size:])


def check_chunk(m: Manifest, c: Chunk) -> bytes:
    """The chunk's bytes if it is chunk ``c.index`` of release ``m`` by the signed hashes,
    else ``DecodeError("chunk_mismatch")``."""
    if c.release != m.release or not 0 <= c.index < m.n_chunks:
        raise DecodeError("chunk_mismatch", f"chunk {c.index} of {c.release} is not one of release {m.release}")
    want = min(m.chunk_size, m.size - c.index * m.chunk_size)
    if len(c.data) != want or hashlib.sha256(c.data).hexdigest() != m.chunks[c.index]:
        raise DecodeError("chunk_mismatch", f"chunk {c.index} of release {m.release} does not match its sha256")
    return c.data


# ---- bundle --------------------------------------------------------------------------

def _path_ok(rel: str) -> bool:
    parts = rel.split("/")
    return (bool(rel) and "\\" not in rel and "\x00" not in rel and not rel.startswith("/")
            and all(p and p not in (".", "..") for p in parts) and "__pycache__" not in parts)


def _order(rel: str) -> list:
    return rel.split("/")


def pack_bundle(files: dict) -> bytes:
    """A folder's files (``edge.zoo.read_folder``) as one deterministic bundle.

    >>> pack_bundle({"a": b"x"})[:9]
    b'EDBN\\x01\\x01\\x00\\x00\\x00'
    """
    if len(files) > MAX_FILES:
        raise ValueError(f"a bundle holds at most {MAX_FILES} files, the folder has {len(files)}")
    out = [BUNDLE_MAGIC, bytes([FORMAT_VERSION]), struct.pack("<I", len(files))]
    for rel in sorted(files, key=_order):
        name = rel.encode("utf-8")
        if not _path_ok(rel) or len(name) > MAX_PATH:
            raise ValueError(f"path {rel[:80]!r} cannot go in a bundle (relative POSIX, no '..', at most {MAX_PATH} bytes)")
        out += [struct.pack("<H", len(name)), name, struct.pack("<Q", len(files[rel])), bytes(files[rel])]
    return b"".join(out)


def parse_bundle(data, *, max_bytes: int = 1 << 31) -> dict:
    """A bundle's files, every length bounded by what is left and the order checked (one
    folder has exactly one bundle). ``DecodeError`` kinds: ``too_large``, ``truncated``,
    ``garbage``, ``bad_path``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError("garbage", "bundle is not bytes")
    mv = memoryview(data)
    if len(mv) > max_bytes:
        raise DecodeError("too_large", f"bundle of {len(mv)} bytes is over {max_bytes}")
    if len(mv) < 9:
        raise DecodeError("truncated", "bundle shorter than its header")
    if bytes(mv[:4]) != BUNDLE_MAGIC or mv[4] != FORMAT_VERSION:
        raise DecodeError("garbage", "not a bundle of format 1")
    (count,) = struct.unpack_from("<I", mv, 5)
    if count > MAX_FILES:
        raise DecodeError("garbage", f"bundle claims {count} files, at most {MAX_FILES}")
    pos, files, last = 9, {}, None
    for _ in range(count):
        if pos + 2 > len(mv):
            raise DecodeError("truncated", f"bundle ends at byte {len(mv)} inside a file header")
        (n,) = struct.unpack_from("<H", mv, pos)
        if n > MAX_PATH or pos + 2 + n + 8 > len(mv):
            raise DecodeError("truncated" if n <= MAX_PATH else "bad_path", f"bundle path of {n} bytes at {pos} overruns")
        try:
            rel = bytes(mv[pos + 2:pos + 2 + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError("bad_path", f"bundle path at byte {pos} is not UTF-8") from None
        if not _path_ok(rel):
            raise DecodeError("bad_path", f"bundle path {rel[:80]!r} is not a plain relative path")
        if last is not None and not _order(last) < _order(rel):
            raise DecodeError("garbage", f"bundle path {rel[:80]!r} is out of order or repeated")
        if last is not None and rel.startswith(last + "/"):
            # "a" then "a/b": no folder holds both (sorted by parts, such a pair is adjacent)
            raise DecodeError("bad_path", f"bundle path {rel[:80]!r} is inside the file {last[:80]!r}")
        (size,) = struct.unpack_from("<Q", mv, pos + 2 + n)
        pos += 2 + n + 8
        if size > len(mv) - pos:
            raise DecodeError("truncated", f"bundle file {rel[:80]!r} of {size} bytes overruns the bundle")
        files[rel], pos, last = bytes(mv[pos:pos + size]), pos + size, rel
    if pos != len(mv):
        raise DecodeError("garbage", f"{len(mv) - pos} bytes after the bundle's last file")
    return files


# ---- wave admission ------------------------------------------------------------------

def wave_point(release: str, node: str) -> float:
    """Where ``node`` stands in ``release``'s order, a percent in [0, 100).

    >>> 0 <= wave_point("00ff00ff00ff00ff", "press-7") < 100
    True
    """
    return int(hashlib.sha256(f"{release}:{node}".encode()).hexdigest()[:8], 16) / 2 ** 32 * 100


def wave_of(release: str, node: str, waves) -> int:
    """The first wave (0-based) that admits ``node``: the last wave, 100%, admits everyone.

    >>> wave_of("00ff00ff00ff00ff", "n", [100])
    0
    """
    p = wave_point(release, node)
    return next(i for i, w in enumerate(waves) if p < w)


def admits(m: Manifest, node: str) -> bool:
    """Whether manifest ``m`` lets ``node`` start taking the release now: ``rolling`` admits
    the open wave and those before it, ``done`` everyone, ``halted`` and ``aborted`` no one.

    >>> m = Manifest("f", "m", "00ff00ff00ff00ff", 1, "1", "0" * 64, "0" * 64, 1, 4096, ("0" * 64,), (100,))
    >>> admits(m, "n"), admits(replace(m, state="halted"), "n")
    (True, False)
    """
    if m.state == "done":
        return True
    if m.state != "rolling":
        return False
    return wave_of(m.release, node, m.waves) <= m.wave
