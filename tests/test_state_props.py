"""Properties of the pure parts of edge.state: the checkpoint codec and the model identity."""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.state import ModelIdentity, _cut, _safe_name, decode_state, encode_state

texts = st.text(max_size=40)
identities = st.builds(
    ModelIdentity, name=texts, version=texts, content_hash=st.text("0123456789abcdef", min_size=64, max_size=64),
    task=st.sampled_from(["classification", "forecast", "regression"]),
    classes=st.lists(texts, max_size=6).map(tuple), outputs=st.integers(1, 10_000),
    feature_size=st.integers(1, 10_000), head=st.sampled_from(["linear", "lowrank", "mlp"]))

leaves = st.one_of(st.none(), st.booleans(), st.integers(-2**62, 2**62), st.floats(allow_nan=False), texts,
                   st.builds(lambda n, s: np.arange(n, dtype=np.float32) * s, st.integers(0, 20), st.floats(-1e3, 1e3)))
trees = st.recursive(leaves, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                     st.dictionaries(texts, kids, max_size=4),
                                                     st.dictionaries(st.integers(0, 100), kids, max_size=4)),
                     max_leaves=20)


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, list) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return isinstance(b, float) and (a == b or (math.isnan(a) and math.isnan(b)))
    return a == b and type(a) is type(b)


@settings(max_examples=150, deadline=None)
@given(trees)
def test_the_codec_round_trips_any_state(tree):
    state = {"s": tree}
    assert _same(state, decode_state(encode_state(state)))


@settings(max_examples=200, deadline=None)
@given(identities, identities)
def test_mismatch_is_none_exactly_for_equal_identities_and_round_trips(a, b):
    assert a.mismatch(ModelIdentity.from_dict(a.to_dict())) is None
    why = a.mismatch(b)
    assert (why is None) == (a == b)
    if why is not None:  # names every differing field, bounded whatever the values
        differing = {f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)}
        assert all(re.search(rf"(^|; ){name} ", why) for name in differing)
        assert len(why) <= 8 * 200


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.none(), st.text(max_size=300), st.integers()))
def test_safe_names_are_folder_safe_and_bounded(value):
    name = _safe_name(value)
    assert re.fullmatch(r"[A-Za-z0-9._-]{1,40}", name) and name not in (".", "..")


@given(st.recursive(st.integers(), lambda k: st.lists(k, max_size=3), max_leaves=50))
def test_cut_is_bounded_for_any_value(value):
    assert len(_cut(value, 80)) <= 80


def test_cut_survives_deep_nesting():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert len(_cut(deep)) <= 80
