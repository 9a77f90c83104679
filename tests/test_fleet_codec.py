"""The fleet delta codec: round trips, committed test vectors, rejections, fuzzing, error feedback."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge.errors import DecodeError
from edge.fleet.codec import Header, encode_tensor, pack_message, unpack_message, verify_signature
from edge.fleet.feedback import encode_pending
from edge.fleet.validate import REASONS, Expected, check_delta, check_global

VECTORS = Path(__file__).parent / "vectors" / "fleet_messages.json"
SHAPES = {"weight": (4, 8), "bias": (4,)}
EXP = Expected(fleet="f", model="vibration", model_hash="h0", head_kind="linear", shapes=SHAPES)


def _key(i: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32)


def _header(**kw) -> Header:
    base = dict(kind="delta", fleet="f", model="vibration", model_hash="h0", head_kind="linear", node="n1",
                seq=1, base_version=0, samples=32, encoding="fp32", metrics={"loss": 0.5})
    base.update(kw)
    return Header(**base)


def _arrays(seed=0, scale=0.01):
    r = np.random.default_rng(seed)
    return {k: (r.standard_normal(s) * scale).astype(np.float32) for k, s in SHAPES.items()}


def _delta(key=None, arrays=None, encoding="fp32", **kw) -> bytes:
    arrays = _arrays() if arrays is None else arrays
    tensors = {k: encode_tensor(v, encoding, fraction=0.25) for k, v in arrays.items()}
    return pack_message(_header(encoding=encoding, **kw), tensors, key or _key(1))


def _check(data, seen=lambda n, s: False, keys=None, max_norm=10.0, current=0, topic_node=None):
    return check_delta(data, expected=EXP, keys=keys or {"n1": _key(1).public_key()}, max_norm=max_norm,
                       current_version=current, seen=seen, topic_node=topic_node)


# ---- round trips -------------------------------------------------------------------------

@pytest.mark.parametrize("encoding, tol", [("fp32", 0.0), ("fp16", 1e-5)])
def test_dense_round_trip(encoding, tol):
    a = _arrays()
    msg = unpack_message(_delta(arrays=a, encoding=encoding))
    for k in a:
        np.testing.assert_allclose(msg.tensors[k], a[k], atol=tol)
    assert msg.header == _header(encoding=encoding)


def test_topk8_decodes_exactly_what_the_sender_recorded():
    a = _arrays()
    sent = {k: encode_tensor(v, "topk8", fraction=0.25).decoded for k, v in a.items()}
    msg = unpack_message(_delta(arrays=a, encoding="topk8"))
    for k in a:
        np.testing.assert_array_equal(msg.tensors[k], sent[k])
        assert 0 < np.count_nonzero(sent[k]) <= int(np.ceil(0.25 * a[k].size))


def test_sparse_message_is_far_smaller_than_dense():
    r = np.random.default_rng(1)
    big = {"w1": r.standard_normal((160, 64)).astype(np.float32)}
    dense = pack_message(_header(), {"w1": encode_tensor(big["w1"], "fp32")}, _key(1))
    sparse = pack_message(_header(encoding="topk8"), {"w1": encode_tensor(big["w1"], "topk8", fraction=0.01)}, _key(1))
    assert len(dense) / len(sparse) > 50


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=20),
                  elements=st.floats(-1e3, 1e3, width=32)),
       st.sampled_from(["fp32", "fp16", "topk8"]), st.floats(0.001, 1.0))
def test_any_tensor_round_trips_to_its_recorded_decoding(a, encoding, fraction):
    t = encode_tensor(a, encoding, fraction=fraction)
    msg = unpack_message(pack_message(_header(encoding=encoding), {"x": t}, _key(1)))
    np.testing.assert_array_equal(msg.tensors["x"], t.decoded)


# ---- committed vectors -------------------------------------------------------------------

def _vector_cases():
    r = np.random.default_rng(7)
    arr = {"weight": (r.standard_normal((2, 3)) * 0.1).astype(np.float32), "bias": np.array([0.5, -0.25], np.float32)}
    for enc in ("fp32", "fp16", "topk8"):
        yield f"delta-{enc}", _header(encoding=enc, node="press-7", seq=3, base_version=2, samples=100,
                                      metrics={"loss": 0.25, "accuracy": 0.875}), arr, enc
    yield "global-fp32", _header(kind="global", node="server", version=3, encoding="fp32", metrics={}), arr, "fp32"


def _build(header, arrays, enc):
    return pack_message(header, {k: encode_tensor(v, enc, fraction=0.5) for k, v in arrays.items()}, _key(9))


def test_committed_vectors_encode_and_decode_identically():
    if os.environ.get("EDGE_REGEN_VECTORS"):
        out = [{"name": n, "private_key_hex": (bytes([9]) * 32).hex(), "fraction": 0.5,
                "header": dataclasses.asdict(h), "arrays": {k: v.tolist() for k, v in a.items()},
                "message_hex": _build(h, a, enc).hex()} for n, h, a, enc in _vector_cases()]
        VECTORS.write_text(json.dumps(out, indent=1) + "\n")
    vectors = json.loads(VECTORS.read_text())
    assert [v["name"] for v in vectors] == [c[0] for c in _vector_cases()]
    for v, (name, header, arrays, enc) in zip(vectors, _vector_cases()):
        data = bytes.fromhex(v["message_hex"])
        assert _build(header, arrays, enc) == data, name  # Ed25519 is deterministic: byte-exact
        msg = unpack_message(data)
        assert dataclasses.asdict(msg.header) == v["header"]
        assert verify_signature(msg, _key(9).public_key())
        for k, vals in v["arrays"].items():
            np.testing.assert_allclose(msg.tensors[k], encode_tensor(np.array(vals, np.float32), enc, fraction=0.5).decoded)


# ---- rejections, each with its reason --------------------------------------------------------

def test_valid_delta_is_accepted():
    v = _check(_delta())
    assert v.ok and v.message.header.seq == 1 and v.norm > 0


def test_tampered_payload_fails_the_signature():
    data = bytearray(_delta())
    data[-80] ^= 0x01  # a tensor byte, inside the signed range
    assert _check(bytes(data)).reason == "bad_signature"


def test_delta_signed_by_another_key_fails_the_signature():
    assert _check(_delta(key=_key(2))).reason == "bad_signature"


def test_unknown_node_is_an_unknown_key():
    assert _check(_delta(node="stranger")).reason == "unknown_key"


def test_replayed_sequence_number_is_refused():
    assert _check(_delta(seq=5), seen=lambda n, s: (n, s) == ("n1", 5)).reason == "replayed_seq"


def test_wrong_model_hash_is_refused():
    assert _check(_delta(model_hash="other")).reason == "wrong_model_hash"


def test_wrong_shapes_are_refused():
    a = _arrays()
    a["weight"] = a["weight"][:, :4]
    assert _check(_delta(arrays=a)).reason == "wrong_shapes"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(bad):
    a = _arrays()
    a["bias"][1] = bad
    assert _check(_delta(arrays=a)).reason == "non_finite"


def test_oversized_norm_is_refused():
    v = _check(_delta(arrays=_arrays(scale=10.0)), max_norm=1.0)
    assert v.reason == "norm_too_large" and v.norm > 1.0


def test_delta_on_a_future_base_is_refused():
    assert _check(_delta(base_version=4), current=3).reason == "future_base"


def test_topic_node_must_match_the_header():
    assert _check(_delta(), topic_node="n2").reason == "node_mismatch"


@pytest.mark.parametrize("cut", [0, 10, 40, 100])
def test_truncated_message_is_refused(cut):
    assert _check(_delta()[:cut]).reason == "truncated"


def test_garbage_is_refused():
    assert _check(b"\x00" * 500).reason == "garbage"


def test_global_needs_the_server_key_and_a_newer_version():
    g = pack_message(_header(kind="global", node="server", version=4),
                     {k: encode_tensor(v, "fp32") for k, v in _arrays().items()}, _key(5))
    server = [_key(5).public_key()]
    assert check_global(g, expected=EXP, server_keys=server, current_version=3).ok
    assert check_global(g, expected=EXP, server_keys=server, current_version=4).reason == "not_newer"
    assert check_global(g, expected=EXP, server_keys=[_key(6).public_key()], current_version=0).reason == "bad_signature"
    assert check_global(_delta(), expected=EXP, server_keys=server, current_version=0).reason == "wrong_kind"


# ---- verify first: the order of the reasons, and whom they blame --------------------------------

def _unsigned(data: bytes) -> bytes:
    """``data`` with its signature zeroed: a forgery with a valid envelope."""
    return data[:-64] + bytes(64)


def test_the_signature_is_checked_before_the_tensor_table():
    data = bytearray(_delta())
    data[-80] ^= 0xFF  # inside the tensor table
    data[-72 - 1] = 0xEE  # and a stray byte before the key id
    v = _check(_unsigned(bytes(data)))
    assert v.reason == "bad_signature" and v.signer is None and v.message is None


def test_signed_content_is_judged_only_once_the_signature_verified():
    forged = _delta(model_hash="other", key=_key(2))  # wrong content, and not n1's key
    assert _check(forged).reason == "bad_signature"
    assert _check(_delta(model_hash="other")).reason == "wrong_model_hash"


def test_a_revoked_node_or_key_is_refused_and_blamed_on_its_signer():
    from edge.fleet.codec import key_id
    from edge.fleet.trust import TrustSnapshot

    by_node = TrustSnapshot.from_keys({"n1": _key(1).public_key()}, revoked="n1\n")
    by_id = TrustSnapshot.from_keys({"n1": _key(1).public_key()}, revoked=key_id(_key(1).public_key()).hex())
    for keys in (by_node, by_id):
        v = _check(_delta(), keys=keys)
        assert v.reason == "revoked" and v.signer == "n1"
    assert _check(_delta(key=_key(2)), keys=by_node).reason == "bad_signature"  # a forgery blames nobody


@pytest.mark.parametrize("make, reason, signer", [
    (lambda: b"garbage" * 20, "garbage", None),
    (lambda: _delta(node="stranger"), "unknown_key", None),
    (lambda: _delta(key=_key(2)), "bad_signature", None),
    (lambda: _delta(arrays=_arrays(scale=10.0)), "norm_too_large", "n1"),
    (lambda: _delta(base_version=9), "future_base", "n1"),
])
def test_the_verdict_names_a_signer_only_when_its_key_verified(make, reason, signer):
    v = _check(make(), max_norm=1.0)
    assert (v.reason, v.signer) == (reason, signer)


def test_a_refusal_before_decoding_still_names_the_signed_header_and_digest():
    from edge.fleet.codec import Message

    data = _delta(model_hash="other", seq=7)
    v = _check(data)
    assert v.reason == "wrong_model_hash" and v.message is None and v.signer == "n1"
    assert v.header.seq == 7 and v.digest == Message(v.header, {}, b"", data[-64:], data[:-64]).digest


def test_node_mismatch_is_blamed_on_the_signer_not_the_topic():
    v = _check(_delta(), topic_node="n2")
    assert (v.reason, v.signer) == ("node_mismatch", "n1")
    v = _check(_unsigned(_delta()), topic_node="n2")
    assert (v.reason, v.signer) == ("bad_signature", None)


def test_an_old_global_head_is_refused_without_decoding_its_tensors():
    g = pack_message(_header(kind="global", node="server", version=2),
                     {k: encode_tensor(v, "fp32") for k, v in _arrays().items()}, _key(5))
    v = check_global(g, expected=EXP, server_keys=[_key(5).public_key()], current_version=2)
    assert v.reason == "not_newer" and v.message is None and v.header.version == 2


def test_the_reasons_are_documented_in_format_md_in_the_order_checked():
    text = (Path(__file__).parents[1] / "edge" / "fleet" / "FORMAT.md").read_text()
    start = text.index("## Validation")
    end = text.find("\n## ", start)
    section = text[start:end if end >= 0 else len(text)]
    for r in REASONS:
        assert f"`{r}`" in section, r
    pos = [section.index(f"`{r}`") for r in ("bad_header", "wrong_kind", "unknown_key", "bad_signature", "revoked",
                                              "node_mismatch", "wrong_fleet", "not_newer", "non_finite", "norm_too_large")]
    assert pos == sorted(pos)


# ---- fuzzing: nothing but a Verdict comes out ----------------------------------------------

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_random_bytes_give_a_reason_never_an_exception(data):
    v = _check(data)
    assert not v.ok and v.reason in REASONS


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_messages_give_a_reason_never_an_exception(data):
    msg = bytearray(_delta(encoding=data.draw(st.sampled_from(["fp32", "fp16", "topk8"]))))
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(msg) - 1))
        msg[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        msg = msg[: data.draw(st.integers(0, len(msg)))]
    try:
        unpack_message(bytes(msg))
    except DecodeError as e:
        assert e.kind in REASONS
    v = _check(bytes(msg))
    assert v.reason in REASONS or v.ok


# ---- error feedback --------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31), st.integers(1, 30), st.sampled_from(["fp16", "topk8"]), st.floats(0.01, 0.5))
def test_error_feedback_preserves_what_was_learned(seed, rounds, encoding, fraction):
    """Over many rounds, sum(sent) + residual == sum(updates): compression loses nothing."""
    r = np.random.default_rng(seed)
    total = np.zeros((6, 10), np.float64)
    sent_total = np.zeros((6, 10), np.float64)
    residual = np.zeros((6, 10), np.float32)
    for _ in range(rounds):
        u = (r.standard_normal((6, 10)) * r.uniform(0.001, 1.0)).astype(np.float32)
        total += u
        step = encode_pending({"w": residual + u}, encoding=encoding, fraction=fraction)
        sent_total += step.sent["w"]
        residual = step.residual["w"]
    np.testing.assert_allclose(sent_total + residual, total, atol=1e-4 * max(1.0, np.abs(total).max()))


def test_error_feedback_eventually_sends_everything():
    pending = {"w": np.linspace(-1, 1, 100).astype(np.float32)}
    sent = np.zeros(100, np.float32)
    for _ in range(400):
        step = encode_pending(pending, encoding="topk8", fraction=0.05)
        sent += step.sent["w"]
        pending = step.residual
    assert np.abs(pending["w"]).max() < 1e-3
