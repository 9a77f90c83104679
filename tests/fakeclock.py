"""libfaketime around the whole test run: what it breaks in Python, and the harness's repair.

``faketime -f "-1h" python -m pytest`` preloads libfaketime into pytest and into everything it
starts (mosquitto, ``edge run``), and by default fakes CLOCK_MONOTONIC as well as the wall
clock (to about Unix time). libfaketime 0.9.10 intercepts ``clock_gettime`` but not
``sem_clockwait``, which CPython (3.11 on glibc 2.30 or later) uses for every timed lock
wait: the deadline is computed on the faked monotonic clock and waited for on the kernel's,
decades earlier, so ``Event.wait(t)``, ``Condition.wait(t)``, ``Queue.get(timeout=t)``,
``Thread.join(t)`` and ``Lock.acquire(timeout=t)`` never time out. A wait that something
else ends still returns; one that only its timeout ends (a reconnect backoff, a periodic
checkpoint, a watchdog tick) hangs for ever. No clock of the product is wrong there: the
process cannot measure a wait at all (issue 19, ``test_broker_restart_resumes_stream``: the
ingest connection's backoff never ended, so it never reconnected).

The repair, for the harness only: a shim preloaded before libfaketime whose ``sem_clockwait``
moves the deadline from the faked clock to the kernel's. ``ensure_timed_waits()`` (called by
``tests/conftest.py``'s ``pytest_configure``, before any test) probes a timed wait when libfaketime is preloaded,
and when it hangs re-executes the test run once with the shim in ``LD_PRELOAD``, which every
process the tests start inherits. Without a C compiler it stops the run with what to do.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

_ENV = "EDGE_TESTS_SEMFIX"  # set in the re-executed run: the shim is in LD_PRELOAD already

SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <semaphore.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* sem_clockwait with the deadline moved from the (faked) clock the caller read to the kernel's */
int sem_clockwait(sem_t *sem, clockid_t clock, const struct timespec *abstime) {
    static int (*next)(sem_t *, clockid_t, const struct timespec *);
    struct timespec faked, real, when;
    long long ns;
    if (!next)
        next = (int (*)(sem_t *, clockid_t, const struct timespec *))dlsym(RTLD_NEXT, "sem_clockwait");
    clock_gettime(clock, &faked);
    syscall(SYS_clock_gettime, clock, &real);
    ns = (long long)(abstime->tv_sec - faked.tv_sec) * 1000000000LL + (abstime->tv_nsec - faked.tv_nsec);
    if (ns < 0)
        ns = 0;
    ns += real.tv_nsec;
    when.tv_sec = real.tv_sec + ns / 1000000000LL;
    when.tv_nsec = ns % 1000000000LL;
    return next(sem, clock, &when);
}
"""


def under_faketime() -> bool:
    return "faketime" in os.environ.get("LD_PRELOAD", "")


def timed_waits_hang(probe_s: float = 2.0) -> bool:
    """Whether a 1 ms timed lock wait fails to return within ``probe_s`` (measured with
    ``time.sleep``, which libfaketime handles)."""
    done = []
    lock = threading.Lock()
    lock.acquire()

    def probe():
        lock.acquire(timeout=0.001)
        done.append(True)

    threading.Thread(target=probe, name="timed-wait-probe", daemon=True).start()
    for _ in range(int(probe_s / 0.01)):
        if done:
            return False
        time.sleep(0.01)
    return not done


def build_shim() -> Path:
    """The shim's shared object, built once per source in the temp folder."""
    digest = hashlib.sha256(SHIM.encode()).hexdigest()[:12]
    so = Path(tempfile.gettempdir()) / f"edge-tests-semfix-{digest}.so"
    if so.exists():
        return so
    work = Path(tempfile.mkdtemp(prefix="edge-semfix-"))
    (work / "semfix.c").write_text(SHIM)
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(work / "semfix.so"), str(work / "semfix.c"), "-ldl"],
                   check=True, capture_output=True)
    os.replace(work / "semfix.so", so)  # whole: a concurrent run never loads half a file
    shutil.rmtree(work, ignore_errors=True)
    return so


def ensure_timed_waits(config) -> None:
    """Under libfaketime with timed waits that hang, re-execute this run with the shim (once);
    from ``pytest_configure``, with pytest's capture of the standard streams suspended first
    (the new process inherits the file descriptors)."""
    if not under_faketime() or not timed_waits_hang():
        return
    if os.environ.get(_ENV):
        raise SystemExit(f"timed waits still hang under libfaketime with {os.environ[_ENV]} preloaded; "
                         "run with FAKETIME_DONT_FAKE_MONOTONIC=1 (as NTP: the monotonic clock is never stepped)")
    if not shutil.which("cc"):
        raise SystemExit("libfaketime fakes the monotonic clock here, and this Python's timed waits then never "
                         "time out (sem_clockwait is not intercepted); install a C compiler (apt-get install gcc) "
                         "for the harness's shim, or run with FAKETIME_DONT_FAKE_MONOTONIC=1")
    so = build_shim()
    env = {**os.environ, _ENV: str(so), "LD_PRELOAD": f"{so}:{os.environ['LD_PRELOAD']}"}
    sys.stderr.write(f"tests/fakeclock.py: libfaketime's monotonic clock makes timed waits hang; "
                     f"re-running with {so} preloaded\n")
    sys.stderr.flush()
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.suspend_global_capture(in_=True)
    os.execve(sys.executable, sys.orig_argv, env)
