"""Contract suite run against every head kind: same behaviour whatever the head."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from edge.adapt.heads import HEADS, HeadSnapshot, make_head
from edge.errors import ConfigError

D, K = 16, 3


@pytest.fixture(params=sorted(HEADS))
def head(request):
    rng = np.random.default_rng(0)
    return make_head(request.param, in_features=D, out_features=K,
                     base_weight=rng.normal(size=(K, D)), base_bias=rng.normal(size=K))


def _perturb(h):
    with torch.no_grad():
        for p in h.parameters():
            p.add_(torch.randn_like(p) * 0.1)


def test_head_starts_equal_to_its_base(head):
    z = torch.randn(5, D)
    assert torch.allclose(head(z), F.linear(z, head.base_weight, head.base_bias), atol=1e-6)
    assert float(head.anchor_loss().detach()) == pytest.approx(0.0, abs=1e-10)


def test_snapshot_predicts_like_the_module(head):
    _perturb(head)
    z = torch.randn(7, D)
    snap = HeadSnapshot.from_head(head, task="regression", version="v")
    np.testing.assert_allclose(snap.predict(z.numpy()), head(z).detach().numpy(), atol=1e-5)
    probs = HeadSnapshot.from_head(head, task="classification", version="v").predict(z.numpy())
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_snapshot_is_immutable(head):
    snap = HeadSnapshot.from_head(head, task="classification", version="v")
    with pytest.raises(ValueError):
        snap.arrays["weight"][0, 0] = 1.0
    _perturb(head)  # training the head later does not change a served snapshot
    assert snap.predict(np.zeros(D)).shape == (1, K)


def test_closed_form_gradients_match_autograd(head):
    if head.backward_from is None:
        pytest.skip(f"{head.kind} uses autograd")
    _perturb(head)
    z, g, anchor = torch.randn(6, D), torch.randn(6, K), 0.3
    loss = (head(z) * g).sum() + anchor * head.anchor_loss()
    auto = torch.autograd.grad(loss, list(head.parameters()))
    head.backward_from(z, g, anchor)
    for p, a in zip(head.parameters(), auto):
        torch.testing.assert_close(p.grad, a, atol=1e-5, rtol=1e-4)


def test_reset_to_base_undoes_training(head):
    _perturb(head)
    head.reset_to_base()
    z = torch.randn(4, D)
    assert torch.allclose(head(z), F.linear(z, head.base_weight, head.base_bias), atol=1e-5)


def test_state_dict_round_trip(head):
    _perturb(head)
    other = make_head(head.kind, in_features=D, out_features=K)
    other.load_state_dict(head.state_dict())
    z = torch.randn(3, D)
    assert torch.allclose(other(z), head(z))


def test_unknown_kind_and_bad_base_are_config_errors():
    with pytest.raises(ConfigError, match="not one of"):
        make_head("transformer", in_features=D, out_features=K)
    with pytest.raises(ConfigError, match="expected"):
        make_head("linear", in_features=D, out_features=K, base_weight=np.zeros((K, D + 1)))
    with pytest.raises(ConfigError, match="bad option"):
        make_head("linear", in_features=D, out_features=K, rank=3)
