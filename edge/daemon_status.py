"""Where the daemon's status and metrics are read: ``status.json``, the status socket, the
``/metrics`` registry and the metrics server (``MetricsServer``: ``/metrics``, ``/healthz``,
``/readyz``, ``/status``), and systemd's notify socket. The parts bring the fields and
families (``edge.parts``); this module only serves them.

Runtime files live in the runtime folder (``edge.state.runtime_dir``: systemd's
``RuntimeDirectory``, a tmpfs), not the state folder: ``status.json`` is rewritten every
5 s, and in the state folder it cost 53 MB of flash a day.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any, Callable

import orjson

from edge.observe import MetricsServer, Registry

log = logging.getLogger("edge.daemon")


def write_status_file(cfg, status: dict[str, Any]) -> None:
    """Write ``status.json`` (atomically, mode 0600) for `edge status` when the socket is gone."""
    from edge.state import private_dir, runtime_dir

    d = runtime_dir(cfg)
    try:
        private_dir(d)
        tmp = d / "status.json.tmp"
        data = orjson.dumps({"written": time.time(), **status}, default=str,
                            option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o600)  # an older file may have had wider permissions
        os.replace(tmp, d / "status.json")
    except (OSError, TypeError) as e:
        log.warning("cannot write %s: %s", d / "status.json", e)


def sd_notify(message: str) -> bool:
    """Tell systemd (Type=notify) about readiness/watchdog; a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(message.encode(), addr)
        return True
    except OSError as e:
        log.warning("systemd notify failed: %s", e)
        return False


def metrics_registry(parts) -> Registry:
    """The node's metric families (README, "Metrics"): every part's (``Parts.families``),
    each part read through one snapshot per scrape, taken under its owner's lock."""
    reg = Registry(build_info=build_info())
    parts.families(reg)
    return reg


class Endpoints:
    """The metrics server (with ``[metrics] port``) and the 0600 status socket: started once
    every part runs, stopped once every part has stopped."""

    def __init__(self) -> None:
        self.metrics_server: MetricsServer | None = None
        self.status_socket = None

    def start(self, cfg, registry: Callable[[], Registry], supervisor, *, health, readiness,
              status: Callable[[], dict]) -> None:
        m = cfg.metrics
        if m.port:
            # /status only when asked for: the port is open to every local user, the status socket is 0600
            self.metrics_server = MetricsServer(m.host, m.port, registry(), health, ready=readiness,
                                                status=status if m.status_endpoint else None)
            self.metrics_server.start()
            supervisor.adopt("metrics", self.metrics_server.thread)
            log.info("metrics on http://%s:%d/metrics", m.host, self.metrics_server.port)
        self.status_socket = open_status_socket(cfg, status)
        if self.status_socket is not None:
            self.status_socket.start()
            supervisor.adopt("control", self.status_socket.thread)

    def stop(self) -> None:
        for endpoint in (self.metrics_server, self.status_socket):
            if endpoint is not None:
                endpoint.stop()


def open_status_socket(cfg, status: Callable[[], dict]):
    """The status socket in the runtime folder, serving ``status()``; None (logged) when it
    cannot be made (e.g. a path longer than a Unix socket allows: `edge status` falls back to
    ``status.json``)."""
    from edge.control import StatusSocket
    from edge.state import private_dir, runtime_dir

    path = runtime_dir(cfg) / "edge.sock"  # a RAM folder: see write_status_file
    try:
        private_dir(path.parent)
        return StatusSocket(path, status)
    except OSError as e:
        log.warning("no status socket at %s (%s); `edge status` will read status.json", path, e)
        return None


def build_info() -> dict[str, str]:
    """Labels of ``edge_build_info``: the package version, Python and the machine."""
    import platform
    from importlib import metadata

    try:
        version = metadata.version("edge-runtime")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {"version": version, "python": platform.python_version(), "machine": platform.machine()}
