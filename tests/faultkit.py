"""Helpers of the fault suite (tests/test_faults_*.py): a daemon in-process or as an
`edge run` subprocess against the test broker, its /metrics and /healthz, a probe stream
that proves serving goes on, and a systemd notify socket to listen on.

Everything here polls with generous timeouts; nothing compares wall-clock time with a
limit (the suite runs on a busy 2-core box).
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from edge.broker import free_port
from edge.config import parse_config
from edge.daemon import Daemon
from tests.helpers import Client, batch, poll  # noqa: F401  (poll: re-exported for the fault tests)

ROOT = Path(__file__).resolve().parent.parent
WINDOW = 256  # the shipped vibration model's window (samples)


def config_doc(broker, tmp: Path, *, node: str, metrics_port: int = 0, adapt: bool = False, **sections) -> dict:
    """A daemon config for the test broker; the compile cache is shared by the whole session."""
    doc: dict = {"node": {"name": node, "state_dir": str(tmp / "state")},
                 "mqtt": {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.1, "reconnect_max_s": 0.5},
                 "model": {"cache_dir": str(shared_cache(tmp))},
                 "adapt": {"enabled": adapt}}
    if metrics_port:
        doc["metrics"] = {"port": metrics_port}
    for k, v in sections.items():
        doc[k] = {**doc.get(k, {}), **v} if isinstance(v, dict) else v
    return doc


def shared_cache(tmp: Path) -> Path:
    """One compile cache for every daemon of the session (compiling is the slow part of a start)."""
    base = tmp
    while base.parent != base and not base.name.startswith("pytest-"):
        base = base.parent
    return (base if base.name.startswith("pytest-") else tmp) / "fault-cache"


def start_daemon(broker, tmp: Path, *, node: str, metrics: bool = True, faults: str | None = None,
                 **sections) -> Daemon:
    """An in-process daemon, started and connected. ``faults`` is an EDGE_FAULTS spec."""
    from edge.supervise import Supervisor

    port = free_port() if metrics else 0
    d = Daemon(parse_config(config_doc(broker, tmp, node=node, metrics_port=port, **sections)))
    if faults is not None:
        d.supervisor = Supervisor(on_death=d._thread_died, faults=faults)
    d.start(connect_timeout=15)
    d.metrics_port = port
    return d


# ---- observing --------------------------------------------------------------------------
def http_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def healthz(port: int) -> int:
    return http_get(port, "/healthz")[0]


def scrape(port: int) -> str:
    code, body = http_get(port, "/metrics")
    assert code == 200, code
    return body.decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(4))
    return total



class Probe:
    """A good stream on its own device: each ``check()`` publishes one window and waits for its
    prediction, which proves the daemon still serves."""

    def __init__(self, broker, node: str, device: str = "probe", stream: str = "accel"):
        self.node, self.device, self.stream = node, device, stream
        self.topic = f"sensors/{device}/{stream}"
        self.out = f"edge/{node}/predictions/{device}/{stream}"
        self.c = Client(broker, self.out)
        self.n = 0
        self.t = time.time()

    def check(self, timeout: float = 60.0) -> dict:
        self.n += 1
        want = self.n
        # consecutive windows, so the stream never gaps, restarts or goes out of order
        self.c.publish(self.topic, batch(self.t, WINDOW))
        self.t += WINDOW * 0.001
        self.c.wait_for(lambda m: sum(1 for t, _, _ in m if t == self.out) >= want, timeout=timeout)
        return self.c.json_on(self.out)[-1]

    def close(self) -> None:
        self.c.close()


# ---- `edge run` as a process ------------------------------------------------------------
def toml(doc: dict) -> str:
    """A tiny TOML writer for flat sections of str/int/float/bool (enough for test configs)."""
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
    out = []
    for sec, body in doc.items():
        out.append(f"[{sec}]")
        out += [f"{k} = {val(v)}" for k, v in body.items()]
    return "\n".join(out) + "\n"


class EdgeRun:
    """`python -m edge.cli run --config ...` with its stderr in a log file; a None in ``env``
    removes that variable from the environment the process inherits."""

    def __init__(self, broker, tmp: Path, *, node: str, env: dict | None = None, metrics: bool = True, **sections):
        self.port = free_port() if metrics else 0
        self.tmp = tmp
        self.cfg = tmp / f"{node}.toml"
        self.cfg.write_text(toml(config_doc(broker, tmp, node=node, metrics_port=self.port, **sections)))
        self.log = tmp / f"{node}.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", "--config", str(self.cfg)],
                                     stderr=open(self.log, "wb"), stdout=subprocess.DEVNULL,
                                     env={k: v for k, v in {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}.items()
                                          if v is not None})

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_healthy(self, timeout: float = 90.0) -> None:
        def ok():
            assert self.proc.poll() is None, f"edge run exited {self.proc.returncode}: {self.log_text()[-3000:]}"
            try:
                return healthz(self.port) == 200
            except OSError:
                return False
        poll(ok, timeout, 0.2, "edge run to become healthy")

    def rss_bytes(self) -> int:
        """VmRSS of the process, from /proc."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class NotifySocket:
    """A real AF_UNIX datagram socket for NOTIFY_SOCKET; records (monotonic time, message)."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.s.bind(self.path)
        self.s.settimeout(0.2)
        self.msgs: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.s.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            self.msgs.append((time.monotonic(), data.decode(errors="replace")))

    def lines(self) -> list[str]:
        """Every message's lines, in arrival order (``READY=1``, ``WATCHDOG=1``, ...)."""
        return [ln for _, m in list(self.msgs) for ln in m.splitlines()]

    def close(self) -> None:
        self._stop.set()
        self.thread.join(2)
        self.s.close()
