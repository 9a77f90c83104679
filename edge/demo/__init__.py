"""`edge demo`: a broker, simulated machines, the daemon, a live view and a report.

With no broker given it starts one on a free loopback port (mosquitto when on the PATH,
else the embedded amqtt broker in a child process that it always stops). A few
simulated machines publish over MQTT, one more talks the firmware_bridge protocol over
a pseudo-terminal; an operator publishes labels; a third of the way in, one machine's
sensor is remounted (a drift) and the adapter head has to win its accuracy back.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from edge.broker import BrokerProcess
from edge.config import parse_config
from edge.demo.devices import MqttDevices, Operator, SimDevice
from edge.demo.view import LiveView, Scoreboard, write_report

log = logging.getLogger("edge.demo")

DRIFT = "mounting"


def _demo_config(host: str, port: int, protocol: str, state: Path, serial_port: str | None) -> dict:
    sources = [{"type": "mqtt", "topic": "sensors/{device}/{stream}"}]
    if serial_port:
        sources.append({"type": "serial", "port": serial_port, "protocol": "binary", "device": "serial-0",
                        "stream": "accel"})
    return {"node": {"name": "demo", "state_dir": str(state), "log_level": "warning"},
            "mqtt": {"host": host, "port": port, "protocol": protocol},
            "adapt": {"enabled": True, "checkpoint_interval_s": 10.0},
            # only the demo's operator, who holds this key, can teach the daemon
            "labels": {"keys_dir": str(state / "labellers"), "max_per_s": 50.0},
            "sources": sources}


def run_demo(*, seconds: float = 0, broker: str = "", out: Path = Path("demo-report"), live: bool = True,
             devices: int = 3, drift_at: float | None = None, serial: bool = True) -> int:
    from edge.daemon import Daemon
    from edge.observe import setup_logging

    setup_logging("warning" if live else "info")
    state = Path(tempfile.mkdtemp(prefix="edge-demo-state-"))
    proc = None
    parts: list = []
    try:
        if broker:
            host, _, p = broker.rpartition(":")
            host, port, protocol = host or "127.0.0.1", int(p), "3.1.1"
        else:
            proc = BrokerProcess().start()
            host, port, protocol = proc.host, proc.port, proc.protocol
            print(f"started {proc.kind} broker on {host}:{port}", flush=True)
        serial_dev = None
        if serial:
            from edge.demo.serial_device import SerialDevice

            # its schedule starts when the daemon opens the port (SerialDevice re-anchors it)
            serial_dev = SerialDevice(SimDevice(name="serial-0", seed=200, t0=time.time()))
            parts.append(serial_dev)
            serial_dev.start()
        from edge.ingest.labelauth import create_label_key

        operator_key = create_label_key(state / "labellers", "operator").read_bytes().strip()
        cfg = parse_config(_demo_config(host, port, protocol, state, serial_dev.path if serial_dev else None))
        daemon = Daemon(cfg)
        print("loading the model (compiling it on first use) ...", flush=True)
        daemon.start(connect_timeout=10.0)
        parts.insert(0, daemon)
        t0 = time.time()  # the simulated machines start now, with the daemon ready for them
        sims = [SimDevice(name=f"machine-{i}", seed=100 + i, t0=t0) for i in range(devices)]
        all_devs = {d.name: d for d in sims}
        if serial_dev:
            all_devs[serial_dev.sim.name] = serial_dev.sim
        board = Scoreboard(all_devs, t0)
        listener = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="edge-demo-view",
                               protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311)

        def on_message(c, u, m):
            now = time.time()
            if "/predictions/" in m.topic:
                board.on_prediction(m.payload, now)
            elif m.topic.endswith("/events"):
                board.on_event(m.payload, now)

        listener.on_message = on_message
        listener.on_connect = lambda c, *a: c.subscribe([(f"{cfg.topic_base}/predictions/#", 0), (f"{cfg.topic_base}/events", 0)])
        listener.connect(host, port)
        listener.loop_start()
        pub = MqttDevices(sims, host=host, port=port, protocol=protocol)
        pub.start()
        parts.append(pub)
        operator = Operator(pub.client, topic=f"{cfg.topic_base}/labels", devices=list(all_devs.values()), every_s=0.25,
                            key=operator_key, name="operator", node=cfg.node.name)
        operator.start()
        parts.append(operator)
        drift_dev = sims[min(1, len(sims) - 1)]
        when = drift_at if drift_at is not None else (seconds / 3 if seconds else 30.0)
        notes = [f"drift: {drift_dev.name} gets '{DRIFT}' at {when:.0f} s; labels arrive 4/s per stream",
                 f"backend: {daemon.engine.backend.key} {daemon.engine.backend.precision}; "
                 f"node topics: {cfg.topic_base}/predictions/#, {cfg.topic_base}/events"]
        view = LiveView(board, total=seconds, live=live, notes=notes)
        drifted = False
        try:
            while not seconds or time.time() - t0 < seconds:
                time.sleep(1.0)
                el = time.time() - t0
                if not drifted and el >= when:
                    drift_dev.drift(DRIFT, time.time())
                    drifted = True
                view.tick(el)
        except KeyboardInterrupt:
            pass
        meta = {"seconds": round(time.time() - t0, 1), "broker": f"{host}:{port}", "drift": DRIFT,
                "drift_device": f"{drift_dev.name}/accel", "drift_at": round(when, 1) if drifted else None,
                "labels_sent": operator.sent, "samples_sent": pub.sent, "status": daemon.status()}
        listener.loop_stop()
        listener.disconnect()
    finally:
        # sources first, then the daemon (it checkpoints), then the serial firmware
        order = [p for p in parts if not hasattr(p, "fw")][::-1] + [p for p in parts if hasattr(p, "fw")]
        for p in order:
            p.stop()
        if proc is not None:
            proc.stop()
        shutil.rmtree(state, ignore_errors=True)
    report = write_report(board, Path(out), meta=meta)
    print(f"\nreport: {Path(out) / 'report.json'}, plot: {Path(out) / 'report.png'}")
    for r in report["streams"]:
        print(f"  {r['stream']:24} windows={r['windows']:5d} accuracy={r['accuracy_all']} (last 40: {r['accuracy_recent']}) "
              f"latency p50={r['latency_ms_p50']} ms")
    return 0
