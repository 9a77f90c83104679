"""Fault suite, part 3: `edge run` as a process.

* A thread killed outright (``EDGE_FAULTS=pipeline:kill:N``): the process exits non-zero,
  and the systemd watchdog pings (``WATCHDOG=1`` on a real AF_UNIX datagram socket named
  by ``NOTIFY_SOCKET``) arrive while it is healthy and never after the death.
* Shutdown (finding 10): what is queued at SIGTERM is served or counted
  (``shutdown_dropped``), and the exit code is 0.

The flood and labels-under-flood cases are in test_faults_flood.py.
"""
from __future__ import annotations

import json
import signal
import tempfile
import time
from pathlib import Path

import pytest

from tests.faultkit import WINDOW, EdgeRun, NotifySocket, poll
from tests.helpers import Client, batch

pytestmark = pytest.mark.timeout(180)


def _status(run: EdgeRun, node: str) -> dict:
    from edge.config import load_config
    from edge.state import runtime_dir

    return json.loads((runtime_dir(load_config(str(run.cfg))) / "status.json").read_text())  # in RAM, not the state folder


def test_a_killed_pipeline_stops_the_watchdog_and_edge_run_exits_non_zero(broker, tmp_path):
    node = "wd"
    sock_dir = Path(tempfile.mkdtemp(prefix="edge-notify-"))  # AF_UNIX paths are limited to 108 bytes
    notify = NotifySocket(sock_dir / "notify.sock")
    run = EdgeRun(broker, tmp_path, node=node,
                  env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000", "EDGE_FAULTS": "pipeline:kill:5"})
    c = Client(broker)
    try:
        run.wait_healthy()
        poll(lambda: notify.lines().count("WATCHDOG=1") >= 3, 60, what="watchdog pings while healthy")
        assert "READY=1" in notify.lines()
        t0 = time.time()
        for k in range(8):  # the 5th item kills the pipeline thread
            c.publish("sensors/wd/accel", batch(t0 + k * WINDOW * 0.001, WINDOW))
        code = run.proc.wait(90)
        assert code == 1, run.log_text()[-3000:]
        log = run.log_text()
        assert "thread pipeline died" in log and "exiting non-zero" in log, log[-3000:]
        # the listener may still be reading what is already in the socket's buffer
        lines = poll(lambda: (ls := notify.lines()) and "STOPPING=1" in ls and ls, 30, what="STOPPING=1")
        assert "STOPPING=1" in lines, lines
        stop_at = lines.index("STOPPING=1")
        assert lines[:stop_at].count("WATCHDOG=1") >= 3
        assert "WATCHDOG=1" not in lines[stop_at:], "watchdog pinged after the pipeline died"
        assert "pipeline" in _status(run, node)["health"]["dead_threads"]
    finally:
        c.close()
        run.close()
        notify.close()


def test_sigterm_serves_or_counts_every_queued_window_and_label_and_exits_0(broker, tmp_path):
    """A backlog of big batches and labels at SIGTERM, with a short drain so that some of it
    is likely left: every message the daemon took in is processed or counted.

    The backlog is made with the real OS: the daemon is paused (SIGSTOP) while the test
    publishes, so the messages wait in its sockets; it is resumed (SIGCONT) and told to stop
    (SIGTERM) at once, while its readers hand the backlog to the lanes."""
    node, n_msgs = "shut", 400
    # max_lag_s = 0: on a busy machine a batch can wait past the default 2 s and be shed as
    # stale (counted per lane item, not per message); this test is about shutdown accounting
    run = EdgeRun(broker, tmp_path, node=node, adapt=True, queues={"shutdown_drain_s": 0.3, "max_lag_s": 0.0})
    c = Client(broker)
    try:
        run.wait_healthy()
        t0 = time.time()
        head = b'{"dt":0.001,"v":' + json.dumps([[0.1, 0.2, 0.3]] * 1000).encode() + b',"t0":'
        run.proc.send_signal(signal.SIGSTOP)
        for k in range(n_msgs):  # one stream, consecutive 1000-sample batches
            c.publish("sensors/sd/accel", head + repr(t0 + k).encode() + b"}", qos=0)
            if k % 4 == 0:
                c.publish(f"edge/{node}/labels", json.dumps({"t": t0 + k + 0.5, "label": "normal"}), qos=1)
        run.proc.send_signal(signal.SIGCONT)
        run.proc.send_signal(signal.SIGTERM)
        assert run.proc.wait(90) == 0, run.log_text()[-3000:]
        st = _status(run, node)
        p, lanes, ingest = st["pipeline"], st["lanes"], st["sources"]["mqtt"]
        assert all(lanes[n]["depth"] == 0 and lanes[n]["dropped"] == 0 and lanes[n]["stale"] == 0
                   for n in lanes), json.dumps(lanes)
        # every message the daemon took in was processed or counted as dropped at shutdown
        took_in = ingest["messages"] + lanes["labels"]["offered"]
        assert took_in > 0 and p["messages"] + p["shutdown_dropped"] == took_in, (p, lanes, ingest)
        assert p["published"] + p["publish_failed"] + p["publish_errors"] == p["windows_served"], p
        # the learner got every served window and every label, and learned, rejected (counted
        # by reason), kept pending or counted as dropped at shutdown each of its labels
        a = st["adapt"]
        assert a["lane_learner_offered"] == p["windows_served"] and a["lane_labels_offered"] == p["labels"], a
        assert a["lane_labels_dropped"] == 0 and a["lane_labels_depth"] == 0, a
        handled = a["matcher_labels_matched_total"] + sum(a["matcher_labels_rejected"].values()) + \
            a["matcher_labels_pending"] + a["worker_shutdown_dropped"]
        assert handled >= a["lane_labels_offered"], a
        assert "Traceback" not in run.log_text()
    finally:
        c.close()
        if run.proc.poll() is None:
            run.proc.send_signal(signal.SIGCONT)
        run.close()
