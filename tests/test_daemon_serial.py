"""A serial source in the daemon: firmware on a real pty, predictions over the real broker,
and a LABEL frame from the device reaching the learner."""
from __future__ import annotations

import time

import pytest

from edge.config import parse_config
from edge.daemon import Daemon
from edge.sim import Machine
from firmware_bridge.sim import FirmwareSim
from tests.helpers import Client

pytestmark = pytest.mark.timeout(120)


def test_serial_stream_is_served_and_its_labels_train_the_head(broker, tmp_path):
    machine = Machine(seed=3, fault="imbalance")
    with FirmwareSim(source=machine.read, device_id="mcu-9", speed=4.0) as fw:
        cfg = parse_config({"node": {"name": "ser", "state_dir": str(tmp_path)},
                            "mqtt": {"host": broker.host, "port": broker.port},
                            "model": {"cache_dir": str(tmp_path / "cache")},
                            "sources": [{"type": "serial", "port": fw.path, "stream": "vib"}]})
        d = Daemon(cfg)
        d.start(connect_timeout=10)
        c = Client(broker, "edge/ser/predictions/#")
        try:
            c.wait_for(lambda m: len(m) >= 3, timeout=30)
            topics = {t for t, _, _ in c.msgs}
            assert topics == {"edge/ser/predictions/mcu-9/vib"}  # device name from the HELLO frame
            for _ in range(5):
                fw.send_label("imbalance")
                time.sleep(0.3)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and d.adapt.metrics()["matcher_labels_matched_total"] < 3:
                time.sleep(0.1)
            assert d.adapt.metrics()["matcher_labels_matched_total"] >= 3, d.adapt.metrics()
            st = d.status()["sources"]["serial0"]
            assert st["frames"] > 0 and st["crc_errors"] == 0
        finally:
            c.close()
            d.stop()
