"""Soak: the daemon as a process under steady load with labels, memory watched.

Slow (``pytest -m slow tests/test_soak.py``; ``EDGE_SOAK_SECONDS`` sets the length,
default 120). It checks what months of running depend on: nothing dropped, every window
served, no thread dead, and resident memory flat once warmed up.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from edge.bench.rawmqtt import RawPublisher, publish_packet
from edge.sim import Machine
from tests.helpers import Client

ROOT = Path(__file__).resolve().parent.parent
SECONDS = float(os.environ.get("EDGE_SOAK_SECONDS", "120"))
pytestmark = [pytest.mark.slow, pytest.mark.timeout(int(SECONDS) + 180)]


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def test_steady_load_with_labels_keeps_memory_flat_and_loses_nothing(broker, tmp_path):
    cfg = tmp_path / "edge.toml"
    cfg.write_text(f'[node]\nname = "soak"\nstate_dir = "{tmp_path / "state"}"\n'
                   f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
                   f'[model]\ncache_dir = "{tmp_path / "cache"}"\n[adapt]\ncheckpoint_interval_s = 10.0\n')
    p = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", "--config", str(cfg)], stdout=subprocess.DEVNULL,
                         stderr=open(tmp_path / "edge.log", "wb"), env={**os.environ, "PYTHONPATH": str(ROOT)})
    c = Client(broker, "edge/soak/predictions/#", "edge/soak/status")
    streams = 4
    machines = [Machine(seed=50 + i, fault=f) for i, f in enumerate(("normal", "imbalance", "misalignment", "bearing_wear"))]
    try:
        c.wait_for(lambda m: any(pl == b"online" for _, pl, _ in m), timeout=60)
        pub = RawPublisher(broker.host, broker.port, client_id="soak-pub")
        t0 = time.time()
        sent, rss, next_rss = [0] * streams, [], t0
        while time.time() - t0 < SECONDS:
            now = time.time()
            chunk = []
            for s, m in enumerate(machines):
                due = int((now - t0) * 1000) - sent[s]
                if due <= 0:
                    continue
                t, v = m.read(due)
                t = t + t0
                for ti, vi in zip(t.tolist(), np.round(v, 4).tolist()):
                    chunk.append(publish_packet(b"sensors/m%d/accel" % s, orjson.dumps({"t": ti, "v": vi})))
                if sent[s] // 250 != (sent[s] + due) // 250:  # a label four times a second per stream
                    chunk.append(publish_packet(b"edge/soak/labels", orjson.dumps(
                        {"t": float(t[0]), "label": m.fault, "device": f"m{s}", "stream": "accel"})))
                sent[s] += due
            if chunk:
                pub.send(b"".join(chunk))
            if now >= next_rss:
                rss.append((now - t0, rss_mb(p.pid)))
                next_rss += 5.0
            time.sleep(0.005)
        pub.close()
        expected = sum(n // 256 for n in sent)
        c.wait_for(lambda m: sum(1 for t, _, _ in m if "/predictions/" in t) >= expected, timeout=30)
        assert p.poll() is None, "the daemon died"
        warm = [r for t, r in rss if t >= min(30.0, SECONDS / 3)]
        growth = warm[-1] - warm[0]
        print(f"\nsoak {SECONDS:.0f} s: {sum(sent)} samples, {expected} windows, RSS {warm[0]:.1f} -> {warm[-1]:.1f} MB "
              f"(max {max(r for _, r in rss):.1f})")
        print("RSS (s, MB):", [(round(t), round(r, 1)) for t, r in rss])
        assert growth < 15.0, rss
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
        assert "Traceback" not in (tmp_path / "edge.log").read_text()
    finally:
        c.close()
        if p.poll() is None:
            p.kill()
