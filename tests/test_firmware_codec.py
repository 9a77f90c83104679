"""Properties and units of the pure firmware_bridge parts: COBS, CRC, codec, session, text."""
import doctest

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import firmware_bridge.codec
import firmware_bridge.cobs
import firmware_bridge.crc
import firmware_bridge.text
from firmware_bridge import messages as m
from firmware_bridge.cobs import cobs_decode, cobs_encode
from firmware_bridge.codec import FrameDecoder, decode_frames, decode_payload_frames, encode_frame
from firmware_bridge.crc import crc16
from firmware_bridge.session import BinarySession
from firmware_bridge.text import TextStream, parse_lines
from firmware_bridge.vectors import VECTORS

SETTINGS = settings(max_examples=150, deadline=None)

f32 = st.floats(width=32, allow_nan=False)
u32 = st.integers(0, 2**32 - 1)
text = st.text(max_size=12)


@st.composite
def samples(draw):
    n, c = draw(st.integers(0, 20)), draw(st.integers(1, 8))
    if draw(st.booleans()):
        v = np.array(draw(st.lists(st.integers(-32768, 32767), min_size=n * c, max_size=n * c)), np.int16)
    else:
        v = np.array(draw(st.lists(f32, min_size=n * c, max_size=n * c)), np.float32)
    return m.Samples(draw(st.integers(0, 65535)), draw(u32), draw(f32), v.reshape(n, c))


@st.composite
def hellos(draw):
    names = draw(st.lists(text, max_size=6))
    units = draw(st.lists(text, min_size=len(names), max_size=len(names)))
    return m.Hello(draw(text), draw(text), draw(f32), draw(st.sampled_from([1, 2])), tuple(names), tuple(units),
                   draw(f32), draw(st.integers(0, 65535)), draw(u32))


messages = st.one_of(
    samples(), hellos(),
    st.builds(m.Label, u32, st.one_of(st.integers(-2**31, 2**31 - 1), f32, text)),
    st.builds(m.Heartbeat, u32, st.integers(0, 255)),
    st.builds(m.Pong, st.integers(0, 65535), u32),
    st.builds(m.Ping, st.integers(0, 65535)), st.builds(m.SetRate, f32),
    st.just(m.Start()), st.just(m.Stop()), st.just(m.GetHello()),
)


def test_crc_is_ccitt_false_with_documented_check_value():
    assert crc16(b"123456789") == 0x29B1 == firmware_bridge.crc.CRC_CHECK


def test_docstring_examples_run():
    for mod in (firmware_bridge.cobs, firmware_bridge.crc, firmware_bridge.codec, firmware_bridge.text):
        assert doctest.testmod(mod).failed == 0


@SETTINGS
@given(st.binary(max_size=1200))
def test_cobs_round_trip_has_no_zero(data):
    enc = cobs_encode(data)
    assert b"\x00" not in enc and cobs_decode(enc) == data


@SETTINGS
@given(messages)
def test_every_message_type_round_trips(msg):
    got, rest, errors = decode_frames(encode_frame(msg))
    assert (got, rest, errors) == ([msg], b"", [])


@SETTINGS
@given(st.binary(max_size=3000))
def test_garbage_never_raises_and_never_yields_a_frame_failing_its_crc(garbage):
    msgs, rest, errors = decode_frames(garbage)
    assert len(rest) <= firmware_bridge.codec.MAX_ENCODED
    for block in garbage.split(b"\x00")[:-1]:
        out = firmware_bridge.codec.decode_block(block)
        if not isinstance(out, firmware_bridge.codec.FrameError):
            payload = cobs_decode(block)
            assert crc16(payload[:-2]) == int.from_bytes(payload[-2:], "little")


@SETTINGS
@given(st.binary(max_size=2000), messages, st.lists(st.integers(1, 64), max_size=8))
def test_valid_frame_after_garbage_is_recovered_whatever_the_chunking(garbage, msg, cuts):
    stream = garbage + b"\x00" + encode_frame(msg)
    dec, got, pos = FrameDecoder(), [], 0
    for c in cuts:
        got += dec.feed(stream[pos:pos + c])
        pos += c
    got += dec.feed(stream[pos:])
    assert got[-1] == msg


def test_corrupted_frame_is_counted_as_crc_error():
    frame = bytearray(encode_frame(VECTORS[1][1]))
    frame[5] ^= 0x01
    msgs, _, errors = decode_frames(bytes(frame) + encode_frame(m.Ping(1)))
    assert msgs == [m.Ping(1)] and [e.kind for e in errors] == ["crc"]


def test_payload_frames_decode_for_mqtt_with_times_ending_now():
    hello = m.Hello("d", "f", 100.0, m.FORMAT_INT16, ("a",), ("g",), scale=0.5)
    a = m.Samples(0, 1_000_000, 100.0, np.array([[2], [4]], np.int16))
    b = m.Samples(1, 1_020_000, 100.0, np.array([[6], [8]], np.int16))
    out = decode_payload_frames(encode_frame(hello) + encode_frame(a) + encode_frame(b), now=50.0)
    t = np.concatenate([x[0] for x in out])
    v = np.concatenate([x[1] for x in out])
    np.testing.assert_allclose(t, [49.97, 49.98, 49.99, 50.0])
    np.testing.assert_array_equal(v[:, 0], [1, 2, 3, 4])


def _stream(session, frames, arrival=100.0):
    out = []
    for i, f in enumerate(frames):
        out += session.on_message(f, arrival + i * 0.01)
    return out


HELLO = m.Hello("dev", "1", 100.0, m.FORMAT_FLOAT32, ("x",), ("u",), boot_id=5, t_us=0)


def _samples(seq, t_us):
    return m.Samples(seq % 65536, t_us % 2**32, 100.0, np.ones((1, 1), np.float32))


def test_session_counts_lost_frames_across_sequence_wrap():
    s = BinarySession()
    _stream(s, [HELLO] + [_samples(q, q * 10_000) for q in (65533, 65534, 65537, 65538)])
    assert s.counters["lost_frames"] == 2 and s.counters["resets"] == 0


def test_session_unwraps_device_clock_and_keeps_spacing():
    s = BinarySession()
    start = 2**32 - 15_000
    ev = _stream(s, [m.Hello("d", "1", 100.0, 2, ("x",), ("u",), t_us=start - 1000)]
                 + [_samples(q, start + q * 10_000) for q in range(4)])
    t = [e[1][0] for e in ev if e[0] == "samples"]
    np.testing.assert_allclose(np.diff(t), 0.01, atol=1e-9)
    assert s.counters["resets"] == 0


def test_session_detects_reboot_by_boot_id_and_by_clock():
    s = BinarySession()
    _stream(s, [HELLO, _samples(0, 5_000_000), _samples(1, 5_010_000)])
    _stream(s, [m.Hello("dev", "1", 100.0, 2, ("x",), ("u",), boot_id=6, t_us=100), _samples(0, 1000)])
    _stream(s, [_samples(1, 11000), _samples(0, 100)])
    assert s.counters["resets"] == 2 and s.counters["lost_frames"] == 0


def test_session_waits_for_hello_before_samples():
    s = BinarySession()
    assert s.on_message(_samples(0, 0), 1.0) == [("need_hello",)]


def test_text_lines_with_commas_tabs_and_bad_lines():
    rows, errors = parse_lines([b"1,2", b"3\t4\r", b"", b"5,x", b"6"], channels=2)
    np.testing.assert_array_equal(rows, [[1, 2], [3, 4]])
    assert sorted(k for k, _ in errors) == ["columns", "text_parse"]


def test_text_stream_estimates_rate_from_arrival_times():
    ts = TextStream(min_seconds=1.0, min_lines=10)
    out = []
    for i in range(30):  # 10 lines every 0.1 s = 100 Hz, with a header line first
        data = (b"ax,ay\r\n" if i == 0 else b"") + b"".join(b"%d,%d\r\n" % (k, -k) for k in range(i * 10, i * 10 + 10))
        out += ts.feed(data, 1000.0 + i * 0.1)
    assert ts.names == ("ax", "ay") and ts.sample_rate == pytest.approx(100.0)
    t = np.concatenate([o[0] for o in out])
    v = np.concatenate([o[1] for o in out])
    np.testing.assert_array_equal(v[:, 0], np.arange(len(v)))
    np.testing.assert_allclose(np.diff(t), 0.01, atol=1e-9)


def test_firmware_bridge_never_imports_edge():
    import subprocess
    import sys
    code = ("import sys, firmware_bridge, firmware_bridge.link, firmware_bridge.sim, firmware_bridge.vectors;"
            "assert not [k for k in sys.modules if k == 'edge' or k.startswith('edge.')]")
    from pathlib import Path
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30, cwd=Path(__file__).resolve().parents[1])


@settings(max_examples=200, deadline=None)
@given(st.floats(-1e6, 1e6), st.lists(st.floats(0.0, 0.2), min_size=1, max_size=60),
       st.floats(0.001, 0.1), st.integers(1, 50))
def test_device_clock_keeps_samples_in_order_and_converges_to_the_fastest_frame(true_offset, delays, period, n):
    """Frames of n samples with any transfer delays under the tolerance: consecutive
    samples are never stamped out of order (spacing within 10% of the period), nothing
    re-anchors, the offset stays within [true, true + first delay], and after enough
    frames at the smallest delay no sample is stamped later than it arrived."""
    from firmware_bridge.session import DeviceClock

    c = DeviceClock(tolerance=0.5)
    last = None
    settle = [min(delays)] * (int(0.2 / (0.1 * period)) + 2)  # enough slew steps to close any gap under 0.2 s
    for k, d in enumerate(delays + settle):
        dev = 10.0 + (k * n + np.arange(n)) * period
        off = c.offset_for(float(dev[-1]), float(dev[-1]) + true_offset + d, period=period)
        t = dev + off
        if last is not None:
            assert t[0] - last >= 0.9 * period - 1e-6
        last = t[-1]
        assert true_offset - 1e-6 <= off <= true_offset + delays[0] + 1e-6
    assert c.reanchors == 0
    assert last <= float(dev[-1]) + true_offset + min(delays) + 1e-6
