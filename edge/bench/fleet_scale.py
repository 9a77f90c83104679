"""``edge bench fleet --instances 1,2,3 --store postgresql://...``: stored deltas per second
as fleet-server instances are added, all counts in the same run.

Each instance is its own process with the real ``Aggregator`` on its own connection to one
PostgreSQL schema (fresh per count), running the server's drain loop: ``ingest`` batches
of up to 512 deltas (verify, decode, store, count) and their receipts, then ``maybe_commit`` (k = 100, the
version commit under the store's lock). The same signed deltas (200 simulated devices,
top-k 8-bit linear-head deltas) are split round-robin, as a shared subscription splits
them. The clock runs from a start barrier until every instance is done and every delta
is applied into a version. The broker is not in the loop (``edge bench mqtt`` measures
it): this measures where instances can wait on each other, the store and the commit.
Per instance it also reports the seconds spent in ``ingest`` and in ``maybe_commit``, and
its CPU seconds: wall time an instance spends off the CPU is waiting (for PostgreSQL, its
locks, or a core).
"""
from __future__ import annotations

import multiprocessing as mp
import queue
import time
import uuid


def _messages(n: int, n_dev: int, seed: int = 1):
    import numpy as np

    from edge.adapt.heads import make_head
    from edge.fleet.codec import Header, pack_message
    from edge.fleet.feedback import encode_pending
    from edge.fleet.keys import generate_key
    from edge.zoo import resolve_model

    m = resolve_model("vibration")
    init = make_head("linear", in_features=m.manifest.feature_size, out_features=len(m.manifest.classes)).arrays()
    keys = [generate_key() for _ in range(n_dev)]
    rng = np.random.default_rng(seed)
    msgs = []
    for j in range(n):
        d = j % n_dev
        delta = {k: (rng.standard_normal(v.shape) * 0.01).astype(np.float32) for k, v in init.items()}
        h = Header(kind="delta", fleet="bench", model="vibration", model_hash=m.content_hash, head_kind="linear",
                   node=f"d{d}", seq=j // n_dev + 1, base_version=0, samples=20, encoding="topk8")
        msgs.append((f"fleet/bench/vibration/delta/d{d}",
                     pack_message(h, encode_pending(delta, encoding="topk8", fraction=0.1).tensors, keys[d])))
    return msgs, [k.public_key().public_bytes_raw() for k in keys]


def _proc_cpu(pid: int) -> float:
    """CPU seconds of a local process (its PostgreSQL backend), 0 where /proc cannot tell."""
    import os

    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _instance(url: str, share, public: list[bytes], barrier, out) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from edge.adapt.heads import make_head
    from edge.fleet.aggregator import Aggregator
    from edge.fleet.keys import generate_key
    from edge.fleet.store import open_store
    from edge.fleet.validate import Expected
    from edge.zoo import resolve_model

    m = resolve_model("vibration")
    init = make_head("linear", in_features=m.manifest.feature_size, out_features=len(m.manifest.classes)).arrays()
    trusted = {f"d{i}": Ed25519PublicKey.from_public_bytes(b) for i, b in enumerate(public)}
    exp = Expected(fleet="bench", model="vibration", model_hash=m.content_hash, head_kind="linear",
                   shapes={k: tuple(v.shape) for k, v in init.items()})
    store = open_store(url)
    agg = Aggregator(store=store, expected=exp, key=generate_key(), trusted=lambda: trusted, k=100, t_s=1e9,
                     max_norm=1e6, initial=init)
    t_ingest = t_commit = 0.0
    (backend,) = store._one("SELECT pg_backend_pid()")  # on this machine's PostgreSQL: its CPU is read from /proc
    barrier.wait()
    t0, c0, p0 = time.perf_counter(), time.process_time(), _proc_cpu(backend)
    for i in range(0, len(share), 512):
        a = time.perf_counter()
        agg.receipts(agg.ingest(share[i: i + 512]))  # the server's drain: verdicts, then their receipts
        b = time.perf_counter()
        while agg.maybe_commit() is not None:
            pass
        t_commit += time.perf_counter() - b
        t_ingest += b - a
    b = time.perf_counter()
    while agg.store.pending().count:  # what is left below k (the server's t_s would commit it)
        if agg.maybe_commit(force=True) is None:
            time.sleep(0.005)  # another instance is committing: it may leave some for the next try
    t_commit += time.perf_counter() - b
    out.put({"seconds": time.perf_counter() - t0, "cpu_s": round(time.process_time() - c0, 3),
             "postgres_backend_cpu_s": round(_proc_cpu(backend) - p0, 3), "ingest_s": round(t_ingest, 3), "commit_s": round(t_commit, 3),
             "accepted": agg.counters["accepted"], "versions": agg.counters["versions"],
             "applied": agg.counters["applied"], "store_retries": getattr(store, "retries", 0),
             "commit_busy": getattr(store, "commit_busy", 0)})
    store.close()


def run_count(base_url: str, n_instances: int, msgs, public) -> dict:
    """One instance count on a fresh schema; the schema is dropped afterwards."""
    import psycopg

    from edge.fleet.store import open_store

    schema = f"bench_scale_{uuid.uuid4().hex[:8]}"
    url = f"{base_url}{'&' if '?' in base_url else '?'}schema={schema}"
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(n_instances + 1), ctx.Queue()
    open_store(url).close()  # the schema exists before the instances race to it
    procs = [ctx.Process(target=_instance, args=(url, msgs[i::n_instances], public, barrier, out))
             for i in range(n_instances)]
    try:
        for p in procs:
            p.start()
        barrier.wait()
        per = []
        while len(per) < n_instances:  # an instance that died (a store error) ends the count, not a hang
            try:
                per.append(out.get(timeout=1.0))
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"{len(dead)} of {n_instances} instances died (exit {dead[0]}): see their stderr")
        for p in procs:
            p.join(60)
        dt = max(r["seconds"] for r in per)  # from the barrier to the last instance's last commit
        store = open_store(url)
        try:
            left, stored = store.pending().count, len(store.deltas())
        finally:
            store.close()
        return {"instances": n_instances, "deltas": len(msgs), "stored": stored, "unapplied_left": left,
                "seconds": round(dt, 3), "stored_per_s": round(stored / dt, 1), "per_instance": per}
    finally:
        with psycopg.connect(base_url.split("?")[0], autocommit=True) as c:
            c.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def run(base_url: str, counts: list[int], *, deltas: int = 6000, devices: int = 200, repeats: int = 2) -> dict:
    """Every count, ``repeats`` times interleaved (1, 2, 3, 1, 2, 3): the best of each, and
    each count's rate over ``n`` x the one-instance rate."""
    msgs, public = _messages(deltas, devices)
    runs = {n: [] for n in counts}
    for _ in range(repeats):
        for n in counts:
            runs[n].append(run_count(base_url, n, msgs, public))
    best = {n: max(r, key=lambda x: x["stored_per_s"]) for n, r in runs.items()}
    one = best[min(counts)]["stored_per_s"] / min(counts)
    return {"counts": counts, "deltas": deltas, "devices": devices, "repeats": repeats,
            "stored_per_s": {str(n): best[n]["stored_per_s"] for n in counts},
            "scaling_over_n_x_one": {str(n): round(best[n]["stored_per_s"] / (n * one), 3) for n in counts},
            "runs": {str(n): r for n, r in runs.items()}}
