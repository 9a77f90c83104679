"""`edge bench device`: the daemon as a device runs it: READY, idle and loaded cost, broker restarts.

One real ``edge run`` (ONNX Runtime, the cache warmed first) against a mosquitto of its
own, with ``NOTIFY_SOCKET`` pointing at a datagram socket of ours as systemd would:

1. **READY**: seconds from ``exec`` to ``READY=1`` with a warm cache; RSS then, and
   whether torch's library is mapped (the serving path should not need it);
2. **idle**: CPU share of one core and RSS over ``--idle-s`` with no input;
3. **loaded**: ``--streams`` single-sample JSON streams at 1 kHz plus labels at 4/s per
   stream over ``--load-s``: CPU share, RSS, windows served;
4. **broker restart** (``--restarts`` times): mosquitto is killed while the streams keep
   sending (their publisher reconnects), restarted on the same port after
   ``--down-s``; measured: seconds from the broker accepting connections again until the
   daemon's next prediction arrives.

    edge bench device --out bench/out/device.json
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt

from edge.bench.machine import cpu_info, write_result
from edge.bench.pipeline import _cpu_seconds, _rss_mb, _samples
from edge.broker import BrokerProcess, free_port, wait_for_port


class _Predictions:
    def __init__(self, host: str, port: int, topic: str):
        self.n, self.last = 0, 0.0
        self.lock = threading.Lock()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-dev-rx-{os.getpid()}")
        self.c.on_connect = lambda c, *a: c.subscribe(topic)
        self.c.on_message = self._on
        self.c.reconnect_delay_set(0.05, 0.2)
        self.c.connect(host, port)
        self.c.loop_start()

    def _on(self, c, u, m):
        if m.retain:  # a retained latest prediction is not a new one
            return
        with self.lock:
            self.n += 1
            self.last = time.time()

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


class _Streams(threading.Thread):
    """``streams`` sensors at 1 kHz (batched every 10 ms) and labels at 4/s each, through paho."""

    def __init__(self, host: str, port: int, streams: int, rows):
        super().__init__(name="bench-streams", daemon=True)
        self.rows, self.streams = rows, streams
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-dev-tx-{os.getpid()}")
        self.c.reconnect_delay_set(0.05, 0.2)
        self.c.connect(host, port)
        self.c.loop_start()
        self.stop_ev = threading.Event()
        self.sent = 0

    def run(self):
        t0 = time.time()
        i = 0
        while not self.stop_ev.is_set():
            now = time.time()
            due = int((now - t0) * 1000)
            while i < due:
                t = t0 + i / 1000.0
                for s in range(self.streams):
                    self.c.publish(f"sensors/d{s}/accel", orjson.dumps({"t": t, "v": self.rows[(i + s) % len(self.rows)].tolist()}))
                    if i % 250 == 0:
                        self.c.publish("edge/dev/labels", orjson.dumps({"t": t, "label": "normal", "device": f"d{s}",
                                                                        "stream": "accel"}), qos=1)
                self.sent += self.streams
                i += 1
            time.sleep(0.01)

    def stop(self):
        self.stop_ev.set()
        self.join(5)
        self.c.disconnect()
        self.c.loop_stop()


def _share(pid: int, seconds: float) -> tuple[float, float]:
    c0, t0 = _cpu_seconds(pid), time.time()
    peak = _rss_mb(pid)
    while time.time() - t0 < seconds:
        time.sleep(0.25)
        peak = max(peak, _rss_mb(pid))
    return (_cpu_seconds(pid) - c0) / (time.time() - t0), peak


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="edge bench device", description=__doc__.split("\n")[0].replace("`", ""))
    ap.add_argument("--model", default="vibration")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--idle-s", type=float, default=10.0)
    ap.add_argument("--load-s", type=float, default=15.0)
    ap.add_argument("--restarts", type=int, default=3)
    ap.add_argument("--down-s", type=float, default=2.0)
    ap.add_argument("--out", default="bench/out/device.json")
    a = ap.parse_args(argv)
    rows = _samples(a.streams, 5000)
    out: dict = {"command": "edge bench device " + " ".join(argv if argv is not None else sys.argv[1:]),
                 "cpu": cpu_info(), "python": sys.version.split()[0]}
    port = free_port()
    with tempfile.TemporaryDirectory() as td, BrokerProcess(kind="mosquitto", port=port) as broker:
        tmp = Path(td)
        cfg = tmp / "edge.toml"
        cfg.write_text(f'[node]\nname = "dev"\nstate_dir = "{tmp / "state"}"\nlog_level = "warning"\n'
                       f'[mqtt]\nhost = "{broker.host}"\nport = {port}\nreconnect_min_s = 0.1\nreconnect_max_s = 1.0\n'
                       f'[model]\npath = "{a.model}"\ncache_dir = "{tmp / "cache"}"\n')
        print("warming the cache (first start builds and measures the candidates) ...", flush=True)
        subprocess.run([sys.executable, "-m", "edge.cli", "compile", a.model, "--cache-dir", str(tmp / "cache"), "--quiet"],
                       check=True, stdout=subprocess.DEVNULL)
        sock_path = tmp / "notify"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.bind(str(sock_path))
            s.settimeout(120)
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", "-c", str(cfg)],
                                    env={**os.environ, "NOTIFY_SOCKET": str(sock_path)}, stdout=subprocess.DEVNULL,
                                    stderr=open(tmp / "edge.log", "wb"))
            while "READY=1" not in s.recv(4096).decode():
                pass
            out["ready_s"] = round(time.perf_counter() - t0, 3)
        try:
            time.sleep(1.0)
            out["ready_rss_mb"] = round(_rss_mb(proc.pid), 1)
            out["torch_loaded"] = "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()
            print(f"READY in {out['ready_s']} s, RSS {out['ready_rss_mb']} MB, torch loaded: {out['torch_loaded']}", flush=True)
            share, rss = _share(proc.pid, a.idle_s)
            out["idle"] = {"cpu_core_share": round(share, 4), "rss_mb": round(rss, 1)}
            print(f"idle: {out['idle']}", flush=True)
            rx = _Predictions(broker.host, port, "edge/dev/predictions/#")
            tx = _Streams(broker.host, port, a.streams, rows)
            tx.start()
            time.sleep(3.0)  # streams up, first windows through
            n0 = rx.n
            share, rss = _share(proc.pid, a.load_s)
            out["loaded"] = {"streams": a.streams, "rate_hz": 1000, "cpu_core_share": round(share, 4),
                             "rss_mb": round(rss, 1), "windows_per_s": round((rx.n - n0) / a.load_s, 1)}
            print(f"loaded: {out['loaded']}", flush=True)
            resumes = []
            for _ in range(a.restarts):
                broker.kill()
                time.sleep(a.down_s)
                broker.start()
                wait_for_port(broker.host, port, 10)
                up = time.time()
                n = rx.n
                deadline = up + 60
                while time.time() < deadline and not (rx.n > n and rx.last > up):
                    time.sleep(0.01)
                resumes.append(round(rx.last - up, 3) if rx.last > up else None)
                print(f"broker restart: predictions resumed {resumes[-1]} s after the broker was back", flush=True)
                time.sleep(3.0)
            out["broker_restart"] = {"down_s": a.down_s, "resume_s": resumes,
                                     "resume_s_max": max((r for r in resumes if r is not None), default=None)}
            tx.stop()
            rx.close()
        finally:
            proc.terminate()
            out["exit_code"] = proc.wait(20)
    write_result(out, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
