"""The learner thread with the forecast model: a window's own future samples train the head."""
from __future__ import annotations

import time

import numpy as np

from edge.adapt.heads import HeadSnapshot
from edge.adapt.worker import AdaptWorker
from edge.config import parse_config
from edge.ingest.types import StreamKey
from edge.sim import ProcessSim
from edge.state import CheckpointStore, ModelIdentity
from edge.zoo import resolve_model


def test_forecast_windows_are_trained_on_their_own_future(tmp_path):
    model = resolve_model("forecast")
    m = model.manifest
    _, head_sd = model.state_dicts()
    ghead = HeadSnapshot.from_arrays({k: v.numpy() for k, v in head_sd.items()}, kind="linear", task=m.task, version="g")
    cfg = parse_config({"node": {"name": "fc", "state_dir": str(tmp_path)}})
    events = []
    store = CheckpointStore(tmp_path / "fc" / "adapt", identity=ModelIdentity.of(model, head=cfg.adapt.head))
    w = AdaptWorker(cfg=cfg, model=model, global_head=ghead, publish_event=lambda kind, **f: events.append(kind),
                    store=store)
    backbone, _ = model.build()
    key = StreamKey("pump", "load")
    t, v = ProcessSim(seed=4).read(64 + 60 * 10 + 10)
    w.start()
    try:
        import torch

        for k in range(60):  # a window every 10 samples, then the samples that follow it
            end = 64 + 10 * k
            with torch.no_grad():
                z = backbone(torch.from_numpy(v[end - 64:end].T[None].astype(np.float32))).numpy()[0]
            w.offer_window(key, float(t[end - 64]), float(t[end - 1]), z, ghead.predict(z[None])[0])
            w.offer_samples(key, t[end:end + 10].tolist(), v[end:end + 10].tolist())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and w.metrics()["worker_self_supervised"] < 60:
            time.sleep(0.02)
        met = w.metrics()
        assert met["worker_self_supervised"] == 60 and met["worker_learned"] == 60
        assert met["learner_labels_total"] == 60 and met["forecast_pending"] == 0
    finally:
        w.stop()
    assert list((tmp_path / "fc" / "adapt").glob("*")), "no checkpoint at stop"
