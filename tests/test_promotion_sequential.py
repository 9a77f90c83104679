"""The anytime-valid promotion test (edge.adapt.promotion.BettingTest): level at any stopping time, power, evidence."""
from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.adapt.promotion import BettingTest, is_betting_state

STREAMS, LABELS = 200, 400


def _binomial_ceiling(n: int, p: float, tail: float = 1e-6) -> int:
    """The smallest k with P(Binomial(n, p) >= k) <= tail: a count above it is not bad luck."""
    term = (1 - p) ** n  # P(X = 0)
    cdf, k = term, 0
    while 1 - cdf > tail:
        term *= (n - k) / (k + 1) * p / (1 - p)
        k += 1
        cdf += term
    return k + 1


def _null_draw(kind: str, mean: float, rng: random.Random) -> float:
    """One paired difference in [-1, 1] with the given mean, from a class of bounded distributions."""
    if kind == "two_point":  # the bettor's worst case: all the mass at the ends
        return 1.0 if rng.random() < (1 + mean) / 2 else -1.0
    if kind == "uniform":
        w = 1 - abs(mean)
        return mean + rng.uniform(-w, w)
    if kind == "rare_big_loss":  # mostly a small gain, now and then a big loss
        p = 0.1
        small = (mean + p) / (1 - p)  # p * (-1) + (1 - p) * small = mean
        return -1.0 if rng.random() < p else min(1.0, small)
    raise AssertionError(kind)


def _fires(alpha: float, draw, margin: float, labels: int = LABELS) -> int | None:
    t = BettingTest()
    for i in range(labels):
        d = draw()
        t.update(1.0, 1.0 - d, margin, 1.0)
        if t.passes(alpha):
            return i + 1
    return None


@settings(max_examples=12, deadline=None)
@given(kind=st.sampled_from(["two_point", "uniform", "rare_big_loss"]), margin=st.sampled_from([0.0, 0.02, 0.1]),
       below=st.floats(0.0, 0.3), alpha=st.sampled_from([0.01, 0.05, 0.2]), seed=st.integers(0, 2**31))
def test_under_the_null_the_test_fires_at_most_at_its_level(kind, margin, below, alpha, seed):
    """Gains i.i.d. with mean at most the margin: over many streams, read after every label, the
    share that ever passes stays within alpha (Ville), up to a binomial tolerance of 1e-6."""
    rng = random.Random(seed)
    mean = margin - below
    fired = sum(_fires(alpha, lambda: _null_draw(kind, mean, rng), margin) is not None for _ in range(STREAMS))
    assert fired <= _binomial_ceiling(STREAMS, alpha)


def test_a_clearly_better_challenger_passes_within_tens_of_labels():
    """A gain of 0.3 nats a label (sd 0.4) at alpha 0.01: a median of tens of labels over 40
    seeded streams, none beyond 150 (the wealth is a random walk: some streams are unlucky)."""
    needed = []
    for seed in range(40):
        rng = random.Random(seed)
        needed.append(_fires(0.01, lambda: max(-1.0, min(1.0, rng.gauss(0.3, 0.4))), margin=0.03, labels=1000))
    assert None not in needed and sorted(needed)[len(needed) // 2] <= 50 and max(needed) <= 150


@pytest.mark.parametrize("seed", range(20))
def test_a_drift_alarms_higher_level_needs_less_evidence(seed):
    """The same stream passes the drift level (0.2) no later than the normal one (0.01), and on
    these seeds earlier on most."""
    earlier = 0
    for s in range(seed * 5, seed * 5 + 5):
        rng_a, rng_b = random.Random(s), random.Random(s)
        normal = _fires(0.01, lambda: max(-1.0, min(1.0, rng_a.gauss(0.15, 0.6))), 0.02, 2000)
        drift = _fires(0.2, lambda: max(-1.0, min(1.0, rng_b.gauss(0.15, 0.6))), 0.02, 2000)
        assert drift is not None and normal is not None and drift <= normal
        earlier += drift < normal
    assert earlier >= 3


def test_a_null_stream_at_the_drift_level_still_does_not_promote():
    """A drift alarm lowers the evidence needed, never skips it: identical heads (d = 0) and
    a challenger worse by a little never pass, whatever the level."""
    for alpha in (0.2, 0.5):
        for d in (0.0, -0.01):
            t = BettingTest()
            for _ in range(5000):
                t.update(0.4, 0.4 - d, 0.0, 1.0)
            assert not t.passes(alpha) and t.e_value <= 1.0


def test_zero_losses_are_no_evidence():
    """The demo's rollback on champion_loss = 0.0 = global_loss: no gain, no e-value above 1."""
    t = BettingTest()
    for _ in range(10_000):
        t.update(0.0, 0.0, 0.0, 1.0)
    ev = t.evidence(0.01)
    assert not t.passes(0.5) and ev["e_value"] == 1.0 and ev["labels"] == 10_000
    assert ev["champion_mean_loss"] == ev["challenger_mean_loss"] == 0.0 and ev["threshold"] == 100.0


@settings(max_examples=300, deadline=None)  # the first batch of 4 or more loads the compiled loop
@given(st.lists(st.tuples(st.floats(0, 20), st.floats(0, 20)), max_size=60), st.floats(0, 0.5), st.floats(0.1, 10))
def test_update_many_is_update_in_turn(pairs, margin, scale):
    """Bit for bit: the compiled loop (4 pairs or more, kernels.betting_many) and the Python one."""
    one, many = BettingTest(), BettingTest()
    for a, b in pairs:
        one.update(a, b, margin, scale)
    many.update_many([a for a, _ in pairs], [b for _, b in pairs], margin, scale)
    assert one.state_dict() == many.state_dict()


@given(st.lists(st.floats(-5, 5), max_size=50))
def test_state_round_trips_and_an_old_paired_blocks_state_is_told_apart(ds):
    t = BettingTest()
    for d in ds:
        t.update(1.0, 1.0 - d, 0.01, 1.0)
    back = BettingTest()
    back.load_state_dict(t.state_dict())
    assert back.state_dict() == t.state_dict() and is_betting_state(t.state_dict())
    old = {"means": [0.1, 0.2], "acc": 0.0, "k": 0}  # PairedBlocks, before issue 18
    assert not is_betting_state(old)
    with pytest.raises(ValueError, match="not a BettingTest state"):
        back.load_state_dict(old)


@pytest.mark.parametrize("bad", [{"n": -1}, {"n": 1.5}, {"log_wealth": math.nan}, {"var": -1.0}])
def test_a_state_out_of_range_is_refused(bad):
    s = {**BettingTest().state_dict(), **bad}
    with pytest.raises(ValueError):
        BettingTest().load_state_dict(s)


def test_the_bet_never_risks_all_the_wealth():
    """Stake at most cap / (B + m): even the worst label leaves 1 - cap of the wealth."""
    t = BettingTest()
    for _ in range(200):
        t.update(1.0, 0.0, 0.0, 1.0)  # the challenger wins big: the bettor stakes the most
    before = t.log_wealth
    t.update(0.0, 50.0, 0.0, 1.0)  # then loses by far more than the bound
    assert t.log_wealth >= before + math.log(1 - t.cap) - 1e-12


def test_the_policy_module_examples_run():
    """edge.adapt.policy is pure: its docstring examples are tests (as tests/test_adapt_doctests.py's modules)."""
    import doctest

    import edge.adapt.policy

    result = doctest.testmod(edge.adapt.policy)
    assert result.failed == 0 and result.attempted > 0


def test_the_policy_decides_by_precedence_and_gates():
    from edge.adapt.policy import Situation, decide
    from edge.config import AdaptConfig

    cfg = AdaptConfig()
    base = dict(since_swap=150, plastic=False, adapted=True, guard_ready=True, guard_tripped=False,
                promote=True, refresh=True, rollback=True)
    assert decide(cfg, Situation(**base)) == "rollback"  # a worse champion goes first
    assert decide(cfg, Situation(**{**base, "rollback": False})) == "promotion"
    assert decide(cfg, Situation(**{**base, "rollback": False, "promote": False})) == "refresh"
    assert decide(cfg, Situation(**{**base, "rollback": False, "promote": False, "since_swap": 99})) is None
    assert decide(cfg, Situation(**{**base, "rollback": False, "guard_ready": False})) is None  # the guard's warm-up
    assert decide(cfg, Situation(**{**base, "since_swap": 39})) is None  # eval_min
    assert decide(cfg, Situation(**{**base, "since_swap": 20, "plastic": True})) == "rollback"  # half while plastic
    assert decide(cfg, Situation(**{**base, "adapted": False, "rollback": False, "promote": False})) is None


def _adapted_learner(plastic: bool):
    """A learner whose champion is an adapted head, past eval_min labels since the swap."""
    import numpy as np

    from edge.adapt.learner import Learner
    from edge.config import AdaptConfig

    lr = Learner(task="classification", feature_size=3, classes=(0, 1), config=AdaptConfig(seed=0, guard=False),
                 clock=lambda: 0.0)
    rng = np.random.default_rng(0)
    for _ in range(5):
        lr.learn_one(rng.normal(size=3).astype(np.float32), 1)
    lr.adopt_consolidated("u1")
    lr.since_swap = 1000
    lr.plasticity.boost_left = 10_000 if plastic else 0
    return lr


def _bet_rollback(lr, pairs) -> BettingTest:
    t = lr.evaluator.pairs["rollback"]
    for champion_loss, global_loss in pairs:
        t.update(champion_loss, global_loss, 0.0, 1.0)
    return t


def test_a_drift_alarm_does_not_lower_the_evidence_a_rollback_needs():
    """A rollback discards learning: while plastic (promote_alpha_drift 0.2, e-value 5) it still
    needs 1 / promote_alpha; a promotion at the same evidence would pass."""
    lr = _adapted_learner(plastic=True)
    rng = random.Random(1)
    t = _bet_rollback(lr, [])
    while t.e_value < 1.0 / lr.cfg.promote_alpha_drift:
        t.update(0.5, 0.5 - 0.2 + rng.gauss(0, 0.3), 0.0, 1.0)
    assert t.e_value < 1.0 / lr.cfg.promote_alpha and t.raw_gain()
    assert lr._decide() is None and lr.champion is not lr._global
    while not t.passes(lr.cfg.promote_alpha):
        t.update(0.5, 0.5 - 0.2 + rng.gauss(0, 0.3), 0.0, 1.0)
    assert lr._decide() == "rollback" and lr.champion is lr._global
    ev = [e for e in lr.events() if e["type"] == "rollback"][-1]
    assert ev["threshold"] == 1.0 / lr.cfg.promote_alpha and ev["e_value"] >= ev["threshold"]


@pytest.mark.parametrize("plastic", [False, True])
def test_no_rollback_when_the_learned_head_has_the_lower_mean_loss(plastic):
    """The global head wins most labels by a little, the learned head a few by a lot (clipped
    at promote_bound): the clipped test passes, the raw means say the learned head is better."""
    lr = _adapted_learner(plastic)
    t = _bet_rollback(lr, ([(0.6, 0.3)] * 9 + [(0.0, 5.0)]) * 30)
    ev = t.evidence(lr.cfg.promote_alpha)
    assert t.passes(lr.cfg.promote_alpha) and ev["champion_mean_loss"] < ev["challenger_mean_loss"]
    assert not t.raw_gain()
    assert lr._decide() is None and lr.champion is not lr._global and lr.metrics()["rollbacks_total"] == 0
