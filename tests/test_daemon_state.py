"""State bound to its model, end to end: a real daemon, a real broker, a checkpoint of another model."""
from __future__ import annotations

import dataclasses
import stat

import pytest

from edge.config import parse_config
from edge.daemon import Daemon
from edge.state import CheckpointStore, ModelIdentity
from edge.zoo import resolve_model
from tests.helpers import Client

pytestmark = pytest.mark.timeout(240)


def test_a_checkpoint_of_another_model_is_not_served_and_an_event_says_why(broker, tmp_path):
    cfg = parse_config({"node": {"name": "sd", "state_dir": str(tmp_path / "state")},
                        "mqtt": {"host": broker.host, "port": broker.port},
                        "model": {"cache_dir": str(tmp_path / "cache")}, "adapt": {"enabled": True}})
    adapt_dir = tmp_path / "state" / "sd" / "adapt"
    mine = ModelIdentity.of(resolve_model(cfg.model.path), head=cfg.adapt.head)
    other = dataclasses.replace(mine, content_hash="0" * 64)  # the same shapes and classes, retrained
    CheckpointStore(adapt_dir, identity=other).save({"format": 1, "task": mine.task, "head_kind": mine.head,
                                                     "feature_size": mine.feature_size, "outputs": mine.outputs})
    c = Client(broker, "edge/sd/events")
    d = Daemon(cfg)
    try:
        d.start(connect_timeout=10)
        c.wait_for(lambda m: any(e.get("type") == "checkpoint_mismatch" for e in c.json_on("edge/sd/events")), timeout=60)
        (ev,) = [e for e in c.json_on("edge/sd/events") if e.get("type") == "checkpoint_mismatch"]
        assert "content_hash '000000000000' != " in ev["why"] and ev["saved"]["content_hash"] == "0" * 64
        assert ev["model"]["content_hash"] == mine.content_hash and isinstance(ev["t"], float)
        met = d.adapt.metrics()
        assert met["learner_champion_is_global"] and met["worker_checkpoint_mismatches"] == 1
        (stale,) = adapt_dir.glob("stale-vibration-00000000-*")
        assert list(stale.glob("ckpt-*.edge")) and stat.S_IMODE(stale.stat().st_mode) == 0o700
    finally:
        c.close()
        d.stop()
    saved = CheckpointStore(adapt_dir).paths()
    assert saved and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in saved)  # the new lineage, at stop
    d2 = Daemon(cfg)  # a restart with the same model restores it: no second mismatch
    try:
        d2.start(connect_timeout=10)
        assert d2.adapt.metrics()["worker_checkpoint_mismatches"] == 0 and d2.adapt.store.loaded_path == saved[-1]
    finally:
        d2.stop()
