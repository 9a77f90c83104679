"""End-to-end fleet server throughput: signed deltas through a real mosquitto into a real
``FleetServer`` on SQLite, with its receipts and without them, in the same run.

    PYTHONPATH=. .venv/bin/python bench/fleet_e2e.py [--nodes 20] [--per-node 100] [--repeats 3]

Publishes ``nodes x per_node`` distinct valid deltas at QoS 1 from one client and times
until all are stored (``store.deltas()``). "without receipts" replaces the server's
receipt step with nothing in this process only (a bench switch, not a setting): the two
variants alternate, repeats times, so both see the same machine. Writes
``bench/out/fleet_e2e.json``. This is the figure the aggregator-level throughput of
``edge bench fleet`` leaves out: the broker, the server loop, and one Ed25519-signed
receipt per delta.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from edge.broker import BrokerProcess
from edge.fleet.config import load_server_config
from edge.fleet.server import FleetServer
from edge.fleet.store import open_store
from tests.fleet_helpers import make_keys, server_toml, signed_delta


def _cpu() -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return {"model": model, "cores": os.cpu_count(), "machine": platform.machine(),
            "features": [f for f in ("avx2", "avx512f", "avx512_vnni", "fma") if f in flags]}


def run_once(b, root: Path, keys, msgs, *, receipts: bool, tag: str) -> dict:
    db = root / f"{tag}.db"
    cfg = load_server_config(server_toml(root, keys, b, store=str(db), name=tag, k=100_000, t_s=3600.0))
    srv = FleetServer(cfg)
    if not receipts:
        srv._send_receipts = lambda rs: None  # this process only: the same loop without its receipts
        srv.agg.receipts = lambda verdicts: []
    srv.start()
    assert srv.connected.wait(10), "server did not connect"
    p = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    p.max_inflight_messages_set(1000)
    p.connect(b.host, b.port)
    p.loop_start()
    store = open_store(str(db))
    try:
        t0 = time.perf_counter()
        infos = [p.publish(t, m, qos=1) for t, m in msgs]
        for i in infos:
            i.wait_for_publish(60)
        deadline = time.monotonic() + 120
        while len(store.deltas()) < len(msgs) and time.monotonic() < deadline:
            time.sleep(0.02)
        dt = time.perf_counter() - t0
        stored = len(store.deltas())
    finally:
        store.close()
        p.loop_stop()
        p.disconnect()
        srv.stop()
    return {"receipts": receipts, "deltas": len(msgs), "stored": stored, "seconds": round(dt, 3),
            "deltas_per_s": round(stored / dt, 1), "receipts_sent": srv.counters.get("receipts", 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--per-node", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/out/fleet_e2e.json")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="edge-fleet-e2e-"))
    nodes = [f"n{i}" for i in range(a.nodes)]
    keys = make_keys(root, nodes)
    msgs = [(f"fleet/test/vibration/delta/{n}", signed_delta(keys[n].private_path, node=n, seq=s, seed=s))
            for s in range(1, a.per_node + 1) for n in nodes]
    runs = []
    with BrokerProcess(kind="mosquitto") as b:
        for r in range(a.repeats):
            for receipts in ((True, False) if r % 2 == 0 else (False, True)):
                runs.append(run_once(b, root, keys, msgs, receipts=receipts, tag=f"r{r}-{int(receipts)}"))
                print(json.dumps(runs[-1]))
    med = {v: statistics.median(x["deltas_per_s"] for x in runs if x["receipts"] == v) for v in (True, False)}
    out = {"cpu": _cpu(), "load_avg": os.getloadavg(), "args": vars(a), "runs": runs,
           "median_deltas_per_s": {"with_receipts": med[True], "without_receipts": med[False]},
           "ratio_with_to_without": round(med[True] / med[False], 3)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("median_deltas_per_s", "ratio_with_to_without")}))


if __name__ == "__main__":
    main()
