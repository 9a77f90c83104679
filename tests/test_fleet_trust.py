"""Fleet trust: the device registry (added, removed, rotated, revoked keys while the server
runs), blame by signature, and verify-before-decode with bounded allocation."""
from __future__ import annotations

import struct
import threading
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.errors import DecodeError
from edge.fleet.codec import KEY_ID_LEN, MAGIC, Header, key_id, read_envelope
from edge.fleet.config import load_server_config
from edge.fleet.keys import create_key, load_private, load_public, public_pem
from edge.fleet.server import FleetServer
from edge.fleet.store import open_store
from edge.fleet.trust import DeviceRegistry, TrustSnapshot, authenticate, parse_revoked
from edge.fleet.validate import REASONS, Expected, check_delta, check_global
from tests.fleet_helpers import make_keys, server_toml, signed_delta
from tests.helpers import Client, poll

TOPIC = "fleet/test/vibration/delta/{}"


def _until(pred, what: str, timeout: float = 30.0):
    """Poll ``pred`` until it is truthy (bounded); its value."""
    return poll(pred, timeout, what=what)


def _replace_pub(devices_dir, node: str, key_path) -> None:
    """Install ``node``'s public key the way an operator's script should: write, then rename."""
    tmp = devices_dir / f".{node}.tmp"
    tmp.write_bytes(public_pem(load_private(key_path)))
    tmp.rename(devices_dir / f"{node}.pub")


@pytest.fixture
def fleet(tmp_path, broker):
    keys = make_keys(tmp_path, ["n1", "n2", "n3"])
    cfg = load_server_config(server_toml(tmp_path, keys, broker, store=str(tmp_path / "fleet.db"), k=1000, t_s=3600.0))
    server = FleetServer(cfg)
    server.start()
    assert server.connected.wait(10)
    pub = Client(broker)
    store = open_store(str(tmp_path / "fleet.db"))
    yield keys, server, pub, store
    store.close()
    pub.close()
    server.stop()


def _devices(store) -> dict:
    return {d.node: d for d in store.devices()}


def _stored_seqs(store, node: str) -> set:
    return {d.seq for d in store.deltas() if d.node == node}


def _send(pub, key_path, node: str, seq: int, topic_node: str | None = None) -> None:
    pub.publish(TOPIC.format(topic_node or node), signed_delta(key_path, node=node, seq=seq))


class _Empty:
    reasons: dict = {}


def _send_until(pred, pub, key_path, node: str, seq: int, what: str, timeout: float = 30.0) -> int:
    """A device sending delta after delta (seq, seq + 1, ...) until ``pred()``; the next seq."""
    state = {"seq": seq}

    def sent_until():
        if pred():
            return True
        _send(pub, key_path, node, state["seq"])
        state["seq"] += 1
        return False
    poll(sent_until, timeout, what=f"{what} (sending from seq {seq})")
    return state["seq"]


# ---- the registry on a running server --------------------------------------------------------

def test_a_removed_key_is_refused_within_seconds_without_a_restart(fleet):
    keys, server, pub, store = fleet
    _send(pub, keys["n1"].private_path, "n1", 1)
    _until(lambda: _stored_seqs(store, "n1") == {1}, "n1's first delta stored")
    (keys["devices_dir"] / "n1.pub").unlink()
    seq = _send_until(lambda: "unknown_key" in _devices(store).get("(unknown)", _Empty).reasons,
                      pub, keys["n1"].private_path, "n1", 2, "a removed key refused")
    stored = max(_stored_seqs(store, "n1"))
    for s in range(seq, seq + 5):  # once refused, refused for good
        _send(pub, keys["n1"].private_path, "n1", s)
    _until(lambda: _devices(store)["(unknown)"].reasons.get("unknown_key", 0) >= 6, "the later deltas refused")
    assert max(_stored_seqs(store, "n1")) == stored and stored < seq


def test_a_rotated_key_counts_within_seconds_and_the_old_one_is_refused(fleet, tmp_path):
    keys, server, pub, store = fleet
    _send(pub, keys["n2"].private_path, "n2", 1)
    _until(lambda: _stored_seqs(store, "n2") == {1}, "n2's first delta stored")
    new = create_key(tmp_path / "newkeys", "n2", role="device")
    _replace_pub(keys["devices_dir"], "n2", new.private_path)
    seq = _send_until(lambda: _stored_seqs(store, "n2") - {1}, pub, new.private_path, "n2", 2, "the new key accepted")
    _send(pub, keys["n2"].private_path, "n2", seq)  # the old key, after the rotation took effect
    _until(lambda: _devices(store).get("(unknown)") and _devices(store)["(unknown)"].reasons.get("bad_signature"),
           "the old key refused")
    assert seq not in _stored_seqs(store, "n2")
    assert server.agg.trust.devices()[1]["key_id"] == key_id(load_public(new.public_path)).hex()


def test_garbage_on_a_devices_topic_is_not_counted_against_that_device(fleet):
    keys, server, pub, store = fleet
    _send(pub, keys["n1"].private_path, "n1", 1)
    pub.publish(TOPIC.format("n1"), b"garbage" * 20)
    pub.publish(TOPIC.format("n1"), signed_delta(keys["n2"].private_path, node="n1", seq=2))  # n2 forging n1
    stranger = create_key(keys["devices_dir"].parent / "other", "x", role="device")
    pub.publish(TOPIC.format("n1"), signed_delta(stranger.private_path, node="n1", seq=3))
    _until(lambda: sum(_devices(store).get("(unknown)", _Empty).reasons.values()) >= 3, "three rejections")
    devs = _devices(store)
    assert devs["n1"].accepted == 1 and devs["n1"].rejected == 0 and devs["n1"].reasons == {}
    assert devs["(unknown)"].reasons == {"garbage": 1, "bad_signature": 2}


def test_a_valid_delta_on_another_devices_topic_is_blamed_on_its_signer(fleet):
    keys, server, pub, store = fleet
    _send(pub, keys["n2"].private_path, "n2", 1, topic_node="n1")
    _until(lambda: "n2" in _devices(store), "the mismatch counted")
    devs = _devices(store)
    assert devs["n2"].reasons == {"node_mismatch": 1} and "n1" not in devs


def test_revoked_and_rotated_keys_while_devices_send(fleet, tmp_path):
    """Three devices send all along; n1 is revoked by the list (its .pub stays), n2 gets a new
    key; n3 goes on untouched."""
    keys, server, pub, store = fleet
    key_of = {n: keys[n].private_path for n in ("n1", "n2", "n3")}
    seqs = {n: 0 for n in key_of}
    stop = threading.Event()
    lock = threading.Lock()

    def device(node):
        while not stop.is_set():
            with lock:
                seqs[node] += 1
                seq, path = seqs[node], key_of[node]
            _send(pub, path, node, seq)
            stop.wait(0.03)

    threads = [threading.Thread(target=device, args=(n,), daemon=True) for n in key_of]
    for t in threads:
        t.start()
    try:
        _until(lambda: all(len(_stored_seqs(store, n)) >= 3 for n in key_of), "every device accepted")
        new = create_key(tmp_path / "newkeys", "n2", role="device")
        with lock:
            (keys["devices_dir"] / "revoked").write_text("# compromised\nn1\n")
            _replace_pub(keys["devices_dir"], "n2", new.private_path)
            key_of["n2"], switched = new.private_path, seqs["n2"]
            old_n2 = keys["n2"].private_path
        _until(lambda: _devices(store)["n1"].reasons.get("revoked", 0) >= 1, "n1 refused as revoked")
        _until(lambda: any(s > switched for s in _stored_seqs(store, "n2")), "n2's new key accepted")
        n1_stored, n3_before = max(_stored_seqs(store, "n1")), len(_stored_seqs(store, "n3"))
        revoked_before = _devices(store)["n1"].reasons["revoked"]
        _until(lambda: _devices(store)["n1"].reasons["revoked"] >= revoked_before + 10, "n1 refused again and again")
        _until(lambda: len(_stored_seqs(store, "n3")) >= n3_before + 10, "n3 goes on")
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    with lock:
        seq = seqs["n2"] + 1
    _send(pub, old_n2, "n2", seq)
    _until(lambda: _devices(store).get("(unknown)", _Empty).reasons.get("bad_signature"), "n2's old key refused")
    assert max(_stored_seqs(store, "n1")) == n1_stored  # nothing of n1 stored once it was refused
    assert seq not in _stored_seqs(store, "n2")
    assert {d["node"]: d["revoked"] for d in server.agg.trust.devices()} == {"n1": True, "n2": False, "n3": False}


# ---- the registry, unit ------------------------------------------------------------------------

def test_the_registry_looks_at_most_once_per_interval_and_revokes_by_key_id(tmp_path):
    keys = make_keys(tmp_path, ["a", "b"])
    now = [0.0]
    reg = DeviceRegistry(keys["devices_dir"], clock=lambda: now[0])
    assert set(reg.current().keys) == {"a", "b"} and reg.counters["reloads"] == 1
    kid = key_id(load_public(keys["b"].public_path)).hex()
    (keys["devices_dir"] / "revoked").write_text(f"{kid}  # b's laptop was stolen\n")
    assert not reg.current().revoked_key_ids  # within the interval: not looked at yet
    now[0] = 1.0
    snap = reg.current()
    assert snap.is_revoked(snap.keys["b"]) and not snap.is_revoked(snap.keys["a"])
    reloads = reg.counters["reloads"]
    now[0] = 5.0
    reg.current()
    assert reg.counters["reloads"] <= reloads + 1  # at most the one "racy" re-read of a fresh file


def test_a_half_written_key_is_skipped_then_picked_up(tmp_path):
    keys = make_keys(tmp_path, ["a"])
    now = [0.0]
    reg = DeviceRegistry(keys["devices_dir"], clock=lambda: now[0])
    pem = (keys["devices_dir"] / "a.pub").read_bytes()
    (keys["devices_dir"] / "c.pub").write_bytes(pem[:20])
    now[0] = 1.0
    assert set(reg.current().keys) == {"a"} and reg.counters["error_key"] == 1
    (keys["devices_dir"] / "c.pub").write_bytes(pem)
    now[0] = 2.0
    assert set(reg.current().keys) == {"a", "c"}


def test_removing_the_folder_trusts_nobody(tmp_path):
    keys = make_keys(tmp_path, ["a"])
    now = [0.0]
    reg = DeviceRegistry(keys["devices_dir"], clock=lambda: now[0])
    for p in keys["devices_dir"].iterdir():
        p.unlink()
    keys["devices_dir"].rmdir()
    now[0] = 1.0
    assert dict(reg.current().keys) == {}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=30), st.binary(min_size=8, max_size=8).map(bytes.hex)), max_size=10))
def test_parse_revoked_keeps_every_entry_and_only_entries(lines):
    nodes, ids = parse_revoked("\n".join(lines))
    want = {ln.split("#", 1)[0].strip() for ln in "\n".join(lines).splitlines()} - {""}
    assert nodes == want
    assert {i.hex() for i in ids} == {n.lower() for n in want if len(n) == 16 and all(c in "0123456789abcdefABCDEF" for c in n)}


# ---- verify before decode: bounded allocation --------------------------------------------------

SHAPES = {"weight": (4, 8), "bias": (4,)}
EXP = Expected(fleet="f", model="vibration", model_hash="h0", head_kind="linear", shapes=SHAPES)


def _trusted_key():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.from_private_bytes(bytes([1]) * 32)


def _forgery(n_tensors: int = 64, side: int = 1 << 12, key=None) -> bytes:
    """A valid-looking delta of ``n_tensors`` empty top-k tensors, each claiming ``side``**2
    elements (64 x 2**24 = 4 GiB of float32): about 1.5 KB. Signed by ``key`` when given,
    else carrying a signature of zeros."""
    h = Header(kind="delta", fleet="f", model="vibration", model_hash="h0", head_kind="linear", node="n1", seq=1,
               encoding="topk8").to_bytes()
    parts = [struct.pack("<4sBBH", MAGIC, 1, 1, len(h)), h, struct.pack("<H", n_tensors)]
    for i in range(n_tensors):
        name = f"t{i:02d}".encode()
        parts += [bytes([len(name)]), name, bytes([2]), struct.pack("<2I", side, side),
                  struct.pack("<BI", 2, 8), struct.pack("<If", 0, 0.0)]
    k = key or _trusted_key()
    payload = b"".join(parts) + key_id(k.public_key())
    return payload + (k.sign(payload) if key is not None else bytes(64))


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


KEYS = TrustSnapshot.from_keys({"n1": _trusted_key().public_key()})
BOUND = 256 << 10  # bytes: the expected head is 144 bytes; a message here is at most ~2 KB


def _check(data):
    return check_delta(data, expected=EXP, keys=KEYS, max_norm=10.0, current_version=0, seen=lambda n, s: False)


@pytest.mark.parametrize("signed", [False, True], ids=["forged", "signed-by-a-trusted-key"])
def test_a_4_gib_forgery_allocates_almost_nothing(signed):
    data = _forgery(key=_trusted_key() if signed else None)
    assert len(data) < 2000
    out = {}
    peak = _peak(lambda: out.setdefault("v", _check(data)))
    assert out["v"].reason == ("wrong_shapes" if signed else "bad_signature")
    assert peak < BOUND, f"{peak} bytes allocated for a {len(data)}-byte message"


def test_a_forged_global_head_allocates_almost_nothing():
    data = bytearray(_forgery(key=_trusted_key()))
    data[5] = 2  # kind: global (the signature no longer verifies)
    peak = _peak(lambda: check_global(bytes(data), expected=EXP, server_keys=[_trusted_key().public_key()],
                                      current_version=0))
    assert peak < BOUND


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_any_bytes_allocate_within_the_bound_and_give_a_reason(data):
    out = {}
    peak = _peak(lambda: out.setdefault("v", _check(data)))
    assert not out["v"].ok and out["v"].reason in REASONS
    assert peak < BOUND


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 64), st.integers(1, 1 << 16), st.integers(1, 1 << 16), st.booleans(), st.data())
def test_forged_shapes_of_any_size_allocate_within_the_bound(n, a, b, signed, data):
    raw = bytearray(_forgery(n_tensors=n, side=1, key=None))
    # rewrite every claimed shape to (a, b), then maybe sign it with the trusted key
    h_end = 8 + struct.unpack_from("<H", raw, 6)[0] + 2
    pos = h_end
    for _ in range(n):
        nlen = raw[pos]
        pos += 1 + nlen + 1
        struct.pack_into("<2I", raw, pos, a, b)
        pos += 8 + 5 + 8
    payload = bytes(raw[:-64])
    raw = payload + (_trusted_key().sign(payload) if signed else bytes(64))
    if data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([data.draw(st.integers(0, 255))]) + raw[i + 1:]
    out = {}
    peak = _peak(lambda: out.setdefault("v", _check(raw)))
    assert not out["v"].ok and out["v"].reason in REASONS
    assert peak < BOUND


def test_the_envelope_reads_no_tensor():
    env = read_envelope(_forgery(key=_trusted_key()))
    assert env.header.node == "n1" and env.key_id == key_id(_trusted_key().public_key())
    assert len(env.key_id) == KEY_ID_LEN
    assert authenticate(env, KEYS).signer == "n1"
    with pytest.raises(DecodeError):
        read_envelope(b"EDFL" + bytes(100))


def test_an_unreadable_revocation_list_keeps_the_last_keys_and_says_so(tmp_path):
    keys = make_keys(tmp_path, ["a"])
    now = [0.0]
    rev = keys["devices_dir"] / "revoked"
    rev.write_text("a\n")
    reg = DeviceRegistry(keys["devices_dir"], clock=lambda: now[0])
    assert reg.current().revoked_nodes == {"a"}
    rev.unlink()
    rev.mkdir()  # unreadable as a file, whoever runs the test (root reads a mode-0 file)
    now[0] = 1.0
    assert reg.current().revoked_nodes == {"a"} and reg.counters["error_revoked"] == 1


def test_the_registry_counters_render_as_prometheus_families(tmp_path):
    from edge.observe import Registry

    keys = make_keys(tmp_path, ["a", "b"])
    (keys["devices_dir"] / "revoked").write_text("b\n")
    (keys["devices_dir"] / "c.pub").write_text("not a key")
    reg = DeviceRegistry(keys["devices_dir"])
    prom = Registry()
    for fam in reg.metric_families():
        prom.add(*fam)
    text = prom.render()
    assert "edge_fleet_trust_reloads_total 1.0" in text and 'edge_fleet_trust_errors_total{kind="key"} 1.0' in text
    assert "edge_fleet_trusted_keys 2.0" in text and "edge_fleet_revoked_keys 1.0" in text


def test_a_key_replaced_within_one_clock_tick_is_still_seen(tmp_path):
    """File times are coarse: a key rewritten in place, same size, in the same tick, has the
    same stat. A recently written file is re-read at the next look all the same."""
    import os

    keys = make_keys(tmp_path, ["a"])
    pub = keys["devices_dir"] / "a.pub"
    before = pub.stat()
    now = [0.0]
    reg = DeviceRegistry(keys["devices_dir"], clock=lambda: now[0])
    new = create_key(tmp_path / "new", "a", role="device")
    with open(pub, "r+b") as f:  # in place: same inode
        f.write(new.public_path.read_bytes())
    os.utime(pub, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert pub.stat().st_ino == before.st_ino and pub.stat().st_size == before.st_size
    now[0] = 1.0
    assert reg.current().keys["a"].key_id == key_id(load_public(new.public_path))
