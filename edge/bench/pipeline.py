"""`edge bench pipeline`: MQTT in -> windows -> model -> predictions out, against a naive baseline.

One run, one broker (mosquitto on a free loopback port), the same messages for both:

1. **paced**: single-sample JSON messages at ``--rate`` msg/s over ``--streams`` streams
   (each stream a 1 kHz sensor in real time) for ``--seconds``; measured: messages and
   windows per second sustained, lost windows, the daemon's drop counter, latency from
   the last sample's publish to the prediction's arrival (p50/p99), CPU used.
2. **saturated**: ``--burst`` messages sent as fast as the load generator can; measured:
   messages per second the system under test gets through (time until its last
   prediction arrives), and messages per CPU-second it spent doing so (its capacity on
   one core, which the broker and the generator sharing the other core cannot cap).
3. **flood** (the daemon only): large batch messages (``--flood-samples`` samples each)
   on their own streams at ``--flood-factor`` times the daemon's measured capacity for
   ``--flood-seconds``, while probe streams keep sending single samples at a low rate;
   measured: peak RSS over the RSS before the flood, drops by lane, and the seconds from
   the end of the flood until the probes' p99 latency (per 0.5 s bin) is back under 20 ms.

``--before-ref REV`` also runs the daemon of an earlier commit (exported with ``git
archive`` into a temporary folder) through the paced and saturated runs, in the same
run, so that a redesign is compared with what it replaced on the same machine.

The system under test runs in a child process pinned to CPU 0; the broker, the load
generator and the receiver share CPU 1. The baseline (``edge.bench.naive``) is a paho
callback that builds each window and calls the eager model per window.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import orjson
import paho.mqtt.client as mqtt

from edge.bench.machine import cpu_info
from edge.bench.rawmqtt import RawPublisher, publish_packet
from edge.broker import BrokerProcess, free_port

WINDOW = 256


def _pin(cpu: int):
    def f():
        if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > cpu:
            os.sched_setaffinity(0, {cpu})
    return f


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


class Receiver:
    """Counts predictions and their latency (arrival minus the window's last sample time)."""

    def __init__(self, host: str, port: int, topic: str):
        self.lat: list[float] = []
        self.samples: list[tuple[float, float, str]] = []  # (arrival, latency, topic), for the flood case
        self.n = 0
        self.last = 0.0
        self.lock = threading.Lock()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-rx-{os.getpid()}-{abs(hash(topic)) % 10**8}", protocol=mqtt.MQTTv311)
        self.subscribed = threading.Event()
        self.c.on_connect = lambda c, *a: c.subscribe(topic)
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        self.c.on_message = self._on
        self.c.connect(host, port)
        self.c.loop_start()
        self.subscribed.wait(30)  # a burst sent before the SUBACK would lose its first predictions

    def _on(self, c, u, m):
        now = time.time()
        t = orjson.loads(m.payload)["t"]
        with self.lock:
            self.n += 1
            self.last = now
            self.lat.append(now - t)
            self.samples.append((now, now - t, m.topic))

    def reset(self):
        with self.lock:
            self.lat, self.n, self.samples = [], 0, []

    def wait_count(self, n: int, timeout: float) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.n >= n:
                return True
            time.sleep(0.01)
        return False

    def close(self):
        self.c.loop_stop()
        self.c.disconnect()


def _samples(streams: int, n: int) -> np.ndarray:
    from edge.sim import Machine

    v = Machine(seed=7, fault="imbalance").read(n)[1]
    return np.round(v.astype(np.float64), 4)


def run_paced(pub: RawPublisher, rx: Receiver, pid: int, *, streams: int, rate: float, seconds: float, rows, prefix: bytes) -> dict:
    per_stream = rate / streams  # Hz
    topics = [prefix + b"/s%02d/accel" % s for s in range(streams)]
    sent = [0] * streams
    rx.reset()
    t0 = time.time()
    cpu0 = _cpu_seconds(pid)
    total = 0
    while True:
        now = time.time()
        el = now - t0
        if el >= seconds:
            break
        chunk = []
        for s in range(streams):
            due = int(el * per_stream) - sent[s]
            for _ in range(due):
                i = sent[s]
                t = t0 + i / per_stream
                chunk.append(publish_packet(topics[s], orjson.dumps({"t": t, "v": rows[(i * 31 + s) % len(rows)].tolist()})))
                sent[s] += 1
        if chunk:
            pub.send(b"".join(chunk))
            total += len(chunk)
        time.sleep(0.002)
    wall = time.time() - t0
    expected = sum(n // WINDOW for n in sent)
    rx.wait_count(expected, 10.0)
    time.sleep(0.3)
    cpu = _cpu_seconds(pid) - cpu0
    lat = np.array(rx.lat) * 1000 if rx.lat else np.array([float("nan")])
    return {"messages_sent": total, "rate_target": rate, "messages_per_s": round(total / wall, 1),
            "windows_expected": expected, "windows_received": rx.n, "windows_lost": expected - rx.n,
            "windows_per_s": round(rx.n / wall, 1), "latency_ms_p50": round(float(np.percentile(lat, 50)), 2),
            "latency_ms_p99": round(float(np.percentile(lat, 99)), 2), "latency_ms_max": round(float(lat.max()), 2),
            "cpu_core_share": round(cpu / (wall + 0.3), 3)}


_BURST_END: dict[bytes, float] = {}  # the stream time each prefix's last burst reached


def run_burst(pub: RawPublisher, rx: Receiver, pid: int, *, streams: int, count: int, rows, prefix: bytes, timeout: float) -> dict:
    topics = [prefix + b"/s%02d/accel" % s for s in range(streams)]
    per = count // streams
    # later than anything paced and than the previous burst on these streams, so windows never see time go back
    base = max(time.time() + 100.0, _BURST_END.get(prefix, 0.0) + 1.0)
    _BURST_END[prefix] = base + per / 1000.0
    pkts = []
    for i in range(per):
        for s in range(streams):
            pkts.append(publish_packet(topics[s], orjson.dumps({"t": base + i / 1000.0, "v": rows[(i * 31 + s) % len(rows)].tolist()})))
    blob = [b"".join(pkts[k:k + 2000]) for k in range(0, len(pkts), 2000)]
    rx.reset()
    expected = streams * (per // WINDOW)
    cpu0 = _cpu_seconds(pid)
    t0 = time.time()
    for b in blob:
        pub.send(b)
    sent_s = time.time() - t0
    done = rx.wait_count(expected, timeout)
    el = (rx.last if rx.n else time.time()) - t0
    cpu = _cpu_seconds(pid) - cpu0
    n = per * streams * min(1.0, rx.n / max(1, expected))
    return {"messages": per * streams, "send_s": round(sent_s, 3), "windows_expected": expected,
            "windows_received": rx.n, "complete": done, "elapsed_s": round(el, 3),
            "messages_per_s": round(n / max(el, 1e-9), 1), "cpu_s": round(cpu, 3),
            "messages_per_cpu_s": round(n / max(cpu, 1e-9), 1)}


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _start_edge(host: str, port: int, model: str, tmp: Path, cache: str, *, src: str = "",
                extra: str = "", node: str = "bench", prefix: str = "bench") -> tuple[subprocess.Popen, int]:
    mport = free_port()
    cfg = tmp / f"{node}.toml"
    cfg.write_text(f"""[node]\nname = "{node}"\nstate_dir = "{tmp / 'state'}"\nlog_level = "warning"\n
[mqtt]\nhost = "{host}"\nport = {port}\nprotocol = "3.1.1"\n[model]\npath = "{model}"\n{f'cache_dir = "{cache}"' if cache else ''}
[adapt]\nenabled = false\n[metrics]\nport = {mport}\n{extra}\n[[sources]]\ntopic = "{prefix}/{{device}}/{{stream}}"\n""")
    env = dict(os.environ)
    if src:  # an earlier commit's tree: its edge package first on the path, and its folder as cwd
        env["PYTHONPATH"] = src
    p = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", "--config", str(cfg)], preexec_fn=_pin(0),
                         stdout=subprocess.DEVNULL, stderr=open(tmp / f"{node}.log", "wb"), env=env, cwd=src or None)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/healthz", timeout=1) as r:
                if json.loads(r.read()).get("broker_connected"):
                    return p, mport
        except OSError:
            pass
        if p.poll() is not None:
            raise RuntimeError(f"edge run exited: {(tmp / f'{node}.log').read_text()[-2000:]}")
        time.sleep(0.2)
    raise RuntimeError("edge run did not become ready")


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return float("nan")


def _buckets(port: int, name: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        return {line.split('le="')[1].split('"')[0]: float(line.split()[-1])
                for line in r.read().decode().splitlines() if line.startswith(name + "{")}


def _lane_metrics(port: int) -> dict[str, dict[str, float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        return lane_figures(r.read().decode())


def lane_figures(text: str) -> dict[str, dict[str, float]]:
    """Each lane's figures from a ``/metrics`` text, keyed ``<quantity>_<outcome>`` (one family
    per quantity, e.g. ``edge_lane_items_total{thread,lane,outcome}``).

    >>> lane_figures('edge_lane_items_total{thread="pipeline",lane="sensor",outcome="dropped"} 3.0\\n'
    ...              'edge_lane_depth{thread="pipeline",lane="sensor"} 1.0')
    {'sensor': {'items_dropped': 3.0, 'depth': 1.0}}
    """
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if line.startswith("edge_lane_") and 'lane="' in line:
            name = line.split("{")[0][len("edge_lane_"):].removesuffix("_total")
            lane = line.split('lane="')[1].split('"')[0]
            if 'outcome="' in line:
                outcome = line.split('outcome="')[1].split('"')[0]
                name = f"{name}_{outcome}"
            out.setdefault(lane, {})[name] = float(line.split()[-1])
    return out


def run_flood(pub: RawPublisher, rx: Receiver, pid: int, mport: int, *, capacity_msgs_per_s: float, factor: float,
              seconds: float, samples: int, rows, probe_streams: int = 2, probe_rate: float = 1000.0,
              settle_s: float = 15.0) -> dict:
    """Large batch messages at ``factor`` x capacity; probes measure latency before, during and after."""
    flood_topics = [b"bench/flood%02d/accel" % s for s in range(8)]
    probe_topics = [b"bench/probe%02d/accel" % s for s in range(probe_streams)]
    body = b",".join(orjson.dumps(rows[i % len(rows)].tolist()) for i in range(samples))
    msg_rate = capacity_msgs_per_s * factor  # flood messages per second
    payload_bytes = len(body) + 40
    rx.reset()
    rss0 = _rss_mb(pid)
    peak = rss0
    t_start = time.time()
    flood_end = t_start + seconds
    stop_at = flood_end + settle_s
    sent_flood = sent_probe = 0
    flood_t0 = [time.time() - 3600.0] * len(flood_topics)  # their own clock: never collides with the probes
    last_rss = 0.0
    while True:
        now = time.time()
        if now >= stop_at:
            break
        chunk = []
        if now < flood_end:
            due = int((now - t_start) * msg_rate) - sent_flood
            for _ in range(min(due, 200)):
                k = sent_flood % len(flood_topics)
                chunk.append(publish_packet(flood_topics[k], b'{"t0": %r, "dt": 0.001, "v": [%s]}' % (flood_t0[k], body)))
                flood_t0[k] += samples * 0.001
                sent_flood += 1
        due = int((now - t_start) * probe_rate) - sent_probe
        for _ in range(due):
            t = t_start + sent_probe / probe_rate
            for k, topic in enumerate(probe_topics):
                chunk.append(publish_packet(topic, orjson.dumps({"t": t, "v": rows[(sent_probe + k) % len(rows)].tolist()})))
            sent_probe += 1
        if chunk:
            pub.send(b"".join(chunk))
        if now - last_rss >= 0.1:
            last_rss = now
            peak = max(peak, _rss_mb(pid))
        time.sleep(0.001)
    time.sleep(0.5)
    # probe latency per 0.5 s bin of arrival time, relative to the end of the flood
    probe = [(arr - flood_end, lat) for arr, lat, topic in rx.samples if "/probe" in topic]
    bins: dict[int, list[float]] = {}
    for rel, lat in probe:
        bins.setdefault(int(np.floor(rel / 0.5)), []).append(lat)
    p99 = {k * 0.5: float(np.percentile(v, 99)) * 1e3 for k, v in sorted(bins.items())}
    after = [k for k in p99 if k >= 0]
    first = next((k for k in after if p99[k] < 20.0), None)
    recovered = None if first is None else first + 0.5  # the end of the first bin after the flood under 20 ms
    stays = next((k + 0.5 for i, k in enumerate(after) if all(p99[j] < 20.0 for j in after[i:])), None)
    before = [v for k, v in p99.items() if k < -seconds]
    return {"flood_messages": sent_flood, "flood_msgs_per_s": round(msg_rate, 1), "flood_payload_bytes": payload_bytes,
            "flood_mb_per_s": round(msg_rate * payload_bytes / 1e6, 1), "flood_seconds": seconds,
            "probe_windows": len(probe), "rss_before_mb": round(rss0, 1), "rss_peak_mb": round(peak, 1),
            "rss_peak_over_before_mb": round(peak - rss0, 1), "lanes": _lane_metrics(mport),
            "p99_ms_by_half_second_from_flood_end": {f"{k:+.1f}": round(v, 2) for k, v in p99.items()},
            "p99_ms_during_flood_max": round(max([v for k, v in p99.items() if -seconds <= k < 0] or [float("nan")]), 2),
            "p99_ms_before_flood": round(max(before), 2) if before else None,
            "seconds_until_p99_under_20ms": recovered, "seconds_until_p99_stays_under_20ms": stays,
            "bins_after_recovery_over_20ms": sum(1 for k in after if first is not None and k > first and p99[k] >= 20.0),
            "bins_after_flood": len(after)}


def _flood_capacity(pub: RawPublisher, rx: Receiver, pid: int, *, samples: int, rows, count: int = 400) -> float:
    """Batch messages per CPU-second the daemon gets through (a burst on streams of their own)."""
    topics = [b"bench/cap%02d/accel" % s for s in range(8)]
    body = b",".join(orjson.dumps(rows[i % len(rows)].tolist()) for i in range(samples))
    t0 = [time.time() - 7200.0] * len(topics)
    pkts = []
    for i in range(count):
        k = i % len(topics)
        pkts.append(publish_packet(topics[k], b'{"t0": %r, "dt": 0.001, "v": [%s]}' % (t0[k], body)))
        t0[k] += samples * 0.001
    expected = len(topics) * ((count // len(topics)) * samples // WINDOW)
    rx.reset()
    cpu0 = _cpu_seconds(pid)
    for k in range(0, len(pkts), 20):
        pub.send(b"".join(pkts[k:k + 20]))
    rx.wait_count(int(expected * 0.99), 120)
    cpu = _cpu_seconds(pid) - cpu0
    return count * min(1.0, rx.n / max(1, expected)) / max(cpu, 1e-9)


def compare_interleaved(host: str, port: int, a, tmp: Path, before_src: str, rows) -> dict:
    """Both daemons at once (each on its own topics, both pinned to CPU 0, the idle one costs
    nothing), bursts sent to one then the other, ``--compare-rounds`` times: the ratio of
    their median messages per CPU-second is what a shared, noisy machine cannot fake."""
    procs = {}
    try:
        prefixes = {"edge": "cmpnew", "edge_before": "cmpold"}  # each daemon its own topics
        for name, src in (("edge", ""), ("edge_before", before_src)):
            procs[name] = _start_edge(host, port, a.model, tmp, a.cache_dir, src=src, node=f"cmp-{name.replace('_', '-')}",
                                      prefix=prefixes[name])
        rounds: dict[str, list[float]] = {n: [] for n in procs}
        incomplete: dict[str, int] = {n: 0 for n in procs}
        rxs = {name: Receiver(host, port, f"edge/cmp-{name.replace('_', '-')}/predictions/#") for name in procs}
        pub = RawPublisher(host, port, client_id="bench-cmp-pub")
        for r in range(a.compare_rounds):
            for name, (proc, _) in procs.items():
                time.sleep(0.5)
                b = run_burst(pub, rxs[name], proc.pid, streams=a.streams, count=a.burst, rows=rows,
                              prefix=prefixes[name].encode(), timeout=60)
                if b["complete"]:  # a burst whose predictions did not all come back says nothing of its cost
                    rounds[name].append(b["messages_per_cpu_s"])
                else:
                    incomplete[name] += 1
            print(f"[compare] round {r + 1}: " + ", ".join(f"{n} {v[-1] if v else float('nan'):.0f}"
                                                          for n, v in rounds.items()), flush=True)
        pub.close()
        for rx in rxs.values():
            rx.close()
    finally:
        for name, (proc, _) in procs.items():
            proc.terminate()
            proc.wait(10)
            log_file = tmp / f"cmp-{name.replace('_', '-')}.log"
            if log_file.exists():
                Path(a.out).with_suffix(f".compare-{name}.log").write_bytes(log_file.read_bytes()[-200_000:])
    med = {n: float(np.median(v)) if v else float("nan") for n, v in rounds.items()}
    return {"rounds_messages_per_cpu_s": rounds, "incomplete_rounds": incomplete, "median_messages_per_cpu_s": med,
            "ratio_median": round(med["edge"] / max(1e-9, med["edge_before"]), 3),
            "ratio_per_round": [round(x / max(1e-9, y), 3) for x, y in zip(rounds["edge"], rounds["edge_before"])]}


def _export(ref: str, dest: Path) -> str:
    """``git archive`` of ``ref`` into ``dest`` (the daemon that ran before a change)."""
    dest.mkdir(parents=True, exist_ok=True)
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True).stdout.strip()
    arch = subprocess.run(["git", "-C", root, "archive", ref], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=arch, check=True)
    return subprocess.run(["git", "-C", root, "rev-parse", "--short", ref], capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="edge bench pipeline", description=__doc__.split("\n")[0].replace("`", ""))
    ap.add_argument("--rate", type=float, default=20000.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--streams", type=int, default=20)
    ap.add_argument("--burst", type=int, default=200_000)
    ap.add_argument("--model", default="vibration")
    ap.add_argument("--cache-dir", default="")
    ap.add_argument("--out", default="bench/out/pipeline.json")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--before-ref", default="", help="also run the daemon of this git commit (same run, same broker)")
    ap.add_argument("--flood-seconds", type=float, default=20.0, help="0 skips the flood case")
    ap.add_argument("--flood-factor", type=float, default=2.0)
    ap.add_argument("--flood-samples", type=int, default=1000, help="samples per flood message (~23 KB of JSON at 1000)")
    ap.add_argument("--ingest-bytes", type=int, default=64 << 20, help="[queues] ingest_bytes of the daemon in the flood")
    ap.add_argument("--compare-rounds", type=int, default=5, help="interleaved bursts per daemon with --before-ref")
    a = ap.parse_args(argv)
    _pin(1)()
    rows = _samples(a.streams, 20_000)
    results: dict = {"command": "edge bench pipeline " + " ".join(argv if argv is not None else sys.argv[1:]),
                     "config": vars(a), "cpu": cpu_info(), "cpu_count": os.cpu_count(), "python": sys.version.split()[0]}
    # Nagle on the broker's sockets meets delayed ACKs: 40 ms stalls on small packets
    with BrokerProcess(kind="mosquitto", extra_conf="set_tcp_nodelay true") as broker, tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        before_src = ""
        if a.before_ref:
            results["before_commit"] = _export(a.before_ref, tmp / "before")
            before_src = str(tmp / "before")
        systems = ["edge"] + (["edge_before"] if before_src else []) + ([] if a.skip_baseline else ["naive"])
        if before_src and a.compare_rounds:
            print(f"[compare] {a.compare_rounds} interleaved bursts per daemon ...", flush=True)
            results["compare_interleaved"] = compare_interleaved(broker.host, broker.port, a, tmp, before_src, rows)
        for name in systems:
            if name in ("edge", "edge_before"):
                extra = f"[queues]\ningest_bytes = {a.ingest_bytes}\n" if name == "edge" else ""
                proc, mport = _start_edge(broker.host, broker.port, a.model, tmp, a.cache_dir,
                                          src=before_src if name == "edge_before" else "", extra=extra)
                rx = Receiver(broker.host, broker.port, "edge/bench/predictions/#")
            else:
                proc = subprocess.Popen([sys.executable, "-m", "edge.bench.naive", broker.host, str(broker.port), a.model],
                                        preexec_fn=_pin(0), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                proc.stdout.readline()
                rx = Receiver(broker.host, broker.port, "naive/predictions/#")
            time.sleep(0.5)
            pub = RawPublisher(broker.host, broker.port, client_id=f"bench-pub-{name}")
            try:
                print(f"[{name}] paced {a.rate:.0f} msg/s for {a.seconds:.0f} s ...", flush=True)
                paced = run_paced(pub, rx, proc.pid, streams=a.streams, rate=a.rate, seconds=a.seconds, rows=rows,
                                  prefix=b"bench")
                if name != "naive":  # receive-to-publish inside the daemon, for comparison with end to end
                    paced["daemon_latency_buckets"] = _buckets(mport, "edge_pipeline_latency_seconds_bucket")
                print(f"[{name}] burst of {a.burst} messages ...", flush=True)
                burst = run_burst(pub, rx, proc.pid, streams=a.streams, count=a.burst, rows=rows, prefix=b"bench", timeout=120)
                r = {"paced": paced, "burst": burst}
                if name != "naive":
                    r["daemon_latency_buckets"] = paced.pop("daemon_latency_buckets", None)
                if name == "edge":
                    r["lanes_after_burst"] = _lane_metrics(mport)
                if name == "edge" and a.flood_seconds > 0:
                    cap = _flood_capacity(pub, rx, proc.pid, samples=a.flood_samples, rows=rows)
                    print(f"[{name}] flood at {a.flood_factor}x {cap:.0f} batch msg/s for {a.flood_seconds:.0f} s ...", flush=True)
                    r["flood_capacity_msgs_per_s"] = round(cap, 1)
                    r["flood"] = run_flood(pub, rx, proc.pid, mport, capacity_msgs_per_s=cap, factor=a.flood_factor,
                                           seconds=a.flood_seconds, samples=a.flood_samples, rows=rows)
                results[name] = r
                print(json.dumps(r, indent=1), flush=True)
            finally:
                pub.close()
                rx.close()
                proc.terminate()
                proc.wait(10)
                if name != "naive" and (tmp / "bench.log").exists():
                    log_out = Path(a.out).with_suffix(f".{name}.log")
                    log_out.parent.mkdir(parents=True, exist_ok=True)
                    log_out.write_bytes((tmp / "bench.log").read_bytes()[-200_000:])
    if "edge_before" in results:
        results["ratio_per_cpu_s_vs_before"] = round(results["edge"]["burst"]["messages_per_cpu_s"] /
                                                     max(1e-9, results["edge_before"]["burst"]["messages_per_cpu_s"]), 3)
    if "naive" in results:
        results["ratio_burst_throughput"] = round(results["edge"]["burst"]["messages_per_s"] /
                                                  max(1e-9, results["naive"]["burst"]["messages_per_s"]), 2)
        results["ratio_burst_per_cpu_s"] = round(results["edge"]["burst"]["messages_per_cpu_s"] /
                                                 max(1e-9, results["naive"]["burst"]["messages_per_cpu_s"]), 2)
        results["ratio_paced_cpu"] = round(results["naive"]["paced"]["cpu_core_share"] /
                                           max(1e-9, results["edge"]["paced"]["cpu_core_share"]), 2)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2))
    print(f"edge / naive: burst throughput {results.get('ratio_burst_throughput')}x, messages per CPU-second "
          f"{results.get('ratio_burst_per_cpu_s')}x, paced CPU {results.get('ratio_paced_cpu')}x; written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
