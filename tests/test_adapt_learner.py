"""The learner on seeded synthetic features: adapts, remembers, promotes with a margin, rolls back."""
from __future__ import annotations

import collections

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.config import AdaptConfig
from edge.adapt.learner import Learner
from edge.adapt.synth import ClusterStream, fit_linear_head
from edge.errors import ConfigError, StateError

K, D = 4, 32


@pytest.fixture(scope="module")
def world():
    stream = ClusterStream(dim=D, classes=K, sep=0.5, noise=1.0, seed=0)
    rng = np.random.default_rng(0)
    z, y = stream.sample(3000, rng=rng)
    return stream, fit_linear_head(z, y, K)


def _learner(world, events=None, **cfg):
    clock = [0.0]
    cfg.setdefault("seed", 0)
    lr = Learner(task="classification", feature_size=D, classes=[f"c{i}" for i in range(K)], global_head=world[1],
                 global_version="1.0", config=AdaptConfig(**cfg), on_event=events.append if events is not None else None,
                 clock=lambda: clock[0])
    lr._clock = clock
    return lr


def _feed(lr, z, y):
    out = []
    for a, b in zip(z, y):
        lr._clock[0] += 0.05
        out.append(lr.learn_one(a, int(b)))
    return out


def _acc(snap, z, y):
    return float((snap.predict(z).argmax(1) == y).mean())


def test_head_adapts_to_a_shifted_stream_and_prequential_accuracy_rises(world):
    stream, _ = world
    rng = np.random.default_rng(1)
    events = []
    lr = _learner(world, events)
    _feed(lr, *stream.sample(100, rng=rng))
    r = _feed(lr, *stream.sample(500, rng=rng, shifted=True))
    early = np.mean([x["error"] == 0 for x in r[:50]])
    late = np.mean([x["error"] == 0 for x in r[-100:]])
    assert late > early + 0.2
    zt, yt = stream.sample(1000, rng=rng, shifted=True)
    assert _acc(lr.champion, zt, yt) > _acc(lr._global, zt, yt) + 0.2
    kinds = {e["type"] for e in events}
    assert {"drift", "promotion"} <= kinds


def test_replay_limits_forgetting_of_the_nominal_condition(world):
    stream, _ = world
    rng = np.random.default_rng(2)
    nominal = stream.sample(300, rng=rng)
    shifted = stream.sample(600, rng=rng, shifted=True)
    zt, yt = stream.sample(1000, rng=rng)
    accs = {}
    for name, cfg in {"replay": {}, "none": {"replay_bytes": 1, "recent_share": 1.0, "anchor": 0.0}}.items():
        lr = _learner(world, **cfg)
        _feed(lr, *nominal)
        _feed(lr, *shifted)
        accs[name] = _acc(lr.champion, zt, yt)
    assert accs["replay"] > accs["none"] + 0.05


def test_no_promotion_without_the_margin(world):
    stream, _ = world
    rng = np.random.default_rng(3)
    z, y = stream.sample(600, rng=rng, shifted=True)
    assert _learner(world, promote_margin=0.99, drift_detector="none").metrics()["promotions_total"] == 0
    lr = _learner(world, promote_margin=0.99, drift_detector="none")
    _feed(lr, z, y)
    assert lr.metrics()["promotions_total"] == 0 and lr.champion is lr._global
    lr2 = _learner(world, promote_margin=0.05, drift_detector="none")
    _feed(lr2, z, y)
    assert lr2.metrics()["promotions_total"] >= 1


def test_poisoned_labels_are_held_by_the_guard_not_promoted(world):
    stream, _ = world
    rng = np.random.default_rng(4)
    events = []
    lr = _learner(world, events, drift_detector="none")
    z, y = stream.sample(400, rng=rng)
    _feed(lr, z, (y + 1) % K)  # a miswired or hostile label source: every label is wrong, consistently
    m = lr.metrics()
    assert m["promotions_total"] == 0 and lr.champion is lr._global
    assert m["promotions_held_total"] >= 1 and m["label_anomalies_total"] == 1
    assert [e for e in events if e["type"] == "label_anomaly"][0]["contradicting_share"] > 0.5


def test_without_the_guard_poisoned_labels_promote_a_bad_head_that_is_then_rolled_back(world):
    stream, _ = world
    rng = np.random.default_rng(4)
    events = []
    lr = _learner(world, events, drift_detector="none", guard=False)
    z, y = stream.sample(400, rng=rng)
    _feed(lr, z, (y + 1) % K)
    assert lr.metrics()["promotions_total"] >= 1 and lr.champion is not lr._global
    _feed(lr, *stream.sample(300, rng=rng))  # correct labels again
    assert lr.metrics()["rollbacks_total"] >= 1
    assert any(e["type"] == "rollback" and e["version"] == "1.0" for e in events)
    for e in (e for e in events if e["type"] in ("promotion", "refresh", "rollback")):  # each names its evidence
        assert e["labels"] > 0 and e["e_value"] >= e["threshold"] and e["mean_gain"] > 0
    zt, yt = stream.sample(1000, rng=rng)
    assert _acc(lr.champion, zt, yt) > 0.8


@pytest.mark.parametrize("z,y,reason", [
    (np.zeros(D), "gearbox", "unknown_class"), (np.zeros(D), 9, "unknown_class"), (np.zeros(D), 1.5, "unknown_class"),
    (np.zeros(D + 1), 0, "bad_shape"), (np.full(D, np.nan), 0, "non_finite"),
])
def test_bad_labels_are_rejected_and_counted(world, z, y, reason):
    lr = _learner(world)
    assert lr.learn_one(z, y) == {"accepted": False, "reason": reason}
    m = lr.metrics()
    assert m["labels_rejected"] == {reason: 1} and m["labels_total"] == 0


_LABELS = st.one_of(st.integers(-3, K + 2), st.floats(allow_nan=True, allow_infinity=True, width=32),
                    st.sampled_from([0.0, 1.0, 2.5, -0.0, float(K), 1e30]))


@settings(max_examples=60, deadline=None)
@given(st.lists(_LABELS, min_size=1, max_size=40), st.booleans())
def test_learn_many_takes_and_rejects_the_labels_learn_one_would(world, labels, as_float):
    """The batch's vectorised label check accepts, converts and rejects (by reason) exactly
    the labels the per-row check does, for class indices and regression targets."""
    from edge.adapt.batch import _targets

    Y = np.asarray(labels, np.float64 if as_float or any(isinstance(v, float) for v in labels) else np.int64)
    rows = np.arange(len(Y))
    for lr in (_learner(world), Learner(task="regression", feature_size=D, config=AdaptConfig(seed=0))):
        expect = [(i, lr._target(Y[i])) for i in rows]
        kept, T = _targets(Y, rows, task=lr.task, outputs=lr.outputs, n_classes=lr._n_classes, target=lr._target,
                           rejected=lr.rejected)
        want = [(i, t) for i, (t, why) in expect if not why]
        assert kept.tolist() == [i for i, _ in want]
        for got, (_, t) in zip(T, want):
            np.testing.assert_array_equal(np.asarray(got).reshape(-1), np.asarray(t).reshape(-1))
        reasons = collections.Counter(why for _, (_, why) in expect if why)
        assert dict(lr.rejected) == dict(reasons)


def test_learn_many_rejects_a_batch_without_one_label_a_row(world):
    lr = _learner(world)
    z = np.zeros((3, D), np.float32)
    for y in ([0, 1], 2, [[0, 1, 2]]):
        assert lr.learn_many(z, y)["accepted"] == 0
    assert lr.metrics()["labels_rejected"] == {"bad_shape": 9} and lr.metrics()["labels_total"] == 0


def test_class_names_and_indices_are_both_labels(world):
    lr = _learner(world)
    assert lr.learn_one(np.zeros(D), "c2")["accepted"] and lr.learn_one(np.zeros(D), 2)["accepted"]


def test_state_round_trip_continues_identically(world):
    stream, _ = world
    rng = np.random.default_rng(5)
    a = _learner(world)
    _feed(a, *stream.sample(300, rng=rng, shifted=True))
    b = _learner(world)
    b.load_state_dict(a.state_dict())
    b._clock[0] = a._clock[0]
    more = stream.sample(100, rng=rng, shifted=True)
    ra, rb = _feed(a, *more), _feed(b, *more)
    assert [x["served"].tolist() for x in ra] == [x["served"].tolist() for x in rb]
    assert a.metrics() == b.metrics()


def test_state_of_another_head_kind_is_refused(world):
    a = _learner(world, head="lowrank")
    with pytest.raises(StateError, match="head_kind"):
        _learner(world).load_state_dict(a.state_dict())


def test_training_budget_skips_steps_but_still_scores(world):
    stream, _ = world
    lr = _learner(world, budget_steps_per_s=10)
    z, y = stream.sample(50, rng=np.random.default_rng(6))
    for a, b in zip(z, y):  # 50 labels in 0 simulated seconds
        lr.learn_one(a, int(b))
    m = lr.metrics()
    assert m["labels_total"] == 50 and m["train_steps_total"] == 10 and m["train_steps_skipped_total"] == 40


def test_set_global_moves_the_anchor_and_the_serving_head(world):
    lr = _learner(world)
    w = {"weight": np.zeros((K, D)), "bias": np.arange(K, dtype=np.float32)}
    lr.set_global(w, "2.0")
    assert lr.champion.version == "2.0" and lr.champion.predict(np.zeros(D)).argmax() == K - 1
    assert lr.events()[-1]["type"] == "global"


def test_every_head_kind_learns(world):
    stream, _ = world
    rng = np.random.default_rng(7)
    z, y = stream.sample(400, rng=rng, shifted=True)
    zt, yt = stream.sample(500, rng=rng, shifted=True)
    for kind in ("linear", "lowrank", "mlp"):
        lr = _learner(world, head=kind)
        _feed(lr, z, y)
        assert _acc(lr.champion, zt, yt) > _acc(lr._global, zt, yt) + 0.15, kind


def test_regression_learner_fits_a_shifted_target():
    rng = np.random.default_rng(8)
    w_true = rng.normal(size=(2, 8)).astype(np.float32)
    clock = [0.0]
    lr = Learner(task="forecast", feature_size=8, outputs=2, global_head={"weight": w_true, "bias": np.zeros(2)},
                 config=AdaptConfig(), clock=lambda: clock[0])
    z = rng.normal(size=(600, 8)).astype(np.float32)
    y = z @ w_true.T + 1.5  # the sensor gained an offset
    for a, b in zip(z, y):
        clock[0] += 0.05
        lr.learn_one(a, b)
    assert lr.metrics()["champion_mse"] < 0.2 < lr.metrics()["global_mse"]


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="unknown key 'lrate'"):
        AdaptConfig.from_dict({"lrate": 0.1})
    with pytest.raises(ConfigError, match=r"head = 'cnn' is invalid: allowed: linear, lowrank, mlp"):
        AdaptConfig(head="cnn")
    with pytest.raises(ConfigError, match="must be >= 1"):
        AdaptConfig(batch=0)


def test_near_perfect_heads_do_not_churn_promotions(world):
    stream, _ = world
    rng = np.random.default_rng(8)
    z, y = stream.sample(1200, rng=rng, shifted=True)
    # no real test (an e-value of 2 at no margin, after 2 labels): promotes on noise
    churn = _learner(world, promote_floor=0.0, promote_margin=0.0, promote_alpha=0.5, promote_alpha_drift=0.5,
                     eval_min=2, drift_detector="none")
    calm = _learner(world, drift_detector="none")  # default: e-value 100 beyond a 5 % margin and a 1 % floor
    _feed(churn, z, y)
    _feed(calm, z, y)
    assert calm.metrics()["promotions_total"] >= 1  # the shift is still learned and served
    assert calm.metrics()["promotions_total"] < churn.metrics()["promotions_total"]


def _recall_after_labels_without_one_class(evidence: int):
    """A mildly shifted device whose labels never include class 2: the champion's recall per class."""
    stream = ClusterStream(dim=D, classes=K, sep=0.5, noise=1.0, seed=0, shift=0.35)
    rng = np.random.default_rng(0)
    head = fit_linear_head(*stream.sample(3000, rng=rng), K)
    clock = [0.0]
    lr = Learner(task="classification", feature_size=D, classes=[f"c{i}" for i in range(K)], global_head=head,
                 global_version="1", config=AdaptConfig(seed=0, class_evidence=evidence), clock=lambda: clock[0])
    zt, yt = stream.sample(2000, rng=rng, shifted=True)
    z, y = stream.sample(1500, rng=rng, shifted=True, labels=rng.choice([0, 1, 3], 1500))
    for a, b in zip(z, y):
        clock[0] += 0.05
        lr.learn_one(a, int(b))
    pred = lr.champion.predict(zt).argmax(1)
    return [float((pred[yt == c] == c).mean()) for c in range(K)], lr


def test_a_class_without_labels_is_not_unlearnt():
    """Class evidence: a class the device never labels keeps most of what the global head knew
    of it, where plain cross-entropy erases it; the classes it does label learn as well."""
    plain, _ = _recall_after_labels_without_one_class(0)
    kept, lr = _recall_after_labels_without_one_class(20)
    assert plain[2] < 0.3 and kept[2] >= 0.45 and kept[2] >= plain[2] + 0.25, (plain, kept)
    seen = [0, 1, 3]
    assert np.mean([kept[c] for c in seen]) >= np.mean([plain[c] for c in seen]) - 0.05, (plain, kept)
    off = lr.trainer.logit_offset  # class 2 has no label: its pull is 0.1 / 20 of the others'
    assert off is not None and off[2] == pytest.approx(np.log(0.1 / 20)) and off[[0, 1, 3]].tolist() == [0.0, 0.0, 0.0]
    restored = Learner(task="classification", feature_size=D, classes=[f"c{i}" for i in range(K)], config=AdaptConfig(seed=0))
    restored.load_state_dict(lr.state_dict())  # the offset comes back with the label counts
    np.testing.assert_array_equal(restored.trainer.logit_offset, off)


def test_the_class_evidence_offset_ends_once_every_class_has_its_labels(world):
    lr = _learner(world, class_evidence=5)
    stream = world[0]
    z, y = stream.sample(200, rng=np.random.default_rng(3))
    assert lr.trainer.logit_offset is not None and np.ptp(lr.trainer.logit_offset) == 0  # equal counts: no effect
    _feed(lr, z, y)
    assert lr.trainer.logit_offset is None and lr._offset_done


def _first_swap_after(lr, z, y):
    for i, r in enumerate(_feed(lr, z, y)):
        if r["swap"] in ("promotion", "refresh", "rollback"):
            return i
    return None


def test_a_clear_shift_is_promoted_within_tens_of_labels(world):
    """The anytime-valid test (docs/LEARNING.md, "Promotions") on a clear shift: the first
    promotion comes tens of labels after it, on three seeds."""
    stream, _ = world
    for seed in (11, 12, 13):
        rng = np.random.default_rng(seed)
        events = []
        lr = _learner(world, events, seed=seed)
        assert _first_swap_after(lr, *stream.sample(300, rng=rng)) is None
        n = _first_swap_after(lr, *stream.sample(300, rng=rng, shifted=True))
        assert n is not None and n <= 80, (seed, n)
        ev = next(e for e in events if e["type"] == "promotion")
        assert ev["e_value"] >= ev["threshold"] and ev["mean_gain"] > 0


def test_a_stationary_stream_swaps_none(world):
    stream, _ = world
    lr = _learner(world)
    _feed(lr, *stream.sample(3000, rng=np.random.default_rng(21)))
    m = lr.metrics()
    assert m["promotions_total"] == m["refreshes_total"] == m["rollbacks_total"] == 0 and lr.champion is lr._global


def test_an_old_checkpoint_with_paired_blocks_evidence_loads_with_the_evidence_restarted(world):
    """A state from before issue 18 holds PairedBlocks' block means: it loads, its evidence restarts."""
    stream, _ = world
    rng = np.random.default_rng(22)
    lr = _learner(world)
    _feed(lr, *stream.sample(150, rng=rng, shifted=True))
    old = lr.state_dict()
    old["pairs"] = {"promote": {"means": [0.1, 0.3, 0.2], "acc": 0.05, "k": 3}, "rollback": {"means": [], "acc": 0.0, "k": 0}}
    back = _learner(world)
    back.load_state_dict(old)
    assert back.counters == lr.counters and all(p.n == 0 and p.e_value == 1.0 for p in back.pairs.values())
    _feed(back, *stream.sample(50, rng=rng, shifted=True))  # and it goes on learning
    assert back.metrics()["labels_total"] == 200


def test_a_bad_evidence_state_is_refused_whole(world):
    stream, _ = world
    lr = _learner(world)
    _feed(lr, *stream.sample(100, rng=np.random.default_rng(23), shifted=True))
    bad = lr.state_dict()
    bad["pairs"]["promote"] = {**bad["pairs"]["promote"], "log_wealth": float("nan")}
    fresh = _learner(world)
    with pytest.raises(StateError, match="inconsistent"):
        fresh.load_state_dict(bad)
    assert fresh.metrics()["labels_total"] == 0


def test_adopt_consolidated_serves_the_trained_head_and_restarts_records_and_evidence(world):
    """The public method edge.learning's incremental_update is to call instead of setting members."""
    stream, _ = world
    lr = _learner(world)
    _feed(lr, *stream.sample(120, rng=np.random.default_rng(24), shifted=True))
    lr.adopt_consolidated("u7")
    assert lr.champion.version == "1.0+u7" and lr.champion is not lr._global
    assert all(p.n == 0 for p in lr.pairs.values()) and lr.preq["champion"].n == lr.preq["challenger"].n == 0
    assert lr.since_swap == 0 and lr.serving() == "champion"  # served until new labels compare it


def test_learn_one_and_learn_many_share_one_accounting_path(world):
    """The guard, the budget and the counters are the same function for both entry points:
    the same labels one by one, through learn_one or as batches of one through learn_many,
    on a budget that pays a step for every 4th label, give the same accounting."""
    stream, _ = world
    z, y = stream.sample(300, rng=np.random.default_rng(25))
    y = np.where(np.arange(300) >= 100, (y + 1) % K, y)  # then a hostile source: the guard trips
    out = {}
    for how in ("one", "many"):
        lr = _learner(world, drift_detector="none", budget_steps_per_s=5.0)
        for a, b in zip(z, y):
            lr._clock[0] += 0.05
            lr.learn_one(a, int(b)) if how == "one" else lr.learn_many(a[None], [int(b)])
        m = lr.metrics()
        out[how] = ({k: m[k] for k in ("labels_total", "train_steps_total", "train_steps_skipped_total",
                                       "promotions_held_total", "label_anomalies_total")},
                    lr.guard.state_dict(), lr.budget.skipped)
    assert out["one"] == out["many"]
    recent = out["one"][1]["recent"]  # both paths were exercised: steps skipped, the guard's window full of contradictions
    assert out["one"][0]["train_steps_skipped_total"] > 100 and sum(recent) / len(recent) > 0.5
