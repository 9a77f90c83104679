"""Simulated devices for the demo: machines publishing over MQTT, an operator publishing labels.

Each device is an ``edge.sim.Machine`` whose fault changes every ``segment_s`` seconds
(so every class shows up) and publishes batches of samples in real time, the way a
gateway forwards an accelerometer: ``{"t0", "dt", "v": [[ax, ay, az], ...]}`` every
``batch_s``. The schedule is known, so the demo can score each prediction against the
true class at the prediction's time.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import orjson
import paho.mqtt.client as mqtt

from edge.ingest.labelauth import sign_label
from edge.sim import FAULTS, SHIFTS, Condition, Machine


def story_schedule(confused: str, drift_segment: int, seed: int, n: int = 64) -> list[str]:
    """The drifted machine's faults, one per segment: ``confused`` once early (accuracy before
    the drift), then right at ``drift_segment`` (the drift lands just before it) and every other
    segment after (so its recovery is learning, not "the fault changed"); the others between.

    >>> story_schedule("imbalance", 3, seed=1, n=9)[:9]
    ['imbalance', 'normal', 'misalignment', 'imbalance', 'normal', 'imbalance', 'misalignment', 'imbalance', 'bearing_wear']
    """
    rng = np.random.default_rng(seed)
    others = [str(f) for f in rng.permutation([f for f in FAULTS if f != confused])]
    out = [confused] + [others[i % len(others)] for i in range(drift_segment - 1)]
    k = 0
    while len(out) < n:
        if (len(out) - drift_segment) % 2 == 0:
            out.append(confused)
        else:
            out.append(others[k % len(others)])
            k += 1
    return out


class SimDevice:
    """One simulated machine: its schedule of faults and conditions, and its samples.

    ``schedule`` gives the fault of each ``segment_s`` segment (cycled); by default a
    seeded permutation of the faults."""

    def __init__(self, *, name: str, seed: int, t0: float, segment_s: float = 8.0, sample_rate: float = 1000.0,
                 schedule: list[str] | None = None):
        self.name, self.segment_s, self.t0 = name, segment_s, t0
        self.machine = Machine(seed=seed, sample_rate=sample_rate, t0=t0)
        self._rng = np.random.default_rng(seed)
        self._order = list(schedule) if schedule else [str(f) for f in self._rng.permutation(FAULTS)]
        self.drift_name = "nominal"
        self.drift_since: float | None = None
        self._lock = threading.Lock()

    def true_fault(self, t: float) -> str:
        """The fault the machine has at time ``t`` (from the schedule)."""
        k = int(max(0.0, t - self.t0) // self.segment_s)
        return self._order[k % len(self._order)]

    def drift(self, name: str, at: float) -> None:
        with self._lock:
            self.drift_name, self.drift_since = name, at

    def read(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The next ``n`` samples, with the fault and condition in force at their start."""
        with self._lock:
            t_next = self.machine.t0 + self.machine.samples_read / self.machine.sample_rate
            fault = self.true_fault(t_next)
            if fault != self.machine.fault:
                self.machine.fault = fault
            cond = SHIFTS[self.drift_name] if self.drift_since is not None and t_next >= self.drift_since else SHIFTS["nominal"]
            if cond is not self.machine.condition:
                self.machine.condition = cond
            return self.machine.read(n)


class MqttDevices:
    """Publish every device's samples in real time from one thread ("sim-devices")."""

    def __init__(self, devices: list[SimDevice], *, host: str, port: int, protocol: str, batch_s: float = 0.05,
                 topic: str = "sensors/{device}/accel", until_s: float = 0.0, gate=None):
        """``until_s``: publish that many seconds of samples per device, then stop (0: until
        ``stop``); ``gate(samples_after) -> bool``: asked before each batch, which waits while it
        says no (the lockstep pacing, ``edge.demo.pacing``)."""
        self.devices, self.batch_s, self.topic = devices, batch_s, topic
        self.until = int(round(until_s * devices[0].machine.sample_rate)) if until_s else None
        self.gate = gate
        proto = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="edge-demo-devices", protocol=proto)
        self.client.connect(host, port)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="sim-devices", daemon=True)
        self.sent = 0

    def start(self) -> None:
        self.client.loop_start()
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.client.disconnect()
        self.client.loop_stop()

    def _run(self) -> None:
        rate = self.devices[0].machine.sample_rate
        n = int(round(self.batch_s * rate))
        while not self._stop.is_set():
            for d in self.devices:
                due = int((time.time() - d.t0) * rate) - d.machine.samples_read  # samples that exist by now
                while due >= n and not self._stop.is_set():
                    after = d.machine.samples_read + n
                    if (self.until is not None and after > self.until) or (self.gate is not None and not self.gate(after)):
                        break
                    t, v = d.read(n)
                    payload = orjson.dumps({"t0": float(t[0]), "dt": 1.0 / rate, "v": np.round(v, 5).tolist()})
                    self.client.publish(self.topic.format(device=d.name), payload)
                    self.sent += n
                    due -= n
            self._stop.wait(self.batch_s / 2)

    def finished(self) -> bool:
        """Every device published its ``until_s`` of samples (never, without a limit)."""
        n = int(round(self.batch_s * self.devices[0].machine.sample_rate))
        return self.until is not None and all(d.machine.samples_read + n > self.until for d in self.devices)


class Operator:
    """Labels each window the daemon predicted, with the truth at the window's middle, as an
    inspector who checks what the node said would.

    Labelling a prediction (not a moment picked by the clock) sends only labels the daemon
    takes: the stream exists (it predicted), the window is cached, and each window gets one
    label (no ``duplicate``). Signed for node ``node`` when a key is given ([labels] keys_dir),
    naming the device and stream (on the bare labels topic)."""

    def __init__(self, client: mqtt.Client, *, topic: str, devices: dict[str, SimDevice],
                 key: bytes | None = None, name: str = "operator", node: str = ""):
        self.client, self.topic, self.devices = client, topic, devices
        self.key, self.name, self.node = key, name, node
        self.sent = 0
        self._lock = threading.Lock()

    def on_prediction(self, p: dict) -> None:
        """Label the window of prediction ``p`` now (the lockstep pacing calls it in its rounds)."""
        d = self.devices.get(p.get("device"))
        if d is None:
            return
        t = 0.5 * (float(p["t"]) + float(p["t_start"]))
        msg = {"t": t, "label": d.true_fault(t), "device": d.name, "stream": p["stream"]}
        payload = sign_label(self.key, self.name, msg, node=self.node) if self.key else orjson.dumps(msg)
        self.client.publish(self.topic, payload, qos=1)
        with self._lock:
            self.sent += 1


__all__ = ["SimDevice", "MqttDevices", "Operator", "Condition", "story_schedule"]
