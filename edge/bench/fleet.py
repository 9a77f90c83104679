"""``edge bench fleet``: a simulated non-IID fleet learning over rounds, four ways, plus bytes and server throughput.

Every device gets its own shift of the simulated sensors (``edge.sim.SHIFTS``, one per
device in turn, with a per-device strength) and its own skewed class mix; features come
from the shipped ``vibration`` backbone (torch fp32), computed once. Each device learns
online with the real ``Learner``; between rounds the real ``SyncClient`` prepares its
delta and the real ``Aggregator`` (on a real SQLite store) validates, stores and
aggregates them; every device then checks and applies the signed global head. Compared:

- ``alone``: no sync, every device by itself;
- ``dense``: fp32 deltas, sample-weighted mean, no clipping (FedAvg as Flower does it);
- ``compressed``: top-k 8-bit deltas with error feedback, default robust rule (clip);
- ``compressed_malicious``: the same with 20% of the devices sending sign-flipped or
  scaled (x10) deltas, validly signed (compromised devices).

``--attack NAME[,NAME...]`` (or ``all``) runs instead the honest ``compressed`` baseline
and, in the same run, one ``attack:NAME`` mode per attack, 20% of the devices (``--malicious``)
validly signed and compromised: ``sign-flip`` (their delta negated), ``scaled`` (x10),
``colluding`` (all send one shared vector, -10 x their mean delta, each claiming 2**62
samples), ``clip-game`` (each sends 3 deltas of 5 x its negated delta per batch) and
``label-flip`` (they learn from flipped labels and send what they learned). Per version it
records each device's step (its weighted clipped share of the version, from the
aggregator) as the largest malicious step over the median honest one; the JSON goes to
``fleet_attack.json``.

Reported: accuracy per round on every training device (its served head on its own
shift) and on held-out devices that never trained (each with its own shift; they would
start from the global head, against the shipped head), bytes per sync with the fixed
per-message overhead for every head kind, and server throughput (deltas validated,
stored and aggregated per second) on SQLite and PostgreSQL.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

MODES = ("alone", "dense", "compressed", "compressed_malicious")
ATTACKS = ("sign-flip", "scaled", "colluding", "clip-game", "label-flip")


class InlineWorker:
    """The learner-thread side of ``SyncClient`` run inline (the bench is single-threaded;
    tests use it too): calls run at once, checkpoints always succeed."""

    def __init__(self, learner):
        self.learner = learner

    def attach_state(self, name, obj):
        pass

    def offer_call(self, fn):
        fn(self)

    def checkpoint(self):
        return True


def _cpu() -> dict:
    info = {"machine": platform.machine(), "python": platform.python_version(), "torch_threads": torch.get_num_threads()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["model"] = next(ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name"))
        flags = next(ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags"))
        info["features"] = [f for f in ("avx2", "avx512f", "avx512_vnni", "fma", "sse4_2") if f in flags]
        info["cores"] = text.count("processor\t:")
    except (OSError, StopIteration):
        pass
    return info


def _features(bb, X) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([bb(torch.from_numpy(X[i: i + 512])) for i in range(0, len(X), 512)]).numpy()


def _conditions(n: int, seed: int):
    """Device i: shift SHIFTS[names[i % 5]], its strength scaled by a per-device factor."""
    from edge.sim import SHIFTS, Condition

    names = [k for k in SHIFTS if k != "nominal"]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        base, s = SHIFTS[names[i % len(names)]], float(rng.uniform(0.6, 1.2))
        nom = Condition()
        lerp = lambda a, b: tuple(float(x) for x in np.asarray(a) + s * (np.asarray(b) - np.asarray(a)))  # noqa: E731
        c = Condition(gain=lerp(np.broadcast_to(nom.gain, 3), np.broadcast_to(base.gain, 3)),
                      offset=lerp(np.broadcast_to(nom.offset, 3), np.broadcast_to(base.offset, 3)),
                      speed_hz=nom.speed_hz + s * (base.speed_hz - nom.speed_hz),
                      mounting_deg=s * base.mounting_deg, noise=nom.noise + s * (base.noise - nom.noise),
                      drift_per_s=s * base.drift_per_s)
        out.append((names[i % len(names)], round(s, 3), c))
    return out


def _device_data(bb, cond, *, n_train, n_test, seed, classes, alpha):
    """A device's training stream (skewed class mix, Dirichlet(alpha)) and balanced test set."""
    from edge.sim import make_dataset

    rng = np.random.default_rng(seed)
    X, y = make_dataset(n_train * 3, seed=seed, condition=cond)
    mix = rng.dirichlet([alpha] * classes)
    want = rng.choice(classes, size=n_train, p=mix)
    pools = {c: list(np.flatnonzero(y == c)) for c in range(classes)}
    idx = [pools[c].pop() for c in want if pools[c]]
    Xt, yt = make_dataset(n_test, seed=seed + 50_000, condition=cond)
    return _features(bb, X[idx]), y[idx], _features(bb, Xt), yt


def _acc(snap, z, y) -> float:
    return float((snap.predict(z).argmax(1) == y).mean())


def _tamper(msg_bytes: bytes, key, how: str) -> bytes:
    """A compromised device's delta: its honest one sign-flipped or scaled x10, re-signed with its key."""
    return _resign(msg_bytes, key, factor=-1.0 if how == "flip" else 10.0)


def _resign(msg_bytes: bytes, key, *, factor: float = 1.0, tensors: dict | None = None, **header) -> bytes:
    """A delta re-signed with ``key``: its tensors (or ``tensors``) times ``factor``, header fields replaced."""
    from edge.fleet.codec import encode_tensor, pack_message, unpack_message

    m = unpack_message(msg_bytes)
    arrays = {k: v * factor for k, v in (tensors if tensors is not None else m.tensors).items()}
    if m.header.encoding == "topk8":  # keep it sparse: re-encode exactly the entries that are set
        enc = {k: encode_tensor(v, "topk8", k=max(1, int(np.count_nonzero(v)))) for k, v in arrays.items()}
    else:
        enc = {k: encode_tensor(v, m.header.encoding) for k, v in arrays.items()}
    return pack_message(dataclasses.replace(m.header, **header), enc, key)


def _attack(attack: str, msgs: dict, keys, r: int) -> list[tuple[int, bytes]]:
    """What the compromised devices send this round, from their honest deltas ``msgs`` (device -> bytes)."""
    from edge.fleet.codec import unpack_message

    if attack == "sign-flip":
        return [(i, _resign(m, keys[i], factor=-1.0)) for i, m in msgs.items()]
    if attack == "scaled":
        return [(i, _resign(m, keys[i], factor=10.0)) for i, m in msgs.items()]
    if attack == "colluding":
        dec = [unpack_message(m).tensors for m in msgs.values()]
        shared = {k: -10.0 * np.mean([d[k] for d in dec], axis=0) for k in dec[0]} if dec else {}
        return [(i, _resign(m, keys[i], tensors=shared, samples=2**62)) for i, m in msgs.items()]
    if attack == "clip-game":  # several deltas per batch, each under max_norm; seqs apart from the client's own
        return [(i, _resign(m, keys[i], factor=-5.0, **({"seq": 10**6 + 3 * r + j} if j else {})))
                for i, m in msgs.items() for j in range(3)]
    return list(msgs.items())  # label-flip: what it learned is the attack


def run_mode(mode, data, held, ctx, args, fraction: float | None = None) -> dict:
    from edge.adapt.learner import Learner
    from edge.config import AdaptConfig
    from edge.fleet.aggregator import Aggregator
    from edge.fleet.client import SyncClient
    from edge.fleet.keys import generate_key
    from edge.fleet.store import SQLiteStore
    from edge.fleet.validate import Expected
    from edge.adapt.heads import HeadSnapshot

    extra = {} if args.refresh_labels is None else {"refresh_labels": args.refresh_labels}
    if args.class_evidence is not None:
        extra["class_evidence"] = args.class_evidence
    cfg = AdaptConfig(head=args.head, head_hidden=args.hidden, head_rank=args.rank, seed=0, **extra)
    n = len(data)
    clock = [0.0]
    learners = [Learner(task="classification", feature_size=ctx["dim"], classes=ctx["classes"], global_head=ctx["shipped"],
                        global_version="shipped", config=cfg, clock=lambda: clock[0]) for _ in range(n)]
    init = learners[0].head.arrays()
    skey = generate_key()
    keys = [generate_key() for _ in range(n)]
    encoding = {"dense": "fp32"}.get(mode, "topk8")
    attack = mode.split(":", 1)[1] if mode.startswith("attack:") else None
    bad = mode == "compressed_malicious" or attack is not None
    malicious = set(range(0, n, max(1, round(1 / args.malicious)))) if bad else set()
    classes = len(ctx["classes"])
    tmp = tempfile.mkdtemp(prefix="edge-bench-fleet-")
    exp = Expected(fleet="bench", model="vibration", model_hash=ctx["hash"], head_kind=args.head,
                   shapes={k: tuple(v.shape) for k, v in init.items()})
    agg = None
    clients = []
    if mode != "alone":
        agg = Aggregator(store=SQLiteStore(Path(tmp) / "fleet.db"), expected=exp, key=skey,
                         trusted=lambda: {f"d{i}": k.public_key() for i, k in enumerate(keys)}, name="bench",
                         k=n, t_s=1e9, rule="clip" if mode == "dense" else args.rule,
                         clip_norm=1e12 if mode == "dense" else args.clip_norm, max_norm=1e6,
                         initial=init, samples_ratio=args.samples_ratio, reference_growth=args.reference_growth)
        for i, lr in enumerate(learners):
            clients.append(SyncClient(worker=InlineWorker(lr), node=f"d{i}", fleet="bench", model="vibration",
                                      model_hash=ctx["hash"], key=keys[i], server_keys=[skey.public_key()],
                                      publish=lambda *a, **k: None, encoding=encoding,
                                      fraction=args.fraction if fraction is None else fraction))
    curve, held_curve, sizes, step_ratio, step_norm = [], [], [], [], []
    per_round = args.labels_per_round
    for r in range(args.rounds):
        for i, lr in enumerate(learners):
            z, y = data[i]["train"]
            flip = attack == "label-flip" and i in malicious
            for j in range(r * per_round, min(len(y), (r + 1) * per_round)):
                clock[0] += 1.0 / 20
                lr.learn_one(z[j], classes - 1 - int(y[j]) if flip else int(y[j]))
        if agg is not None:
            items, bad_msgs = [], {}
            for i, c in enumerate(clients):
                c.prepare_delta(c.worker)
                if c.outbox is None:
                    continue
                msg = c.outbox[1]
                c.outbox = None  # acknowledged
                if i in malicious and attack is not None:
                    bad_msgs[i] = msg
                    continue
                if i in malicious:
                    msg = _tamper(msg, keys[i], "flip" if i % 2 == 0 else "scale")
                sizes.append(len(msg))
                items.append((f"fleet/bench/vibration/delta/d{i}", msg))
            items += [(f"fleet/bench/vibration/delta/d{i}", m) for i, m in _attack(attack, bad_msgs, keys, r)] if attack else []
            agg.ingest(items)
            before = agg.store.latest()
            rec = agg.maybe_commit(force=True)
            if rec is not None:
                from edge.fleet.codec import unpack_message as _um

                a, b = _um(rec.message).tensors, _um(before.message).tensors
                step_norm.append(float(np.sqrt(sum(float(np.square(a[k] - b[k]).sum()) for k in a))))
                shares = getattr(agg.last_aggregate, "shares", None) or {}
                norm = {nd: float(np.sqrt(sum(float(np.square(v).sum()) for v in sh.values()))) for nd, sh in shares.items()}
                honest_steps = [v for nd, v in norm.items() if int(nd[1:]) not in malicious]
                bad_steps = [v for nd, v in norm.items() if int(nd[1:]) in malicious]
                if honest_steps and bad_steps and np.median(honest_steps) > 0:
                    step_ratio.append(float(max(bad_steps) / np.median(honest_steps)))
                for c in clients:
                    c.on_global(rec.message)
        honest = [i for i in range(n) if i not in malicious]
        curve.append(float(np.mean([_acc(learners[i].champion, *data[i]["test"]) for i in honest])))
        if agg is not None:
            from edge.fleet.codec import unpack_message

            g = unpack_message(agg.store.latest().message).tensors
            snap = HeadSnapshot.from_arrays(g, kind=args.head, task="classification", version="g")
        else:
            snap = HeadSnapshot.from_arrays(init, kind=args.head, task="classification", version="shipped")
        held_curve.append(float(np.mean([_acc(snap, *h) for h in held])))
    out = {"device_accuracy": curve, "held_out_accuracy": held_curve, "malicious": sorted(malicious),
           "final_device_accuracy": curve[-1], "final_held_out_accuracy": held_curve[-1]}
    if sizes:
        out["bytes_per_sync_mean"] = float(np.mean(sizes))
        out["rejected"] = dict(agg.rejected)
        out["versions"] = agg.current
        out["version_step_norm_median"] = float(np.median(step_norm)) if step_norm else None
        out["global_message_bytes"] = len(agg.store.latest().message)
    if step_ratio:
        out["malicious_over_honest_median_step"] = step_ratio
        out["malicious_over_honest_median_step_max"] = max(step_ratio)
    return out


def bytes_per_head(ctx, args) -> dict:
    """Message sizes of one trained-like delta per head kind and encoding, and the fixed overhead."""
    from edge.adapt.heads import make_head
    from edge.fleet.codec import Header, pack_message
    from edge.fleet.feedback import encode_pending
    from edge.fleet.keys import generate_key

    key = generate_key()
    rng = np.random.default_rng(0)
    out = {}
    h = Header(kind="delta", fleet="bench", model="vibration", model_hash=ctx["hash"], head_kind="linear", node="press-07",
               seq=123456, base_version=4321, samples=250, encoding="topk8",
               metrics={"champion_loss": 0.1234, "challenger_loss": 0.1111, "global_loss": 0.1345})
    out["fixed_overhead_bytes"] = len(pack_message(h, {}, key))
    for kind, opts in (("linear", {}), ("lowrank", {"rank": 4}), ("mlp", {"hidden": 32}), ("mlp", {"hidden": args.hidden})):
        head = make_head(kind, in_features=ctx["dim"], out_features=len(ctx["classes"]), **opts)
        arrays = head.arrays()
        delta = {k: (rng.standard_normal(v.shape) * 0.01).astype(np.float32) for k, v in arrays.items()}
        if kind == "mlp":
            delta["weight"][:] = 0  # the mlp's base layer does not train: its delta is zero
            delta["bias"][:] = 0
        params = int(sum(v.size for v in arrays.values()))
        row = {"params": params}
        for enc in ("fp32", "fp16", "topk8"):
            step = encode_pending(delta, encoding=enc, fraction=args.fraction)
            row[f"{enc}_bytes"] = len(pack_message(dataclasses.replace(h, head_kind=kind, encoding=enc), step.tensors, key))
        row["fp32_over_topk8"] = round(row["fp32_bytes"] / row["topk8_bytes"], 1)
        out[f"{kind}" + (f"-{opts['hidden']}" if kind == "mlp" else "")] = row
    return out


def throughput(ctx, args, store_url: str | None) -> dict:
    """Deltas per second through ``Aggregator.ingest`` + ``maybe_commit`` (k = 100) on a store."""
    from edge.fleet.aggregator import Aggregator
    from edge.fleet.codec import Header, pack_message
    from edge.fleet.feedback import encode_pending
    from edge.fleet.keys import generate_key
    from edge.fleet.store import SQLiteStore, open_store
    from edge.fleet.validate import Expected
    from edge.adapt.heads import make_head

    n_dev, n = 200, args.throughput_deltas
    init = make_head("linear", in_features=ctx["dim"], out_features=len(ctx["classes"])).arrays()
    keys = [generate_key() for _ in range(n_dev)]
    rng = np.random.default_rng(1)
    msgs = []
    for j in range(n):
        d = j % n_dev
        delta = {k: (rng.standard_normal(v.shape) * 0.01).astype(np.float32) for k, v in init.items()}
        h = Header(kind="delta", fleet="bench", model="vibration", model_hash=ctx["hash"], head_kind="linear", node=f"d{d}",
                   seq=j // n_dev + 1, base_version=0, samples=20, encoding="topk8")
        msgs.append((f"fleet/bench/vibration/delta/d{d}", pack_message(h, encode_pending(delta, encoding="topk8",
                                                                                          fraction=0.1).tensors, keys[d])))
    if store_url is None:
        store = SQLiteStore(Path(tempfile.mkdtemp(prefix="edge-bench-fleet-")) / "fleet.db")
    else:
        store = open_store(store_url)
    exp = Expected(fleet="bench", model="vibration", model_hash=ctx["hash"], head_kind="linear",
                   shapes={k: tuple(v.shape) for k, v in init.items()})
    agg = Aggregator(store=store, expected=exp, key=generate_key(), trusted=lambda: {f"d{i}": k.public_key() for i, k in enumerate(keys)},
                     k=100, t_s=1e9, max_norm=1e6, initial=init)
    t0 = time.perf_counter()
    for i in range(0, n, 256):
        agg.ingest(msgs[i: i + 256])
        while agg.maybe_commit() is not None:
            pass
    agg.maybe_commit(force=True)
    dt = time.perf_counter() - t0
    res = {"deltas": n, "seconds": round(dt, 3), "deltas_per_s": round(n / dt, 1), "accepted": agg.counters["accepted"],
           "applied": agg.counters["applied"], "versions": agg.counters["versions"]}
    store.close()
    return res


def _plot(results, path, rounds) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(1, rounds + 1)
    for mode, r in results.items():
        ax[0].plot(x, np.array(r["device_accuracy"]) * 100, label=mode)
        ax[1].plot(x, np.array(r["held_out_accuracy"]) * 100, label=mode if mode != "alone" else "shipped head")
    ax[0].set(title="training devices (own shift, served head)", xlabel="round", ylabel="accuracy %")
    ax[1].set(title="held-out devices (global head)", xlabel="round", ylabel="accuracy %")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _throughputs(ctx, args) -> dict:
    out = {"sqlite": throughput(ctx, args, None)}
    if args.postgres:
        import uuid

        schema = f"bench_{uuid.uuid4().hex[:8]}"
        try:
            out["postgres"] = throughput(ctx, args, f"{args.postgres}?schema={schema}")
        finally:
            try:
                import psycopg

                with psycopg.connect(args.postgres, autocommit=True) as c:
                    c.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            except Exception:
                pass
    return out


def _attack_report(attacks, data, held, conds, ctx, args, argv, out: Path, t_feat: float) -> int:
    """The honest baseline and each attack in one run, against the issue's targets (``fleet_attack.json``)."""
    results = {"compressed": run_mode("compressed", data, held, ctx, args)}
    for a in attacks:
        results[f"attack:{a}"] = run_mode(f"attack:{a}", data, held, ctx, args)
    base = results["compressed"]
    targets = {}
    for a in attacks:
        r = results[f"attack:{a}"]
        dev = round((base["final_device_accuracy"] - r["final_device_accuracy"]) * 100, 2)
        hold = round((base["final_held_out_accuracy"] - r["final_held_out_accuracy"]) * 100, 2)
        ratio = r.get("malicious_over_honest_median_step_max")
        targets[a] = {"device_points_below_no_attack": dev, "held_out_points_below_no_attack": hold,
                      "max_malicious_over_honest_median_step": None if ratio is None else round(ratio, 2),
                      "accuracy_met": dev <= 2.0 and hold <= 2.0, "step_met": ratio is not None and ratio <= 3.0}
    report = {"command": "edge bench fleet " + " ".join(argv or []), "cpu": _cpu(), "args": vars(args),
              "feature_seconds": round(t_feat, 1),
              "devices": [{"shift": s, "strength": k} for s, k, _ in conds[: args.devices]],
              "modes": results, "throughput": _throughputs(ctx, args), "targets": targets,
              "bytes_per_sync_no_attack": base.get("bytes_per_sync_mean")}
    (out / "fleet_attack.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({"cpu": report["cpu"], "targets": targets, "throughput": report["throughput"],
                      "bytes_per_sync": report["bytes_per_sync_no_attack"],
                      "final": {m: (round(r["final_device_accuracy"] * 100, 2), round(r["final_held_out_accuracy"] * 100, 2))
                                for m, r in results.items()}}, indent=1))
    return 0


def _scale_report(args, argv) -> int:
    """``--instances``: the scale-out bench (``edge.bench.fleet_scale``), JSON in ``fleet_scale.json``."""
    from edge.bench import fleet_scale

    counts = [int(x) for x in args.instances.split(",") if x]
    report = {"command": "edge bench fleet " + " ".join(argv or []), "cpu": _cpu(),
              **fleet_scale.run(args.store, counts, deltas=args.throughput_deltas, repeats=args.repeats)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fleet_scale.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("cpu", "stored_per_s", "scaling_over_n_x_one")}, indent=1))
    return 0


def main(argv=None) -> int:
    from edge.fleet.config import ServerSection

    ap = argparse.ArgumentParser(prog="edge bench fleet", description=__doc__.splitlines()[0].replace("`", ""))
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--held-out", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--labels-per-round", type=int, default=10)
    ap.add_argument("--test", type=int, default=200, help="test windows per device")
    ap.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of each device's class mix")
    ap.add_argument("--head", default="mlp", choices=["linear", "lowrank", "mlp"])
    ap.add_argument("--hidden", type=int, default=160, help="mlp hidden units (160: 11,304 parameters)")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--class-evidence", type=int, default=None,
                    help="[adapt] class_evidence of every device's learner (default: the config's; 0: plain cross-entropy)")
    ap.add_argument("--refresh-labels", type=int, default=None,
                    help="[adapt] refresh_labels of every device's learner (default: the config's; 0: promotions only)")
    ap.add_argument("--fraction", type=float, default=0.01, help="top-k share of the compressed modes")
    ap.add_argument("--sweep", default="0.02,0.05", help="more top-k shares to run the compressed mode at")
    ap.add_argument("--malicious", type=float, default=0.2)
    ap.add_argument("--rule", default="clip", choices=["clip", "trimmed_mean", "median"], help="compressed modes' rule")
    ap.add_argument("--clip-norm", type=float, default=0.0, help="compressed modes' clip bound; 0: the batch's median norm")
    ap.add_argument("--samples-ratio", type=float, default=ServerSection.samples_ratio,
                    help="[server] samples_ratio: a device weighs at most this many typical devices")
    ap.add_argument("--reference-growth", type=float, default=ServerSection.reference_growth,
                    help="[server] reference_growth: the fleet's reference norm moves at most this factor per version")
    ap.add_argument("--throughput-deltas", type=int, default=5000)
    ap.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test", help="'' to skip")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--instances", default="",
                    help="run instead the scale-out bench: stored deltas per second for these instance counts (1,2,3)")
    ap.add_argument("--repeats", type=int, default=2, help="--instances: runs of each count, interleaved; the best is kept")
    ap.add_argument("--store", default="postgresql://postgres@127.0.0.1:5432/test",
                    help="--instances: the PostgreSQL the instances share (a fresh schema per count)")
    ap.add_argument("--attack", default="", help=f"run the honest baseline and these attacks: {','.join(ATTACKS)} or all")
    args = ap.parse_args(argv)
    attacks = list(ATTACKS) if args.attack == "all" else [a for a in args.attack.split(",") if a]
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        ap.error(f"unknown attack {unknown[0]!r}; use one of {', '.join(ATTACKS)} or all")
    if args.instances:
        return _scale_report(args, argv)
    torch.set_num_threads(1)
    from edge.zoo import resolve_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = resolve_model("vibration")
    bb, hd = folder.build()
    ctx = {"dim": folder.manifest.feature_size, "classes": folder.manifest.classes, "hash": folder.content_hash,
           "shipped": {"weight": hd.weight.detach().numpy(), "bias": hd.bias.detach().numpy()}}
    t0 = time.perf_counter()
    conds = _conditions(args.devices + args.held_out, args.seed)
    n_train = args.rounds * args.labels_per_round
    data, held = [], []
    for i, (_, _, c) in enumerate(conds):
        zt, yt, ze, ye = _device_data(bb, c, n_train=n_train, n_test=args.test, seed=args.seed * 1000 + i,
                                      classes=len(ctx["classes"]), alpha=args.alpha)
        if i < args.devices:
            data.append({"train": (zt, yt), "test": (ze, ye)})
        else:
            held.append((ze, ye))
    t_feat = time.perf_counter() - t0
    if attacks:
        return _attack_report(attacks, data, held, conds, ctx, args, argv, out, t_feat)
    results = {m: run_mode(m, data, held, ctx, args) for m in MODES}
    for f in [float(x) for x in args.sweep.split(",") if x]:
        results[f"compressed@{f:g}"] = run_mode("compressed", data, held, ctx, args, fraction=f)
    report = {"command": "edge bench fleet " + " ".join(argv or []), "cpu": _cpu(), "args": vars(args),
              "feature_seconds": round(t_feat, 1),
              "devices": [{"shift": s, "strength": k} for s, k, _ in conds[: args.devices]],
              "held_out": [{"shift": s, "strength": k} for s, k, _ in conds[args.devices:]],
              "modes": results, "bytes": bytes_per_head(ctx, args), "throughput": _throughputs(ctx, args)}
    dense, comp, mal = (results[m]["final_device_accuracy"] for m in ("dense", "compressed", "compressed_malicious"))
    big = report["bytes"][f"mlp-{args.hidden}"]
    # measured message sizes of the big head at each swept share (bytes of real deltas, from the runs)
    report["sweep"] = {name: {"bytes_per_sync": r.get("bytes_per_sync_mean"), "final_device_accuracy": r["final_device_accuracy"],
                              "final_held_out_accuracy": r["final_held_out_accuracy"]}
                       for name, r in results.items() if name.startswith(("compressed", "dense"))}
    report["targets"] = {
        "bytes_ratio_dense_over_compressed_10k_head": big["fp32_over_topk8"],
        "bytes_ratio_measured_in_run": round(results["dense"]["bytes_per_sync_mean"] / results["compressed"]["bytes_per_sync_mean"], 1),
        "compressed_loss_vs_dense_points": round((dense - comp) * 100, 2),
        "malicious_loss_vs_dense_points": round((dense - mal) * 100, 2),
        "held_out_global_minus_shipped_points": round((results["compressed"]["final_held_out_accuracy"]
                                                       - results["alone"]["final_held_out_accuracy"]) * 100, 2),
        "sqlite_deltas_per_s": report["throughput"]["sqlite"]["deltas_per_s"],
        "postgres_deltas_per_s": report["throughput"].get("postgres", {}).get("deltas_per_s"),
    }
    (out / "fleet.json").write_text(json.dumps(report, indent=1))
    _plot(results, out / "fleet.png", args.rounds)
    print(json.dumps({"cpu": report["cpu"], "targets": report["targets"],
                      "final": {m: (round(r["final_device_accuracy"] * 100, 2), round(r["final_held_out_accuracy"] * 100, 2))
                                for m, r in results.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
