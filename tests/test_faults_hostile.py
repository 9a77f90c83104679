"""Fault suite, part 1: hostile input through a real mosquitto to one live daemon.

Hypothesis generates payloads, labels and topics of the kinds an attacker or a broken
device sends (nesting ~1000 deep, huge and odd numbers, long topic levels up to a legal
65,000+ byte topic, non-UTF-8 bytes, wrong types, names outside the name rule). After
each generated batch a good probe stream is still served and /healthz is 200; at the end
no thread died and every published topic is a valid, wildcard-free topic name. Then the
three examples of finding 1 of issue 8, each as its own regression test.
"""
from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.faultkit import Probe, healthz, metric, poll, scrape, start_daemon
from tests.helpers import Client

pytestmark = pytest.mark.timeout(240)

NODE = "hx"
HYP = settings(max_examples=20, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])
MAX_TOPIC = 65_535  # MQTT's limit for a topic name, in UTF-8 bytes


@pytest.fixture(scope="module")
def daemon(broker, tmp_path_factory):
    d = start_daemon(broker, tmp_path_factory.mktemp("hostile"), node=NODE)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def probe(broker, daemon):
    p = Probe(broker, NODE)
    p.check()  # warm: the first window of a stream is served before any hostile input
    yield p
    p.close()


@pytest.fixture(scope="module")
def sender(broker):
    c = Client(broker)
    yield c
    c.close()


@pytest.fixture(scope="module")
def watcher(broker, daemon):
    """Everything the daemon publishes under its base, for the topic checks at the end."""
    c = Client(broker, f"edge/{NODE}/#")
    yield c
    c.close()


def _still_serving(daemon, probe) -> None:
    assert probe.check()["device"] == "probe"
    assert healthz(daemon.metrics_port) == 200
    assert not daemon.supervisor.dead(), daemon.supervisor.dead()


def _wait_labels_taken(daemon, sent_before: int, n: int) -> None:
    """The label lane took (or refused) every label message sent, and is empty."""
    lane = daemon.pipeline.inbox.labels
    poll(lambda: lane.counters["offered"] + lane.counters["oversized"] >= sent_before + n and not len(lane),
         60, what="labels to reach the pipeline")


def _internal_errors(daemon) -> dict:
    return dict(daemon.supervisor.errors)


# ---- strategies: raw JSON text, so that numbers JSON libraries refuse can be sent -------
ODD_NUMBERS = ["1e999", "-1e999", "1e-400", "-0", "0.0", "123456789012345678901234567890123456789",
               "-9223372036854775809", "18446744073709551616", "NaN", "Infinity", "-Infinity", "1.7976931348623157e308",
               "4.9e-324", "0x10", "01", "1.", ".5", "+1", "1e", "--1"]
atoms = st.one_of(st.sampled_from(ODD_NUMBERS), st.integers().map(str),
                  st.floats(allow_nan=False, allow_infinity=False).map(repr),
                  st.text(max_size=30).map(json.dumps), st.sampled_from(["null", "true", "false", "[]", "{}"]))


def _deep(depth: int, inner: str = "1", kind: str = "[") -> str:
    if kind == "[":
        return "[" * depth + inner + "]" * depth
    return '{"a":' * depth + inner + "}" * depth


deep = st.builds(_deep, st.integers(900, 1100), atoms, st.sampled_from(["[", "{"]))
values = st.recursive(atoms, lambda kids: st.one_of(
    st.lists(kids, max_size=6).map(lambda xs: "[" + ",".join(xs) + "]"),
    st.dictionaries(st.sampled_from(["t", "v", "t0", "dt", "label", "y", "x"]), kids, max_size=4).map(
        lambda d: "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in d.items()) + "}")), max_leaves=12)
field = st.one_of(values, deep)


@st.composite
def sensor_payloads(draw) -> bytes:
    shape = draw(st.sampled_from(["sample", "batch", "csv", "bytes", "rows"]))
    now = time.time()
    if shape == "sample":
        t = draw(st.one_of(st.just(repr(now)), field))
        return f'{{"t":{t},"v":{draw(field)}}}'.encode()
    if shape == "batch":
        return f'{{"t0":{draw(st.one_of(st.just(repr(now)), field))},"dt":{draw(field)},"v":{draw(field)}}}'.encode()
    if shape == "rows":  # a plausible batch with one poisoned row
        rows = ["[0.1,0.2,0.3]"] * draw(st.integers(0, 300)) + [draw(field)]
        return f'{{"t0":{now!r},"dt":0.001,"v":[{",".join(rows)}]}}'.encode()
    if shape == "csv":  # CSV lines with odd numbers, text and wrong column counts
        cells = draw(st.lists(st.one_of(st.sampled_from(ODD_NUMBERS + ["abc", "", " ", "1", "2.5"]),
                                        st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)),
                              min_size=1, max_size=6))
        return ",".join(cells).encode()
    return draw(st.binary(min_size=1, max_size=2000))  # non-UTF-8 and anything else


# names outside the rule (chars, empty, too long) or inside it. In a topic level they stay
# within what a broker accepts in a PUBLISH (valid UTF-8 without wildcards, NUL, control
# characters or non-characters: mosquitto disconnects a client that sends those); in a
# label payload's device/stream fields anything goes.
_topic_chars = st.characters(blacklist_characters="/+#", blacklist_categories=("Cs", "Cc", "Cn"))
odd_names = st.one_of(
    st.text(_topic_chars, min_size=1, max_size=80),
    st.sampled_from(["$SYS", "..", " ", "ü", "a b", "名前", "x" * 65, "\ufeff", "a.b:c-d_e"]),
    st.from_regex(r"[A-Za-z0-9_.:\-]{1,64}", fullmatch=True))
payload_names = st.one_of(odd_names, st.text(max_size=80), st.sampled_from(["a/b", "+", "#", "x#", "", "\x00"]))


@st.composite
def sensor_topics(draw) -> str:
    kind = draw(st.sampled_from(["names", "long", "empty"]))
    if kind == "long":  # one huge level; the whole topic stays a legal MQTT topic name
        n = draw(st.integers(65, MAX_TOPIC - len("sensors//accel")))
        return f"sensors/{'d' * n}/accel"
    if kind == "empty":
        return draw(st.sampled_from(["sensors//accel", "sensors/dev/", "sensors//"]))
    return f"sensors/{draw(odd_names)}/{draw(odd_names)}"


@st.composite
def label_messages(draw) -> tuple[str, bytes]:
    topic = draw(st.one_of(st.just(f"edge/{NODE}/labels"),
                           st.builds(lambda a, b: f"edge/{NODE}/labels/{a}/{b}", odd_names, odd_names),
                           st.builds(lambda a: f"edge/{NODE}/labels/{a}/x/y/z", odd_names)))
    now = time.time()
    shape = draw(st.sampled_from(["label", "y", "names", "bytes"]))
    if shape == "label":
        payload = f'{{"t":{draw(st.one_of(st.just(repr(now)), field))},"label":{draw(field)}}}'
    elif shape == "y":
        payload = f'{{"t":{now!r},"y":{draw(field)}}}'
    elif shape == "names":
        payload = json.dumps({"t": now, "label": "normal", "device": draw(payload_names),
                              "stream": draw(payload_names)})
    else:
        return topic, draw(st.binary(max_size=500))
    return topic, payload.encode()


def _bad_total(daemon) -> int:
    return sum(daemon.pipeline.bad.values())


# ---- hypothesis: batches of hostile messages, then the probe ------------------------------
@pytest.mark.timeout(300)
@HYP
@given(batch=st.lists(st.tuples(sensor_topics(), sensor_payloads()), min_size=1, max_size=5))
def test_hostile_sensor_messages_are_skipped_and_serving_goes_on(daemon, probe, sender, batch):
    errors = _internal_errors(daemon)
    for topic, payload in batch:
        sender.publish(topic, payload)
    _still_serving(daemon, probe)  # the probe was sent after the batch on the same connection
    assert _internal_errors(daemon) == errors, "hostile input must be bad input, not an internal error"


@pytest.mark.timeout(300)
@HYP
@given(batch=st.lists(label_messages(), min_size=1, max_size=5))
def test_hostile_labels_are_skipped_and_serving_goes_on(daemon, probe, sender, batch):
    errors = _internal_errors(daemon)
    lane = daemon.pipeline.inbox.labels
    before = lane.counters["offered"] + lane.counters["oversized"]
    for topic, payload in batch:
        sender.publish(topic, payload)
    _wait_labels_taken(daemon, before, len(batch))
    _still_serving(daemon, probe)
    assert _internal_errors(daemon) == errors


def test_after_the_hostile_batches_bad_input_was_counted_and_every_topic_is_valid(daemon, probe, watcher):
    _still_serving(daemon, probe)
    text = scrape(daemon.metrics_port)
    assert metric(text, "edge_bad_input_total") >= 20, daemon.pipeline.bad
    assert metric(text, "edge_thread_alive", thread="pipeline") == 1.0
    assert daemon.link.counters["publish_errors"] == 0 and daemon.pipeline.publisher.counters["publish_errors"] == 0
    time.sleep(0.2)  # let the watcher see the probe's last prediction (nothing is asserted on time)
    for topic, _, _ in list(watcher.msgs):
        assert "+" not in topic and "#" not in topic and len(topic.encode()) < 1024, topic[:200]
        if "/predictions/" in topic:
            dev, stream = topic.split("/")[-2:]
            assert len(topic.split("/")) == 5 and dev and stream, topic[:200]


# ---- finding 1, its examples one by one ---------------------------------------------------
def _deep_list(n: int) -> str:
    return "[" * n + "1" + "]" * n


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["label", "sample", "time"])
def test_finding1_a_value_nested_1000_deep_is_bad_input(daemon, probe, sender, where):
    now = time.time()
    bad_before = _bad_total(daemon)
    if where == "label":
        lane = daemon.pipeline.inbox.labels
        offered = lane.counters["offered"]
        sender.publish(f"edge/{NODE}/labels", f'{{"t":{now!r},"label":{_deep_list(1000)}}}'.encode())
        _wait_labels_taken(daemon, offered, 1)
    elif where == "sample":
        sender.publish("sensors/deep/accel", f'{{"t":{now!r},"v":{_deep_list(1000)}}}'.encode())
    else:
        sender.publish("sensors/deep/accel", f'{{"t":{_deep_list(1000)},"v":[1,2,3]}}'.encode())
    _still_serving(daemon, probe)
    poll(lambda: _bad_total(daemon) > bad_before, 30, what="the deep value to be counted as bad input")
    assert not any(k[0] == "pipeline" for k in _internal_errors(daemon)), daemon.supervisor.errors


@pytest.mark.timeout(120)
def test_finding1_a_65530_byte_sensor_topic_is_a_bad_name(daemon, probe, sender, watcher):
    topic = "sensors/" + "d" * (65_530 - len("sensors//accel")) + "/accel"
    assert len(topic.encode()) == 65_530
    before = daemon.pipeline.bad.get("bad_name", 0)
    sender.publish(topic, f'{{"t0":{time.time()!r},"dt":0.001,"v":{json.dumps([[0.1, 0.2, 0.3]] * 256)}}}'.encode())
    _still_serving(daemon, probe)
    poll(lambda: daemon.pipeline.bad.get("bad_name", 0) > before, 30, what="bad_name to be counted")
    assert all(len(t) < 1024 for t, _, _ in list(watcher.msgs)), "a prediction topic was built from the long level"
    assert daemon.pipeline.publisher.counters["publish_errors"] == 0
