"""Payload decoding: every accepted form, every rejection with its kind, garbage never escapes."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.errors import DecodeError
from edge.ingest.payload import decode_label, decode_payload

NOW = 1_700_000_000.0


def dec(p, **kw):
    return decode_payload(p, channels=3, now=NOW, max_skew=3600.0, **kw)


def test_single_json_sample():
    assert dec(b'{"t": 1700000000.5, "v": [1, 2.5, -3]}') == ([1700000000.5], [[1.0, 2.5, -3.0]])


def test_json_sample_without_time_has_no_time():
    assert dec(b'{"v": [0, 0, 1]}') == ([None], [[0.0, 0.0, 1.0]])


def test_json_batch_without_t0_has_no_times():
    assert dec(b'{"dt": 0.001, "v": [[1,1,1],[2,2,2]]}') == ([None, None], [[1.0] * 3, [2.0] * 3])


def test_json_batch_spaces_samples_by_dt():
    ts, rows = dec(b'{"t0": 1700000000.0, "dt": 0.5, "v": [[1,1,1],[2,2,2],[3,3,3]]}')
    assert ts == [NOW, NOW + 0.5, NOW + 1.0]
    assert rows[2] == [3.0, 3.0, 3.0]


def test_json_list_of_samples():
    ts, rows = dec(b'[{"t": 1700000000.0, "v": [1,2,3]}, {"t": 1700000000.1, "v": [4,5,6]}]')
    assert len(ts) == 2 and rows[1] == [4.0, 5.0, 6.0]


def test_csv_with_and_without_time():
    assert dec(b"1700000000.25,1,2,3\n") == ([1700000000.25], [[1.0, 2.0, 3.0]])
    assert dec(b"1\t2\t3") == ([None], [[1.0, 2.0, 3.0]])


@pytest.mark.parametrize("payload, kind", [
    (b'{"t": 1700000000, "v": [1, 2', "bad_json"),
    (b'{"t": 1700000000, "v": [1, 2]}', "wrong_channels"),
    (b'{"t": 1700000000, "v": [1, 2, 3, 4]}', "wrong_channels"),
    (b'{"t": 1700000000, "v": [1, NaN, 3]}', "bad_json"),
    (b'{"t": 1700000000, "v": [1, null, 3]}', "bad_value"),
    (b'{"t": 1700000000, "v": [1, "x", 3]}', "bad_value"),
    (b'{"t": 1e300, "v": [1, 2, 3]}', "absurd_time"),
    (b'{"t": 12, "v": [1, 2, 3]}', "absurd_time"),
    (b'{"t": "now", "v": [1, 2, 3]}', "bad_time"),
    (b'{"t0": 1700000000, "dt": 0, "v": [[1,2,3]]}', "bad_time"),
    (b'{"t0": 1700000000, "dt": -1, "v": [[1,2,3]]}', "bad_time"),
    (b'{"x": 1}', "bad_shape"),
    (b'"hello"', "bad_shape"),
    (b"1,2,nan", "non_finite"),
    (b"1,2,inf", "non_finite"),
    (b"1,2", "wrong_channels"),
    (b"a,b,c", "bad_csv"),
    (b"\xff\xfe", "bad_csv"),
    (b"", "empty"),
])
def test_bad_payload_is_rejected_with_its_kind(payload, kind):
    with pytest.raises(DecodeError) as e:
        dec(payload)
    assert e.value.kind == kind


def test_oversized_payload_is_rejected_before_parsing():
    with pytest.raises(DecodeError) as e:
        decode_payload(b"{" + b" " * 2000 + b"}", channels=3, now=NOW, max_bytes=1000)
    assert e.value.kind == "oversized"


def test_skew_check_can_be_disabled_for_replayed_recordings():
    assert decode_payload(b'{"t": 12.0, "v": [1,2,3]}', channels=3, now=NOW, max_skew=0.0)[0] == [12.0]


def test_labels_class_and_value():
    assert decode_label(b'{"t": 1700000000.0, "label": "imbalance"}', now=NOW) == (NOW, "imbalance", "", "")
    assert decode_label(b'{"t": 1700000000.0, "y": 2}', now=NOW) == (NOW, 2.0, "", "")
    assert decode_label(b'{"y": [1, 2]}', now=NOW)[1] == [1.0, 2.0]


@pytest.mark.parametrize("payload", [b"{", b"[]", b'{"t": 1}', b'{"label": [1]}', b'{"y": "x"}', b'{"y": []}',
                                     b'{"label": "a", "device": 3}'])
def test_bad_labels_are_rejected(payload):
    with pytest.raises(DecodeError):
        decode_label(payload, now=NOW)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_never_escapes_as_another_exception(data):
    try:
        ts, rows = dec(data)
    except DecodeError:
        return
    assert len(ts) == len(rows)
    assert all(len(r) == 3 and all(math.isfinite(x) for x in r) for r in rows)


json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                          lambda c: st.lists(c, max_size=4) | st.dictionaries(st.sampled_from(["t", "v", "t0", "dt", "x"]), c, max_size=4),
                          max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(json_value)
def test_any_json_document_decodes_or_raises_decode_error(doc):
    import orjson

    try:
        payload = orjson.dumps(doc)
    except (TypeError, orjson.JSONEncodeError):
        return
    try:
        ts, rows = dec(payload)
        assert all(len(r) == 3 for r in rows) and all(t is None or math.isfinite(t) for t in ts)
    except DecodeError:
        pass
    try:
        decode_label(payload, now=NOW)
    except DecodeError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(-1e6, 1e6), st.floats(-1e6, 1e6), st.floats(-1e6, 1e6)), min_size=1, max_size=20),
       st.floats(0.0001, 1.0))
def test_batch_round_trip(rows, dt):
    import orjson

    ts, out = dec(orjson.dumps({"t0": NOW, "dt": dt, "v": [list(r) for r in rows]}))
    assert out == [[float(x) for x in r] for r in rows]
    assert ts[0] == NOW and all(b > a for a, b in zip(ts, ts[1:]))


def test_firmware_frame_is_accepted_as_an_mqtt_payload():
    import numpy as np

    from firmware_bridge.codec import encode_frame
    from firmware_bridge.messages import Samples

    vals = np.arange(30, dtype=np.float32).reshape(10, 3)
    frame = encode_frame(Samples(seq=1, t_us=5_000_000, sample_rate=1000.0, values=vals))
    ts, rows = dec(frame)
    assert rows == vals.tolist()
    assert len(ts) == 10 and abs(ts[0] - NOW) < 3600 and all(abs(b - a - 0.001) < 1e-6 for a, b in zip(ts, ts[1:]))


def test_firmware_frame_with_wrong_channel_count_is_rejected():
    import numpy as np

    from firmware_bridge.codec import encode_frame
    from firmware_bridge.messages import Samples

    frame = encode_frame(Samples(seq=1, t_us=0, sample_rate=1000.0, values=np.zeros((4, 2), np.float32)))
    with pytest.raises(DecodeError) as e:
        dec(frame)
    assert e.value.kind == "wrong_channels"


# -- hostile input: only DecodeError, with bounded messages ------------------------------------

MAX_MESSAGE = 300


def _nested(depth: int, leaf: bytes = b"1") -> bytes:
    return b"[" * depth + leaf + b"]" * depth


def _deep_obj(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


odd_numbers = [b"1e308", b"-1e308", b"1e400", b"-0.0", b"18446744073709551616", b"9" * 400, b"1" * 5000,
               b"-9223372036854775809", b"0.0000000000000000000000001", b"true", b"null", b'"1"', b"[]", b"{}"]
deep = [_nested(d) for d in (1, 10, 500, 999, 1000, 1023, 1030, 5000)] + [_deep_obj(d) for d in (999, 1000, 1100)]
hostile_values = st.sampled_from(odd_numbers + deep) | st.binary(max_size=40).map(lambda b: b'"' + b + b'"')
fields = st.sampled_from([b"t", b"v", b"t0", b"dt", b"label", b"y", b"device", b"stream", b"x"])


@st.composite
def hostile_docs(draw):
    """JSON objects (or lists of them) whose fields hold deep, huge, odd or non-UTF-8 values."""
    items = draw(st.lists(st.tuples(fields, hostile_values | st.just(b"[1,2,3]") | st.just(b"[[1,2,3],[4,5,6]]")),
                          max_size=5))
    obj = b"{" + b",".join(b'"' + k + b'":' + v for k, v in items) + b"}"
    return draw(st.sampled_from([obj, b"[" + obj + b"," + obj + b"]", b" " + obj]))


def _only_decode_error(fn, payload, **kw):
    try:
        return fn(payload, **kw)
    except DecodeError as e:
        assert len(str(e)) <= MAX_MESSAGE, str(e)[:400]
        return None


@settings(max_examples=400, deadline=None)
@given(payload=hostile_docs())
def test_hostile_json_raises_only_bounded_decode_errors(payload):
    from edge.ingest.payload import decode_sample

    out = _only_decode_error(decode_payload, payload, channels=3, now=NOW, max_skew=0.0)
    if out is not None:
        ts, rows = out
        assert len(ts) == len(rows) and all(t is None or math.isfinite(t) for t in ts)
    _only_decode_error(decode_payload, payload, channels=3, now=NOW, max_skew=3600.0)
    _only_decode_error(decode_label, payload, now=NOW)
    r = decode_sample(payload, channels=3, now=NOW, max_skew=3600.0)  # never raises
    assert r is None or len(r[1]) == 3


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2000))
def test_any_bytes_raise_only_bounded_decode_errors(data):
    from edge.ingest.payload import decode_sample

    for fmt in ("auto", "json", "csv", "frame"):
        _only_decode_error(decode_payload, data, channels=3, now=NOW, fmt=fmt)
    _only_decode_error(decode_label, data, now=NOW)
    assert decode_sample(data, channels=3, now=NOW) is None or True


@pytest.mark.parametrize("payload", [
    b'{"v": [1, 2, ' + _nested(1000) + b']}',
    b'{"t": ' + _nested(1000) + b', "v": [1, 2, 3]}',
    b'{"t0": 1700000000, "dt": ' + _nested(1000) + b', "v": [[1, 2, 3]]}',
    b'{"v": [[1, 2, 3], ' + _nested(1000) + b']}',
    b"[" + b'{"v": [1, 2, ' + _nested(999) + b']}' + b"]",
])
def test_a_thousand_deep_value_is_a_decode_error(payload):
    with pytest.raises(DecodeError) as e:
        dec(payload)
    assert len(str(e.value)) <= MAX_MESSAGE


@pytest.mark.parametrize("payload", [
    b'{"label": ' + _nested(1000) + b'}',
    b'{"y": ' + _nested(1000) + b'}',
    b'{"t": ' + _nested(1000) + b', "label": "a"}',
    b'{"label": "a", "device": ' + _nested(1000) + b'}',
    b'{"label": "a", "stream": "' + b"s" * 100_000 + b'"}',
])
def test_a_hostile_label_is_a_bounded_decode_error(payload):
    with pytest.raises(DecodeError) as e:
        decode_label(payload, now=NOW)
    assert len(str(e.value)) <= MAX_MESSAGE


def test_a_batch_whose_end_overflows_is_rejected_even_without_a_skew_limit():
    with pytest.raises(DecodeError) as e:
        decode_payload(b'{"t0": 1e308, "dt": 1e308, "v": [[1,2,3],[1,2,3],[1,2,3]]}', channels=3, now=NOW)
    assert e.value.kind == "bad_time"


def test_csv_error_messages_are_bounded():
    with pytest.raises(DecodeError) as e:
        dec(b"x" * 100_000 + b",1,2")
    assert len(str(e.value)) <= MAX_MESSAGE


@settings(max_examples=200, deadline=None)
@given(rate=st.floats(width=32) | st.sampled_from([1e-38, 1e-30, 3.4e38, 0.0, -1.0]),
       t_us=st.integers(0, 2 ** 32 - 1), n=st.integers(1, 20), skew=st.sampled_from([0.0, 3600.0]),
       scale=st.floats(width=32))
def test_firmware_frames_with_odd_rates_and_clocks_decode_or_raise_decode_error(rate, t_us, n, skew, scale):
    import numpy as np

    from firmware_bridge.codec import encode_frame
    from firmware_bridge.messages import Hello, Samples

    hello = encode_frame(Hello("m1", "fw", 1000.0, 1, ("a", "b", "c"), ("g", "g", "g"), scale, 1, 0))
    frame = encode_frame(Samples(seq=1, t_us=t_us, sample_rate=rate, values=np.ones((n, 3), np.int16)))
    for payload in (frame, hello + frame):
        out = _only_decode_error(decode_payload, payload, channels=3, now=NOW, max_skew=skew)
        if out is not None:
            ts, rows = out
            assert all(math.isfinite(t) for t in ts) and all(math.isfinite(x) for r in rows for x in r)


# ---- values must be finite in the windows' dtype (issue 19) ---------------------------------

import numpy as np  # noqa: E402
import orjson  # noqa: E402

from edge.ingest.payload import decode_label, decode_payload, decode_sample  # noqa: E402
from edge.ingest.window import WINDOW_DTYPE  # noqa: E402

_BIG = [1e39, -1e39, 3.5e38, 1.7e308]


@pytest.mark.parametrize("x", _BIG)
@pytest.mark.parametrize("form", ["one", "batch", "list", "csv"])
def test_a_value_infinite_in_float32_is_rejected_in_every_form(form, x):
    doc = {"one": {"v": [x, 0.0, 1.0]}, "batch": {"t0": 1.0, "dt": 0.01, "v": [[0.0, 0.0, 0.0], [0.0, x, 0.0]]},
           "list": [{"t": 1.0, "v": [0.0, 0.0, x]}]}.get(form)
    payload = f"1.0,{x!r},0,0".encode() if form == "csv" else orjson.dumps(doc)
    with pytest.raises(DecodeError) as e:
        decode_payload(payload, channels=3, now=1.0)
    assert e.value.kind == "non_finite"
    if form == "one":
        assert decode_sample(payload, channels=3, now=1.0) is None  # the fast path leaves it to the slow one


@pytest.mark.parametrize("y", ["1e39", "[0.5, -1e39]"])
def test_a_regression_label_infinite_in_float32_is_rejected(y):
    with pytest.raises(DecodeError) as e:
        decode_label(b'{"t": 1.0, "y": %s}' % y.encode(), now=1.0)
    assert e.value.kind == "bad_label"


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_every_accepted_value_is_finite_in_the_window_dtype(x):
    try:
        _, rows = decode_payload(orjson.dumps({"v": [x, 0.0, 0.0]}), channels=3, now=1.0)
    except DecodeError as e:
        assert e.kind == "non_finite" and not np.isfinite(WINDOW_DTYPE(x))
    else:
        assert np.isfinite(np.asarray(rows, WINDOW_DTYPE)).all()
