"""The trust model: signed labels, label rate limits, the model pin; and the MQTT conventions
(retained latest prediction, Home Assistant discovery), against a real broker."""
from __future__ import annotations

import shutil
import time

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.config import parse_config
from edge.daemon import Daemon
from edge.errors import DecodeError, ModelError
from edge.ingest.labelauth import LabelGate, create_label_key, load_label_keys, sign_label
from edge.zoo import check_pin, folder_digest, resolve_model
from tests.helpers import Client, batch

pytestmark = pytest.mark.timeout(120)
KEY = b"0123456789abcdef0123456789abcdef"


# ---- the pure gate -----------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=300) | st.builds(lambda d: orjson.dumps(d), st.dictionaries(
    st.sampled_from(["by", "msg", "sig", "t"]), st.one_of(st.text(max_size=80), st.integers(-2**63, 2**63 - 1), st.none()))))
def test_the_gate_refuses_anything_unsigned_with_a_decode_error(payload):
    gate = LabelGate(keys={"op1": KEY}, node="n")
    try:
        gate.open(payload, target=None, now=100.0)
    except DecodeError as e:
        assert e.kind in {"unsigned_label", "unknown_labeller", "bad_signature"}
    else:
        raise AssertionError("an unsigned payload was accepted")


@settings(max_examples=200, deadline=None)
@given(label=st.sampled_from(["normal", "imbalance"]), flip=st.integers(0, 200))
def test_a_signed_label_verifies_and_any_change_to_it_does_not(label, flip):
    env = orjson.loads(sign_label(KEY, "op1", {"t": 100.0, "label": label}, node="n"))
    gate = LabelGate(keys={"op1": KEY}, node="n")
    inner, by = LabelGate(keys={"op1": KEY}, node="n").open(orjson.dumps(env), target=None, now=100.0)
    assert by == "op1" and orjson.loads(inner)["label"] == label
    msg = env["msg"]
    i = flip % len(msg)
    env["msg"] = msg[:i] + ("x" if msg[i] != "x" else "y") + msg[i + 1:]
    with pytest.raises(DecodeError) as e:
        gate.open(orjson.dumps(env), target=None, now=100.0)
    assert e.value.kind == "bad_signature"


def test_replays_and_stale_labels_are_refused():
    gate = LabelGate(keys={"op1": KEY}, node="n", max_age_s=60)
    env = sign_label(KEY, "op1", {"t": 100.0, "label": "a"}, node="n")
    gate.open(env, target=None, now=100.0)
    with pytest.raises(DecodeError, match="replayed"):
        gate.open(env, target=None, now=101.0)
    with pytest.raises(DecodeError) as e:
        gate.open(sign_label(KEY, "op1", {"t": 10.0, "label": "a"}, node="n"), target=None, now=100.0)
    assert e.value.kind == "label_replay"


def test_the_rate_limit_refuses_beyond_the_burst_and_refills():
    gate = LabelGate(max_per_s=2.0, burst=3)
    for _ in range(3):
        gate.open(b"{}", target=None, now=0.0)
    with pytest.raises(DecodeError) as e:
        gate.open(b"{}", target=None, now=0.0)
    assert e.value.kind == "label_rate"
    gate.open(b"{}", target=None, now=1.0)  # two tokens came back


def test_keys_are_created_private_and_loaded(tmp_path):
    p = create_label_key(tmp_path / "keys", "op1")
    assert p.stat().st_mode & 0o777 == 0o600
    keys = load_label_keys(tmp_path / "keys")
    assert set(keys) == {"op1"} and len(keys["op1"]) == 64


# ---- through the daemon --------------------------------------------------------------------
def _daemon(broker, tmp_path, node, **sections):
    cfg = parse_config({"node": {"name": node, "state_dir": str(tmp_path / "state")},
                        "mqtt": {"host": broker.host, "port": broker.port, **sections.pop("mqtt", {})},
                        "model": {"cache_dir": str(tmp_path / "cache"), **sections.pop("model", {})}, **sections})
    d = Daemon(cfg)
    d.start(connect_timeout=20)
    return d


def test_signed_labels_are_accepted_and_forged_or_unsigned_ones_refused(broker, tmp_path):
    create_label_key(tmp_path / "keys", "op1")
    key = load_label_keys(tmp_path / "keys")["op1"]
    d = _daemon(broker, tmp_path, "sig", labels={"keys_dir": str(tmp_path / "keys")})
    c = Client(broker)
    try:
        now = time.time()
        c.publish("edge/sig/labels", sign_label(key, "op1", {"t": now, "label": "normal"}, node="sig"))
        c.publish("edge/sig/labels", sign_label(b"x" * 32, "op1", {"t": now, "label": "imbalance"}, node="sig"))  # forged
        c.publish("edge/sig/labels", {"t": now, "label": "bearing_wear"})  # unsigned
        c.publish("edge/sig/labels", sign_label(key, "mallory", {"t": now, "label": "normal"}, node="sig"))  # unknown labeller
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and sum(d.pipeline.bad.values()) < 3:
            time.sleep(0.05)
        assert d.pipeline.counters["labels"] == 1
        assert d.pipeline.bad == {"bad_signature": 1, "unsigned_label": 1, "unknown_labeller": 1}
    finally:
        c.close()
        d.stop()


def test_the_model_pin_refuses_other_content_before_running_its_code(tmp_path):
    folder = tmp_path / "mine"
    shutil.copytree(resolve_model("vibration").path, folder, ignore=shutil.ignore_patterns("__pycache__"))
    pin = folder_digest(folder)
    check_pin(resolve_model(folder), pin)  # matches
    (folder / "model.py").write_text("raise SystemExit('this code must not run')\n")
    with pytest.raises(ModelError, match="does not match"):
        check_pin(resolve_model(folder), pin)
    assert ModelError.exit_code == 3


def test_the_latest_prediction_is_retained_and_streams_are_announced_to_home_assistant(broker, tmp_path):
    d = _daemon(broker, tmp_path, "ret", mqtt={"ha_discovery": True})
    c = Client(broker, "edge/ret/predictions/#")
    try:
        c.publish("sensors/m9/accel", batch(time.time(), 256))
        c.wait_for(lambda m: len(m) >= 1, timeout=30)
        late = Client(broker, "edge/ret/predictions/#", "homeassistant/#")
        got = late.wait_for(lambda m: [x for x in m if x[0].startswith("homeassistant/")] and
                            [x for x in m if x[0].startswith("edge/")] and m, timeout=20)
        pred = next(x for x in got if x[0] == "edge/ret/predictions/m9/accel")
        assert pred[2] is True  # retained: a fresh subscriber sees the latest at once
        ha = next(x for x in got if x[0].startswith("homeassistant/sensor/"))
        conf = orjson.loads(ha[1])
        assert ha[0] == "homeassistant/sensor/ret_m9_accel/config" and ha[2] is True
        assert conf["state_topic"] == "edge/ret/predictions/m9/accel" and conf["availability_topic"] == "edge/ret/status"
        late.close()
    finally:
        c.close()
        d.stop()
