"""The compiled step and scaler update (edge.adapt.kernels) apply the numpy step's rule:
the same scores, errors, weights and Adam moments, to float32 rounding, on every task."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edge.adapt import kernels
from edge.adapt.heads import make_head
from edge.adapt.optim import OptimizerSpec
from edge.adapt.scaler import OnlineScaler
from edge.adapt.trainer import HeadTrainer

pytestmark = pytest.mark.skipif(not kernels.AVAILABLE, reason=kernels.UNAVAILABLE_REASON or "numba")

D, B = 7, 12


def _pair(task, k, spec, anchor, seed=0):
    rng = np.random.default_rng(seed)
    w, b = rng.normal(size=(k, D)), rng.normal(size=k)
    out = []
    for compiled in (True, False):
        head = make_head("linear", in_features=D, out_features=k, base_weight=w, base_bias=b)
        out.append(HeadTrainer(head, task=task, batch=B, optimizer=spec, anchor=anchor, compiled=compiled))
    assert out[0].compiled and not out[1].compiled
    return out


@pytest.mark.parametrize("task,k", [("classification", 1), ("classification", 4), ("regression", 1), ("regression", 3)])
@pytest.mark.parametrize("spec", [OptimizerSpec(kind="adam", lr=0.02), OptimizerSpec(kind="adam", lr=0.02, weight_decay=0.01),
                                  OptimizerSpec(kind="adamw", lr=0.02, weight_decay=0.1)], ids=["adam", "adam_l2", "adamw"])
@pytest.mark.parametrize("anchor", [0.0, 0.05])
@pytest.mark.parametrize("offset", [False, True])
def test_compiled_step_equals_the_numpy_step(task, k, spec, anchor, offset):
    if offset and task != "classification":
        pytest.skip("a logit offset is classification's")
    fast, ref = _pair(task, k, spec, anchor)
    rng = np.random.default_rng(1)
    if offset:
        off = np.log(np.minimum(1.0, (np.array([0, 3, 30, 7][: max(2, k)], np.float64) + 0.1) / 20)).astype(np.float32)
        fast.logit_offset, ref.logit_offset = off, off.copy()
    for i in range(40):
        z = (rng.normal(size=(B, D)) * 3).astype(np.float32)
        y = rng.integers(0, max(2, k), B) if task == "classification" else rng.normal(size=(B, k)).astype(np.float32)
        want = (1, 9) if i % 2 else None
        for t in (fast, ref):
            t.z_np[:], t.y_np[:] = z, y
            t.last_loss_of = want
            t.last_loss = np.nan
        first = 1 if i % 3 else 5  # learn_many asks for several rows' scores
        s_fast = fast.step_arrays(fast.z_np, fast.y_np, first=first)
        s_ref = ref.step_arrays(ref.z_np, ref.y_np, first=first)
        np.testing.assert_allclose(s_fast, s_ref, rtol=1e-5, atol=1e-5)
        if want:
            assert fast.last_loss == pytest.approx(ref.last_loss, abs=1e-5)
        np.testing.assert_allclose(fast.head.flat, ref.head.flat, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fast.opt.m, ref.opt.m, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(fast.opt.v, ref.opt.v, rtol=1e-4, atol=1e-8)
    assert fast.opt.steps == ref.opt.steps == 40


def test_sgd_and_other_heads_take_the_numpy_path():
    lin = make_head("linear", in_features=D, out_features=2)
    assert not HeadTrainer(lin, task="classification", batch=B, optimizer=OptimizerSpec(kind="sgd", lr=0.1)).compiled
    low = make_head("lowrank", in_features=D, out_features=2, rank=2)
    assert not HeadTrainer(low, task="classification", batch=B, lr=0.01).compiled


def test_switching_to_sgd_leaves_the_compiled_path():
    tr = HeadTrainer(make_head("linear", in_features=D, out_features=2), task="classification", batch=B, lr=0.01)
    assert tr.compiled
    tr.set_optimizer(OptimizerSpec(kind="sgd", lr=0.1))
    assert not tr.compiled


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 30), st.integers(1, 6)), elements=st.floats(-1e4, 1e4, width=32)))
def test_compiled_scaler_update_equals_the_numpy_update(Z):
    fast, ref = OnlineScaler(Z.shape[1]), OnlineScaler(Z.shape[1])
    for z in Z:
        fast.learn_one(z)  # float32 rows: the compiled update
        ref.learn_one(z.astype(np.float64))  # the numpy update
    np.testing.assert_allclose(fast.mean, ref.mean, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(fast.m2, ref.m2, rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(fast._inv32, ref._inv32, rtol=1e-6)
    np.testing.assert_array_equal(fast._mean32, ref._mean32)


def test_a_new_learner_loads_the_kernels_before_its_first_label():
    """The compiled step's first call (numba's cache load or compile, ~0.5 s) happens when the
    trainer is built, not inside a budgeted step (it would be charged to the training budget
    and skip the first labels' steps). Checked in a fresh process: building the learner adds
    the kernels' signatures, and training on labels of both entry points adds none."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import numpy as np
        from edge.adapt import kernels
        from edge.adapt.learner import Learner
        from edge.config import AdaptConfig
        sigs = lambda: tuple(len(f.signatures) for f in (kernels.linear_adam_step, kernels.welford_one,
                                                          kernels.fill_step, kernels.fill_step_many, kernels.betting_many,
                                                          kernels.guard_many))
        assert sigs() == (0,) * 6, sigs()
        for task, kw in (("classification", dict(classes=(0, 1), outputs=1)), ("classification", dict(classes=(0, 1, 2))),
                         ("regression", dict(outputs=2))):
            lr = Learner(task=task, feature_size=5, config=AdaptConfig(scale=True, seed=0), clock=lambda: 0.0, **kw)
            built = sigs()
            assert min(built) >= 1, built
            rng = np.random.default_rng(0)
            Z = rng.normal(size=(40, 5)).astype(np.float32)
            Y = rng.integers(0, 2, 40) if task == "classification" else rng.normal(size=(40, 2)).astype(np.float32)
            for z, y in zip(Z[:20], Y[:20]):
                lr.learn_one(z, y if task != "classification" else int(y))
            lr.learn_many(Z[20:], Y[20:])
            assert lr.metrics()["train_steps_total"] > 0
            assert sigs() == built, (built, sigs())
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]



class _Buf:
    """A source of replayed rows as ``HeadTrainer.fill`` reads one: ``z``, ``y`` and ``sample_indices``."""

    def __init__(self, z, y, draws):
        self.z, self.y, self._draws = z, y, draws

    def sample_indices(self, n):
        return self._draws.integers(0, len(self.z), size=n) if n > 0 and len(self.z) else np.empty(0, np.int64)


@pytest.mark.parametrize("task,k", [("classification", 1), ("classification", 3), ("regression", 1), ("regression", 2)])
@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("sizes", [(5, 6), (0, 11), (3, 0), (20, 20)], ids=["both", "no_recent", "no_replay", "over_batch"])
def test_the_compiled_fill_and_step_equals_fill_transform_and_step(task, k, scale, sizes):
    """``HeadTrainer.fill_step`` (learn_one's one compiled call: gather the new row and the
    replayed rows, scale them, step) against the numpy fill, the scaler's transform and the
    numpy step: the same rows, scores, replayed rows' error, weights and moments."""
    fast, ref = _pair(task, k, OptimizerSpec(kind="adam", lr=0.05), 0.02)
    rng = np.random.default_rng(3)
    cls = task == "classification"
    sources = {}
    for name, t in (("fast", fast), ("ref", ref)):
        bufs = []
        for i, (n_rows, n_take) in enumerate(zip((30, 50), sizes)):
            data = np.random.default_rng(10 + i)
            z = (data.normal(size=(n_rows if n_take else 0, D)) * 4 + 1).astype(np.float32)
            y = data.integers(0, max(2, k), len(z)) if cls else data.normal(size=(len(z), k)).astype(np.float32)
            bufs.append((_Buf(z, y, np.random.default_rng(20 + i)), n_take))
        sources[name] = bufs
    scalers = {}
    for name in ("fast", "ref"):
        sc = OnlineScaler(D) if scale else None
        if sc is not None:
            sc.learn_many((np.random.default_rng(5).normal(size=(40, D)) * 4 + 1).astype(np.float32))
        scalers[name] = sc
    for i in range(12):
        z = (rng.normal(size=D) * 4 + 1).astype(np.float32)
        y = int(rng.integers(0, max(2, k))) if cls else rng.normal(size=k).astype(np.float32)
        want = bool(i % 2)
        s_fast = fast.fill_step(z, y, sources["fast"], scalers["fast"], replay_loss=want)
        fast_rows = fast.z_np[: fast.ranges[1][1]].copy()
        n = ref.fill(z, y, sources["ref"])
        if scalers["ref"] is not None:
            scalers["ref"].transform_many(ref.z_np[:n], out=ref.z_np[:n])
        ref.last_loss_of = ref.ranges[1] if want else None
        ref_rows = ref.z_np[:n].copy()
        s_ref = ref.step(n)
        assert fast.ranges == ref.ranges and fast.ranges[1][1] == n <= B
        np.testing.assert_array_equal(fast_rows, ref_rows)
        np.testing.assert_array_equal(fast.y_np[:n], ref.y_np[:n])
        np.testing.assert_allclose(s_fast, s_ref, rtol=1e-5, atol=1e-6)
        if want and ref.ranges[1][1] > ref.ranges[1][0]:
            assert fast.last_loss == pytest.approx(ref.last_loss, abs=1e-5)
        np.testing.assert_allclose(fast.head.flat, ref.head.flat, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fast.opt.m, ref.opt.m, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(fast.opt.v, ref.opt.v, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("task,k,scale", [("classification", 1, True), ("classification", 3, False),
                                          ("regression", 2, True)])
@pytest.mark.parametrize("size", [1, 7, 32])
def test_learn_many_on_the_compiled_fill_and_step_learns_as_on_the_numpy_path(task, k, scale, size):
    """learn_many's gather + scale + step in one compiled call (HeadTrainer.fill_step_many) against
    the numpy concatenate, transform and step: the same heads, records and evidence."""
    from edge.adapt.learner import Learner
    from edge.config import AdaptConfig

    kw = dict(classes=tuple(range(max(2, k))), outputs=k) if task == "classification" else dict(outputs=k)
    cfg = AdaptConfig(scale=scale, seed=0, drift_detector="none", budget_steps_per_s=1e6, budget_cpu_share=1.0)
    fast, ref = (Learner(task=task, feature_size=D, config=cfg, clock=lambda: 0.0, **kw) for _ in range(2))
    ref.trainer.compiled = False
    assert fast.trainer.compiled
    rng = np.random.default_rng(4)
    for _ in range(200 // size):
        Z = (rng.normal(size=(size, D)) * 3 + 1).astype(np.float32)
        Y = rng.integers(0, max(2, k), size) if task == "classification" else rng.normal(size=(size, k)).astype(np.float32)
        a, b = fast.learn_many(Z, Y), ref.learn_many(Z, Y)
        np.testing.assert_allclose(a["challenger"], b["challenger"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(a["served"], b["served"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fast.head.flat, ref.head.flat, rtol=1e-3, atol=1e-4)
    for key in ("champion", "challenger"):
        assert fast.preq[key].loss.get() == pytest.approx(ref.preq[key].loss.get(), rel=1e-3, abs=1e-5)
    assert fast.metrics()["train_steps_total"] == ref.metrics()["train_steps_total"] > 0


def test_without_numba_every_path_falls_back_to_numpy_and_python(monkeypatch):
    """A platform without numba's wheels (the CPU container leaves numba out by default): the
    learner trains on both entry points through the numpy step and the Python rules."""
    from edge.adapt.learner import Learner
    from edge.config import AdaptConfig

    monkeypatch.setattr(kernels, "AVAILABLE", False)
    for name in ("linear_adam_step", "welford_one", "fill_step", "fill_step_many", "betting_many", "guard_many"):
        monkeypatch.setattr(kernels, name, None)
    rng = np.random.default_rng(0)
    for task, kw in (("classification", dict(classes=(0, 1), outputs=1)), ("regression", dict(outputs=2))):
        lr = Learner(task=task, feature_size=D, config=AdaptConfig(scale=True, seed=0), clock=lambda: 0.0, **kw)
        assert not lr.trainer.compiled
        Z = rng.normal(size=(120, D)).astype(np.float32)
        Y = (Z[:, 0] > 0).astype(int) if task == "classification" else rng.normal(size=(120, 2)).astype(np.float32)
        for z, y in zip(Z[:60], Y[:60]):
            assert lr.learn_one(z, y if task != "classification" else int(y))["accepted"]
        for i in range(60, 120, 20):
            assert lr.learn_many(Z[i:i + 20], Y[i:i + 20])["accepted"] == 20
        m = lr.metrics()
        assert m["labels_total"] == 120 and m["train_steps_total"] == 120
        assert lr.guard is None or lr.guard.seen == 120
