"""Re-checking an uncertain serving choice once the device is idle, and switching atomically.

A choice measured at start-up on a busy device can be ``uncertain`` (``Decision.confidence``:
a speedup interval straddled the gain needed). Such a backbone comes from ``load_backbone``
carrying a ``RecheckPlan``; the ``Engine`` serving it starts one ``Rechecker`` thread after
its warm-up. That thread waits until serving has been idle for ``idle_s`` and the load
average is below half the cores, measures again with three times the rounds, records the
new decision, and, when it is sure and names another candidate, swaps the engine's backend
in one assignment (``Engine.swap``): a batch is served wholly by the old or the new one.
``should_switch`` and ``device_idle`` are the pure rules.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from edge.serve.choice import Decision

log = logging.getLogger("edge.serve")

IDLE_S = 30.0  # seconds without a served batch before the device counts as idle
POLL_S = 5.0


def should_switch(current: Decision, new: Decision) -> bool:
    """Switch only to a different candidate the new measurement is sure of.

    >>> from edge.serve.choice import Candidate
    >>> i8, f32 = Candidate("onnxruntime", "int8", "u8s8-rr"), Candidate("onnxruntime", "fp32")
    >>> should_switch(Decision(f32, "", "auto", confidence="uncertain"), Decision(i8, "", "auto"))
    True
    >>> should_switch(Decision(f32, "", "auto", confidence="uncertain"), Decision(i8, "", "auto", confidence="uncertain"))
    False
    """
    return new.chosen is not None and new.chosen != current.chosen and new.confidence == "sure"


def device_idle(now: float, last_call: float, load1: float, cores: int, *, idle_s: float = IDLE_S) -> bool:
    """Idle: nothing served for ``idle_s`` and a 1-minute load average under half the cores.

    >>> device_idle(100.0, 60.0, 0.2, 4), device_idle(100.0, 90.0, 0.2, 4), device_idle(100.0, 60.0, 3.0, 4)
    (True, False, False)
    """
    return now - last_call >= idle_s and load1 < cores / 2


@dataclass(frozen=True)
class RecheckPlan:
    """What re-measuring needs: the decision to re-check and a function that measures again
    (``edge.serve.select.remeasure``), returning a ``Served``."""

    decision: Decision
    remeasure: Callable[[], Any]


class Rechecker:
    """One thread: wait for idle, measure again, switch the engine if the evidence changed."""

    def __init__(self, engine, plan: RecheckPlan, *, idle: Callable[[], bool] | None = None,
                 poll_s: float = POLL_S, stop: threading.Event | None = None):
        self.engine, self.plan, self.poll_s = engine, plan, poll_s
        self.idle = idle or (lambda: device_idle(time.monotonic(), engine.last_call, os.getloadavg()[0],
                                                 os.cpu_count() or 1))
        self.stop = stop or threading.Event()
        self.outcome = ""  # what the re-check did, for status and tests
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="serve-recheck", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.idle():
                if self.stop.wait(self.poll_s):
                    self.outcome = "stopped before the device was idle"
                    return
            self.check_now()
        except Exception as e:  # noqa: BLE001  the serving goes on with the first choice; say why
            self.outcome = f"failed: {type(e).__name__}: {e}"
            log.warning("re-checking the serving choice failed (%s); keeping %s", self.outcome,
                        self.plan.decision.chosen.label if self.plan.decision.chosen else "it", exc_info=True)
        finally:
            self.done.set()

    def check_now(self) -> str:
        """Measure again and switch if ``should_switch``; returns (and keeps) what happened."""
        old = self.plan.decision
        served = self.plan.remeasure()
        new = served.decision
        if should_switch(old, new) and served.backend is not None:
            self.engine.swap(served.backend)
            self.outcome = f"switched from {old.chosen.label if old.chosen else 'nothing'} to {new.chosen.label}"
        else:
            self.outcome = f"kept {old.chosen.label if old.chosen else 'nothing'} (re-check {new.confidence}: " \
                           f"{new.chosen.label if new.chosen else 'nothing'})"
        log.info("serving choice re-checked on an idle device: %s; %s", self.outcome, new.reason)
        return self.outcome
