"""The demo's unexplained rollback ("champion_loss=0.0, global_loss=0.0", issue 21): near zero
loss the rule rolled back on a relative margin alone, throwing the learned head away on
noise. A rollback needs a gap that passes promote_floor of the trivial reference's loss; a
learned head that is clearly worse is still rolled back (tests/test_adapt_learner.py)."""
from __future__ import annotations

import numpy as np

from edge.adapt.learner import Learner
from edge.adapt.synth import ClusterStream, fit_linear_head
from edge.config import AdaptConfig

K, D = 4, 32


def test_no_rollback_on_noise_when_both_heads_are_near_zero_loss():
    stream = ClusterStream(dim=D, classes=K, sep=3.0, noise=0.5, seed=0)  # an easy world: losses near 0
    rng = np.random.default_rng(0)
    z, y = stream.sample(3000, rng=rng)
    events, clock = [], [0.0]
    lr = Learner(task="classification", feature_size=D, classes=[f"c{i}" for i in range(K)],
                 global_head=fit_linear_head(z, y, K), global_version="1.0", config=AdaptConfig(seed=0),
                 on_event=events.append, clock=lambda: clock[0])
    for zs, ys in (stream.sample(600, rng=rng, shifted=True), stream.sample(1500, rng=rng)):
        for a, b in zip(zs, ys):
            clock[0] += 0.05
            lr.learn_one(a, f"c{int(b)}")
    assert any(e["type"] in ("promotion", "refresh") for e in events)
    rollbacks = [e for e in events if e["type"] == "rollback"]
    # before the fix: a rollback at champion_loss 4e-05 against global_loss 1e-07
    assert all(e["champion_loss"] - e["global_loss"] > 0.01 for e in rollbacks), rollbacks
