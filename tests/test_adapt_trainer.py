"""The numpy training step: the same update as torch autograd + torch Adam, checkpoints in torch's format."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from edge.adapt.heads import HEADS, make_head
from edge.adapt.adam import AdamState
from edge.adapt.trainer import HeadTrainer

D, K, B = 16, 3, 8


def _head(kind, seed=0):
    rng = np.random.default_rng(seed)
    return make_head(kind, in_features=D, out_features=K, base_weight=rng.normal(size=(K, D)), base_bias=rng.normal(size=K))


def _batches(task, n, seed=1):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        z = rng.normal(size=(B, D)).astype(np.float32)
        y = rng.integers(0, K, B) if task == "classification" else rng.normal(size=(B, K)).astype(np.float32)
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


@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("kind", sorted(HEADS))
def test_numpy_step_matches_autograd_and_torch_adam(kind, task):
    head, ref = _head(kind), _head(kind)
    tr = HeadTrainer(head, task=task, batch=B, lr=0.01, anchor=0.05)
    opt = torch.optim.Adam(list(ref.parameters()), lr=0.01)
    for z, y in _batches(task, 40):
        tr.z_np[:], tr.y_np[:] = z, y
        scores = tr.step(B)
        out = ref(torch.from_numpy(z))
        yt = torch.from_numpy(y)
        loss = F.cross_entropy(out, yt) if task == "classification" else F.mse_loss(out, yt)
        expected = torch.softmax(out[0], 0) if task == "classification" else out[0]
        opt.zero_grad()
        (loss + 0.05 * ref.anchor_loss()).backward()
        opt.step()
        np.testing.assert_allclose(scores, expected.detach().numpy(), rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(head.named_parameters(), ref.parameters()):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-4, atol=1e-5, err_msg=name)


def test_head_parameters_live_in_the_flat_buffer():
    head = _head("lowrank")
    head.flat[:] = 0.5
    assert all(bool((p == 0.5).all()) for p in head.parameters())
    head.reset_to_base()  # in place: the buffer still backs the parameters
    assert head.flat[: head.u.numel()].tolist() == [0.0] * head.u.numel()


def test_trainer_checkpoint_is_torch_format_and_resumes_identically():
    a = HeadTrainer(_head("linear"), task="classification", batch=B, lr=0.01, anchor=0.01)
    batches = list(_batches("classification", 30))
    for z, y in batches[:20]:
        a.z_np[:], a.y_np[:] = z, y
        a.step(B)
    state = a.state_dict()
    plain = torch.optim.Adam([torch.nn.Parameter(torch.zeros(K, D)), torch.nn.Parameter(torch.zeros(K))], lr=0.01)
    plain.load_state_dict(state["optimizer"])  # what torch itself wrote before: old checkpoints load, new ones too
    assert float(plain.state_dict()["state"][0]["step"]) == 20
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
    assert tr.adam.steps == 0 and not tr.adam.m.any() and tr.state_dict()["optimizer"]["state"] == {}


def test_sgd_runs_through_torch_on_the_closed_form_gradient():
    head, ref = _head("linear"), _head("linear")
    tr = HeadTrainer(head, task="regression", batch=B, lr=0.01, optimizer="sgd")
    opt = torch.optim.SGD(list(ref.parameters()), lr=0.01, momentum=0.9)
    for z, y in _batches("regression", 10):
        tr.z_np[:], tr.y_np[:] = z, y
        tr.step(B)
        opt.zero_grad()
        F.mse_loss(ref(torch.from_numpy(z)), torch.from_numpy(y)).backward()
        opt.step()
    np.testing.assert_allclose(head.flat, torch.cat([p.detach().reshape(-1) for p in ref.parameters()]).numpy(), rtol=1e-5, atol=1e-6)


def test_a_head_without_closed_form_trains_by_autograd_to_the_same_place():
    class AutogradLinear(HEADS["linear"]):
        grad_np = None

    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(K, D)), rng.normal(size=K)
    heads = [make_head("linear", in_features=D, out_features=K, base_weight=w, base_bias=b),
             AutogradLinear(in_features=D, out_features=K, base_weight=w, base_bias=b)]
    trainers = [HeadTrainer(h, task="classification", batch=B, lr=0.01, anchor=0.05) for h in heads]
    assert [t.closed_form for t in trainers] == [True, False]
    for z, y in _batches("classification", 20):
        got = []
        for t in trainers:
            t.z_np[:], t.y_np[:] = z, y
            got.append(t.step(B))
        np.testing.assert_allclose(got[0], got[1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(heads[0].flat, heads[1].flat, rtol=1e-4, atol=1e-5)
