"""The fleet server answers every verified delta with a signed receipt, starts a new epoch
when a device holds a version its store never made, and republishes its head on request
and periodically. Real mosquitto, real SQLite, a real ``FleetServer``."""
from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from edge.fleet.aggregator import UNVERIFIED, receipt_for
from edge.fleet.codec import Envelope, Header, encode_tensor, pack_message, unpack_message
from edge.fleet.config import load_server_config
from edge.fleet.keys import generate_key, load_private, load_public
from edge.fleet.receipts import pack_receipt, unpack_receipt
from edge.fleet.server import FleetServer
from edge.fleet.store import epoch_version, open_store
from edge.fleet.validate import REASONS, Verdict
from edge.zoo import resolve_model
from tests.fleet_helpers import make_keys, server_toml, signed_delta
from tests.helpers import Client, poll

PREFIX = "fleet/test/vibration"


def _start(tmp_path, broker, keys, *, republish_s: float = 3600.0, store: str | None = None) -> FleetServer:
    p = server_toml(tmp_path, keys, broker, store=store or str(tmp_path / "fleet.db"), k=1000, t_s=3600.0)
    p.write_text(p.read_text().replace("[mqtt]", f"republish_s = {republish_s}\n\n[mqtt]"))
    server = FleetServer(load_server_config(p))
    server.start()
    assert server.connected.wait(10)
    return server


@pytest.fixture
def keys(tmp_path):
    return make_keys(tmp_path, ["n1", "n2"])


@pytest.fixture
def watcher(broker):
    c = Client(broker, f"{PREFIX}/receipt/#", f"{PREFIX}/global")
    yield c
    c.c.publish(f"{PREFIX}/global", b"", qos=1, retain=True).wait_for_publish(5)  # clear for the next test
    c.close()


def _until(pred, timeout: float = 10.0):
    """Poll ``pred`` (server state, not messages) until true; bounded."""
    return poll(pred, timeout, interval=0.02, what="server state")


def _receipts(keys, msgs, node="n1"):
    pub = load_public(keys["server"].public_path)
    return [unpack_receipt(p, [pub]) for t, p, _ in msgs if t == f"{PREFIX}/receipt/{node}"]


def _wrong_shapes_delta(key_path, *, seq: int) -> bytes:
    """A delta n1 signed whose arrays are not the head's shapes (refused before decoding)."""
    m = resolve_model("vibration")
    arrays = {"weight": np.zeros((2, 3), np.float32), "bias": np.zeros(2, np.float32)}
    h = Header(kind="delta", fleet="test", model=m.manifest.name, model_hash=m.content_hash, head_kind="linear",
               node="n1", seq=seq, base_version=0, samples=10, encoding="fp32")
    return pack_message(h, {k: encode_tensor(v, "fp32") for k, v in arrays.items()}, load_private(key_path))


def _globals(msgs):
    return [unpack_message(p) for t, p, _ in msgs if t.endswith("/global") and p]


def test_every_verified_delta_gets_a_signed_receipt_saying_what_became_of_it(tmp_path, broker, keys, watcher):
    server = _start(tmp_path, broker, keys)
    try:
        k1 = keys["n1"].private_path
        good = signed_delta(k1, node="n1", seq=5)
        sends = [good,                                                   # stored: accepted
                 good,                                                   # identical resend: accepted
                 signed_delta(k1, node="n1", seq=5, seed=3),             # other content, same seq
                 signed_delta(k1, node="n1", seq=6, scale=100.0),        # norm over max_norm
                 _wrong_shapes_delta(k1, seq=7),                         # refused before its tensors are decoded
                 signed_delta(keys["n2"].private_path, node="n1", seq=8),  # not n1's key: no receipt
                 b"garbage" * 20]
        for payload in sends:
            watcher.publish(f"{PREFIX}/delta/n1", payload)
        got = watcher.wait_for(lambda m: len(r := _receipts(keys, m)) >= 5 and r)
        _until(lambda: server.counters["received"] == len(sends))
        assert [(r.seq, r.status, r.reason) for r in got] == [
            (5, "accepted", ""), (5, "accepted", ""), (5, "refused", "replayed_seq"), (6, "refused", "norm_too_large"),
            (7, "refused", "wrong_shapes")]
        assert {r.stored_seq for r in got} == {5}  # the highest seq stored for n1
        assert got[0].digest == unpack_message(good).digest and got[0].fleet == "test" and got[0].node == "n1"
        assert {r.epoch for r in got} == {server.agg.store.epoch()} and {r.latest_version for r in got} == {0}
        # the forged one (n2's key under n1's name) and the garbage were answered to nobody (the
        # counter moves just after each publish, so a receipt can arrive before it is counted)
        _until(lambda: server.counters["receipts"] >= 5)
        assert server.counters["receipts"] == 5
        assert not _receipts(keys, watcher.msgs, node="n2")
    finally:
        server.stop()


def test_a_delta_on_a_version_the_store_never_made_starts_a_new_epoch_past_it(tmp_path, broker, keys, watcher):
    """A server restored from an older backup: a device on version 40 of the lost history
    is refused (future_base), and the server re-signs its latest head as version 41 of a new
    epoch, published at once, so that the device takes it as newer and sync resumes."""
    server = _start(tmp_path, broker, keys)
    try:
        watcher.publish(f"{PREFIX}/delta/n2", signed_delta(keys["n2"].private_path, node="n2", seq=1))
        _until(lambda: server.agg.store.stored_seq("n2") == 1)
        server.agg.maybe_commit(force=True)  # version 1, whose header carries the fleet's reference
        v1 = watcher.wait_for(lambda m: [g for g in _globals(m) if g.header.version == 1])[0]
        epoch0 = server.agg.store.epoch()
        watcher.publish(f"{PREFIX}/delta/n1", signed_delta(keys["n1"].private_path, node="n1", seq=3, base_version=40))
        (r,) = watcher.wait_for(lambda m: _receipts(keys, m))
        assert (r.status, r.reason, r.latest_version) == ("refused", "future_base", 41)
        assert r.epoch != epoch0 and r.epoch == server.agg.store.epoch()
        g = watcher.wait_for(lambda m: [g for g in _globals(m) if g.header.version == 41])[0]
        assert g.header.base_version == 1 and all((g.tensors[k] == v1.tensors[k]).all() for k in v1.tensors)
        assert g.header.metrics == v1.header.metrics and g.header.metrics  # the clip bound stays the fleet's
        assert "new epoch" in server.agg.store.latest().note
        # the device rebases on 41 and sends again: stored as usual
        watcher.publish(f"{PREFIX}/delta/n1", signed_delta(keys["n1"].private_path, node="n1", seq=4, base_version=41))
        r2 = watcher.wait_for(lambda m: [x for x in _receipts(keys, m) if x.seq == 4])[0]
        assert (r2.status, r2.epoch, r2.stored_seq) == ("accepted", r.epoch, 4)
    finally:
        server.stop()


def test_an_absurd_base_version_is_refused_without_renumbering(tmp_path, broker, keys, watcher):
    server = _start(tmp_path, broker, keys)
    try:
        epoch0 = server.agg.store.epoch()
        watcher.publish(f"{PREFIX}/delta/n1", signed_delta(keys["n1"].private_path, node="n1", seq=1, base_version=1 << 60))
        (r,) = watcher.wait_for(lambda m: _receipts(keys, m))
        assert (r.reason, r.latest_version, r.epoch) == ("future_base", 0, epoch0)
        assert server.agg.store.latest().version == 0
    finally:
        server.stop()


def test_a_request_makes_the_server_publish_its_head_again(tmp_path, broker, keys, watcher):
    server = _start(tmp_path, broker, keys)
    try:
        watcher.wait_for(lambda m: _globals(m))
        # someone clears the retained head (or replaces it); a new device asks
        watcher.c.publish(f"{PREFIX}/global", b"", qos=1, retain=True).wait_for_publish(5)
        late = Client(broker, f"{PREFIX}/global")
        try:
            late.publish(f"{PREFIX}/request/n2", b"")
            g = late.wait_for(lambda m: _globals(m))[0]
            assert g.header.version == 0 and server.counters["republished_on_request"] == 1
        finally:
            late.close()
        # requests in a burst are answered at most once a second in all
        before, t0 = server.counters["republished_on_request"], time.monotonic()
        for _ in range(20):
            watcher.publish(f"{PREFIX}/request/n1", b"?")
        _until(lambda: server.counters["head_requests"] >= 21 and server.counters["republished_on_request"] > before)
        burst_s = time.monotonic() - t0  # coalesced: one publish a second at most, whatever the count
        assert server.counters["republished_on_request"] - before <= int(burst_s) + 2
    finally:
        server.stop()


def test_the_head_is_republished_periodically(tmp_path, broker, keys, watcher):
    server = _start(tmp_path, broker, keys, republish_s=0.3)
    try:
        watcher.wait_for(lambda m: len(_globals(m)) >= 3, timeout=20)
        assert server.counters["republished_periodic"] >= 2
        assert {g.header.version for g in _globals(watcher.msgs)} == {0}
    finally:
        server.stop()


def test_receipts_read_the_store_they_answer_from(tmp_path, broker, keys, watcher):
    """A device that lost its state learns its stored seq from the first receipt."""
    server = _start(tmp_path, broker, keys)
    try:
        for seq in (1, 2, 3):
            watcher.publish(f"{PREFIX}/delta/n1", signed_delta(keys["n1"].private_path, node="n1", seq=seq, seed=seq))
        watcher.wait_for(lambda m: len(_receipts(keys, m)) >= 3)
        watcher.publish(f"{PREFIX}/delta/n1", signed_delta(keys["n1"].private_path, node="n1", seq=1, seed=99))
        r = watcher.wait_for(lambda m: len(x := _receipts(keys, m)) >= 4 and x)[3]
        assert (r.seq, r.reason, r.stored_seq) == (1, "replayed_seq", 3)
        store = open_store(str(tmp_path / "fleet.db"))
        try:
            assert store.stored_seq("n1") == 3
        finally:
            store.close()
    finally:
        server.stop()


# ---- the pure parts ------------------------------------------------------------------------

_KEY = generate_key()


@settings(max_examples=200, deadline=None)
@given(reason=st.sampled_from(("",) + REASONS), signer=st.sampled_from((None, "n1", "n2")),
       seq=st.integers(0, (1 << 63) - 1), stored=st.integers(0, (1 << 63) - 1), latest=st.integers(0, 1 << 53))
def test_a_receipt_answers_exactly_the_verified_verdicts_and_says_what_they_say(reason, signer, seq, stored, latest):
    h = Header(kind="delta", fleet="f", model="m", model_hash="h", head_kind="linear", node="claimed", seq=seq)
    v = Verdict(ok=reason == "", reason=reason, signer=signer,
                envelope=Envelope(header=h, key_id=b"\0" * 8, signature=b"\0" * 64, signed=b"x"))
    r = receipt_for(v, fleet="f", model="m", stored_seq=stored, latest_version=latest, epoch="e" * 16, issued=1.0)
    if signer is None or reason in UNVERIFIED:
        assert r is None  # nobody proved to be a node: nobody is answered
        return
    assert (r.node, r.seq, r.stored_seq, r.latest_version) == (signer, seq, stored, latest)  # the signer, never the header's claim
    assert (r.status, r.reason) == (("accepted", "") if v.ok else ("refused", reason))
    assert unpack_receipt(pack_receipt(r, _KEY), [_KEY.public_key()]) == r


@given(latest=st.integers(0, 1 << 53), claim=st.integers(0, 1 << 53))
def test_an_epoch_version_is_newer_than_the_store_and_the_claim_and_no_more(latest, claim):
    v = epoch_version(latest, claim)
    assert v > latest and v > claim and v == max(latest, claim) + 1
