"""Per-item failures: the first of each (thread, error class) logs its traceback at
WARNING (journald keeps it); later ones are counted and rate-limited, stack at DEBUG."""
from __future__ import annotations

import logging

from edge.supervise import Supervisor


def _fail(exc_type, msg):
    try:
        raise exc_type(msg)
    except exc_type as e:
        return e


def _tracebacks(records, level=logging.WARNING):
    return [r for r in records if r.levelno >= level and r.exc_info]


def test_the_first_failure_per_thread_and_class_logs_its_traceback_at_warning(caplog):
    sup = Supervisor(faults="")
    caplog.set_level(logging.WARNING, logger="edge")

    for _ in range(3):
        sup.item_failed("pipeline", _fail(KeyError, "k"), where="item")
    sup.item_failed("pipeline", _fail(ValueError, "v"), where="item")
    sup.item_failed("learner", _fail(KeyError, "k"), where="item")

    traced = [(r.exc_info[0], r.getMessage().split(":")[0]) for r in _tracebacks(caplog.records)]
    assert traced == [(KeyError, "pipeline"), (ValueError, "pipeline"), (KeyError, "learner")]
    assert "Traceback" in caplog.text and "_fail" in caplog.text
    assert sup.errors == {("pipeline", "KeyError"): 3, ("pipeline", "ValueError"): 1, ("learner", "KeyError"): 1}


def test_a_hostile_exception_still_logs_and_counts(caplog):
    class Hostile(Exception):
        def __str__(self):
            raise RuntimeError("no")

    sup = Supervisor(faults="")
    caplog.set_level(logging.WARNING, logger="edge")
    sup.item_failed("pipeline", _fail(Hostile, "x"))

    assert sup.errors == {("pipeline", "Hostile"): 1} and "<unprintable>" in caplog.text
