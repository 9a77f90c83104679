"""learn_one's scoring path (edge.adapt.rowscore: plain floats, one stacked product for the
champion and the global head) gives what the batch path gives (HeadSnapshot.predict, then
metrics.sample_loss): the same scores, losses and errors, to float32 rounding, for every task."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edge.adapt.guard import LabelGuard
from edge.adapt.heads import HeadSnapshot
from edge.adapt.metrics import sample_loss
from edge.adapt.rowscore import Stack, loss_err, mode_of

D = 5
floats = st.floats(-30, 30, width=32)


def _snap(w, b, task):
    return HeadSnapshot.from_arrays({"weight": w, "bias": b}, kind="linear", task=task, version="v")


@settings(max_examples=150, deadline=None)
@given(task=st.sampled_from(["binary", "softmax", "regression1", "regression3"]), same=st.booleans(),
       w=arrays(np.float32, (2, 3, D), elements=floats), b=arrays(np.float32, (2, 3), elements=floats),
       z=arrays(np.float32, D, elements=st.floats(-10, 10, width=32)), label=st.integers(0, 2),
       y=arrays(np.float32, 3, elements=floats))
def test_the_row_path_scores_as_the_batch_path(task, same, w, b, z, label, y):
    k = {"binary": 1, "softmax": 3, "regression1": 1, "regression3": 3}[task]
    kind = "classification" if task in ("binary", "softmax") else "regression"
    champion = _snap(w[0, :k], b[0, :k], kind)
    glob = champion if same else _snap(w[1, :k], b[1, :k], kind)
    mode = mode_of(kind, k)
    t = (label if task == "softmax" else label % 2) if kind == "classification" else y[:k]
    p, g = Stack.of(champion, glob).scores(z, mode)
    assert (g is p) == same
    for snap, row in ((champion, p), (glob, g)):
        want = snap.predict(z[None])[0]  # float32: the row path's float64 scores are as close as float32 gets
        np.testing.assert_allclose(row, want, rtol=2e-6, atol=2e-7)
        # the loss and error of the same scores (the batch path's 1 - p in float32 loses digits near p = 1)
        lw, ew = sample_loss(np.array(row, np.float64), t, kind)
        lr, er = loss_err(row, t if kind == "classification" else t.tolist(), mode)
        assert lr == pytest.approx(lw, rel=1e-12, abs=1e-12) and er == ew


def test_an_mlp_or_module_snapshot_does_not_stack():
    mlp = HeadSnapshot.from_arrays({"weight": np.zeros((2, D)), "bias": np.zeros(2), "w1": np.zeros((4, D)),
                                    "b1": np.zeros(4), "w2": np.zeros((2, 4)), "b2": np.zeros(2)},
                                   kind="mlp", task="classification", version="v")
    lin = _snap(np.zeros((2, D), np.float32), np.zeros(2, np.float32), "classification")
    assert Stack.of(mlp, lin) is None and Stack.of(lin, mlp) is None and Stack.of(object(), object()) is None
    assert Stack.of(lin, lin) is not None


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=2, max_size=4), st.lists(st.floats(0, 1), min_size=2, max_size=4),
       st.integers(0, 3))
def test_the_guard_reads_lists_as_arrays(served, glob, label):
    n = min(len(served), len(glob))
    served, glob, label = served[:n], glob[:n], label % n
    g = LabelGuard(confidence=0.5)
    assert g.contradicts(served, glob, label) == g.contradicts(np.array(served), np.array(glob), label)
