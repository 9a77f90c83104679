"""The release codec (``edge.fleet.release_codec``): round trips of every message, and every
malformed, tampered, foreign-signed or oversized input refused with a ``DecodeError``
(never another exception). Pure: no broker, no files."""
from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.errors import DecodeError
from edge.fleet import release_codec as rc
from edge.fleet.keys import generate_key
from edge.zoo import digest_files

KEY, OTHER = generate_key(), generate_key()
REL = "0123456789abcdef"
KINDS = {"garbage", "truncated", "too_large", "unknown_key", "bad_signature", "bad_header", "bad_path",
         "chunk_mismatch"}

_seg = st.text(st.characters(whitelist_categories=("L", "N"), whitelist_characters="_-."), min_size=1, max_size=12) \
    .filter(lambda s: s not in (".", "..", "__pycache__"))
_paths = st.lists(_seg, min_size=1, max_size=3).map("/".join)
_files = st.dictionaries(_paths, st.binary(max_size=300), min_size=1, max_size=12).filter(
    # a path cannot be both a file and a folder in a real folder
    lambda d: not any(a != b and b.startswith(a + "/") for a in d for b in d))


def _manifest(files=None, *, chunk_size=rc.MIN_CHUNK, **kw):
    files = files or {"manifest.toml": b"name = 'x'", "model.py": b"x" * 10_000}
    bundle = rc.pack_bundle(files)
    return rc.make_manifest(fleet="f", model="m", release=REL, seq=3, version="1.2", files=files, bundle=bundle,
                            chunk_size=chunk_size, waves=[5, 25, 100], **kw), bundle


def _report(**kw):
    base = dict(fleet="f", model="m", node="n1", release=REL, seq=1, state="shadowing", reason="",
                evidence={"labels": 12, "mean_diff": -0.01, "agree": 0.93}, progress=(3, 3))
    return rc.Report(**{**base, **kw})


# ---- round trips -----------------------------------------------------------------------------

@settings(max_examples=80, deadline=None)
@given(_files)
def test_bundle_round_trip_and_digest_is_the_folder_digest(files):
    bundle = rc.pack_bundle(files)
    assert rc.parse_bundle(bundle) == files
    assert digest_files(rc.parse_bundle(bundle)) == digest_files(files)
    assert rc.pack_bundle(dict(reversed(list(files.items())))) == bundle  # deterministic


@settings(max_examples=40, deadline=None)
@given(_files, st.sampled_from([rc.MIN_CHUNK, 5000, 1 << 16]), st.integers(1, 1 << 20),
       st.sampled_from(rc.MANIFEST_STATES), st.integers(0, 2), st.floats(-1, 1, allow_nan=False))
def test_manifest_round_trip(files, chunk_size, seq, state, wave, margin):
    m, bundle = _manifest(files, chunk_size=chunk_size, state=state, wave=wave, margin=margin,
                          previous={"version": "0.9", "digest": "ab" * 32})
    m = rc.replace(m, seq=seq)
    assert rc.unpack_manifest(rc.pack_manifest(m, KEY), [OTHER.public_key(), KEY.public_key()]) == m
    joined = b"".join(rc.check_chunk(m, rc.unpack_chunk(rc.pack_chunk(REL, i, rc.chunk_bytes(bundle, i, chunk_size)),
                                                         max_len=chunk_size)) for i in range(m.n_chunks))
    assert joined == bundle and hashlib.sha256(joined).hexdigest() == m.bundle_sha256


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 1 << 31), st.integers(1, rc.MAX_COUNT))
def test_request_round_trip(start, count):
    r = rc.ChunkRequest(fleet="f", model="m", node="n1", release=REL, start=start, count=count)
    assert rc.unpack_request(rc.pack_request(r, KEY), [KEY.public_key()]) == r


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(rc.REPORT_STATES), st.sampled_from(rc.REFUSE_REASONS), st.integers(0, 1 << 40),
       st.integers(0, 100), st.integers(0, 100))
def test_report_round_trip(state, reason, seq, a, b):
    r = _report(state=state, reason=reason if state == "refused" else "", seq=seq, progress=(min(a, b), max(a, b)))
    assert rc.unpack_report(rc.pack_report(r, KEY), [KEY.public_key()]) == r


# ---- refusals --------------------------------------------------------------------------------

def test_foreign_signed_manifest_is_unknown_key():
    m, _ = _manifest()
    with pytest.raises(DecodeError) as e:
        rc.unpack_manifest(rc.pack_manifest(m, OTHER), [KEY.public_key()])
    assert e.value.kind == "unknown_key"


def test_forged_signature_with_a_trusted_key_id_is_bad_signature():
    """A message carrying the trusted key's id but signed by another key."""
    data = bytearray(rc.pack_report(_report(), OTHER))
    data[-72:-64] = rc.key_id(KEY.public_key())
    with pytest.raises(DecodeError) as e:
        rc.unpack_report(bytes(data), [KEY.public_key()])
    assert e.value.kind == "bad_signature"


def test_oversized_body_refused_before_the_signature():
    """The claimed length is checked against the cap before anything else is read."""
    data = rc._ENV.pack(rc.REPORT_MAGIC, 1, rc.MAX_REPORT_BODY + 1) + b"x" * 10
    with pytest.raises(DecodeError) as e:
        rc.unpack_report(data, [KEY.public_key()])
    assert e.value.kind == "too_large"


def test_wrong_magic_is_refused():
    """A signed request is not a report, nor a manifest."""
    r = rc.pack_request(rc.ChunkRequest("f", "m", "n1", REL, 0, 1), KEY)
    for fn in (rc.unpack_report, rc.unpack_manifest):
        with pytest.raises(DecodeError) as e:
            fn(r, [KEY.public_key()])
        assert e.value.kind == "garbage"


@pytest.mark.parametrize("body", [
    {"fleet": "f", "model": "m", "node": "n1", "release": REL, "from": 0, "count": 17},
    {"fleet": "f", "model": "m", "node": "n1", "release": REL, "from": -1, "count": 1},
    {"fleet": "f", "model": "m", "node": "n1", "release": "XYZ", "from": 0, "count": 1},
    {"fleet": "f", "model": "m", "node": "n1", "release": REL, "from": 0, "count": True},
    {"fleet": "f", "model": "m", "node": "n1", "release": REL, "from": 0},
    {"fleet": "f", "model": "m", "node": "", "release": REL, "from": 0, "count": 1},
])
def test_signed_request_with_bad_fields_is_bad_header(body):
    data = rc.pack_envelope(rc.REQUEST_MAGIC, body, KEY, max_body=rc.MAX_REQUEST_BODY)
    with pytest.raises(DecodeError) as e:
        rc.unpack_request(data, [KEY.public_key()])
    assert e.value.kind == "bad_header"


@pytest.mark.parametrize("change", [
    {"chunks": []}, {"waves": [50, 25, 100]}, {"waves": [5, 25]}, {"wave": 3}, {"state": "paused"},
    {"size": 0}, {"chunk_size": 100}, {"digest": "zz"}, {"margin": "0.1"}, {"previous": {"version": "1"}},
    {"seq": 0}, {"extra": 1},
])
def test_signed_manifest_with_bad_fields_is_bad_header(change):
    m, _ = _manifest()
    body = {**rc._manifest_body(m), **change}
    data = rc.pack_envelope(rc.MANIFEST_MAGIC, body, KEY, max_body=rc.MAX_MANIFEST_BODY)
    with pytest.raises(DecodeError) as e:
        rc.unpack_manifest(data, [KEY.public_key()])
    assert e.value.kind == "bad_header"


def test_refused_report_needs_a_known_reason():
    body = {**rc._report_body(_report(state="refused", reason="because")), "progress": [0, 0]}
    data = rc.pack_envelope(rc.REPORT_MAGIC, body, KEY, max_body=rc.MAX_REPORT_BODY)
    with pytest.raises(DecodeError) as e:
        rc.unpack_report(data, [KEY.public_key()])
    assert e.value.kind == "bad_header"
    with pytest.raises(ValueError):
        rc.pack_report(_report(state="refused", reason="because"), KEY)


def test_tampered_chunk_is_chunk_mismatch():
    m, bundle = _manifest()
    good = rc.chunk_bytes(bundle, 1, m.chunk_size)
    bad = bytes([good[0] ^ 1]) + good[1:]
    for c in (rc.Chunk(REL, 1, bad), rc.Chunk(REL, 1, good[:-1]), rc.Chunk(REL, 0, good),
              rc.Chunk("f" * 16, 1, good), rc.Chunk(REL, m.n_chunks, b"")):
        with pytest.raises(DecodeError) as e:
            rc.check_chunk(m, c)
        assert e.value.kind == "chunk_mismatch"


def test_chunk_longer_than_the_manifest_allows_is_too_large():
    frame = rc.pack_chunk(REL, 0, b"x" * (rc.MIN_CHUNK + 1))
    with pytest.raises(DecodeError) as e:
        rc.unpack_chunk(frame, max_len=rc.MIN_CHUNK)
    assert e.value.kind == "too_large"


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a\\b", "a//b", "./a", "a/__pycache__/x.pyc", ""])
def test_bundle_refuses_unsafe_paths(path):
    name = path.encode()
    data = rc.BUNDLE_MAGIC + b"\x01" + (1).to_bytes(4, "little") + len(name).to_bytes(2, "little") + name \
        + (1).to_bytes(8, "little") + b"x"
    with pytest.raises(DecodeError) as e:
        rc.parse_bundle(data)
    assert e.value.kind == "bad_path"
    with pytest.raises(ValueError):
        rc.pack_bundle({path: b"x"})


def test_bundle_refuses_unsorted_and_repeated_files_and_trailing_bytes():
    one = rc.pack_bundle({"a": b"1"})[9:]
    two = rc.pack_bundle({"b": b"2"})[9:]
    head = rc.BUNDLE_MAGIC + b"\x01" + (2).to_bytes(4, "little")
    for data in (head + two + one, head + one + one, rc.pack_bundle({"a": b"1"}) + b"\x00"):
        with pytest.raises(DecodeError) as e:
            rc.parse_bundle(data)
        assert e.value.kind == "garbage"


@pytest.mark.parametrize("files", [{"a": b"1", "a/b": b"2"}, {"m": b"1", "m/x/y.py": b"2", "n": b"3"},
                                   {"a": b"1", "a-x": b"2", "b/c": b"3"}])
def test_bundle_refuses_a_file_inside_a_file(files):
    """No folder holds both ``a`` and ``a/b``: such a bundle is the signer's error, refused as
    ``bad_path`` at parse time (before: an OSError at unpack, reported as ``disk_full``, which the
    server does not count towards a halt). A name that only starts like another is fine."""
    data = rc.pack_bundle(files)
    if "a-x" in files:
        assert rc.parse_bundle(data) == files
        return
    with pytest.raises(DecodeError) as e:
        rc.parse_bundle(data)
    assert e.value.kind == "bad_path"


def test_bundle_over_max_bytes_is_too_large():
    with pytest.raises(DecodeError) as e:
        rc.parse_bundle(rc.pack_bundle({"a": b"x" * 100}), max_bytes=50)
    assert e.value.kind == "too_large"


# ---- fuzzing: nothing but DecodeError comes out ----------------------------------------------

def _mutate(data: bytes, draw) -> bytes:
    msg = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        msg[draw(st.integers(0, len(msg) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        msg = msg[:draw(st.integers(0, len(msg)))]
    return bytes(msg)


_M, _BUNDLE = _manifest()
_SAMPLES = {
    "manifest": (rc.pack_manifest(_M, KEY), lambda d: rc.unpack_manifest(d, [KEY.public_key()])),
    "request": (rc.pack_request(rc.ChunkRequest("f", "m", "n1", REL, 0, 4), KEY),
                lambda d: rc.unpack_request(d, [KEY.public_key()])),
    "report": (rc.pack_report(_report(), KEY), lambda d: rc.unpack_report(d, [KEY.public_key()])),
    "chunk": (rc.pack_chunk(REL, 0, rc.chunk_bytes(_BUNDLE, 0, _M.chunk_size)),
              lambda d: rc.check_chunk(_M, rc.unpack_chunk(d, max_len=_M.chunk_size))),
    "bundle": (_BUNDLE, rc.parse_bundle),
}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(_SAMPLES)), st.data())
def test_tampered_messages_are_refused_never_an_exception(kind, data):
    good, parse = _SAMPLES[kind]
    bad = _mutate(good, data.draw)
    try:
        out = parse(bad)
    except DecodeError as e:
        assert e.kind in KINDS
        return
    # only a bundle may survive a change to its content bytes (it is not signed: the
    # manifest's sha256 catches that); every signed or hashed form must be refused
    assert kind == "bundle" or bad == good, (kind, out)
    if kind == "bundle":
        assert rc.pack_bundle(out) == bad  # what parsed is exactly a canonical bundle


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(_SAMPLES)), st.binary(max_size=400))
def test_random_bytes_are_refused_never_an_exception(kind, data):
    with pytest.raises(DecodeError) as e:
        _SAMPLES[kind][1](data)
    assert e.value.kind in KINDS


@settings(max_examples=100, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(max_size=20), lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                              max_size=4), max_leaves=20),
       st.sampled_from(["manifest", "request", "report"]))
def test_any_signed_json_is_checked_field_by_field(body, kind):
    """A correctly signed envelope of arbitrary JSON gives a record or bad_header, nothing else."""
    magic = {"manifest": rc.MANIFEST_MAGIC, "request": rc.REQUEST_MAGIC, "report": rc.REPORT_MAGIC}[kind]
    try:
        data = rc.pack_envelope(magic, body, KEY, max_body=rc.MAX_REQUEST_BODY)
    except ValueError:
        return
    try:
        _SAMPLES[kind][1](data)
    except DecodeError as e:
        assert e.kind == "bad_header"


# ---- wave admission --------------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=30, unique=True))
def test_admission_is_monotone_in_the_wave_and_deterministic(nodes):
    m, _ = _manifest()
    for node in nodes:
        seen = [rc.admits(rc.replace(m, wave=w), node) for w in range(len(m.waves))]
        assert seen == sorted(seen) and seen[-1]  # once admitted, admitted; the last wave admits all
        assert rc.wave_of(REL, node, m.waves) == seen.index(True)
        assert not rc.admits(rc.replace(m, state="halted"), node) and not rc.admits(rc.replace(m, state="aborted"), node)
        assert rc.admits(rc.replace(m, state="done", wave=0), node)


def test_wave_point_is_the_formats_formula():
    node = "press-7"
    want = int(hashlib.sha256(f"{REL}:{node}".encode()).hexdigest()[:8], 16) / 2 ** 32 * 100
    assert rc.wave_point(REL, node) == want


def test_manifest_body_is_canonical_json():
    data = rc.pack_manifest(_M, KEY)
    n = int.from_bytes(data[5:9], "little")
    body = data[9:9 + n]
    assert body == json.dumps(json.loads(body), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
