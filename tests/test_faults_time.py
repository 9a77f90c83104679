"""Fault suite, part 5: the time policy end to end (findings 4, 5 and 9 of issue 8).

* Timestamp-less payloads at 1 kHz (JSON ``{"v": [...]}`` single samples and CSV lines
  without a time column), published in bursts with jitter, lose nothing: no out_of_order,
  no gaps, and every expected window is served.
* A timestamped 500 Hz stream into the 1 kHz model is flagged: in ``status()["streams"]``,
  in the metric ``edge_stream_flagged`` and by an event on ``edge/<node>/events``.
* Every event's ``t`` is Unix time (within a day of ``time.time()``).
* Issue 19, a steppable clock: a real ``edge run`` under libfaketime with a timestamp file
  (the wall clock moved, the monotonic one left alone, as NTP does), while the sensors and
  the labeller keep true time: a day ahead, then stepped to an hour behind, then restarted
  there. Labels for windows with and without ``t`` are all matched, nothing is refused as
  ``absurd_time``, ``future`` or ``too_old``, the skew and the step are events and metrics,
  uptime comes from the monotonic clock, and the restarted daemon restores its label cache.
"""
from __future__ import annotations

import glob
import json
import os
import random
import shutil
import signal
import subprocess
import time

import pytest

from tests.faultkit import WINDOW, EdgeRun, http_get, metric, poll, scrape, start_daemon
from tests.helpers import Client, batch

pytestmark = pytest.mark.timeout(180)

NODE = "tm"
N_WINDOWS = 8


@pytest.fixture(scope="module")
def daemon(broker, tmp_path_factory):
    d = start_daemon(broker, tmp_path_factory.mktemp("time"), node=NODE)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def events(broker, daemon):
    c = Client(broker, f"edge/{NODE}/events")
    yield c
    c.close()


def _stream(daemon, key: str) -> dict:
    return daemon.status()["streams"].get(key, {})


def test_timestampless_json_and_csv_at_1khz_in_jittered_bursts_lose_nothing(broker, daemon):
    c = Client(broker, f"edge/{NODE}/predictions/#")
    rng = random.Random(8)
    n = N_WINDOWS * WINDOW
    start = time.monotonic()
    sent = 0
    while sent < n:
        # bursts of 20-80 samples on the nominal 1 kHz schedule, each up to 20 ms late
        burst = min(rng.randint(20, 80), n - sent)
        due = start + (sent + burst) / 1000.0 + rng.uniform(0.0, 0.02)
        while time.monotonic() < due:
            time.sleep(0.001)
        for i in range(sent, sent + burst):
            x = 0.001 * i
            c.c.publish("sensors/tj/accel", b'{"v":[%.4f,0.5,-0.5]}' % x, qos=0)
            c.c.publish("sensors/tc/accel", b"%.4f,0.5,-0.5" % x, qos=0)
        sent += burst
    for key in ("tj/accel", "tc/accel"):
        poll(lambda: _stream(daemon, key).get("samples", 0) >= n, 60, what=f"all samples of {key}")
        st = _stream(daemon, key)
        assert st["samples"] == n and st["out_of_order"] == 0 and st["gaps"] == 0, st
        assert st["windows"] == N_WINDOWS, st
        topic = f"edge/{NODE}/predictions/{key}"
        c.wait_for(lambda m: sum(1 for t, _, _ in m if t == topic) >= N_WINDOWS, timeout=60)
    text = scrape(daemon.metrics_port)
    assert metric(text, "edge_stream_out_of_order_total", stream="tj/accel") == 0
    assert metric(text, "edge_stream_out_of_order_total", stream="tc/accel") == 0
    c.close()


def test_a_500hz_stream_into_the_1khz_model_is_flagged_with_metric_and_event(broker, daemon, events):
    c = Client(broker)
    t0 = time.time()
    for k in range(20):  # 4 s of stream time at 500 Hz, with its own timestamps
        c.publish("sensors/slow/accel", batch(t0 + k * 0.2, 100, dt=0.002))
    poll(lambda: _stream(daemon, "slow/accel").get("flag"), 60, what="the 500 Hz stream to be flagged")
    assert _stream(daemon, "slow/accel")["flag"] in ("rate", "fill")
    assert metric(scrape(daemon.metrics_port), "edge_stream_flagged", stream="slow/accel") == 1.0
    evs = events.wait_for(lambda m: [e for e in events.json_on(f"edge/{NODE}/events")
                                     if e.get("type") == "stream_flag" and e.get("device") == "slow"], timeout=30)
    assert evs[0]["flag"] in ("rate", "fill") and evs[0]["stream"] == "accel", evs
    c.close()


def test_events_carry_unix_time(broker, daemon, events):
    c = Client(broker)
    t0 = time.time()
    for k in range(10):  # 1250 Hz: off the model's 1 kHz without gaps, so flagged by rate
        c.publish("sensors/fast/accel", batch(t0 + k * 0.2, 250, dt=0.0008))
    evs = events.wait_for(lambda m: [e for e in events.json_on(f"edge/{NODE}/events")
                                     if e.get("device") == "fast"], timeout=60)
    now = time.time()
    every = events.json_on(f"edge/{NODE}/events")
    assert evs and every
    for e in every:
        assert abs(e["t"] - now) < 86400, e
    c.close()


# ---- issue 19: a steppable clock -----------------------------------------------------------
_LIBS = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1") + glob.glob("/usr/lib/faketime/libfaketime.so.1")
               + glob.glob("/usr/local/lib/faketime/libfaketime.so.1"))
needs_faketime = pytest.mark.skipif(not _LIBS or not shutil.which("cc"),
                                    reason="the clock-step scenarios need libfaketime (apt-get install faketime) and a C "
                                           "compiler (.ci/run installs both)")
# libfaketime 0.9.10 with FAKETIME_DONT_FAKE_MONOTONIC answers Python's time.sleep (an absolute
# clock_nanosleep on CLOCK_MONOTONIC) with EINVAL; the monotonic clock is not faked, so this
# shim, preloaded first, hands clock_nanosleep straight to the kernel
_SHIM = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
int clock_nanosleep(clockid_t c, int f, const struct timespec *q, struct timespec *r) {
    return syscall(SYS_clock_nanosleep, c, f, q, r) == 0 ? 0 : errno;
}
"""


class SteppableClock:
    """The environment of a process whose wall clock this test steps (``set(offset_s)``: that far
    from this test's own clock, which its sensors and labeller keep).

    The whole test run may itself be under libfaketime (``faketime -f "-1h" pytest``, issue 19):
    then the inherited ``FAKETIME`` would win over the timestamp file (the process's clock never
    stepped), and the file's offset is from the kernel's clock, not this test's. So the process
    gets no ``FAKETIME`` (nor the wrapper's shared state), and the file holds the offset plus how
    far this test's clock is from the kernel's."""

    def __init__(self, tmp):
        src, self.shim, self.file = tmp / "shim.c", tmp / "shim.so", tmp / "faketime"
        src.write_text(_SHIM)
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(self.shim), str(src)], check=True)
        self.env = {"LD_PRELOAD": f"{self.shim} {_LIBS[0]}", "FAKETIME_TIMESTAMP_FILE": str(self.file),
                    "FAKETIME_DONT_FAKE_MONOTONIC": "1", "FAKETIME_NO_CACHE": "1", "FAKETIME": None,
                    "FAKETIME_SHARED": None}
        self.base = _own_clock_offset()
        self.set(0.0)

    def set(self, offset_s: float) -> None:
        tmp = self.file.with_suffix(".new")
        tmp.write_text(f"{offset_s + self.base:+.0f}\n")
        tmp.replace(self.file)  # whole, so the process never reads half a line


def _own_clock_offset() -> float:
    """This process's wall clock minus the kernel's (0 unless libfaketime is preloaded here):
    the kernel's read by ``date`` started without libfaketime, between two readings of ours."""
    if "faketime" not in os.environ.get("LD_PRELOAD", ""):
        return 0.0
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("FAKETIME")}
    before = time.time()
    real = float(subprocess.run(["date", "+%s.%N"], env=env, capture_output=True, text=True, check=True).stdout)
    return round((before + time.time()) / 2 - real)


CLK = "clk"


class Feed:
    """A timed and an untimed stream on true time, and a labeller that labels every window."""

    def __init__(self, broker, node: str = CLK, sign=None):
        self.node, self.sign = node, sign  # sign(label dict) -> signed envelope, or None: unsigned labels
        self.c = Client(broker, f"edge/{node}/predictions/#", f"edge/{node}/events")
        self.t = None
        self.labelled = 0
        self.seen: set = set()

    def events(self, kind: str) -> list:
        return [e for e in self.c.json_on(f"edge/{self.node}/events") if e.get("type") == kind]

    def send(self, windows: int) -> None:
        """``windows`` windows of each stream, in 64-sample reads paced at 1 kHz, and one
        window's worth more: on a loaded machine a late read can resync the untimed stream's
        stamps and cost it a partial window, and the waits below count whole windows."""
        start = time.monotonic()
        # the sensor's clock runs on while the feed pauses (labels, a restart): resume on true time,
        # not where the last read ended; otherwise the timed stream's clock falls behind by each
        # pause, the node keeps its higher offset for LOWER_S, and after a restart the untimed
        # stream's time line starts earlier than the cached one (a label for a window of the old
        # line published just before the restart then waits for ever: seen on a loaded machine)
        self.t = max(self.t or 0.0, time.time())
        for k in range((windows + 1) * WINDOW // 64):
            while time.monotonic() < start + (k + 1) * 0.064:
                time.sleep(0.002)
            self.c.publish("sensors/ct/accel", batch(self.t, 64))
            self.c.c.publish("sensors/cu/accel", json.dumps({"dt": 0.001, "v": [[0.01 * i, 0.5, 1.0] for i in range(64)]}))
            self.t += 0.064

    def label_new_windows(self, want: int) -> list:
        """Wait for ``want`` more predictions of each stream, label each one's middle (true time)."""
        base = f"edge/{self.node}/predictions/"
        self.c.wait_for(lambda m: all(sum(1 for t, _, _ in m if t == f"{base}{s}/accel") >= want for s in ("ct", "cu")),
                        timeout=60)
        new = [p for p in self.all() if (p["device"], p["t_start"]) not in self.seen]
        self.seen |= {(p["device"], p["t_start"]) for p in new}
        for p in new:
            label = {"t": (p["t_start"] + p["t"]) / 2, "label": "normal"}
            if self.sign is not None:
                label = self.sign({**label, "device": p["device"], "stream": "accel"})
            self.c.publish(f"edge/{self.node}/labels/{p['device']}/accel", label)
            self.labelled += 1
        return new

    def all(self) -> list:
        return [p for s in ("ct", "cu") for p in self.c.json_on(f"edge/{self.node}/predictions/{s}/accel")]


def _matched(port: int) -> float:
    return metric(scrape(port), "edge_adapt_labels_matched_total")


@needs_faketime
@pytest.mark.timeout(300)
def test_a_day_ahead_then_an_hour_behind_then_a_restart_keeps_learning_from_true_time_labels(broker, tmp_path):
    clock = SteppableClock(tmp_path)
    clock.set(86400)  # a day ahead of its sensors and labeller
    run = EdgeRun(broker, tmp_path, node=CLK, adapt=True, env=clock.env)
    feed = Feed(broker)
    try:
        run.wait_healthy()
        feed.send(4)
        new = feed.label_new_windows(4)
        clocks = {p["device"]: p["clock"] for p in new}
        assert clocks == {"ct": "sensor", "cu": "sources"}, clocks
        # the untimed windows are on true time too: the timed stream's, not this node's day-ahead clock
        ref = sorted(p["t"] for p in new if p["device"] == "ct")
        assert all(ref[0] - 60 <= p["t"] <= ref[-1] + 60 for p in new if p["device"] == "cu"), new
        poll(lambda: _matched(run.port) >= feed.labelled, 60, what=f"{feed.labelled} labels matched (a day ahead)")
        (skew,) = feed.c.wait_for(lambda m: feed.events("clock_skew"), timeout=30)[:1]
        assert abs(skew["skew_s"] + 86400) < 30, skew

        clock.set(-3600)  # NTP steps it to an hour behind
        feed.send(4)
        feed.label_new_windows(8)
        poll(lambda: _matched(run.port) >= feed.labelled, 60, what=f"{feed.labelled} labels matched (stepped back)")
        step = feed.c.wait_for(lambda m: feed.events("clock_step"), timeout=30)[0]
        assert abs(step["step_s"] + 90000) < 30, step
        text = scrape(run.port)
        assert metric(text, "edge_clock_steps_total") >= 1 and abs(metric(text, "edge_clock_skew_seconds") - 3600) < 30
        assert metric(text, "edge_adapt_labels_rejected_total") == 0 and metric(text, "edge_bad_input_total") == 0
        code, body = http_get(run.port, "/healthz")
        assert 0 <= json.loads(body)["uptime_s"] < 3000, body  # was -3,549 s after the step back

        run.proc.send_signal(signal.SIGTERM)  # the final checkpoint holds the label cache
        assert run.proc.wait(60) == 0, run.log_text()[-3000:]
        run = EdgeRun(broker, tmp_path, node=CLK, adapt=True, env=clock.env)
        run.wait_healthy()
        before = feed.labelled
        feed.send(4)
        feed.label_new_windows(12)
        poll(lambda: _matched(run.port) >= feed.labelled - before, 60, what="labels matched after the restart")
        text = scrape(run.port)
        assert metric(text, "edge_adapt_labels_rejected_total") == 0, run.log_text()[-3000:]
        log = run.log_text()
        assert "not restored" not in log and "Traceback" not in log, log[-3000:]
    finally:
        feed.c.close()
        run.close()


@needs_faketime
@pytest.mark.timeout(300)
def test_booted_three_years_in_the_past_then_stepped_to_the_truth_signed_labels_all_pass(broker, tmp_path):
    """A board without a real-time clock: three years behind, then NTP steps it forward (a step
    far beyond labels max_age_s): every signed true-time label for windows with and without
    ``t`` is matched, none refused (label_time, label_replay), and the newest checkpoint is
    the one a restart loads."""
    from edge.ingest.labelauth import create_label_key, sign_label

    node = "clk3"
    keys = tmp_path / "labellers"
    key = create_label_key(keys, "op").read_bytes().strip()
    clock = SteppableClock(tmp_path)
    clock.set(-3 * 365 * 86400)
    run = EdgeRun(broker, tmp_path, node=node, adapt=True, env=clock.env, labels={"keys_dir": str(keys)})
    feed = Feed(broker, node, sign=lambda d: sign_label(key, "op", d, node=node))
    try:
        run.wait_healthy()
        feed.send(4)
        feed.label_new_windows(4)
        poll(lambda: _matched(run.port) >= feed.labelled, 60, what="signed labels matched (three years behind)")
        clock.set(0)  # stepped to the truth: about 94,608,000 s forward
        feed.send(4)
        feed.label_new_windows(8)
        poll(lambda: _matched(run.port) >= feed.labelled, 60, what="signed labels matched (stepped to the truth)")
        text = scrape(run.port)
        assert metric(text, "edge_bad_input_total") == 0 and metric(text, "edge_adapt_labels_rejected_total") == 0, \
            [x for x in text.splitlines() if "bad_input" in x or "rejected" in x]
        assert feed.events("clock_step") and 0 <= json.loads(http_get(run.port, "/healthz")[1])["uptime_s"] < 3000
        run.proc.send_signal(signal.SIGTERM)
        assert run.proc.wait(60) == 0, run.log_text()[-3000:]
        ckpts = sorted((tmp_path / "state" / node / "adapt").glob("ckpt-*.edge"))
        run = EdgeRun(broker, tmp_path, node=node, adapt=True, env=clock.env, labels={"keys_dir": str(keys)})
        run.wait_healthy()
        assert ckpts and f"restored the learner from {ckpts[-1]}" in run.log_text(), run.log_text()[-3000:]
    finally:
        feed.c.close()
        run.close()
