"""The container's health check: healthy means serving, not merely alive.

It reads the same config ``edge run`` reads (``$EDGE_CONFIG``, the image sets it) and asks
the daemon the way that config allows:

* ``[metrics] port`` set (the image's example config: 9108): ``GET /readyz`` on that port,
  200 when the model is loaded, every connection is up and no source that was flowing
  went silent (README, "Metrics");
* ``[metrics] port = 0`` (the default: no HTTP at all): the status socket in the runtime
  folder, the one ``edge status`` reads; healthy when the daemon has started serving, no
  thread died and it is connected to the broker.

Exit 0 healthy, 1 not (with the daemon's reason on stdout, which ``podman/docker inspect``
show), 2 when the config cannot be read.
"""
from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request

DEFAULT_CONFIG = "/etc/edge-runtime/edge.toml"


def readyz_url(host: str, port: int) -> str:
    """The daemon's ``/readyz`` as seen from inside its own network namespace.

    >>> readyz_url("0.0.0.0", 9108), readyz_url("::", 1), readyz_url("10.0.0.5", 2)
    ('http://127.0.0.1:9108/readyz', 'http://[::1]:1/readyz', 'http://10.0.0.5:2/readyz')
    """
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}/readyz" if ":" in host else f"http://{host}:{port}/readyz"


def check_http(url: str) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=4) as r:
            return r.status == 200, r.read(2000).decode(errors="replace")
    except urllib.error.HTTPError as e:  # 503: not ready, and the body says why
        return False, f"{url}: {e.code} {e.read(2000).decode(errors='replace')}"
    except OSError as e:
        return False, f"{url}: {e}"


def check_socket(cfg) -> tuple[bool, str]:
    from edge.control import read_status
    from edge.state import runtime_dirs

    errors = []
    for d in dict.fromkeys(runtime_dirs(cfg)):
        try:
            health = read_status(d / "edge.sock", timeout=4).get("health", {})
        except (OSError, ValueError) as e:
            errors.append(f"{d / 'edge.sock'}: {e}")
            continue
        ok = bool(health.get("ready")) and bool(health.get("broker_connected")) and not health.get("dead_threads")
        return ok, json.dumps(health, default=str)
    return False, "no daemon answers: " + "; ".join(errors)


def main() -> int:
    from edge.config import load_config
    from edge.errors import EdgeError

    path = os.environ.get("EDGE_CONFIG") or DEFAULT_CONFIG
    try:
        cfg = load_config(path)
    except (EdgeError, OSError) as e:
        print(f"healthcheck: cannot read {path}: {e}")
        return 2
    ok, why = check_http(readyz_url(cfg.metrics.host, cfg.metrics.port)) if cfg.metrics.port else check_socket(cfg)
    print(why[:2000])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
