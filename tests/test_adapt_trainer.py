"""The numpy training step: the same update as torch autograd + torch's optimizers (float32 rounding)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from edge.adapt.adam import AdamState
from edge.adapt.heads import HEADS, make_head
from edge.adapt.optim import OptimizerSpec, SGDState, spec_from_torch
from edge.adapt.trainer import HeadTrainer
from edge.errors import ConfigError
from tests.torch_reference import TorchRef

D, K, B = 16, 3, 8


def _head(kind, seed=0, k=K):
    rng = np.random.default_rng(seed)
    return make_head(kind, in_features=D, out_features=k, base_weight=rng.normal(size=(k, D)), base_bias=rng.normal(size=k))


def _batches(task, n, seed=1, k=K):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        z = rng.normal(size=(B, D)).astype(np.float32)
        if task == "classification":
            y = rng.integers(0, max(2, k), B)
        else:
            y = rng.normal(size=(B, k)).astype(np.float32)
        yield z, y


def test_numpy_adam_matches_torch_adam():
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=50).astype(np.float32)
    ref = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = torch.optim.Adam([ref], lr=0.01)
    ours, adam = p0.copy(), AdamState(50)
    for i in range(300):
        g = (rng.normal(size=50) * (0.01 if i % 2 else 1.0)).astype(np.float32)
        lr = 0.01 if i < 150 else 0.03  # the learner changes the rate while boosting after a drift
        opt.param_groups[0]["lr"] = lr
        ref.grad = torch.from_numpy(g.copy())
        opt.step()
        adam.update(ours, g, lr)
    np.testing.assert_allclose(ours, ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adam.v, opt.state[ref]["exp_avg_sq"].numpy(), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("torch_opt,spec", [
    (lambda p: torch.optim.Adam(p, lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01),
     OptimizerSpec(kind="adam", lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01)),
    (lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.1), OptimizerSpec(kind="adamw", lr=0.02, weight_decay=0.1)),
    (lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, dampening=0.1, weight_decay=0.01),
     OptimizerSpec(kind="sgd", lr=0.01, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    (lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.5, nesterov=True), OptimizerSpec(kind="sgd", lr=0.01, momentum=0.5, nesterov=True)),
    (lambda p: torch.optim.SGD(p, lr=0.05), OptimizerSpec(kind="sgd", lr=0.05, momentum=0.0)),
])
def test_torch_hyper_parameters_map_onto_the_numpy_optimizers(torch_opt, spec):
    head, ref = _head("linear"), None
    ref = TorchRef(head)
    opt = torch_opt(ref.ordered())
    assert spec_from_torch(opt) == spec
    tr = HeadTrainer(head, task="regression", batch=B, optimizer=spec_from_torch(opt))
    for z, y in _batches("regression", 30):
        tr.z_np[:], tr.y_np[:] = z, y
        tr.step(B)
        opt.zero_grad()
        F.mse_loss(ref(torch.from_numpy(z)), torch.from_numpy(y)).backward()
        opt.step()
    np.testing.assert_allclose(head.flat, ref.flat(), rtol=1e-4, atol=1e-5)


def test_unsupported_optimizers_are_named():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ConfigError, match="RMSprop is not supported"):
        spec_from_torch(torch.optim.RMSprop(p))
    with pytest.raises(ConfigError, match="amsgrad"):
        spec_from_torch(torch.optim.Adam(p, amsgrad=True))


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "numpy"])  # the linear head has both steps
@pytest.mark.parametrize("task,k", [("classification", K), ("regression", K), ("classification", 1)])
@pytest.mark.parametrize("kind", sorted(HEADS))
def test_numpy_step_matches_autograd_and_torch_adam(kind, task, k, compiled):
    head = _head(kind, k=k)
    ref = TorchRef(head)
    tr = HeadTrainer(head, task=task, batch=B, lr=0.01, anchor=0.05, compiled=compiled)
    opt = torch.optim.Adam(ref.ordered(), lr=0.01)
    for z, y in _batches(task, 40, k=k):
        tr.z_np[:], tr.y_np[:] = z, y
        scores = tr.step(B)
        out = ref(torch.from_numpy(z))
        yt = torch.from_numpy(y)
        if task == "classification" and k == 1:  # BCEWithLogitsLoss: one logit, scores [1 - p, p]
            loss = F.binary_cross_entropy_with_logits(out[:, 0], yt.float())
            p = torch.sigmoid(out[0, 0])
            expected = torch.stack([1 - p, p])
        elif task == "classification":
            loss, expected = F.cross_entropy(out, yt), torch.softmax(out[0], 0)
        else:
            loss, expected = F.mse_loss(out, yt), out[0]
        opt.zero_grad()
        (loss + 0.05 * ref.anchor_loss()).backward()
        opt.step()
        np.testing.assert_allclose(scores, expected.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(head.flat, ref.flat(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "numpy"])
@pytest.mark.parametrize("k", [K, 1])
@pytest.mark.parametrize("kind", sorted(HEADS))
def test_logit_offset_step_matches_autograd_of_the_offset_loss_and_scores_stay_plain(kind, k, compiled):
    """With a class-evidence offset the step is the gradient of the cross-entropy of
    softmax(logits + offset) (BCE of logit + offset[1] - offset[0]), while the scores it
    returns are the plain head's: the offset never reaches what is served."""
    head = _head(kind, k=k)
    ref = TorchRef(head)
    tr = HeadTrainer(head, task="classification", batch=B, lr=0.01, anchor=0.05, compiled=compiled)
    off = np.log(np.minimum(1.0, (np.array([0, 3, 30, 7][: max(2, k)], np.float64) + 0.1) / 20)).astype(np.float32)
    tr.logit_offset = off
    opt = torch.optim.Adam(ref.ordered(), lr=0.01)
    for z, y in _batches("classification", 40, k=k):
        tr.z_np[:], tr.y_np[:] = z, y
        scores = tr.step(B)
        out = ref(torch.from_numpy(z))
        yt = torch.from_numpy(y)
        if k == 1:
            loss = F.binary_cross_entropy_with_logits(out[:, 0] + float(off[1] - off[0]), yt.float())
            p = torch.sigmoid(out[0, 0])
            expected = torch.stack([1 - p, p])
        else:
            loss, expected = F.cross_entropy(out + torch.from_numpy(off), yt), torch.softmax(out[0], 0)
        opt.zero_grad()
        (loss + 0.05 * ref.anchor_loss()).backward()
        opt.step()
        np.testing.assert_allclose(scores, expected.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(head.flat, ref.flat(), rtol=1e-4, atol=1e-5)


def test_sgd_doctest_matches_torch_sgd_with_momentum():
    ref = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9)
    ours, sgd = np.ones(1, np.float32), SGDState(1, momentum=0.9)
    for _ in range(5):
        ref.grad = torch.ones(1)
        opt.step()
        sgd.update(ours, np.ones(1, np.float32), 0.1)
    np.testing.assert_allclose(ours, ref.detach().numpy(), rtol=1e-6)


def test_trainer_checkpoint_resumes_identically():
    a = HeadTrainer(_head("linear"), task="classification", batch=B, lr=0.01, anchor=0.01)
    batches = list(_batches("classification", 30))
    for z, y in batches[:20]:
        a.z_np[:], a.y_np[:] = z, y
        a.step(B)
    state = a.state_dict()
    assert state["optimizer"]["steps"] == 20
    b = HeadTrainer(_head("linear", seed=9), task="classification", batch=B, lr=0.01, anchor=0.01)
    b.load_state_dict(state)
    for z, y in batches[20:]:
        for t in (a, b):
            t.z_np[:], t.y_np[:] = z, y
        assert a.step(B).tolist() == b.step(B).tolist()
    assert a.head.flat.tolist() == b.head.flat.tolist()


def test_reset_forgets_the_optimizer_state():
    tr = HeadTrainer(_head("linear"), task="classification", batch=B, lr=0.01)
    for z, y in _batches("classification", 5):
        tr.z_np[:], tr.y_np[:] = z, y
        tr.step(B)
    tr.reset()
    assert tr.opt.steps == 0 and not tr.opt.m.any()
