"""Where the daemon's status and metrics are read: ``status.json``, the status socket, the
``/metrics`` registry and the metrics server (``MetricsServer``: ``/metrics``, ``/healthz``,
``/readyz``, ``/status``). The parts bring the fields and families (``edge.parts``); this
module only serves them.

Runtime files live in the runtime folder (``edge.state.runtime_dir``: systemd's
``RuntimeDirectory``, a tmpfs), not the state folder: ``status.json`` is rewritten every
5 s, and in the state folder it cost 53 MB of flash a day.
"""
from __future__ import annotations

import logging
import os
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


def open_status_socket(cfg, status: Callable[[], dict]):
    """The 0600 status socket in the runtime folder, serving ``status()``; None (logged) when it
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


def metrics_registry(parts) -> Registry:
    """The node's metric families (README, "Metrics"): every part's (``Parts.families``),
    each part read through one snapshot per scrape, taken under its owner's lock."""
    reg = Registry(build_info=build_info())
    parts.families(reg)
    return reg


def metrics_server(cfg, registry: Registry, *, health, readiness, status) -> MetricsServer:
    """The metrics server; ``/status`` only when asked for: the port is open to every local
    user, the status socket is 0600."""
    m = cfg.metrics
    return MetricsServer(m.host, m.port, registry, health, ready=readiness,
                         status=status if m.status_endpoint else None)


def build_info() -> dict[str, str]:
    """Labels of ``edge_build_info``: the package version, Python and the machine."""
    import platform
    from importlib import metadata

    try:
        version = metadata.version("edge-runtime")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {"version": version, "python": platform.python_version(), "machine": platform.machine()}
