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
   daemon's next prediction arrives;
5. **flash** (a second, fresh ``edge run`` at the default settings, its runtime folder on
   tmpfs as systemd's ``RuntimeDirectory`` is): bytes it makes the kernel write to storage
   (``/proc/<pid>/io`` ``write_bytes``), idle (``--flash-idle-s``), under one 1 kHz stream
   with 1 label/s (``--flash-load-s``), and idle again after that load. Short windows are
   extrapolated to a day (``per_day_extrapolated``); since a window may be shorter than
   ``[adapt] checkpoint_interval_s``, ``per_day`` also counts what is not checkpoints at its
   measured rate and the checkpoints at one of the measured size per interval while the
   learner changes (loaded), none while it does not (idle): docs/STATE.md, "Flash budget".
   The journal's own writes (jbd2, on fsync) are the kernel's and not counted here.

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
    """``streams`` sensors at 1 kHz (batched every 10 ms) and labels at ``label_hz`` each, through paho."""

    def __init__(self, host: str, port: int, streams: int, rows, label_hz: float = 4.0):
        super().__init__(name="bench-streams", daemon=True)
        self.rows, self.streams = rows, streams
        self.label_every = max(1, int(round(1000 / label_hz)))
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
                    if i % self.label_every == 0:
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


def _write_bytes(pid: int) -> int:
    """Bytes this process caused to be written to storage so far (``/proc/<pid>/io``)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/io has no write_bytes")


def _checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("ckpt-*.edge"))


def _learned(status: Path) -> int:
    """Labels the daemon's learner matched so far, from its status.json (every 5 s)."""
    try:
        return int(orjson.loads(status.read_bytes()).get("adapt", {}).get("matcher_labels_matched_total", 0))
    except (OSError, ValueError, AttributeError):
        return 0


def _period(pid: int, seconds: float, ckdir: Path, status: Path) -> dict:
    """Bytes written, checkpoints made and labels learned during ``seconds``."""
    seen = {p.name for p in _checkpoints(ckdir)}
    l0 = _learned(status)
    w0, t0 = _write_bytes(pid), time.monotonic()
    time.sleep(seconds)
    w1, dt = _write_bytes(pid), time.monotonic() - t0
    time.sleep(5.5)  # the next status.json: what was learned in the window (its writes are in RAM)
    learned = _learned(status) - l0
    new = [p for p in _checkpoints(ckdir) if p.name not in seen]
    size = max((p.stat().st_size for p in new), default=0)
    ck_bytes = sum(p.stat().st_size for p in new)
    return {"seconds": round(dt, 1), "write_bytes": w1 - w0, "checkpoints": len(new), "checkpoint_bytes": size,
            "labels_matched": learned,
            "other_bytes": max(0, w1 - w0 - ck_bytes),
            "per_day_extrapolated_mb": round((w1 - w0) * 86400 / dt / 1e6, 3)}


def _prefill(cfg_path: Path, n: int) -> dict:
    """A checkpoint as months of labels leave it: ``n`` labelled windows learned, so that the
    replay buffer is full (the issue's case: its rows are most of a checkpoint's bytes)."""
    import numpy as np

    from edge.adapt.heads import HeadSnapshot
    from edge.adapt.worker import AdaptWorker
    from edge.config import load_config
    from edge.ingest.types import StreamKey
    from edge.state import learner_store
    from edge.supervise import wait_until
    from edge.zoo import resolve_model

    cfg = load_config(str(cfg_path))
    model = resolve_model(cfg.model.path)
    m = model.manifest
    _, head_sd = model.arrays()
    ghead = HeadSnapshot.from_arrays(dict(head_sd), kind="linear", task=m.task, version=f"{m.version}+shipped")
    w = AdaptWorker(cfg=cfg, model=model, global_head=ghead, store=learner_store(cfg, model),
                    publish_event=lambda *a, **k: None)
    rng, key = np.random.default_rng(0), StreamKey("prefill", "accel")
    w.start()
    for i in range(n):
        w.offer_window(key, 1000.0 + i, 1000.5 + i, rng.normal(size=m.feature_size).astype(np.float32), None)
        w.offer_label(key, 1000.25 + i, m.classes[i % len(m.classes)])
    wait_until(lambda: w.metrics()["matcher_labels_matched_total"] >= n, timeout=600)
    w.stop(timeout_s=60)
    met = w.metrics()
    return {"labels": n, "replay_samples": met["learner_replay_samples"]}


def per_day(out: dict) -> dict:
    """Bytes per day at steady state from a flash phase's windows (module docstring, 5):
    what is not checkpoints at its measured rate in the windows without a checkpoint, plus
    checkpoints at their measured cost (write_bytes per checkpoint where one was seen, else
    the file's size): one per interval while the learner changes (loaded), none while it
    does not (idle: an idle learner's state is unchanged, so a checkpoint seen in an idle
    window is the one-off of the load before it).

    >>> w = lambda s, b, n: {"seconds": s, "write_bytes": b, "checkpoints": n}
    >>> per_day({"checkpoint_interval_s": 1800, "checkpoint_file_bytes": 10**6, "idle": w(100, 0, 0),
    ...          "loaded": w(100, 0, 0), "idle_after_load": w(100, 2 * 10**6, 1)})["per_day_mb"]
    {'idle': 0.0, 'loaded': 96.0, 'checkpoint_bytes_each': 2000000}
    """
    wins = [out[k] for k in ("idle", "loaded", "idle_after_load") if k in out]
    quiet = [x for x in wins if not x["checkpoints"]]
    rate = sum(x["write_bytes"] for x in quiet) / max(1e-9, sum(x["seconds"] for x in quiet)) if quiet else 0.0
    seen = [x for x in wins if x["checkpoints"]]
    each = (sum(x["write_bytes"] for x in seen) // sum(x["checkpoints"] for x in seen) if seen
            else out["checkpoint_file_bytes"])
    day = 86400 * rate
    return {"per_day_mb": {"idle": round(day / 1e6, 3),
                           "loaded": round((day + 86400 / out["checkpoint_interval_s"] * each) / 1e6, 3),
                           "checkpoint_bytes_each": int(each)},
            "targets_mb_per_day": {"idle": 1.0, "loaded": 100.0}}


def flash(a, rows, broker, port: int, tmp: Path) -> dict:
    """Phase 5 (module docstring): a fresh daemon at the defaults, its replay buffer full
    (``--flash-prefill`` labels learned first), idle / loaded / idle again."""
    from edge.config import load_config, parse_config

    interval = parse_config({}).adapt.checkpoint_interval_s
    run_dir = Path(tempfile.mkdtemp(prefix="edge-bench-run-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    cfg = tmp / "flash.toml"
    cfg.write_text(f'[node]\nname = "dev"\nstate_dir = "{tmp / "flash-state"}"\n'
                   f'[mqtt]\nhost = "{broker.host}"\nport = {port}\n'
                   f'[model]\npath = "{a.model}"\ncache_dir = "{tmp / "cache"}"\n' + a.flash_toml.replace("\\n", "\n"))
    if a.flash_toml:  # other settings than the defaults (docs/STATE.md's formula); the interval is the config's
        interval = load_config(str(cfg)).adapt.checkpoint_interval_s
        out_extra = {"settings": a.flash_toml}
    else:
        out_extra = {}
    ckdir = tmp / "flash-state" / "dev" / "adapt"
    out: dict = {"checkpoint_interval_s": interval, "runtime_dir": "tmpfs (/dev/shm, as systemd's /run)",
                 "log": "stderr to tmpfs (under systemd it is a pipe to journald, not the daemon's write)", **out_extra}
    if a.flash_prefill:
        out["prefill"] = _prefill(cfg, a.flash_prefill)
        print(f"flash: prefilled {out['prefill']}", flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", "-c", str(cfg)],
                            env={**os.environ, "RUNTIME_DIRECTORY": str(run_dir)}, stdout=subprocess.DEVNULL,
                            stderr=open(run_dir / "flash.log", "wb"))
    try:
        status = run_dir / "dev" / "status.json"
        deadline = time.monotonic() + 120
        while not status.exists() and time.monotonic() < deadline:  # written once it serves
            time.sleep(0.2)
        time.sleep(2.0)  # start-up writes (cache lookups, the first status) are not the idle rate
        out["idle"] = _period(proc.pid, a.flash_idle_s, ckdir, status)
        print(f"flash idle: {out['idle']}", flush=True)
        tx = _Streams(broker.host, port, 1, rows, label_hz=1.0)
        tx.start()
        out["loaded"] = _period(proc.pid, a.flash_load_s, ckdir, status)
        tx.stop()
        out["loaded"].update({"streams": 1, "rate_hz": 1000, "labels_per_s": 1.0})
        print(f"flash loaded: {out['loaded']}", flush=True)
        out["idle_after_load"] = _period(proc.pid, a.flash_idle_s, ckdir, status)
        print(f"flash idle after load: {out['idle_after_load']}", flush=True)
    finally:
        proc.terminate()
        out["exit_code"] = proc.wait(30)
        final = _checkpoints(ckdir)
        out["checkpoint_file_bytes"] = final[-1].stat().st_size if final else 0
    out.update(per_day(out))
    print(f"flash per day (MB): {out['per_day_mb']}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="edge bench device", description=__doc__.split("\n")[0].replace("`", ""))
    ap.add_argument("--model", default="vibration")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--idle-s", type=float, default=10.0)
    ap.add_argument("--load-s", type=float, default=15.0)
    ap.add_argument("--restarts", type=int, default=3)
    ap.add_argument("--down-s", type=float, default=2.0)
    ap.add_argument("--flash-idle-s", type=float, default=60.0, help="each idle window of the flash phase")
    ap.add_argument("--flash-load-s", type=float, default=60.0, help="the loaded window of the flash phase")
    ap.add_argument("--flash-prefill", type=int, default=4500, help="labels learned before the flash phase (fills the replay buffer)")
    ap.add_argument("--only-flash", action="store_true", help="run only the flash phase")
    ap.add_argument("--flash-toml", default="", help='config lines added for the flash phase, e.g. "[adapt]\\ncheckpoint_interval_s = 600"')
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
        if not a.only_flash:
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
        out["flash"] = flash(a, rows, broker, port, tmp)
    write_result(out, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
