"""Bounded influence: no device, whatever it claims or however many deltas it sends, moves a
version more than the documented bound (edge/fleet/aggregate.py, docs/TRUST.md)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.fleet.aggregate import Bounds, Contribution, Reference, aggregate, aggregate_deltas, staleness_weight
from edge.fleet.aggregator import Aggregator
from edge.fleet.codec import Header, encode_tensor, pack_message, unpack_message
from edge.fleet.keys import generate_key
from edge.fleet.store import SQLiteStore
from edge.fleet.validate import Expected

DIM = 8


def _unit(i: int, dim: int = DIM) -> np.ndarray:
    v = np.zeros(dim, np.float32)
    v[i % dim] = 1.0
    return v


# ---- the two findings, on the real aggregator and a real SQLite store -------------------------

@pytest.fixture
def fleet(tmp_path):
    nodes = ["h0", "h1", "h2", "h3", "h4", "evil"]
    keys = {n: generate_key() for n in nodes}
    exp = Expected(fleet="f", model="vibration", model_hash="ab", head_kind="linear", shapes={"w": (DIM,)})
    agg = Aggregator(store=SQLiteStore(tmp_path / "fleet.db"), expected=exp, key=generate_key(),
                     trusted=lambda: {n: k.public_key() for n, k in keys.items()}, k=3, t_s=1e9, max_norm=100.0,
                     initial={"w": np.zeros(DIM, np.float32)})
    seqs = dict.fromkeys(nodes, 0)

    def delta(node, vec, *, samples=20):
        seqs[node] += 1
        h = Header(kind="delta", fleet="f", model="vibration", model_hash="ab", head_kind="linear", node=node,
                   seq=seqs[node], base_version=agg.current, samples=samples, encoding="fp32")
        return (f"fleet/f/vibration/delta/{node}", pack_message(h, {"w": encode_tensor(vec, "fp32")}, keys[node]))

    yield agg, delta
    agg.store.close()


def _step(agg, rec) -> np.ndarray:
    prev = unpack_message(agg.store.version(rec.version - 1).message).tensors["w"]
    return unpack_message(rec.message).tensors["w"] - prev


def _honest_history(agg, delta, versions=4):
    """Honest versions first: devices h0..h4 with steps of norm 0.065 (the finding's honest scale)."""
    rng = np.random.default_rng(0)
    for v in range(versions):
        items = []
        for i in range(5):
            d = (_unit(0) + 0.3 * rng.standard_normal(DIM)).astype(np.float32)
            items.append(delta(f"h{i}", d / np.linalg.norm(d) * 0.065))
        assert all(x.ok for x in agg.ingest(items))
        assert agg.maybe_commit(force=True) is not None


def test_three_deltas_of_one_device_in_a_batch_of_three_do_not_set_the_clip_bound(fleet):
    agg, delta = fleet
    _honest_history(agg, delta)
    evil = -_unit(0) * 5.0  # norm 5, under max_norm 100: validly signed, accepted
    assert all(v.ok for v in agg.ingest([delta("evil", evil) for _ in range(3)]))
    rec = agg.maybe_commit()  # k = 3: the batch is due
    assert rec is not None
    step = np.linalg.norm(_step(agg, rec))
    # the old rule took the batch's median norm (5) as the bound: a step 77x the honest one
    assert step <= 3 * 0.065
    assert agg.last_aggregate.devices == 1 and agg.last_aggregate.tau <= 1.25 * 0.065 * 1.001


def test_a_device_with_several_deltas_among_honest_ones_is_one_contribution(fleet):
    agg, delta = fleet
    _honest_history(agg, delta)
    items = [delta("evil", -_unit(0) * 5.0) for _ in range(3)] + [delta(h, _unit(0) * 0.065) for h in ("h0", "h1", "h2")]
    agg.ingest(items)
    rec = agg.maybe_commit()
    step = _step(agg, rec)
    # still the honest direction: 3 honest devices outweigh 1 device's 3 deltas (merged, its weight is
    # capped at samples_ratio typical devices; the old rule made it 3 of 6 at the bound the batch's median set)
    assert step[0] > 0
    shares = agg.last_aggregate.shares
    assert np.linalg.norm(shares["evil"]["w"]) <= 3 * np.median([np.linalg.norm(shares[h]["w"]) for h in ("h0", "h1", "h2")])


@pytest.mark.parametrize("claim", [10**12, 2**62])
def test_a_huge_sample_claim_does_not_dictate_the_version(fleet, claim):
    agg, delta = fleet
    _honest_history(agg, delta)
    items = [delta(f"h{i}", _unit(0) * 0.065, samples=20) for i in range(4)] + [delta("evil", _unit(1) * 0.065, samples=claim)]
    agg.ingest(items)
    rec = agg.maybe_commit(force=True)
    step = _step(agg, rec)
    cos = float(step @ _unit(1) / np.linalg.norm(step))
    # the old weight was the claim itself: cosine 1.000 with the attacker
    assert cos < 0.5
    rho = agg.bounds.samples_ratio  # it weighs at most rho typical (20-sample) devices
    assert agg.last_aggregate.weights["evil"] <= rho * 20 / (4 * 20 + rho * 20) + 1e-9


def test_a_huge_sample_claim_is_capped_in_the_pure_rule():
    honest = [Contribution({"w": _unit(0) * 0.065}, samples=20, staleness=0, node=f"h{i}") for i in range(4)]
    evil = Contribution({"w": _unit(1) * 0.065}, samples=2**62, staleness=0, node="evil")
    out = aggregate_deltas(honest + [evil], clip_norm=1.0)["w"]
    assert out[1] / np.linalg.norm(out) < 0.5


def test_each_version_carries_the_reference_that_bounds_the_next(fleet):
    agg, delta = fleet
    _honest_history(agg, delta, versions=2)
    ref = unpack_message(agg.store.latest().message).header.metrics
    assert ref["ref_norm"] == pytest.approx(0.065, rel=1e-3) and ref["ref_samples"] == pytest.approx(20.0)
    agg.ingest([delta("evil", -_unit(0) * 5.0)])
    agg.maybe_commit(force=True)
    assert agg.last_aggregate.tau == pytest.approx(ref["ref_norm"])  # the bound it was held to: the history's
    nxt = unpack_message(agg.store.latest().message).header.metrics
    assert nxt["ref_norm"] <= 1.25 * ref["ref_norm"] * 1.001  # and one batch moves the reference a bounded step


# ---- the property: for any batch, one device's influence is within the documented bound ------

_contribs = st.lists(
    st.tuples(st.integers(0, 5),                                     # device
              st.integers(0, 2**62),                                 # claimed samples
              st.floats(0.0, 100.0),                                 # norm (max_norm)
              st.integers(0, DIM - 1), st.sampled_from([1.0, -1.0]),  # direction
              st.integers(0, 6)),                                    # staleness
    min_size=1, max_size=12)


def _batch(rows):
    return [Contribution({"w": _unit(d) * s * n}, samples=smp, staleness=stl, node=f"d{dev}")
            for dev, smp, n, d, s, stl in rows]


def _documented_weights(batch, ref: Reference, b: Bounds, exponent=0.5):
    """a_i = staleness_weight(max staleness) * min(sum of claims, max_samples, samples_ratio * m), per device."""
    claims, stale = {}, {}
    for c in batch:
        claims[c.node] = claims.get(c.node, 0) + c.samples
        stale[c.node] = max(stale.get(c.node, 0), c.staleness)
    m = ref.samples if ref.samples > 0 else float(np.median([min(max(s, 1), b.max_samples) for s in claims.values()]))
    cap = min(b.max_samples, b.samples_ratio * max(m, 1.0))
    return {n: staleness_weight(stale[n], exponent=exponent) * min(max(s, 1), cap) for n, s in claims.items()}, cap


@settings(max_examples=200, deadline=None)
@given(_contribs, st.floats(1e-3, 50.0), st.floats(1.0, 5000.0), st.integers(1, 2**40), st.floats(1.0, 4.0))
def test_one_devices_influence_is_within_the_bound(rows, ref_norm, ref_samples, max_samples, ratio):
    batch = _batch(rows)
    ref, b = Reference(norm=ref_norm, samples=ref_samples), Bounds(max_samples=max_samples, samples_ratio=ratio)
    out = aggregate(batch, reference=ref, bounds=b)
    a, cap = _documented_weights(batch, ref, b)
    total = sum(a.values())
    assert out.tau == ref_norm  # the history's bound, whatever the batch holds
    for node in a:
        assert a[node] <= cap * (1 + 1e-12)
        # its weighted clipped share ...
        assert np.linalg.norm(out.shares[node]["w"]) <= ref_norm * a[node] / total * (1 + 1e-6) + 1e-12
        # ... and its influence: the result with it minus the result without it
        rest = [c for c in batch if c.node != node]
        without = aggregate(rest, reference=ref, bounds=b).delta["w"] if rest else np.zeros(DIM)
        assert np.linalg.norm(out.delta["w"] - without) <= 2 * ref_norm * a[node] / total * (1 + 1e-5) + 1e-6
    np.testing.assert_allclose(sum(s["w"] for s in out.shares.values()), out.delta["w"], rtol=1e-5, atol=1e-6)


@settings(max_examples=100, deadline=None)
@given(_contribs, st.integers(1, 4))
def test_splitting_a_step_into_many_deltas_buys_nothing(rows, parts):
    batch = _batch(rows)
    first = batch[0]
    split = [Contribution({"w": first.arrays["w"] / parts}, samples=first.samples // parts + (i < first.samples % parts),
                          staleness=first.staleness, node=first.node) for i in range(parts)]
    ref = Reference(norm=1.0, samples=100.0)
    np.testing.assert_allclose(aggregate(split + batch[1:], reference=ref).delta["w"],
                               aggregate(batch, reference=ref).delta["w"], rtol=1e-5, atol=1e-6)


@settings(max_examples=200, deadline=None)
@given(st.integers(3, 9), st.data())
def test_first_version_a_minority_of_devices_sets_neither_bound(n_devices, data):
    """No history: tau and the weight cap are medians over distinct devices, inside the honest range."""
    n_bad = data.draw(st.integers(0, (n_devices - 1) // 2))
    honest = [Contribution({"w": _unit(i) * data.draw(st.floats(0.01, 1.0))}, samples=data.draw(st.integers(1, 100)),
                           staleness=0, node=f"h{i}") for i in range(n_devices - n_bad)]
    bad = [Contribution({"w": -_unit(0) * data.draw(st.floats(0.0, 100.0))}, samples=data.draw(st.integers(0, 2**62)),
                        staleness=0, node=f"x{data.draw(st.integers(0, n_bad - 1))}")
           for _ in range(data.draw(st.integers(0, 4 * n_bad)))] if n_bad else []
    out = aggregate(honest + bad, bounds=Bounds(samples_ratio=2.0))
    assert out.tau <= max(np.linalg.norm(c.arrays["w"]) for c in honest) * (1 + 1e-9)
    assert out.weight_cap <= 2.0 * max(c.samples for c in honest)
    for rule in ("median", "trimmed_mean"):  # per-device merge first: a minority stays a minority
        if rule == "trimmed_mean" and n_bad > int(np.floor(0.2 * out.devices)):
            continue  # trimmed mean bounds only as many outliers as it trims
        w = aggregate(honest + bad, rule=rule).delta["w"]
        lo = np.min([c.arrays["w"] for c in honest], axis=0)
        hi = np.max([c.arrays["w"] for c in honest], axis=0)
        assert np.all(w >= lo - 1e-6) and np.all(w <= hi + 1e-6)


def test_the_servers_config_sets_the_bounds(tmp_path):
    from types import SimpleNamespace

    from edge.fleet.config import load_server_config
    from edge.fleet.server import build_aggregator
    from tests.fleet_helpers import make_keys, server_toml

    keys = make_keys(tmp_path, ["n1"])
    path = server_toml(tmp_path, keys, SimpleNamespace(host="127.0.0.1", port=1883), store=str(tmp_path / "fleet.db"))
    path.write_text(path.read_text().replace("max_norm = 50.0\n",
                                             "max_norm = 50.0\nmax_samples = 500\nsamples_ratio = 1.5\nreference_growth = 1.1\n"))
    agg = build_aggregator(load_server_config(path))
    try:
        assert agg.bounds == Bounds(max_samples=500, samples_ratio=1.5, growth=1.1, clip_norm=0.0)
    finally:
        agg.store.close()
