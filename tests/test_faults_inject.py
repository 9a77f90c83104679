"""Fault suite, part 2: exceptions injected into each thread's per-item work, and threads
killed outright, in a live daemon (``EDGE_FAULTS`` specs through ``Supervisor(faults=...)``).

An injected ``InjectedFault`` must cost exactly the item it hit: it is counted in
``edge_internal_errors_total{thread,kind}`` (scraped from /metrics), the item is skipped,
and everything else is served. A ``ThreadKill`` ends the thread: /healthz turns 503 and
the thread is reported dead (the `edge run` exit code is in test_faults_process.py).
"""
from __future__ import annotations

import time

import pytest

from tests.faultkit import WINDOW, healthz, metric, poll, scrape, start_daemon
from tests.helpers import Client, batch

pytestmark = pytest.mark.timeout(180)


def _fire(broker, node: str, n_windows: int, n_labels: int, prefix: str) -> Client:
    c = Client(broker, f"edge/{node}/predictions/#")
    t0 = time.time()
    for i in range(n_windows):  # one stream per message: each message is exactly one window
        c.publish(f"sensors/{prefix}{i}/accel", batch(t0, WINDOW))
    for i in range(n_labels):
        c.publish(f"edge/{node}/labels", {"t": t0 + i * 0.001, "label": "normal"})
    return c


def test_injected_faults_in_pipeline_and_mqtt_link_cost_only_their_items(broker, tmp_path):
    node, S, L = "inj", 60, 60
    d = start_daemon(broker, tmp_path, node=node, faults="pipeline:item:0.2,mqtt-link:item:0.2")
    try:
        c = _fire(broker, node, S, L, "f")
        errs = d.supervisor.errors

        def accounted():
            # each item either got through (a prediction, a label counted) or was hit by exactly one fault
            preds = sum(1 for t, _, _ in list(c.msgs) if "/predictions/f" in t)
            got = preds + d.pipeline.counters["labels"]
            lost = errs.get(("pipeline", "InjectedFault"), 0) + errs.get(("mqtt-link", "InjectedFault"), 0)
            return got + lost == S + L and (preds, lost)
        preds, lost = poll(accounted, 90, what="every item to be served or counted as an injected fault")
        text = scrape(d.metrics_port)
        n_pipe = metric(text, "edge_internal_errors_total", thread="pipeline", kind="InjectedFault")
        n_link = metric(text, "edge_internal_errors_total", thread="mqtt-link", kind="InjectedFault")
        assert n_pipe > 0 and n_link > 0 and n_pipe + n_link == lost, text
        assert preds > 0 and d.pipeline.counters["labels"] > 0
        assert not d.supervisor.dead() and healthz(d.metrics_port) == 200
        assert metric(text, "edge_thread_alive", thread="pipeline") == 1.0
        assert metric(text, "edge_thread_alive", thread="mqtt-link") == 1.0
        # serving goes on: later windows are still served (some are hit too, at the same rate)
        more = _fire(broker, node, 20, 0, "g")
        poll(lambda: any("/predictions/g" in t for t, _, _ in list(more.msgs)), 60, what="a later prediction")
        c.close()
        more.close()
    finally:
        d.stop()


def test_injected_faults_in_the_learner_are_counted_and_learning_goes_on(broker, tmp_path):
    node = "injl"
    d = start_daemon(broker, tmp_path, node=node, adapt=True, faults="learner:item:0.3")
    try:
        t0 = time.time()
        c = Client(broker, f"edge/{node}/predictions/#")
        for k in range(30):  # one stream, consecutive windows, each labelled
            c.publish("sensors/lrn/accel", batch(t0 + k * WINDOW * 0.001, WINDOW))
            c.publish(f"edge/{node}/labels", {"t": t0 + (k + 0.5) * WINDOW * 0.001, "label": "normal",
                                              "device": "lrn", "stream": "accel"})
        poll(lambda: d.supervisor.errors.get(("learner", "InjectedFault"), 0) > 0, 30, what="a learner fault")
        poll(lambda: d.adapt.metrics().get("matcher_labels_matched_total", 0) > 0, 60, what="labels learned")
        text = scrape(d.metrics_port)
        assert metric(text, "edge_internal_errors_total", thread="learner", kind="InjectedFault") > 0
        assert metric(text, "edge_thread_alive", thread="learner") == 1.0
        assert healthz(d.metrics_port) == 200 and not d.supervisor.dead()
        c.close()
    finally:
        d.stop()


def test_injected_faults_in_mqtt_ingest_lose_no_qos1_message(broker, tmp_path):
    """A read that fails to be handed on is not acknowledged: with QoS 1 the broker delivers
    it again after the ingest reconnects, so nothing is lost but what the poison guard
    gives up on (counted as ``handoff_lost``)."""
    node, n = "inji", 40
    d = start_daemon(broker, tmp_path, node=node, faults="mqtt-ingest:every:2",
                     mqtt={"qos": 1, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5})
    try:
        c = _fire(broker, node, n, 0, "q")
        ing = d.ingest

        def served():
            streams = {t for t, _, _ in list(c.msgs) if "/predictions/q" in t}
            return len(streams) + ing.counters["handoff_lost"] == n and streams
        streams = poll(served, 120, what="every QoS 1 message to be served or counted as lost")
        text = scrape(d.metrics_port)
        faults = metric(text, "edge_internal_errors_total", thread="mqtt-ingest", kind="InjectedFault")
        assert faults > 0 and len(streams) > 0, text
        assert ing.counters["handoff_unacked"] > 0  # left for redelivery, not acknowledged
        assert not d.supervisor.dead() and healthz(d.metrics_port) == 200
        c.close()
    finally:
        d.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # paho's thread ends by the kill
@pytest.mark.parametrize("thread", ["pipeline", "mqtt-link", "learner"])
def test_a_killed_thread_fails_health(broker, tmp_path, thread):
    node = f"kill-{thread.replace('-', '')}"
    d = start_daemon(broker, tmp_path, node=node, faults=f"{thread}:kill:3", adapt=thread == "learner")
    try:
        assert healthz(d.metrics_port) == 200
        # the pipeline's items are messages, paho's are label messages, the learner's windows
        c = _fire(broker, node, 0, 4, "k") if thread == "mqtt-link" else _fire(broker, node, 4, 0, "k")
        poll(lambda: thread in d.supervisor.dead(), 60, what=f"{thread} to be reported dead")
        assert healthz(d.metrics_port) == 503
        ok, info = d.health()
        assert not ok and thread in info["dead_threads"], info
        assert metric(scrape(d.metrics_port), "edge_thread_alive", thread=thread) == 0.0
        c.close()
    finally:
        d.stop()


def test_injected_faults_in_a_serial_reader_cost_only_their_reads(broker, tmp_path):
    """A serial link's per-read work fails on every 100th read: each failure is counted under
    the link's thread, the partial frame is dropped, and the link keeps serving its stream."""
    from edge.sim import Machine
    from firmware_bridge.sim import FirmwareSim

    node = "injs"
    with FirmwareSim(source=Machine(seed=3).read, device_id="mcu-f", speed=2.0) as fw:
        d = start_daemon(broker, tmp_path, node=node, faults="serial:serial0:every:100",
                         sources=[{"type": "serial", "port": fw.path, "stream": "vib"}])
        c = Client(broker, f"edge/{node}/predictions/mcu-f/vib")
        try:
            poll(lambda: d.supervisor.errors.get(("serial:serial0", "InjectedFault"), 0) >= 3, 60,
                 what="faults in the serial reader")
            seen = len(c.msgs)
            poll(lambda: len(c.msgs) >= seen + 2, 60, what="serial predictions after the faults")
            text = scrape(d.metrics_port)
            assert metric(text, "edge_internal_errors_total", thread="serial:serial0", kind="InjectedFault") >= 3, text
            assert metric(text, "edge_thread_alive", thread="serial:serial0") == 1.0
            assert d.status()["sources"]["serial0"]["handle_errors"] >= 3
            assert healthz(d.metrics_port) == 200 and not d.supervisor.dead()
        finally:
            c.close()
            d.stop()
