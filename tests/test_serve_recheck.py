"""An uncertain serving choice is measured again once the device is idle and the engine
switches atomically when the new evidence is sure of another candidate. In-memory
backends and a stand-in measurement: the logic, not the timing (that is test_serve_select)."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from edge.serve import recheck as recheck_mod
from edge.serve.backends.base import Backend
from edge.serve.choice import Candidate, Decision
from edge.serve.engine import Engine
from edge.serve.recheck import RecheckPlan, Rechecker
from edge.serve.select import Served

pytestmark = pytest.mark.timeout(120)
I8, F32 = Candidate("onnxruntime", "int8", "u8s8-rr"), Candidate("onnxruntime", "fp32")


class ConstBackend(Backend):
    """Features all equal to ``value``: which backend served a batch is visible in it."""

    key = "onnxruntime"
    precisions = ("int8", "fp32")

    def __init__(self, precision, value):
        super().__init__(precision=precision, channels=2, window=4, feature_size=3)
        self.value = value

    def _run(self, x):
        return np.full((len(x), 3), self.value, np.float32)


def _x(n=5):
    return np.zeros((n, 2, 4), np.float32)


def test_a_sure_recheck_of_another_candidate_switches_and_no_batch_is_served_by_two(monkeypatch):
    engine = Engine(ConstBackend("fp32", 0.0), max_batch=2)
    plan = RecheckPlan(Decision(F32, "first", "auto", confidence="uncertain"),
                       lambda: Served(Decision(I8, "again", "auto"), ConstBackend("int8", 1.0)))
    seen, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            seen.append(set(np.unique(engine.features(_x()))))  # 3 chunks of one batch

    t = threading.Thread(target=serve)
    t.start()
    try:
        while len(seen) < 20:
            pass
        outcome = Rechecker(engine, plan, idle=lambda: True).check_now()
        n = len(seen)
        while len(seen) < n + 20:
            pass
    finally:
        stop.set()
        t.join(10)

    assert outcome == "switched from onnxruntime fp32 to onnxruntime int8 (u8s8-rr)"
    assert engine.backend.precision == "int8" and engine.label == "onnxruntime-int8"
    assert all(len(s) == 1 for s in seen) and seen[0] == {0.0} and seen[-1] == {1.0}
    assert set(engine.latency_snapshot()) == {"onnxruntime-fp32", "onnxruntime-int8"}


def test_an_uncertain_recheck_keeps_the_first_choice():
    first = ConstBackend("fp32", 0.0)
    engine = Engine(first)
    plan = RecheckPlan(Decision(F32, "first", "auto", confidence="uncertain"),
                       lambda: Served(Decision(I8, "again", "auto", confidence="uncertain"), ConstBackend("int8", 1.0)))

    outcome = Rechecker(engine, plan, idle=lambda: True).check_now()

    assert engine.backend is first and outcome.startswith("kept onnxruntime fp32 (re-check uncertain")


def test_the_recheck_waits_for_idle_and_a_stop_ends_the_wait():
    engine = Engine(ConstBackend("fp32", 0.0))
    calls = []
    plan = RecheckPlan(Decision(F32, "first", "auto", confidence="uncertain"), lambda: calls.append(1))
    stop = threading.Event()
    asked = threading.Event()

    def busy():
        asked.set()
        return False

    r = Rechecker(engine, plan, idle=busy, poll_s=0.01, stop=stop)
    r.start()
    assert asked.wait(10)
    stop.set()

    assert r.done.wait(10) and calls == [] and r.outcome == "stopped before the device was idle"


def test_an_uncertain_measured_choice_is_rechecked_by_its_engine_when_idle_and_recorded(tmp_path, monkeypatch):
    import edge.serve.select as select
    from edge.serve.cache import ArtifactCache
    from edge.serve.testing import make_tiny_model

    model = make_tiny_model(tmp_path / "m")
    results = iter([Served(Decision(F32, "busy", "auto", confidence="uncertain"), ConstBackend("fp32", 0.0)),
                    Served(Decision(I8, "idle", "auto"), ConstBackend("int8", 1.0))])
    asked = []

    def fake_measure(model, *, rounds=select.ROUNDS, **kw):
        asked.append(rounds)
        return next(results)

    monkeypatch.setattr(select, "measure", fake_measure)
    monkeypatch.setattr(recheck_mod, "device_idle", lambda *a, **k: True)
    cache = ArtifactCache(tmp_path / "cache")

    served = select.serve_auto(model, cache=cache, policy="auto")
    engine = Engine(served.backend)
    engine.warm_up(rounds=1)

    assert engine.rechecker is not None and engine.rechecker.done.wait(60)
    assert engine.backend.precision == "int8" and asked == [select.ROUNDS, 3 * select.ROUNDS]
    [rec] = select.records(cache)
    assert rec["confidence"] == "sure" and rec["chosen"]["precision"] == "int8"
    assert json.loads(open(rec["file"]).read())["decision"]["reason"] == "idle"
