"""Contract suite run against every head kind: same behaviour whatever the head."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edge.adapt.heads import HEADS, HeadSnapshot, make_head
from edge.errors import ConfigError
from tests.torch_reference import TorchRef

D, K = 16, 3


@pytest.fixture(params=sorted(HEADS))
def head(request):
    rng = np.random.default_rng(0)
    return make_head(request.param, in_features=D, out_features=K,
                     base_weight=rng.normal(size=(K, D)), base_bias=rng.normal(size=K))


def _perturb(h, seed=1):
    h.flat += np.random.default_rng(seed).normal(size=h.flat.size).astype(np.float32) * 0.1


def _z(n, seed=2):
    return np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)


def _base_out(h, z):
    return z @ h.base_weight.T + h.base_bias


def test_head_starts_equal_to_its_base(head):
    z = _z(5)
    np.testing.assert_allclose(head(z), _base_out(head, z), atol=1e-5)
    assert head.anchor_loss() == pytest.approx(0.0, abs=1e-10)


def test_snapshot_predicts_like_the_head(head):
    _perturb(head)
    z = _z(7)
    snap = HeadSnapshot.from_head(head, task="regression", version="v")
    np.testing.assert_allclose(snap.predict(z), head(z), atol=1e-5)
    probs = HeadSnapshot.from_head(head, task="classification", version="v").predict(z)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_snapshot_is_immutable(head):
    snap = HeadSnapshot.from_head(head, task="classification", version="v")
    with pytest.raises(ValueError):
        snap.arrays["weight"][0, 0] = 1.0
    _perturb(head)  # training the head later does not change a served snapshot
    assert snap.predict(np.zeros(D)).shape == (1, K)


def test_forward_matches_the_torch_reference(head):
    _perturb(head)
    z = _z(6)
    ref = TorchRef(head)
    np.testing.assert_allclose(head(z), ref(torch.from_numpy(z)).detach().numpy(), atol=1e-5)
    assert head.anchor_loss() == pytest.approx(float(ref.anchor_loss().detach()), rel=1e-5)


def test_closed_form_gradients_match_autograd(head):
    _perturb(head)
    z, g, anchor = _z(6), np.random.default_rng(3).normal(size=(6, K)).astype(np.float32), 0.3
    ref = TorchRef(head)
    loss = (ref(torch.from_numpy(z)) * torch.from_numpy(g)).sum() + anchor * ref.anchor_loss()
    auto = torch.cat([a.reshape(-1) for a in torch.autograd.grad(loss, ref.ordered())]).numpy()
    out = np.zeros_like(head.flat)
    head.grad_np(z, g, anchor, out, head.forward_np(z)[1])
    np.testing.assert_allclose(out, auto, atol=1e-5, rtol=1e-4)


def test_named_parameters_are_views_of_the_flat_buffer(head):
    head.flat[:] = 0.5
    assert all(bool((getattr(head, k) == 0.5).all()) for k in head.param_names)


def test_reset_to_base_undoes_training(head):
    _perturb(head)
    head.reset_to_base()
    z = _z(4)
    np.testing.assert_allclose(head(z), _base_out(head, z), atol=1e-5)


def test_state_dict_round_trip(head):
    _perturb(head)
    other = make_head(head.kind, in_features=D, out_features=K)
    other.load_state_dict(head.state_dict())
    z = _z(3)
    np.testing.assert_array_equal(other(z), head(z))


def test_unknown_kind_and_bad_base_are_config_errors():
    with pytest.raises(ConfigError, match="not one of"):
        make_head("transformer", in_features=D, out_features=K)
    with pytest.raises(ConfigError, match="expected"):
        make_head("linear", in_features=D, out_features=K, base_weight=np.zeros((K, D + 1)))
    with pytest.raises(ConfigError, match="bad option"):
        make_head("linear", in_features=D, out_features=K, rank=3)


def test_binary_snapshot_is_a_sigmoid():
    snap = HeadSnapshot.from_arrays({"weight": np.ones((1, 2), np.float32), "bias": np.zeros(1, np.float32)},
                                    kind="linear", task="classification", version="v")
    p = snap.predict(np.array([[1.0, 1.0]]))
    np.testing.assert_allclose(p, [[1 - 1 / (1 + np.exp(-2.0)), 1 / (1 + np.exp(-2.0))]], rtol=1e-6)


@pytest.mark.parametrize("k", [1, K])
def test_snapshot_and_trainer_score_with_the_one_softmax_and_sigmoid(k):
    from edge.adapt.activations import binary_scores, softmax
    from edge.adapt.trainer import HeadTrainer

    head = make_head("linear", in_features=D, out_features=k)
    _perturb(head)
    z = _z(6) * 10  # logits far from zero too
    snap = HeadSnapshot.from_head(head, task="classification", version="v")
    logits = z @ head.weight.T + head.bias
    expected = binary_scores(logits) if k == 1 else softmax(logits)
    np.testing.assert_array_equal(snap.predict(z), expected)
    # the textbook forms, written out here, not imported
    p = 1.0 / (1.0 + np.exp(-np.clip(logits[:, :1], -60, 60)))
    e = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(expected, np.hstack([1 - p, p]) if k == 1 else e / e.sum(1, keepdims=True), rtol=1e-6)
    tr = HeadTrainer(head, task="classification", batch=4, lr=0.01)
    for row, want in zip(z, expected):
        np.testing.assert_allclose(tr.score(row), want, rtol=1e-6, atol=1e-7)
