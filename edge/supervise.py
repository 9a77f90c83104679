"""Supervision: one mechanism for every long-lived thread of the daemon.

Two levels:

* **Items.** A loop that handles outside input wraps each item's work; an exception
  from one item is handed to ``Supervisor.item_failed(thread, exc, where)``, which counts
  it by thread and exception type (``edge_internal_errors_total{thread,kind}``), logs it
  rate-limited with where it happened (cut to a bounded size), and the loop goes on with
  the next item. The first failure of each (thread, exception type) also logs its
  traceback at WARNING, so an internal bug shows its stack in journald; later ones log
  it at DEBUG only.
* **Threads.** Threads are started with ``spawn`` (or, when a library owns them, such as
  paho's network loop, registered with ``adopt``). A thread that ends while the daemon is
  not stopping, by an exception or by returning, is *dead*: ``dead()`` names it and
  why, health fails, the watchdog stops being fed, and ``on_death`` lets the daemon exit
  non-zero so that systemd restarts it.

Fault injection, for the fault suite and for operators who want to see it work: the
environment variable ``EDGE_FAULTS`` (or ``Supervisor(faults=...)``) holds
comma-separated ``THREAD:item:P`` (raise ``InjectedFault`` in that thread's per-item
work with probability P, from a seeded generator), ``THREAD:every:N`` (at every N-th
item: deterministic however the items are grouped) and ``THREAD:kill:N`` (kill the
thread outright at its N-th item, with an exception that the item guard does not catch). Without it the check costs
one falsy test per item.

>>> sup = Supervisor()
>>> for x in [1, 0, 2]:
...     try:
...         _ = 1 / x
...     except Exception as e:
...         sup.item_failed("demo", e, where="x=0")
>>> sup.errors
{('demo', 'ZeroDivisionError'): 1}
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from typing import Callable

from edge.errors import EdgeError
from edge.observe import RateLimitedLog
from edge.parts import Part

log = logging.getLogger("edge.supervise")


class InjectedFault(EdgeError):
    """Raised on purpose in a thread's per-item work (``EDGE_FAULTS``)."""


class ThreadKill(BaseException):
    """Ends a thread on purpose (``EDGE_FAULTS=THREAD:kill:N``); item guards do not catch it."""


def _cut(s: str, limit: int = 120) -> str:
    return s if len(s) <= limit else s[: limit - 3] + "..."


def parse_faults(spec: str) -> dict[str, tuple[float, int, int]]:
    """``"pipeline:item:0.1,learner:kill:5"`` -> ``{thread: (item probability, every N-th item, kill at item N)}``.

    A thread's name may hold colons (``serial:serial1``): the last two fields are the rule.

    >>> parse_faults("pipeline:item:0.5, learner:kill:3, mqtt-ingest:every:2")
    {'pipeline': (0.5, 0, 0), 'learner': (0.0, 0, 3), 'mqtt-ingest': (0.0, 2, 0)}
    >>> parse_faults("serial:serial1:every:3")
    {'serial:serial1': (0.0, 3, 0)}
    """
    out: dict[str, tuple[float, int, int]] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            thread, what, arg = part.rsplit(":", 2)
            if not thread:
                raise ValueError(part)
            p, every, n = out.get(thread, (0.0, 0, 0))
            if what == "item":
                p = float(arg)
            elif what == "every":
                every = int(arg)
            elif what == "kill":
                n = int(arg)
            else:
                raise ValueError(what)
        except ValueError:
            raise ValueError(f"EDGE_FAULTS entry {_cut(part, 60)!r}: expected THREAD:item:P, THREAD:every:N "
                             "or THREAD:kill:N") from None
        out[thread] = (p, every, n)
    return out


class Supervisor:
    """Counts per-item failures and watches threads; see the module docstring."""

    def __init__(self, *, on_death: Callable[[str, str], None] | None = None, faults: str | None = None,
                 seed: int = 0):
        self.on_death = on_death
        self.errors: dict[tuple[str, str], int] = {}
        self._traced: set[tuple[str, str]] = set()  # (thread, error class) whose traceback was logged
        self._threads: dict[str, threading.Thread] = {}
        self._dead: dict[str, str] = {}
        self._stopping = threading.Event()
        self._badlog = RateLimitedLog(log)
        self._lock = threading.Lock()
        spec = os.environ.get("EDGE_FAULTS", "") if faults is None else faults
        self._faults = parse_faults(spec) if spec else {}
        self._fault_items: dict[str, int] = {}
        self._rng = random.Random(seed)
        if self._faults:
            log.warning("fault injection is on: %s", spec)

    # ---- items -----------------------------------------------------------------------
    def item_failed(self, thread: str, exc: BaseException, where: str = "") -> None:
        """Count and log (rate-limited) one item's failure; the caller skips the item."""
        kind = type(exc).__name__
        key = (thread, kind)
        with self._lock:
            self.errors[key] = self.errors.get(key, 0) + 1
        try:
            text = str(exc)
        except Exception:  # a hostile __str__ must not escape the handler
            text = "<unprintable>"
        logged = self._badlog.warn(f"{thread}:{kind}", "%s: skipped one item after an internal error at %s: %s: %s",
                                   thread, _cut(where) or "?", kind, _cut(text))
        with self._lock:
            first = key not in self._traced
            self._traced.add(key)  # bounded: threads and exception classes are the code's, not the input's
        if first:  # an internal bug shows its stack in journald once, at the level journald keeps
            log.warning("%s: the traceback of the first %s (later ones at DEBUG)", thread, kind, exc_info=exc)
        elif logged:
            log.debug("the failure", exc_info=exc)

    def fault_point(self, thread: str) -> None:
        """Where a thread's per-item work may fail on purpose; a no-op unless faults are set."""
        if not self._faults:
            return
        f = self._faults.get(thread)
        if f is None:
            return
        p, every, kill_at = f
        n = self._fault_items[thread] = self._fault_items.get(thread, 0) + 1
        if kill_at and n >= kill_at:
            raise ThreadKill(f"{thread} killed by EDGE_FAULTS at item {n}")
        if (every and n % every == 0) or (p and self._rng.random() < p):
            raise InjectedFault(f"injected fault in {thread} (item {n})")

    @property
    def faults_enabled(self) -> bool:
        return bool(self._faults)

    # ---- threads ---------------------------------------------------------------------
    def spawn(self, name: str, target: Callable[[], None], *, start: bool = False) -> threading.Thread:
        """A daemon thread running ``target``, whose end outside ``stop()`` counts as a death."""

        def run() -> None:
            try:
                target()
            except BaseException as e:  # noqa: BLE001 - any end of a supervised thread is reported
                self._died(name, f"{type(e).__name__}: {_cut(str(e))}", e)
                return
            if not self._stopping.is_set():
                self._died(name, "returned while the daemon was running", None)

        t = threading.Thread(target=run, name=name, daemon=True)
        self._threads[name] = t
        if start:
            t.start()
        return t

    def adopt(self, name: str, thread: threading.Thread | None) -> None:
        """Watch a thread started by a library (checked by ``is_alive`` in ``dead()``)."""
        if thread is not None:
            self._threads[name] = thread

    def _died(self, name: str, why: str, exc: BaseException | None) -> None:
        with self._lock:
            self._dead[name] = why
        log.critical("thread %s died: %s; the daemon is unhealthy and will exit non-zero", name, why,
                     exc_info=exc if exc is not None and not isinstance(exc, ThreadKill) else None)
        if self.on_death is not None:
            try:
                self.on_death(name, why)
            except Exception:  # noqa: BLE001 - reporting a death must not raise
                log.exception("on_death handler failed")

    def dead(self) -> dict[str, str]:
        """Threads that ended while the daemon was running, with why."""
        out = dict(self._dead)
        if not self._stopping.is_set():
            for name, t in list(self._threads.items()):
                if t.ident is not None and not t.is_alive() and name not in out:
                    out[name] = "no longer running"
        return out

    def alive(self) -> dict[str, bool]:
        """Every watched thread and whether it runs."""
        return {name: t.is_alive() for name, t in list(self._threads.items())}

    def stopping(self) -> None:
        """From now on a thread's end is expected, not a death."""
        self._stopping.set()

    def counters(self) -> list[tuple[dict[str, str], int]]:
        """``edge_internal_errors_total`` samples: ``[({thread, kind}, n)]``."""
        with self._lock:
            return [({"thread": t, "kind": k}, n) for (t, k), n in self.errors.items()]


class SupervisorPart(Part):
    """The supervisor as a part of the daemon (``edge.parts.Part``): internal errors and
    threads' lives in the status and on ``/metrics``; no thread or stop phase of its own."""

    name = "supervisor"

    def __init__(self, sup: Supervisor):
        self.sup = sup

    def status(self) -> dict:
        return {"internal_errors": {f"{lb['thread']}/{lb['kind']}": n for lb, n in self.sup.counters()}}

    def families(self, reg) -> None:
        sup = self.sup
        reg.add("edge_internal_errors_total", "counter", "items skipped after an internal error, by thread and kind",
                sup.counters)
        reg.add("edge_thread_alive", "gauge", "1 while a supervised thread runs",
                lambda: [({"thread": k}, float(v)) for k, v in sup.alive().items()])


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    """Poll ``pred`` until true or ``timeout`` seconds pass; True when it became true."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True
