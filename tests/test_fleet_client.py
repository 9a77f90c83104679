"""The sync client's logic with an inline learner thread: every head kind, error feedback, rebase, refusals."""
from __future__ import annotations

import numpy as np
import pytest

from edge.adapt.learner import Learner
from edge.config import AdaptConfig
from edge.fleet.client import SyncClient
from edge.fleet.codec import Header, encode_tensor, pack_message, unpack_message
from edge.fleet.feedback import add, subtract
from edge.fleet.keys import generate_key


class Inline:
    def __init__(self, learner):
        self.learner, self.checkpoints, self.state = learner, 0, None

    def attach_state(self, name, obj):
        pass

    def offer_call(self, fn):
        fn(self)

    def checkpoint(self):
        self.checkpoints += 1


def _client(kind, encoding="topk8", fraction=0.05):
    t = [0.0]
    lr = Learner(task="classification", feature_size=8, classes=["a", "b", "c"], config=AdaptConfig(head=kind, head_hidden=6),
                 clock=lambda: t.__setitem__(0, t[0] + 0.05) or t[0])
    server, device = generate_key(), generate_key()
    c = SyncClient(worker=Inline(lr), node="n1", fleet="f", model="m", model_hash="h", key=device,
                   server_keys=[server.public_key()], publish=lambda *a, **k: None, encoding=encoding, fraction=fraction)
    return c, lr, server


def _learn(lr, n=60, seed=0):
    r = np.random.default_rng(seed)
    for _ in range(n):
        y = int(r.integers(3))
        lr.learn_one(r.standard_normal(8).astype(np.float32) + 2 * np.eye(3, 8)[y], y)


def _global(c, server, arrays, version):
    h = Header(kind="global", fleet="f", model="m", model_hash="h", head_kind=c.head_kind, node="srv", version=version)
    return pack_message(h, {k: encode_tensor(v, "fp32") for k, v in arrays.items()}, server)


@pytest.mark.parametrize("kind", ["linear", "lowrank", "mlp"])
def test_every_head_kind_syncs_its_full_parameter_set(kind):
    c, lr, server = _client(kind, encoding="fp32")
    _learn(lr)
    c.prepare_delta(c.worker)
    msg = unpack_message(c.outbox[1])
    assert set(msg.tensors) == set(lr.head.arrays())
    trained = {"linear": ("weight",), "lowrank": ("weight",), "mlp": ("w1", "w2")}[kind]
    assert all(np.abs(msg.tensors[k]).sum() > 0 for k in trained)
    np.testing.assert_allclose(add(c.base, msg.tensors)["weight"], lr.head.arrays()["weight"], atol=1e-6)
    assert c.worker.checkpoints == 1 and msg.header.seq == 1 and msg.header.samples == 60


@pytest.mark.parametrize("kind", ["linear", "lowrank", "mlp"])
def test_rebase_is_the_new_global_plus_the_unsent_residual(kind):
    c, lr, server = _client(kind, fraction=0.05)
    _learn(lr)
    c.prepare_delta(c.worker)
    c.outbox = None
    residual = subtract(subtract(lr.head.arrays(), c.base), c.sent)
    assert sum(np.abs(v).sum() for v in residual.values()) > 0  # top-k left something behind
    g = {k: v + 0.01 for k, v in c.base.items()}
    c.on_global(_global(c, server, g, 1))
    assert c.base_version == 1 and lr.global_version == "fleet-1"
    for k, v in lr.head.arrays().items():
        np.testing.assert_allclose(v, g[k] + residual[k], atol=1e-5)
    assert all(np.all(v == 0) for v in c.sent.values())
    np.testing.assert_allclose(lr._global.arrays["weight"], g["weight"])


def test_a_forged_or_stale_global_is_refused_and_never_applied():
    c, lr, server = _client("linear")
    before = lr.head.arrays()
    g = {k: v + 1.0 for k, v in c.base.items()}
    events = []
    c.on_event = lambda kind, **f: events.append((kind, f.get("reason")))
    c.on_global(_global(c, generate_key(), g, 5))
    c.on_global(b"\x00garbage" * 20)
    assert c.refused == {"bad_signature": 1, "garbage": 1} and c.base_version == 0
    assert events == [("sync_refused", "bad_signature"), ("sync_refused", "garbage")]
    c.on_global(_global(c, server, g, 2))
    c.on_global(_global(c, server, c.base, 1))  # an older version after a newer one
    assert c.base_version == 2 and c.counters["globals_not_newer"] == 1
    assert not np.allclose(lr.head.arrays()["weight"], before["weight"])


def test_state_round_trips_through_the_checkpoint_dict():
    c, lr, server = _client("mlp")
    _learn(lr)
    c.prepare_delta(c.worker)
    s = c.state_dict()
    c2, lr2, _ = _client("mlp")
    c2.load_state_dict(s)
    assert (c2.seq, c2.outbox, c2.labels_at_send) == (1, c.outbox, 60)
    assert all(np.array_equal(c2.sent[k], c.sent[k]) for k in c.sent)
