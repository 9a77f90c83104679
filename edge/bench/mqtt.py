"""`edge bench mqtt`: CPU cost per received message, paho's client loop vs the raw FastSubscriber.

One run, one mosquitto on a free loopback port, the same messages for both readers:
``--messages`` single-sample JSON sensor messages (``{"t": ..., "v": [ax, ay, az]}`` on
20 streams ``mb/sNN/accel``, as ``edge bench pipeline`` sends them), published as fast
as possible by this process (a raw-socket publisher, so that the generator is not the
bottleneck) to a receiver in a child process. The receiver is the daemon's own code:

- ``paho``: ``edge.ingest.mqtt.MqttLink`` (paho's network thread calls ``on_message``
  per message, which hands ``(topic, payload, received)`` on);
- ``raw``: ``edge.ingest.fastmqtt.FastSubscriber`` (one ``on_batch`` per socket read).

Both hand what they get to the same kind of sink (a bounded deque append and a count).
Measured: the CPU time of the receiving thread alone (``pthread_getcpuclockid``, from
subscribed to the last message; the child's main thread only polls), the child's whole
CPU time, and the wall time from first to last message. The receiver runs pinned to
CPU 0; mosquitto and the publisher share CPU 1. Each reader runs ``--repeat`` times,
alternating which goes first; the median is reported. Cases: ``--qos 0,1`` (the
publisher publishes at that QoS and the subscription asks for it, so QoS 1 runs include
the PUBACKs each reader sends; mosquitto keeps its default 20 messages in flight).

This is a benchmark, not a test: figures go to BENCHMARKS.md with this command.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections import deque

STREAMS = 20


def _pin(cpu: int):
    def f():
        if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > cpu:
            os.sched_setaffinity(0, {cpu})
    return f


# ---- the receiver (child process) ------------------------------------------------------
def _receive(kind: str, host: str, port: int, n: int, qos: int, protocol: str, idle_s: float) -> dict:
    from edge.config import MqttConfig

    cfg = MqttConfig(host=host, port=port, protocol=protocol, session_expiry_s=0, keepalive_s=60)
    sink: deque = deque(maxlen=4096)
    count = [0]
    first = [0.0]
    last = [0.0]
    subscribed = threading.Event()
    subs = [("mb/#", qos)]
    if kind == "paho":
        from edge.ingest.mqtt import MqttLink

        def on_message(topic: str, payload: bytes, received: float) -> None:
            sink.append((topic, payload, received))
            count[0] += 1
            last[0] = received
            if not first[0]:
                first[0] = received

        link = MqttLink(cfg, client_id=f"bench-rx-paho-{os.getpid()}", status_topic="mbench/status",
                        subscriptions=subs, on_message=on_message)
        link.client.on_subscribe = lambda *a: subscribed.set()
        link.start()
        if not subscribed.wait(60):
            raise RuntimeError("paho receiver did not get its SUBACK")
        thread, stop, extra = link.client._thread, link.stop, {}
    else:
        from edge.ingest.fastmqtt import FastSubscriber

        def on_batch(msgs: list, received: float) -> None:
            sink.append((msgs, received))
            count[0] += len(msgs)
            last[0] = received
            if not first[0]:
                first[0] = received

        sub = FastSubscriber(cfg, client_id=f"bench-rx-raw-{os.getpid()}", subscriptions=subs, on_batch=on_batch)
        sub.start()
        if not sub.wait_connected(60):
            raise RuntimeError("raw receiver did not get its SUBACK")
        subscribed.set()
        thread, stop, extra = sub.thread, sub.stop, sub.counters
    clock = time.pthread_getcpuclockid(thread.ident)
    cpu0 = time.clock_gettime(clock)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    print("ready", flush=True)
    seen, since = -1, time.monotonic()
    while count[0] < n:
        time.sleep(0.05)
        if count[0] != seen:
            seen, since = count[0], time.monotonic()
        elif time.monotonic() - since > (idle_s if seen > 0 else 120.0):
            break
    cpu = time.clock_gettime(clock) - cpu0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    stop()
    got = count[0]
    proc_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    out = {"reader": kind, "qos": qos, "received": got, "expected": n, "thread_cpu_s": round(cpu, 4),
           "process_cpu_s": round(proc_cpu, 4), "wall_s": round(last[0] - first[0], 4),
           "cpu_us_per_message": round(cpu / max(got, 1) * 1e6, 3),
           "messages_per_cpu_s": round(got / max(cpu, 1e-9), 1)}
    if extra:
        out["reads"] = extra.get("reads", 0)
        out["messages_per_read"] = round(got / max(1, extra.get("reads", 0)), 1)
    return out


# ---- the publisher (this process) ------------------------------------------------------
def _frames(n: int, qos: int) -> list[bytes]:
    """``n`` PUBLISH packets over STREAMS streams, pre-framed, in chunks of 2,000."""
    import numpy as np
    import orjson

    from edge.ingest.mqttwire import encode_publish

    rows = np.round(np.random.default_rng(7).normal(size=(4096, 3)), 4).tolist()
    topics = [b"mb/s%02d/accel" % s for s in range(STREAMS)]
    t0 = time.time()
    pkts = [encode_publish(topics[i % STREAMS], orjson.dumps({"t": t0 + i / 20_000.0, "v": rows[i % 4096]}),
                           qos=qos, packet_id=(i % 65535) + 1) for i in range(n)]
    return [b"".join(pkts[k:k + 2000]) for k in range(0, n, 2000)]


def _drain(sock) -> None:
    """Read (and ignore) what the broker sends the publisher: its PUBACKs at QoS 1."""
    try:
        while sock.recv(1 << 16):
            pass
    except OSError:
        pass


def _one(broker, kind: str, qos: int, blobs: list[bytes], n: int, protocol: str, idle_s: float) -> dict:
    from edge.bench.rawmqtt import RawPublisher

    proc = subprocess.Popen([sys.executable, "-m", "edge.bench.mqtt", "--receiver", kind, broker.host,
                             str(broker.port), str(n), str(qos), protocol, str(idle_s)],
                            preexec_fn=_pin(0), stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"{kind} receiver did not start: {line!r}")
        pub = RawPublisher(broker.host, broker.port, client_id=f"bench-pub-{kind}-{qos}")
        threading.Thread(target=_drain, args=(pub.sock,), daemon=True).start()
        t0 = time.perf_counter()
        for b in blobs:
            pub.send(b)
        send_s = time.perf_counter() - t0
        out, _ = proc.communicate(timeout=600)
        pub.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    r = json.loads(out.strip().splitlines()[-1])
    r["publisher_send_s"] = round(send_s, 3)
    return r


def _median(runs: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 3)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--receiver":
        kind, host, port, n, qos, protocol, idle_s = argv[1:8]
        print(json.dumps(_receive(kind, host, int(port), int(n), int(qos), protocol, float(idle_s))), flush=True)
        return 0
    ap = argparse.ArgumentParser(prog="edge bench mqtt", description=__doc__.split("\n")[0].replace("`", ""))
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--qos", default="0,1", help="comma-separated QoS levels to run (0, 1)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per reader and QoS (median reported)")
    ap.add_argument("--protocol", default="5", choices=["5", "3.1.1"], help="the receivers' MQTT version")
    ap.add_argument("--idle-s", type=float, default=5.0, help="a receiver ends after this long without a message")
    ap.add_argument("--out", default="bench/out/mqtt.json")
    a = ap.parse_args(argv)
    from edge.bench.machine import cpu_info, write_result
    from edge.broker import BrokerProcess

    _pin(1)()
    machine = cpu_info()
    print(f"CPU: {machine['model']} ({machine['cores']} cores; features: {', '.join(machine['features']) or 'none'})",
          flush=True)
    results: dict = {"command": "edge bench mqtt " + " ".join(argv), "config": vars(a), "machine": machine,
                     "python": sys.version.split()[0], "cases": {}}
    import paho.mqtt

    results["paho"] = paho.mqtt.__version__
    T0 = time.perf_counter()
    with BrokerProcess(kind="mosquitto", extra_conf="set_tcp_nodelay true\nmax_queued_messages 0\n") as broker:
        for qos in (int(q) for q in a.qos.split(",")):
            blobs = _frames(a.messages, qos)
            runs: dict[str, list[dict]] = {"paho": [], "raw": []}
            for rep in range(a.repeat):
                for kind in (("paho", "raw") if rep % 2 == 0 else ("raw", "paho")):
                    r = _one(broker, kind, qos, blobs, a.messages, a.protocol, a.idle_s)
                    runs[kind].append(r)
                    print(f"[qos {qos}] {kind}: {r['received']}/{r['expected']} messages, receiving thread "
                          f"{r['thread_cpu_s']:.3f} CPU-s ({r['cpu_us_per_message']:.2f} us/message), "
                          f"wall {r['wall_s']:.2f} s", flush=True)
            summary = {k: {"cpu_us_per_message": _median(v, "cpu_us_per_message"),
                           "messages_per_cpu_s": _median(v, "messages_per_cpu_s"),
                           "process_cpu_s": _median(v, "process_cpu_s"), "wall_s": _median(v, "wall_s"),
                           "received_min": min(r["received"] for r in v)} for k, v in runs.items()}
            summary["ratio_raw_over_paho_messages_per_cpu_s"] = round(
                summary["raw"]["messages_per_cpu_s"] / max(summary["paho"]["messages_per_cpu_s"], 1e-9), 2)
            results["cases"][f"qos{qos}"] = {"runs": runs, "median": summary}
            print(f"[qos {qos}] raw / paho, messages per CPU-second of the receiving thread: "
                  f"{summary['ratio_raw_over_paho_messages_per_cpu_s']}x", flush=True)
    results["bench_wall_s"] = round(time.perf_counter() - T0, 1)
    write_result(results, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
