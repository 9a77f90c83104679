"""Fault suite, part 1b: hostile serial input on a real pty, with an MQTT probe alongside.

The emulated firmware (``firmware_bridge.sim.FirmwareSim``) streams good frames; the test
writes garbage bytes, truncated and corrupted frames, oversized frames and HELLOs with
hostile device ids (hypothesis) into the same pty. After each batch the daemon still
serves the good MQTT stream, the serial link recovers (its frames keep being served after
the firmware reboots), /healthz is 200, and nothing is ever published to a topic holding a
wildcard. Finding 1's third example (a HELLO whose device id holds ``+`` or ``#``) is its
own regression test: counted as ``bad_hello``, its samples dropped until a valid HELLO.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.sim import Machine
from firmware_bridge import messages as m
from firmware_bridge.codec import encode_frame
from firmware_bridge.sim import FirmwareSim
from tests.faultkit import Probe, healthz, poll, start_daemon
from tests.helpers import Client

pytestmark = pytest.mark.timeout(240)

NODE = "sx"
GOOD_ID = "mcu-1"
HYP = settings(max_examples=20, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def fw():
    machine = Machine(seed=5)
    with FirmwareSim(source=machine.read, device_id=GOOD_ID, speed=2.0) as sim:
        yield sim


@pytest.fixture(scope="module")
def daemon(broker, tmp_path_factory, fw):
    d = start_daemon(broker, tmp_path_factory.mktemp("serial"), node=NODE,
                     sources=[{"type": "mqtt", "topic": "sensors/{device}/{stream}"},
                              {"type": "serial", "port": fw.path, "stream": "vib"}])
    yield d
    d.stop()


@pytest.fixture(scope="module")
def probe(broker, daemon):
    p = Probe(broker, NODE)
    p.check()
    yield p
    p.close()


@pytest.fixture(scope="module")
def watcher(broker, daemon):
    c = Client(broker, f"edge/{NODE}/#")
    yield c
    c.close()


def _serial(daemon) -> dict:
    return daemon.status()["sources"]["serial1"]


def _serial_predictions(watcher, device: str) -> int:
    topic = f"edge/{NODE}/predictions/{device}/vib"
    return sum(1 for t, _, _ in list(watcher.msgs) if t == topic)


def _serial_served_again(daemon, watcher, fw, device: str = GOOD_ID) -> None:
    """Reboot the firmware (a valid HELLO again) and wait for new predictions of its stream."""
    fw.device_id = device
    before = _serial_predictions(watcher, device)
    fw.reset()
    poll(lambda: _serial_predictions(watcher, device) >= before + 2, 60, what=f"serial predictions of {device}")


def _no_wildcard_topics(watcher) -> None:
    for t, _, _ in list(watcher.msgs):
        assert "+" not in t and "#" not in t and "//" not in t, t[:200]


def _hello(device_id: str) -> m.Hello:
    return m.Hello(device_id, "evil 0.1", 1000.0, m.FORMAT_INT16, ("ax", "ay", "az"), ("g", "g", "g"), 1 / 4096, 7, 0)


def _samples(seq: int) -> m.Samples:
    return m.Samples(seq, 0, 1000.0, np.zeros((25, 3), np.int16))


# ---- strategies ---------------------------------------------------------------------------
device_ids = st.one_of(
    st.text(max_size=60).filter(lambda s: len(s.encode()) <= 255),
    st.sampled_from(["+", "#", "a+b", "x#", "a/b", "", "$SYS", "m" * 65, "..", "名前", "sensor 1"]),
    st.from_regex(r"[A-Za-z0-9_.:\-]{1,64}", fullmatch=True))


@st.composite
def wire_chunks(draw) -> bytes:
    kind = draw(st.sampled_from(["garbage", "truncated", "corrupt", "oversized", "hello", "zeros"]))
    if kind == "garbage":
        return draw(st.binary(min_size=1, max_size=3000))
    if kind == "zeros":
        return b"\x00" * draw(st.integers(1, 50))
    frame = encode_frame(draw(st.sampled_from([_samples(3), _hello(GOOD_ID), m.Label(0, "imbalance"),
                                               m.Heartbeat(0, 0)])))
    if kind == "truncated":  # cut short, then the next frame's delimiter
        return frame[:draw(st.integers(0, len(frame) - 2))] + b"\x00"
    if kind == "corrupt":
        i = draw(st.integers(0, len(frame) - 2))
        flip = draw(st.integers(1, 255))
        return frame[:i] + bytes([(frame[i] ^ flip) or 1]) + frame[i + 1:]
    if kind == "oversized":  # a run without a delimiter far beyond the largest frame
        return bytes([draw(st.integers(1, 255))]) * draw(st.integers(1100, 6000)) + b"\x00"
    return encode_frame(_hello(draw(device_ids)))


# ---- tests -----------------------------------------------------------------------------
def test_serial_stream_is_served(daemon, watcher, fw):
    poll(lambda: _serial_predictions(watcher, GOOD_ID) >= 2, 60, what="the first serial predictions")


@pytest.mark.timeout(400)
@HYP
@given(chunks=st.lists(wire_chunks(), min_size=1, max_size=6))
def test_hostile_serial_bytes_are_skipped_and_serving_goes_on(daemon, probe, watcher, fw, chunks):
    for c in chunks:
        fw.inject_bytes(c)
    assert probe.check()["device"] == "probe"  # the MQTT stream never waited on the serial one
    assert healthz(daemon.metrics_port) == 200 and not daemon.supervisor.dead(), daemon.supervisor.dead()
    _serial_served_again(daemon, watcher, fw)
    _no_wildcard_topics(watcher)


def test_after_the_hostile_bytes_errors_were_counted(daemon, watcher):
    st_ = _serial(daemon)
    assert st_["decode_errors"] > 0, st_
    assert daemon.pipeline.publisher.counters["publish_errors"] == 0
    _no_wildcard_topics(watcher)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("bad_id", ["mcu+1", "mcu#", "+", "#", "a/+/#"])
def test_finding1_a_wildcard_hello_is_counted_and_never_published(daemon, probe, watcher, fw, bad_id):
    bad_before = _serial(daemon)["bad_hello"]
    fw.device_id = bad_id
    fw.reset()  # the firmware boots and says HELLO with the bad id, then streams
    poll(lambda: _serial(daemon)["bad_hello"] > bad_before, 60, what="bad_hello to be counted")
    dropped = _serial(daemon)["unnamed_samples"]
    poll(lambda: _serial(daemon)["unnamed_samples"] > dropped, 60, what="the unnamed device's samples to be dropped")
    assert probe.check()["device"] == "probe"
    assert healthz(daemon.metrics_port) == 200 and not daemon.supervisor.dead()
    _no_wildcard_topics(watcher)
    assert daemon.pipeline.publisher.counters["publish_errors"] == 0 and daemon.link.counters["publish_errors"] == 0
    _serial_served_again(daemon, watcher, fw, "mcu-2")  # a valid HELLO names the stream again
