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


# ---- delivery: receipts, refused publishes, checkpoint ordering, the fleet lane (issue 16) ----

import hashlib  # noqa: E402
import threading  # noqa: E402

from hypothesis import given, settings, strategies as st  # noqa: E402

from edge.fleet.receipts import Receipt, pack_receipt  # noqa: E402


def _receipt(c, server, seq, status="accepted", reason="", *, stored_seq=None, latest=0, epoch="e1", digest=None):
    if digest is None:
        digest = next((e.digest for e in c.ledger.entries if e.seq == seq), "")
    r = Receipt(fleet="f", model="m", node="n1", seq=seq, status=status, reason=reason,
                stored_seq=seq if stored_seq is None else stored_seq, latest_version=latest, epoch=epoch, digest=digest)
    return pack_receipt(r, server)


def _pending(c, lr):
    return subtract(subtract(lr.head.arrays(), c.base), c.sent)


def _send(c):
    """Prepare a delta and hand it over (as a PUBACK with a success code would); its step."""
    c.prepare_delta(c.worker)
    seq, msg = c.outbox
    c.outbox = None
    return seq, unpack_message(msg).tensors


def test_the_ledger_keeps_the_digest_the_server_computes():
    c, lr, server = _client("linear")
    _learn(lr)
    c.prepare_delta(c.worker)
    assert [e.seq for e in c.ledger.entries] == [1]
    assert c.ledger.entries[0].digest == unpack_message(c.outbox[1]).digest == hashlib.sha256(c.outbox[1]).hexdigest()


@settings(max_examples=15, deadline=None)
@given(st.lists(st.sampled_from(["accepted", "norm_too_large", "future_base", "wrong_shapes"]), min_size=1, max_size=5))
def test_refused_steps_go_back_so_accepted_plus_residual_is_what_was_learned(outcomes):
    """Nothing learned is lost: whatever the server accepts or refuses, in any order, the
    steps it accepted plus the pending residual equal what the device learned."""
    c, lr, server = _client("linear", encoding="topk8", fraction=0.05)
    start = lr.head.arrays()
    accepted = {k: np.zeros_like(v) for k, v in start.items()}
    for i, what in enumerate(outcomes):
        _learn(lr, n=15, seed=i)
        seq, step = _send(c)
        if what == "accepted":
            c.on_receipt(_receipt(c, server, seq))
            accepted = add(accepted, step)
        else:
            c.on_receipt(_receipt(c, server, seq, "refused", what, stored_seq=seq - 1))
    learned = subtract(lr.head.arrays(), start)
    total = add(accepted, _pending(c, lr))
    for k in learned:
        np.testing.assert_allclose(total[k], learned[k], atol=1e-5)
    assert len(c.ledger) == 0 and c.counters["returned"] == sum(w != "accepted" for w in outcomes)
    assert c.receipts_refused == {w: outcomes.count(w) for w in set(outcomes) if w != "accepted"}


def test_a_step_refused_after_a_rebase_still_goes_back():
    c, lr, server = _client("linear", fraction=0.05)
    _learn(lr)
    seq, step = _send(c)
    g = {k: v + 0.01 for k, v in c.base.items()}
    c.on_global(_global(c, server, g, 1))  # at the rebase the step is left out of the residual ...
    residual = subtract(lr.head.arrays(), g)
    c.on_receipt(_receipt(c, server, seq, "refused", "future_base", latest=1))
    pending = _pending(c, lr)  # ... and once refused it is pending again, on the new base
    for k in pending:
        np.testing.assert_allclose(pending[k], residual[k] + step[k], atol=1e-5)
    assert c.courier.want  # future_base: the device asks for the head


def test_replayed_seq_moves_the_seq_past_the_servers_and_norm_too_large_clips_the_next_steps():
    c, lr, server = _client("linear", encoding="fp32")
    _learn(lr)
    seq, step = _send(c)
    c.on_receipt(_receipt(c, server, seq, "refused", "replayed_seq", stored_seq=41))
    assert c.seq == 41 and c.counters["seq_resumed"] == 1
    seq, step = _send(c)
    assert seq == 42
    big = float(np.sqrt(sum(np.square(v).sum() for v in step.values())))
    c.on_receipt(_receipt(c, server, seq, "refused", "norm_too_large", stored_seq=41))
    assert c.step_cap == pytest.approx(big / 2)
    seq, step = _send(c)
    norm = float(np.sqrt(sum(np.square(v).sum() for v in step.values())))
    assert norm <= big / 2 * 1.001 and c.counters["clipped"] == 1
    c.on_receipt(_receipt(c, server, seq))
    _, step = _send(c)  # the rest of the residual, under the cap: through, and the cap is lifted
    assert c.step_cap == 0.0


def test_receipts_that_ask_for_the_head_and_receipts_that_are_not_ours():
    c, lr, server = _client("linear")
    _learn(lr)
    seq, _ = _send(c)
    c.on_receipt(_receipt(c, server, seq, latest=0))
    assert not c.courier.want and c.epoch == "e1"
    _learn(lr, n=5, seed=9)
    seq, _ = _send(c)
    c.on_receipt(_receipt(c, server, seq, latest=7))  # the server is ahead of this device's base
    assert c.courier.want
    c.courier.want = False
    c.on_receipt(_receipt(c, server, 99, "refused", "replayed_seq", stored_seq=5, epoch="e2", digest="other"))
    assert c.courier.want and c.counters["epoch_changes"] == 1 and c.counters["receipts_unmatched"] == 1
    c.on_receipt(_receipt(c, generate_key(), 1))  # not the server's key
    c.on_receipt(b"\x00" * 50)
    assert c.counters["receipts_bad"] == 2 and c.counters["receipts"] == 3
    m = c.metrics()
    assert m["sync_server_latest_version"] == 0 and m["sync_epoch"] == 0xE2 and m["sync_receipts_refused"] == {
        "replayed_seq": 1}
    assert all(isinstance(v, (int, float)) for k, v in m.items() if k not in ("sync_refused", "sync_receipts_refused"))


def test_a_failed_checkpoint_sends_nothing_and_the_next_round_sends_it():
    c, lr, server = _client("linear")
    seen = []

    def checkpoint():
        seen.append((c.state_dict()["seq"], c.state_dict()["outbox"] is not None, c.outbox))
        return ok[0]

    c.worker.checkpoint = checkpoint
    ok = [False]
    _learn(lr)
    c.prepare_delta(c.worker)
    assert seen == [(1, True, None)]  # the checkpoint held the next state; the outbox did not yet
    assert c.outbox is None and c.seq == 0 and len(c.ledger) == 0 and c.counters["checkpoint_failed"] == 1
    assert all(np.all(v == 0) for v in c.sent.values())
    assert c.state_dict()["seq"] == 0  # nothing staged is left behind
    ok[0] = True
    c.prepare_delta(c.worker)
    assert c.outbox is not None and c.outbox[0] == 1 and c.seq == 1 and c.counters["prepared"] == 1


def test_old_checkpoints_without_a_ledger_still_load():
    c, lr, server = _client("linear")
    _learn(lr)
    c.prepare_delta(c.worker)
    s = c.state_dict()
    old = {k: v for k, v in s.items() if k not in ("unreceipted", "step_cap", "epoch")}
    old["format"] = 1
    c2, _, _ = _client("linear")
    c2.load_state_dict(old)
    assert c2.seq == 1 and c2.outbox == c.outbox and len(c2.ledger) == 0
    c3, _, _ = _client("linear")
    c3.load_state_dict(s)
    assert [(e.seq, e.digest, e.message) for e in c3.ledger.entries] == [(e.seq, e.digest, e.message)
                                                                         for e in c.ledger.entries]


def test_a_delta_the_broker_refuses_stays_in_the_outbox_and_is_counted(tmp_path):
    """The shipped ACL had no fleet topics: mosquitto answered every delta with PUBACK 0x87
    and the device dropped them as acknowledged. Now the outbox is kept, and retried."""
    from edge.config import MqttConfig
    from edge.ingest.mqtt import MqttLink
    from tests.fleet_helpers import acl_broker
    from tests.test_ingest_fastmqtt import wait_until

    with acl_broker("fleet/+/+/delta/#") as b:
        link = MqttLink(MqttConfig(host=b.host, port=b.port, protocol="5"), client_id="acl-dev", status_topic="st/acl",
                        subscriptions=[], on_message=lambda *a: None)
        link.start()
        c, lr, server = _client("linear")
        c.publish_fn = lambda t, p, qos=1: link.publish_tracked(t, p)
        c.connected = link.connected.is_set
        c.interval_s = 3600.0
        try:
            assert link.wait_connected(20)
            _learn(lr)
            c.prepare_delta(c.worker)
            c.start()
            assert wait_until(lambda: c.counters["publish_refused"] >= 1, 20)
            assert c.outbox is not None and c.outbox[0] == 1 and c.counters["acked"] == 0
            assert link.publish_refused.get("not_authorized", 0) >= 1 and len(c.ledger) == 1
        finally:
            c.stop()
            link.stop()


def test_fleet_calls_survive_a_label_flood(tmp_path):
    """Fleet work went through the drop-oldest labels lane: a burst of labels dropped it."""
    from tests.test_adapt_worker import _worker

    w = _worker(tmp_path, queues={"labels_bytes": 1 << 14})
    ran = []

    class Fleet:
        def prepare(self, worker):
            ran.append("prepare")

        def rebase(self, worker):
            ran.append("rebase")

    f = Fleet()
    w.offer_call(f.prepare)
    w.offer_call(f.rebase)
    w.offer_call(f.prepare)  # coalesced with the pending one
    for i in range(2000):  # far beyond the labels lane's bound: the oldest labels are dropped
        w.offer_label(None, float(i), "normal")
    assert w.metrics()["lane_labels_dropped"] > 0
    done = threading.Event()
    w.offer_call(lambda worker: done.set())
    w.start()
    try:
        assert done.wait(30)
        assert ran == ["prepare", "rebase"] and w.metrics()["lane_fleet_coalesced"] == 1
    finally:
        w.stop()


class _Acked:
    """What MqttLink.publish_tracked returns, answered at once by the broker with a success code."""

    def __init__(self):
        import time as _t

        self.done, self.ok, self.code, self.reason, self.acked_at = True, True, 0, "success", _t.monotonic()


def test_a_head_request_is_repeated_until_a_head_comes_after_it():
    c, lr, server = _client("linear")
    sent = []
    c.publish_fn = lambda t, p, qos=1: sent.append(t) or _Acked()
    c.courier.head_seen()  # the retained copy, delivered on subscribe: before the request
    c.want_head("start")
    c.courier.round()
    assert sent == ["fleet/f/m/request/n1"] and c.courier.want
    c.courier._ask_at = 0.0  # its backoff is over
    c.courier.round()
    assert len(sent) == 2 and c.courier.want  # no head since: asked again
    c.on_global(_global(c, server, c.base, 3))  # the server's answer
    c.courier.round()
    assert not c.courier.want and len(sent) == 2 and c.base_version == 3


def test_a_delta_whose_receipt_never_came_is_sent_again_unchanged():
    c, lr, server = _client("linear")
    sent = []
    c.publish_fn = lambda t, p, qos=1: sent.append(p) or _Acked()
    _learn(lr)
    c.prepare_delta(c.worker)
    msg = c.outbox[1]
    c.courier.round()  # published, and handed over (PUBACK success)
    c.courier.round()
    assert sent == [msg] and c.outbox is None and c.counters["acked"] == 1 and len(c.ledger) == 1
    c.courier.round()
    assert len(sent) == 1  # the receipt has time to come
    c.courier._resend = {s: (0.0, w) for s, (_, w) in c.courier._resend.items()}  # ... and that time is over
    c.courier.round()
    assert sent == [msg, msg] and c.counters["resent_unreceipted"] == 1
    c.on_receipt(_receipt(c, server, 1))
    c.courier.round()
    assert len(c.ledger) == 0 and c.courier._resend == {}


def test_a_step_refused_then_stored_after_all_is_not_sent_twice():
    """A redelivered delta the server first refused (future_base) and then stored: the
    device put the step back at the refusal, and takes it out again at the acceptance."""
    c, lr, server = _client("linear")
    start = lr.head.arrays()
    _learn(lr)
    seq, step = _send(c)
    digest = c.ledger.entries[0].digest
    c.on_receipt(_receipt(c, server, seq, "refused", "future_base", stored_seq=0))
    c.on_receipt(_receipt(c, server, seq, digest=digest))
    assert c.counters["returned_then_accepted"] == 1 and c.labels_at_send == 60
    total = add(step, _pending(c, lr))
    learned = subtract(lr.head.arrays(), start)
    for k in learned:
        np.testing.assert_allclose(total[k], learned[k], atol=1e-5)


def test_every_counter_is_in_the_metrics_from_the_start():
    from edge.fleet.client import COUNTERS

    c, lr, server = _client("linear")
    m = c.metrics()
    assert all(m[f"sync_{k}"] == 0 for k in COUNTERS)
    _learn(lr)
    c.prepare_delta(c.worker)
    c.on_receipt(b"junk")
    assert set(k for k in c.counters) == set(COUNTERS)  # no counter outside the declared list


@settings(max_examples=200, deadline=None)
@given(status=st.sampled_from(["accepted", "refused"]),
       reason=st.sampled_from(["", "norm_too_large", "future_base", "replayed_seq", "wrong_shapes"]),
       matched=st.booleans(), seq=st.integers(1, 50), stored=st.integers(0, 100), latest=st.integers(0, 9),
       base=st.integers(0, 9), epoch=st.sampled_from(["", "e1", "e2"]), norm=st.floats(0.0, 100.0))
def test_judge_follows_the_protocol(status, reason, matched, seq, stored, latest, base, epoch, norm):
    from edge.fleet.reconcile import Sent, judge

    r = Receipt(fleet="f", model="m", node="n1", seq=seq, status=status, reason=reason, stored_seq=stored,
                latest_version=latest, epoch="e1", digest="d")
    entry = Sent(seq=seq, digest="d", base_version=base, norm=norm, message=b"") if matched else None
    o = judge(r, entry=entry, base_version=base, epoch=epoch)
    assert o.matched == matched
    assert o.put_back == (matched and status == "refused")  # only a refused delta of ours goes back
    assert o.seq_floor == (stored if reason == "replayed_seq" and (status == "refused" or not matched) else 0)
    assert (o.step_cap is not None) == (o.put_back and reason == "norm_too_large" and norm > 0)
    assert o.step_cap is None or o.step_cap == norm / 2
    assert o.new_epoch == (epoch not in ("", "e1"))
    assert o.want_head == (o.new_epoch or latest > base or (o.put_back and reason == "future_base"))
