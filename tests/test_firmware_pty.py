"""Real pseudo-terminals: the firmware simulator on one end, the daemon's SerialSource on the other."""
import threading
import time

import numpy as np
import pytest

from edge.ingest.serial import SerialSource
from edge.ingest.types import StreamKey
from firmware_bridge.sim import FirmwareSim

pytestmark = pytest.mark.timeout(30)


class Sink:
    def __init__(self):
        self.lock = threading.Lock()
        self.blocks, self.labels = [], []

    def push_samples(self, key, t, v):
        with self.lock:
            self.blocks.append((key, t, v))

    def push_label(self, key, t, label):
        with self.lock:
            self.labels.append((key, t, label))

    def values(self):
        with self.lock:
            return np.concatenate([b[2] for b in self.blocks]) if self.blocks else np.zeros((0, 0), np.float32)

    def times(self):
        with self.lock:
            return np.concatenate([b[1] for b in self.blocks])

    def count(self):
        with self.lock:
            return sum(len(b[2]) for b in self.blocks)


def wait_for(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def sensor(seed=0):
    rng = np.random.default_rng(seed)
    return lambda n: (np.zeros(n), rng.normal(0.0, 1.0, (n, 3)))


@pytest.fixture
def rig():
    made = []

    def make(protocol="binary", source_kw=None, **sim_kw):
        sink = Sink()
        sim_kw.setdefault("sample_rate", 2000.0)
        sim_kw.setdefault("block", 40)
        sim = FirmwareSim(source=sensor(), protocol=protocol, **sim_kw).start()
        src = SerialSource(name="mcu", port=sim.path, sink=sink, protocol=protocol, retry_interval=0.05,
                           **(source_kw or {}))
        src.start()
        made.append((src, sim))
        return sim, src, sink

    yield make
    for src, sim in made:
        src.stop()
        sim.stop()


def _evenly_spaced(t, rate: float) -> None:
    """Spaced at ``rate``; where a faster frame moves the device clock down toward it
    (firmware_bridge.session.DeviceClock), a gap shrinks by at most a tenth of a period."""
    gaps = np.diff(t)
    assert gaps.min() >= 0.9 / rate - 1e-6 and gaps.max() <= 1 / rate + 1e-6, (gaps.min(), gaps.max())
    assert np.mean(np.abs(gaps - 1 / rate) <= 1e-6) >= 0.9


def test_binary_stream_delivers_exact_samples_and_values(rig):
    started = time.time()
    sim, src, sink = rig(max_frames=40, autostart=False)
    assert wait_for(lambda: sink.count() == 1600 and src.stats()["frames"] == 40)
    np.testing.assert_array_equal(sink.values(), np.concatenate(sim.sent))
    assert sink.blocks[0][0] == StreamKey("sim-mcu", "serial")
    t = sink.times()
    _evenly_spaced(t, 2000.0)
    assert started - 5.0 <= t[-1] <= time.time() + 1.0  # Unix time of this run (the device clock maps onto it)
    st = src.stats()
    assert (st["frames"], st["samples"], st["lost_frames"], st["crc_errors"], st["resets"]) == (40, 1600, 0, 0, 0)


def test_dropped_frames_are_counted_as_lost(rig):
    sim, src, sink = rig(max_frames=30, autostart=False)
    assert wait_for(lambda: sink.count() >= 200)
    sim.drop_frames(3)
    assert wait_for(lambda: sim.counters["frames_sent"] + sim.counters["frames_dropped"] == 30)
    assert wait_for(lambda: sink.count() == 27 * 40)
    assert src.stats()["lost_frames"] == 3
    np.testing.assert_array_equal(sink.values(), np.concatenate(sim.sent))


def test_noise_is_survived_and_every_missing_frame_is_counted(rig):
    sim, src, sink = rig(max_frames=40, autostart=False)
    assert wait_for(lambda: sink.count() >= 200)
    for _ in range(3):
        sim.inject_noise(300)
        time.sleep(0.05)
    assert wait_for(lambda: sim.counters["frames_sent"] == 40)
    # every frame sent is then either delivered or counted lost, once the reader has read them all
    assert wait_for(lambda: sink.count() + src.stats()["lost_frames"] * 40 == 1600)
    st = src.stats()
    assert st["decode_errors"] > 0
    assert sink.count() + st["lost_frames"] * 40 == 1600
    assert sink.count() >= 1600 - 6 * 40  # at most the frames the noise ran into


def test_unplug_and_replug_reconnects_and_resumes(rig):
    sim, src, sink = rig(max_frames=None)
    assert wait_for(lambda: sink.count() >= 400)
    sim.unplug()
    assert wait_for(lambda: src.stats()["disconnects"] == 1)
    before = sink.count()
    time.sleep(0.2)  # stays unplugged a moment (pacing: the disconnect was already seen above)
    sim.replug()
    assert wait_for(lambda: sink.count() >= before + 400)
    st = src.stats()
    assert (st["reconnects"], st["resets"], st["crc_errors"]) == (1, 1, 0)


def test_label_frames_reach_the_sink(rig):
    started = time.time()
    sim, src, sink = rig(max_frames=5, autostart=False)
    assert wait_for(lambda: sink.count() == 200)
    sim.send_label("imbalance")
    sim.send_label(2)
    assert wait_for(lambda: len(sink.labels) == 2)
    assert [lab for _, _, lab in sink.labels] == ["imbalance", 2]
    assert started - 5.0 <= sink.labels[0][1] <= time.time() + 1.0  # stamped in Unix time of this run


def test_device_reset_is_counted_and_stream_continues(rig):
    sim, src, sink = rig(max_frames=None)
    assert wait_for(lambda: sink.count() >= 200)
    sim.reset()
    assert wait_for(lambda: src.stats()["resets"] == 1)
    n = sink.count()
    assert wait_for(lambda: sink.count() >= n + 200)
    assert src.stats()["lost_frames"] == 0


def test_channel_mapping_picks_and_orders_channels(rig):
    sim, src, sink = rig(max_frames=5, autostart=False, source_kw={"channels": ["az", 0]})
    assert wait_for(lambda: sink.count() == 200)
    np.testing.assert_array_equal(sink.values(), np.concatenate(sim.sent)[:, [2, 0]])


def test_text_protocol_with_given_rate_delivers_exact_values(rig):
    sim, src, sink = rig("text", max_frames=20, boot_delay=0.1, text_header=True,
                         source_kw={"sample_rate": 2000.0, "device": "uno"})
    assert wait_for(lambda: sink.count() == 800)
    np.testing.assert_array_equal(sink.values(), np.concatenate(sim.sent))
    assert sink.blocks[0][0] == StreamKey("uno", "serial")
    _evenly_spaced(sink.times(), 2000.0)


def test_text_protocol_estimates_the_sample_rate(rig):
    sim, src, sink = rig("text", sample_rate=1000.0, block=20, boot_delay=0.1,
                         source_kw={"text_min_seconds": 0.5})
    assert wait_for(lambda: sink.count() >= 1000)
    assert src.stats()["sample_rate"] == pytest.approx(1000.0, rel=0.05)
