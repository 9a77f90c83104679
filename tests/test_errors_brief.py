"""``edge.errors.brief``: any value, however deep, large or hostile, gives a short string."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.errors import brief

pytestmark = pytest.mark.timeout(60)

values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary(),
    lambda c: st.lists(c, max_size=5) | st.tuples(c, c) | st.dictionaries(st.text(max_size=3) | st.integers(), c, max_size=4)
    | st.frozensets(st.integers(), max_size=3),
    max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(value=values, limit=st.integers(4, 200))
def test_any_value_gives_a_string_within_the_limit(value, limit):
    text = brief(value, limit)
    assert type(text) is str and len(text) <= limit


json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary(),
    lambda c: st.lists(c, max_size=5) | st.tuples(c, c) | st.dictionaries(st.text(max_size=3) | st.integers(), c, max_size=4),
    max_leaves=30)


@settings(max_examples=100, deadline=None)
@given(value=json_like)
def test_short_values_read_like_repr(value):
    r = repr(value)
    if len(r) <= 80:
        assert brief(value) == r


def _nest(depth, make):
    v = []
    for _ in range(depth):
        v = make(v)
    return v


@pytest.mark.parametrize("value", [
    _nest(100_000, lambda v: [v]),
    _nest(100_000, lambda v: {"k": v}),
    _nest(100_000, lambda v: (v, 1)),
    10 ** 100_000,
    -(10 ** 5000),
    "x" * 10_000_000,
    b"\xff" * 1_000_000,
    bytearray(b"\x00" * 100_000),
    memoryview(b"abc"),
    float("nan"),
], ids=["deep-list", "deep-dict", "deep-tuple", "huge-int", "huge-negative-int", "long-str", "long-bytes",
        "bytearray", "memoryview", "nan"])
def test_hostile_values_are_bounded(value):
    assert len(brief(value)) <= 80


def test_a_self_containing_list_is_bounded():
    a: list = []
    a.append(a)
    assert brief(a, 20) == "[[[[[[[[[[[[[[[[[..."


class _Str(str):
    def __repr__(self):
        raise RuntimeError("no")

    def __getitem__(self, i):
        raise RuntimeError("no")

    def __len__(self):
        raise RuntimeError("no")


class _Bad:
    def __repr__(self):
        raise RuntimeError("no repr")


class _Deep:
    def __repr__(self):
        return repr(_nest(100_000, lambda v: [v]))  # RecursionError inside repr


class _Huge:
    def __repr__(self):
        return "y" * 1_000_000


class _List(list):
    def __iter__(self):
        raise RuntimeError("no iteration")


@pytest.mark.parametrize("value, expected", [
    (_Str("abc"), "'abc'"),
    (_Bad(), "<_Bad>"),
    (_Deep(), "<_Deep>"),
    (_List([1, 2]), "[1, 2]"),
    ({"a": _Bad()}, "{'a': <_Bad>}"),
], ids=["str-subclass", "repr-raises", "repr-recurses", "list-subclass", "bad-value-in-dict"])
def test_objects_that_misbehave_are_described_safely(value, expected):
    assert brief(value) == expected


def test_a_huge_repr_is_cut():
    assert brief(_Huge(), 10) == "yyyyyyy..."
