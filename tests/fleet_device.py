"""A fleet device for the multi-process tests: ``python tests/fleet_device.py CONFIG STATUS SEED``.

A real ``AdaptWorker`` (learner thread, checkpoints on disk) and a real ``DeviceSync``
(its own MQTT connection to the test broker); only the backbone is left out, to spare
the test box's CPU: features are drawn per class around fixed centres plus this
device's own shift, and go in through the worker's public window/label API. Signals
stand in for the network: SIGUSR1 takes the sync connection down, SIGUSR2 brings it
back; SIGTERM stops cleanly (checkpoint), SIGKILL is a crash. Every 0.1 s the device
writes its counters to STATUS (atomically).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import numpy as np


def main(config: str, status: str, seed: int) -> int:
    from edge.adapt.heads import HeadSnapshot
    from edge.adapt.worker import AdaptWorker
    from edge.config import load_config
    from edge.fleet.device import DeviceSync
    from edge.ingest.types import StreamKey
    from edge.state import learner_store
    from edge.zoo import resolve_model

    cfg = load_config(config)
    model = resolve_model(cfg.model.path)
    m = model.manifest
    _, sd = model.arrays()
    ghead = HeadSnapshot.from_arrays(sd, kind="linear", task=m.task, version="shipped")
    events: list = []
    worker = AdaptWorker(cfg=cfg, model=model, global_head=ghead, publish_event=lambda k, **f: events.append(k),
                         store=learner_store(cfg, model))
    sync = DeviceSync(cfg=cfg, worker=worker, model=model, on_event=lambda k, **f: events.append((k, f.get("reason"))))
    stop = threading.Event()
    link = sync.link.client

    def offline(*_):
        link.disconnect()
        link.loop_stop()

    def online(*_):
        link.connect_async(cfg.mqtt.host, cfg.mqtt.port)
        link.loop_start()

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGUSR1, offline)
    signal.signal(signal.SIGUSR2, online)
    worker.start()
    sync.start()
    centres = np.random.default_rng(0).standard_normal((len(m.classes), m.feature_size)).astype(np.float32)
    shift = np.random.default_rng(100 + seed).standard_normal(m.feature_size).astype(np.float32) * 0.5
    rng = np.random.default_rng(seed)
    key = StreamKey("machine", "vib")
    t = time.time()
    last = 0.0
    while not stop.is_set():
        y = int(rng.integers(len(m.classes)))
        z = centres[y] + shift + rng.standard_normal(m.feature_size).astype(np.float32)
        t += 0.2
        worker.offer_window(key, t, t + 0.1, z, ghead.predict(z[None])[0])
        worker.offer_label(key, t + 0.05, m.classes[y])
        stop.wait(0.01)
        if time.monotonic() - last >= 0.1:
            last = time.monotonic()
            c = sync.client
            st = {"pid": os.getpid(), "labels": worker.learner.counters["labels"], "base_version": c.base_version,
                  "seq": c.seq, "labels_at_send": c.labels_at_send, "outbox": int(c.outbox is not None),
                  "refused": dict(c.refused), "counters": dict(c.counters), "global_version": worker.learner.global_version,
                  "connected": sync.link.connected.is_set(), "events": [e for e in events if e[0] == "sync_refused"][-5:],
                  "unreceipted": len(c.ledger), "epoch": c.epoch, "server_latest": c.server_latest,
                  "receipts_refused": dict(c.receipts_refused), "want_head": int(c.courier.want),
                  "publish_refused": dict(sync.link.publish_refused)}
            with open(status + ".tmp", "w") as f:
                json.dump(st, f)
            os.replace(status + ".tmp", status)
    sync.stop()
    worker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
