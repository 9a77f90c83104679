"""`edge demo`: a broker, simulated machines, the daemon, a live view and a report.

With no broker given it starts one on a free loopback port (mosquitto when on the PATH,
else the embedded amqtt broker in a child process that it always stops). A few
simulated machines publish over MQTT, one more talks the firmware_bridge protocol over
a pseudo-terminal; an operator labels each window the daemon predicted.

The story, the same for a seed: machine-1's sensor is remounted (turned 60°, ``DRIFT``)
one second before the fault that mounting confuses (``CONFUSED``: the shipped head reads
a turned sensor's imbalance as misalignment) comes up; that fault came up once before the
drift and comes back every other segment after it. So the report can show the accuracy on
that fault before the drift, right after it, and after the head adapted, beside what the
shipped head scores on the same windows (a second node, ``<node>-shipped``, that never
learns). Every temporary folder and process it starts is removed at the end.
"""
from __future__ import annotations

import contextlib
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from edge.broker import BrokerProcess
from edge.config import parse_config
from edge.demo.devices import MqttDevices, Operator, SimDevice, story_schedule
from edge.demo.pacing import Lockstep, windows_in
from edge.demo.report import write_report
from edge.demo.view import LiveView, Scoreboard, story

log = logging.getLogger("edge.demo")

DRIFT = "mounting"
DRIFT_WORDS = "sensor remounted, turned 60°"
#: the fault the drift confuses: measured, the shipped head gets 5% of a turned sensor's
#: imbalance windows right (it reads them as misalignment), and >90% of the other faults
CONFUSED = "imbalance"
SEGMENT_S = 8.0


def _demo_config(host: str, port: int, protocol: str, state: Path, serial_port: str | None, *,
                 node: str = "demo", learn: bool = True) -> dict:
    sources = [{"type": "mqtt", "topic": "sensors/{device}/{stream}"}]
    if serial_port:
        sources.append({"type": "serial", "port": serial_port, "protocol": "binary", "device": "serial-0",
                        "stream": "accel"})
    cfg = {"node": {"name": node, "state_dir": str(state), "log_level": "warning"},  # each node: state/<node>
           "mqtt": {"host": host, "port": port, "protocol": protocol},
           "metrics": {"port": 0},
           # a whole core's training budget: on a loaded machine a skipped step would change the story
           "adapt": {"enabled": learn, "checkpoint_interval_s": 10.0, "budget_cpu_share": 1.0},
           "sources": sources}
    if learn:  # only the demo's operator, who holds this key, can teach the daemon
        cfg["labels"] = {"keys_dir": str(state / "labellers"), "max_per_s": 50.0}
    return cfg


def drift_plan(seconds: float, drift_at: float | None, segment_s: float = SEGMENT_S) -> tuple[int, float]:
    """``(segment, time)`` of the drift: one second before the segment in which the confused
    fault comes back, about a third of the run in (segment 3 of a 60 s run, at 23 s), or the
    first such moment not before ``drift_at``.

    >>> drift_plan(60, None), drift_plan(0, None), drift_plan(60, 40.0)
    ((3, 23.0), (3, 23.0), (6, 47.0))
    """
    if drift_at is not None:
        k = max(1, math.ceil((drift_at + 1.0) / segment_s))  # not before the time asked for
    else:
        k = max(1, math.ceil((seconds or 60.0) / 3 / segment_s))
    return k, k * segment_s - 1.0


def story_seed(seed: int) -> int:
    """The drifted machine's seed: the first from ``seed * 1000 + 101`` whose faults are clear
    (severity at least 0.4), so that the shipped head knows its imbalance before the drift
    (a machine with a faint imbalance is confused with "normal" even unturned).

    >>> story_seed(1)
    1102
    """
    from edge.sim import Machine

    s = seed * 1000 + 101
    while Machine(seed=s).severity < 0.4:
        s += 1
    return s


def _segments(dev: SimDevice, until: float) -> list[dict]:
    n = int(math.ceil(until / dev.segment_s))
    return [{"k": k, "t0": k * dev.segment_s, "t1": min(until, (k + 1) * dev.segment_s),
             "fault": dev.true_fault(dev.t0 + (k + 0.5) * dev.segment_s)} for k in range(n)]


def run_demo(*, seconds: float = 60.0, broker: str = "", out: Path = Path("demo-report"), live: bool = True,
             devices: int = 3, drift_at: float | None = None, serial: bool = True, seed: int = 1) -> int:
    from edge.daemon import Daemon
    from edge.ingest.labelauth import create_label_key
    from edge.observe import setup_logging

    # warnings only: the demo tells the daemon's events itself, in words (the daemon's own
    # INFO lines would print each twice, as field dumps)
    setup_logging("warning")
    parts: list = []
    with contextlib.ExitStack() as stack:
        state = Path(tempfile.mkdtemp(prefix="edge-demo-state-"))
        stack.callback(shutil.rmtree, state, ignore_errors=True)
        if broker:
            host, _, p = broker.rpartition(":")
            host, port, protocol = host or "127.0.0.1", int(p), "3.1.1"
        else:
            proc = stack.enter_context(BrokerProcess())  # leaving it stops it and removes its folder
            host, port, protocol = proc.host, proc.port, proc.protocol
            print(f"started {proc.kind} broker on {host}:{port}", flush=True)
        stack.callback(_stop_parts, parts)  # before the broker stops (the stack unwinds in reverse)
        k_drift, when = drift_plan(seconds, drift_at)
        serial_dev = None
        if serial:
            from edge.demo.serial_device import SerialDevice

            # its schedule starts when the daemon opens the port (SerialDevice re-anchors it)
            serial_dev = SerialDevice(SimDevice(name="serial-0", seed=seed * 1000 + 200, t0=time.time()))
            parts.append(serial_dev)
            serial_dev.start()
        operator_key = create_label_key(state / "labellers", "operator").read_bytes().strip()
        cfg = parse_config(_demo_config(host, port, protocol, state, serial_dev.path if serial_dev else None))
        shadow_cfg = parse_config(_demo_config(host, port, protocol, state, None, node="demo-shipped", learn=False))
        print("loading the model (compiling it on first use) ...", flush=True)
        daemon = Daemon(cfg)
        daemon.start(connect_timeout=10.0)
        parts.insert(0, daemon)
        shadow = Daemon(shadow_cfg)  # what the shipped head would score: a node that never learns
        shadow.start(connect_timeout=10.0)
        parts.insert(0, shadow)
        t0 = time.time()  # the simulated machines start now, with the daemon ready for them
        drift_i = min(1, devices - 1)
        sims = [SimDevice(name=f"machine-{i}", seed=story_seed(seed) if i == drift_i else seed * 1000 + 100 + i,
                          t0=t0, segment_s=SEGMENT_S,
                          schedule=story_schedule(CONFUSED, k_drift, seed) if i == drift_i else None)
                for i in range(devices)]
        drift_dev = sims[drift_i]
        drift_dev.drift(DRIFT, t0 + when)  # by the samples' time, not when the loop below looks at the clock
        all_devs = {d.name: d for d in sims}
        if serial_dev:
            all_devs[serial_dev.sim.name] = serial_dev.sim
        board = Scoreboard(all_devs, t0, host_clock={d.name for d in sims})
        pub = MqttDevices(sims, host=host, port=port, protocol=protocol, until_s=seconds)
        operator = Operator(pub.client, topic=f"{cfg.topic_base}/labels", devices=all_devs, key=operator_key,
                            name="operator", node=cfg.node.name)
        length = cfg.window.length or daemon.model.manifest.window
        hop = cfg.window.hop or length
        # the MQTT machines only: which samples make the serial device's windows depends on when
        # its port opened, so its labels would make the learner's sequence differ from run to run
        labelled = {f"{d.name}/accel" for d in sims}
        pace = Lockstep(sorted(labelled), send=operator.on_prediction, handled=_handled(daemon), length=length, hop=hop)
        pub.gate = pace.may_publish
        t0_mono = time.monotonic()
        listener = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="edge-demo-view",
                               protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311)

        def on_message(c, u, m):
            now = time.time()
            if m.topic.startswith(f"{shadow_cfg.topic_base}/predictions/"):
                board.on_prediction(m.payload, now, shipped=True)
            elif "/predictions/" in m.topic:
                p = board.on_prediction(m.payload, now)
                if (key := f"{p['device']}/{p['stream']}") in labelled:
                    pace.on_prediction(key, p)
            elif m.topic.endswith("/events"):
                board.on_event(m.payload, now)

        listener.on_message = on_message
        listener.on_connect = lambda c, *a: c.subscribe([(f"{cfg.topic_base}/predictions/#", 0), (f"{cfg.topic_base}/events", 0),
                                                         (f"{shadow_cfg.topic_base}/predictions/#", 0)])
        listener.connect(host, port)
        listener.loop_start()
        stack.callback(listener.loop_stop)
        stack.callback(listener.disconnect)
        pub.start()
        parts.append(pub)
        notes = [f"story: {drift_dev.name} gets '{DRIFT}' ({DRIFT_WORDS}) at {when:.0f} s, just before {CONFUSED} "
                 f"comes up; {CONFUSED} comes back every other {SEGMENT_S:.0f} s segment after it (seed {seed})",
                 "the operator labels every window of the MQTT machines that the node predicted (the serial device is scored, "
                 "not labelled); 'shipped': a second node that never learns",
                 f"backend: {daemon.engine.backend.key} {daemon.engine.backend.precision}; "
                 f"node topics: {cfg.topic_base}/predictions/#, {cfg.topic_base}/events"]
        view = LiveView(board, total=seconds, live=live, notes=notes)
        drifted = False
        mqtt_keys, n_windows = [f"{d.name}/accel" for d in sims], windows_in(pub.until or 0, length=length, hop=hop)
        try:
            while not seconds or not _ended(pub, board, mqtt_keys, n_windows, time.time() - t0, seconds):
                time.sleep(1.0)
                el = time.time() - t0
                if not drifted and el >= when:
                    drifted = True
                    if not view.live:
                        print(f"[{when:5.1f}s] drift injected: {drift_dev.name} {DRIFT_WORDS}; {CONFUSED} comes up in 1 s",
                              flush=True)
                view.tick(el)
        except KeyboardInterrupt:
            pass
        elapsed = time.time() - t0
        meta = {"seconds": round(elapsed, 1), "seed": seed, "broker": f"{host}:{port}", "drift": DRIFT,
                "drift_words": DRIFT_WORDS, "drift_device": f"{drift_dev.name}/accel",
                "drift_at": round(when, 1) if drifted else None, "segment_s": SEGMENT_S,
                "labels_sent": operator.sent, "samples_sent": pub.sent, "pacing": pace.summary(t0_mono),
                "status": daemon.status()}
        conditions = {f"{d.name}/accel": (f"{DRIFT_WORDS} at {when:.0f} s" if d is drift_dev and drifted else "nominal")
                      for d in all_devs.values()}
        with board.lock:
            scored = list(board.scored)
        st = story(scored, stream=f"{drift_dev.name}/accel", fault=CONFUSED, drift_at=meta["drift_at"], segment_s=SEGMENT_S)
    report = write_report(board, Path(out), meta=meta, story=st, segments=_segments(drift_dev, seconds or elapsed),
                          conditions=conditions)
    print(f"\nreport: {Path(out) / 'report.json'}, plot: {Path(out) / 'report.png'}")
    for r in report["streams"]:
        lat = "-" if r["latency_ms_p50"] is None else f"{r['latency_ms_p50']} ms"
        print(f"  {r['stream']:18} windows={r['windows']:5d} accuracy={r['accuracy_all']} (last 40: {r['accuracy_recent']}) "
              f"latency p50={lat}")
    print(story_line(st))
    return 0


def _handled(daemon):
    """How many labels the node's learner has handled (matched or rejected): the pacing's count."""
    def handled() -> int:
        m = daemon.adapt.metrics()
        return int(m["matcher_labels_matched_total"] + sum(m["matcher_labels_rejected"].values()))
    return handled


#: how long past its ``seconds`` a paced run waits for its last predictions
END_GRACE_S = 20.0


def _ended(pub: MqttDevices, board, keys: list[str], n_windows: int, elapsed: float, seconds: float) -> bool:
    """A run of ``seconds`` ends when its machines published that many seconds of samples and
    both nodes predicted all their windows (so every run scores the same windows), or, on a
    machine that cannot keep up, ``END_GRACE_S`` later."""
    if elapsed >= seconds + END_GRACE_S:
        return True
    return elapsed >= seconds and pub.finished() and board.has_all(keys, n_windows)


def story_line(st: dict) -> str:
    """The story in one line.

    >>> print(story_line({"stream": "m/a", "fault": "imbalance", "served": {"before_drift": 1.0, "after_drift": 0.1,
    ...     "after_adaptation": 0.9}, "shipped": {"before_drift": 1.0, "after_drift": 0.05, "after_adaptation": 0.05}}))
    m/a on imbalance: before the drift 100%, right after it 10%, after adapting 90% (the shipped head: 100%, 5%, 5%)
    """
    if "served" not in st:
        return f"{st['stream']}: no drift was injected"
    f = lambda d: ", ".join("-" if d[k] is None else f"{100 * d[k]:.0f}%" for k in ("before_drift", "after_drift", "after_adaptation"))  # noqa: E731
    a, b, c = f(st["served"]).split(", ")
    return (f"{st['stream']} on {st['fault']}: before the drift {a}, right after it {b}, after adapting {c} "
            f"(the shipped head: {f(st['shipped'])})")


def _stop_parts(parts: list) -> None:
    """Sources first, then the daemons (they checkpoint), then the serial firmware."""
    order = [p for p in parts if not hasattr(p, "fw")][::-1] + [p for p in parts if hasattr(p, "fw")]
    for p in order:
        try:
            p.stop()
        except Exception:  # one part that fails to stop must not leave the others running
            log.exception("stopping %s", p)
