"""Signed labels name their target (node, device, stream) and time; one canonical signature
in a replay window that outlives a restart; one rate-limit bucket per labeller (issue 16)."""
from __future__ import annotations

import hashlib
import hmac
import subprocess
import sys
import time

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.config import parse_config
from edge.daemon import Daemon
from edge.errors import DecodeError
from edge.ingest.labelauth import LabelGate, ReplayWindow, create_label_key, load_label_keys, sign_label
from edge.ingest.topics import TopicRoute
from edge.ingest.types import StreamKey
from edge.pipeline.router import Router
from tests.helpers import Client

pytestmark = pytest.mark.timeout(120)
KEY = b"0123456789abcdef0123456789abcdef"
NOW = 1_700_000_000.0


def _router(gate: LabelGate) -> Router:
    return Router(sources=[], label_route=TopicRoute("edge/n1/labels/#"), label_gate=gate)


def _deliver(r: Router, topic: str, payload: bytes, now: float = NOW):
    return r.decode_label(r.route(topic), payload, now, topic)


def _kind(fn, *args, **kw) -> str:
    with pytest.raises(DecodeError) as e:
        fn(*args, **kw)
    return e.value.kind


def _envelope(msg: dict, key: bytes = KEY, by: str = "op1") -> bytes:
    """An envelope signed over ``msg`` as given (sign_label insists on t and the target)."""
    raw = orjson.dumps(msg)
    return orjson.dumps({"by": by, "msg": raw.decode(), "sig": hmac.new(key, raw, hashlib.sha256).hexdigest()})


# ---- the target ----------------------------------------------------------------------------
def test_a_label_signed_for_one_stream_is_refused_on_another_streams_topic():
    r = _router(LabelGate(keys={"op1": KEY}, node="n1"))
    env = sign_label(KEY, "op1", {"t": NOW, "label": "imbalance", "device": "m1", "stream": "accel"}, node="n1")
    assert _kind(_deliver, r, "edge/n1/labels/m2/s2", env) == "label_target"
    assert _kind(_deliver, r, "edge/n1/labels/m1", env) == "label_target"  # broader than it was signed for
    got = _deliver(r, "edge/n1/labels/m1/accel", env)
    assert got.key == StreamKey("m1", "accel") and got.by == "op1"


def test_a_label_signed_for_the_bare_topic_trains_only_the_stream_it_names():
    r = _router(LabelGate(keys={"op1": KEY}, node="n1"))
    env = sign_label(KEY, "op1", {"t": NOW, "label": "normal", "device": "m1", "stream": "accel"}, node="n1")
    assert _deliver(r, "edge/n1/labels", env).key == StreamKey("m1", "accel")


def test_a_label_signed_for_another_node_is_refused():
    gate = LabelGate(keys={"op1": KEY}, node="n1")
    env = sign_label(KEY, "op1", {"t": NOW, "label": "normal"}, node="n2")
    assert _kind(gate.open, env, target=None, now=NOW) == "label_target"


@pytest.mark.parametrize("drop", ["node", "device", "stream"])
def test_a_signed_label_that_does_not_name_its_target_is_refused(drop):
    msg = {"node": "n1", "device": "", "stream": "", "t": NOW, "label": "normal"}
    del msg[drop]
    assert _kind(LabelGate(keys={"op1": KEY}, node="n1").open, _envelope(msg), target=None, now=NOW) == "label_target"


@pytest.mark.parametrize("t", [None, "now", True, [NOW]])
def test_a_signed_label_without_a_numeric_time_is_refused(t):
    msg = {"node": "n1", "device": "", "stream": "", "label": "normal"}
    if t is not None:
        msg["t"] = t
    assert _kind(LabelGate(keys={"op1": KEY}, node="n1").open, _envelope(msg), target=None, now=NOW) == "label_time"


def test_a_signed_label_from_far_ahead_is_refused():
    gate = LabelGate(keys={"op1": KEY}, node="n1", max_age_s=60)
    env = sign_label(KEY, "op1", {"t": NOW + 61, "label": "normal"}, node="n1")
    assert _kind(gate.open, env, target=None, now=NOW) == "label_time"


def test_sign_label_insists_on_a_time():
    with pytest.raises(ValueError, match="needs its time"):
        sign_label(KEY, "op1", {"label": "normal"}, node="n1")


# ---- one canonical signature ----------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(flips=st.lists(st.booleans(), min_size=64, max_size=64))
def test_a_replay_in_another_letter_case_is_refused_and_costs_no_rate_budget(flips):
    gate = LabelGate(keys={"op1": KEY}, node="n1", max_per_s=0.001, burst=3)
    env = orjson.loads(sign_label(KEY, "op1", {"t": NOW, "label": "normal"}, node="n1"))
    gate.open(orjson.dumps(env), target=None, now=NOW)
    env["sig"] = "".join(c.upper() if f else c for c, f in zip(env["sig"], flips))
    assert _kind(gate.open, orjson.dumps(env), target=None, now=NOW) == "label_replay"
    for i in range(2):  # the operator's own budget is untouched by the replays
        gate.open(sign_label(KEY, "op1", {"t": NOW + 1 + i, "label": "normal"}, node="n1"), target=None, now=NOW)


@pytest.mark.parametrize("sig", ["zz" * 32, "ab" * 31 + " a", "ab" * 33, "ab" * 31 + "\u0661\u0662", ""])
def test_a_signature_that_is_not_64_hex_digits_is_refused(sig):
    env = orjson.loads(sign_label(KEY, "op1", {"t": NOW, "label": "normal"}, node="n1"))
    env["sig"] = sig
    assert _kind(LabelGate(keys={"op1": KEY}, node="n1").open, orjson.dumps(env), target=None, now=NOW) == "bad_signature"


# ---- the replay window ------------------------------------------------------------------------
def test_the_replay_window_survives_a_checkpoint_round_trip():
    gate = LabelGate(keys={"op1": KEY}, node="n1")
    envs = [sign_label(KEY, "op1", {"t": NOW + i, "label": "normal"}, node="n1") for i in range(5)]
    for e in envs:
        gate.open(e, target=None, now=NOW + 5)
    restored = LabelGate(keys={"op1": KEY}, node="n1")
    restored.load_state_dict(gate.state_dict())
    for e in envs:
        assert _kind(restored.open, e, target=None, now=NOW + 6) == "label_replay"
    restored.open(sign_label(KEY, "op1", {"t": NOW + 6, "label": "normal"}, node="n1"), target=None, now=NOW + 6)


@settings(max_examples=100, deadline=None)
@given(ts=st.lists(st.floats(0, 1000, allow_nan=False), min_size=1, max_size=40), size=st.integers(1, 10),
       age=st.floats(1, 2000))
def test_the_bounded_window_never_lets_a_remembered_or_forgotten_label_pass(ts, size, age):
    w = ReplayWindow(max_size=size, max_age_s=age)
    seen = []
    for i, t in enumerate(ts):
        sig = i.to_bytes(32, "big")
        if w.fresh(sig, t):
            w.add(sig, t, now=1000.0)
            seen.append((sig, t))
        assert len(w) <= size
    back = ReplayWindow(max_size=size, max_age_s=age)
    back.load_state_dict(w.state_dict())
    assert all(not x.fresh(sig, t) for x in (w, back) for sig, t in seen)


def test_the_window_is_bounded_and_refuses_what_it_forgot():
    gate = LabelGate(keys={"op1": KEY}, node="n1", window_max=3)
    envs = [sign_label(KEY, "op1", {"t": NOW + i, "label": "normal"}, node="n1") for i in range(4)]
    for e in envs:
        gate.open(e, target=None, now=NOW + 4)
    assert len(gate.window) == 3
    assert _kind(gate.open, envs[0], target=None, now=NOW + 4) == "label_replay"  # forgotten, still refused


# ---- rate limits per labeller, across topics ------------------------------------------------
def test_a_labellers_rate_limit_is_one_bucket_across_topics():
    r = _router(LabelGate(keys={"op1": KEY}, node="n1", max_per_s=0.001, burst=2))
    topics = ["edge/n1/labels/m1/accel", "edge/n1/labels/m2/accel", "edge/n1/labels/m3/accel"]
    kinds = []
    for i, topic in enumerate(topics):
        dev = topic.split("/")[3]
        env = sign_label(KEY, "op1", {"t": NOW + i, "label": "normal", "device": dev, "stream": "accel"}, node="n1")
        try:
            _deliver(r, topic, env)
            kinds.append("ok")
        except DecodeError as e:
            kinds.append(e.kind)
    assert kinds == ["ok", "ok", "label_rate"]


def test_unsigned_labels_share_one_bucket_across_topics():
    r = _router(LabelGate(max_per_s=0.001, burst=2))
    msg = orjson.dumps({"t": NOW, "label": "normal"})
    _deliver(r, "edge/n1/labels/m1/accel", msg)
    _deliver(r, "edge/n1/labels/m2/accel", msg)
    assert _kind(_deliver, r, "edge/n1/labels/m3/x", msg) == "label_rate"


# ---- the CLI ----------------------------------------------------------------------------------
def test_label_key_twice_is_one_line_and_exit_code_2(tmp_path):
    cmd = [sys.executable, "-m", "edge.cli", "label-key", "op1", "--dir", str(tmp_path / "keys")]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and "already exists" in lines[0] and "Traceback" not in again.stderr


# ---- a real restart ---------------------------------------------------------------------------
def _daemon(broker, tmp_path, keys):
    cfg = parse_config({"node": {"name": "rp", "state_dir": str(tmp_path / "state")},
                        "mqtt": {"host": broker.host, "port": broker.port},
                        "model": {"cache_dir": str(tmp_path / "cache")}, "labels": {"keys_dir": str(keys)}})
    d = Daemon(cfg)
    d.start(connect_timeout=20)
    return d


def _wait(pred, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


def test_a_label_accepted_before_a_restart_is_refused_as_a_replay_after_it(broker, tmp_path):
    create_label_key(tmp_path / "keys", "op1")
    key = load_label_keys(tmp_path / "keys")["op1"]
    env = sign_label(key, "op1", {"t": time.time(), "label": "normal"}, node="rp")
    d = _daemon(broker, tmp_path, tmp_path / "keys")
    c = Client(broker)
    try:
        c.publish("edge/rp/labels", env)
        assert _wait(lambda: d.pipeline.counters["labels"] == 1)
    finally:
        d.stop()  # checkpoints the learner, and the replay window with it
    d2 = _daemon(broker, tmp_path, tmp_path / "keys")
    try:
        c.publish("edge/rp/labels", env)
        assert _wait(lambda: d2.pipeline.bad.get("label_replay", 0) == 1)
        assert d2.pipeline.counters["labels"] == 0
    finally:
        c.close()
        d2.stop()


# ---- garbage inside a valid signature ----------------------------------------------------------
_values = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=False, allow_infinity=False),
                    st.text(max_size=20), st.lists(st.integers(-5, 5), max_size=3), st.sampled_from(["n1", "m1", "", "accel"]))


@settings(max_examples=300, deadline=None)
@given(msg=st.dictionaries(st.sampled_from(["node", "device", "stream", "t", "label", "y"]), _values)
       | st.text(max_size=60) | st.sampled_from(['{"t": 1e400, "node": "n1", "device": "", "stream": ""}',
                                                                  '[1, 2]', '{"t": -1e400}',
                                                                  '{"node": "n1", "device": "", "stream": "", "t": 1' + '0' * 40 + '}']),
       target=st.sampled_from([None, StreamKey("m1", "accel"), StreamKey("m1", "")]))
def test_anything_signed_is_accepted_or_refused_with_a_decode_error(msg, target):
    raw = msg.encode() if isinstance(msg, str) else orjson.dumps(msg)
    env = orjson.dumps({"by": "op1", "msg": raw.decode(), "sig": hmac.new(KEY, raw, hashlib.sha256).hexdigest()})
    gate = LabelGate(keys={"op1": KEY}, node="n1")
    try:
        inner, by = gate.open(env, target=target, now=NOW)
    except DecodeError:
        return
    d = orjson.loads(inner)
    assert d["node"] == "n1" and abs(NOW - float(d["t"])) <= gate.max_age_s
    assert target is None or (d["device"], d["stream"]) == tuple(target)


def test_a_window_that_cannot_be_restored_refuses_labels_from_before_the_restart():
    gate = LabelGate(keys={"op1": KEY}, node="n1")
    gate.load_state_dict({"format": 1, "floor": 0.0, "sigs": [[1, 2]], "t": [1.0]})  # torn: not 32 bytes a row
    old = sign_label(KEY, "op1", {"t": NOW - 10, "label": "normal"}, node="n1")
    new = sign_label(KEY, "op1", {"t": NOW + 1, "label": "normal"}, node="n1")
    assert _kind(gate.open, old, target=None, now=NOW) == "label_replay"
    gate.open(new, target=None, now=NOW + 1)


def test_the_daemon_refuses_a_signed_label_moved_to_another_stream_or_node(broker, tmp_path):
    create_label_key(tmp_path / "keys", "op1")
    key = load_label_keys(tmp_path / "keys")["op1"]
    d = _daemon(broker, tmp_path, tmp_path / "keys")
    c = Client(broker)
    try:
        now = time.time()
        mine = sign_label(key, "op1", {"t": now, "label": "normal", "device": "m1", "stream": "accel"}, node="rp")
        c.publish("edge/rp/labels/m2/s2", mine)  # captured and moved to another stream's topic
        c.publish("edge/rp/labels", sign_label(key, "op1", {"t": now, "label": "normal"}, node="other"))
        c.publish("edge/rp/labels/m1/accel", mine)  # where it was signed for
        assert _wait(lambda: d.pipeline.counters["labels"] == 1 and d.pipeline.bad.get("label_target", 0) == 2)
    finally:
        c.close()
        d.stop()
