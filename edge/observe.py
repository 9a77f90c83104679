"""Logging, rate-limited warnings, Prometheus metrics and the health endpoint.

Metrics are collected, not pushed: each part keeps plain counters and the registry reads
them when ``/metrics`` is scraped, so the hot path never touches a lock for metrics.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

Sample = tuple[dict[str, str], float]


# Libraries that log their inner workings at INFO (the ONNX exporter's passes, ORT's
# quantizer): an operator sees their warnings, their INFO lines only at debug level.
CHATTY_LOGGERS = ("onnx_ir", "onnxscript", "onnxruntime", "torch.onnx", "torch.export", "torch._export", "torch._dynamo")


def setup_logging(level: str = "info") -> None:
    """Plain one-line logs on stderr (journald adds its own timestamps under systemd)."""
    fmt = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    lvl = getattr(logging, level.upper())
    logging.basicConfig(level=lvl, format=fmt, stream=sys.stderr, force=True)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if lvl <= logging.DEBUG else max(lvl, logging.WARNING))


class RateLimitedLog:
    """Log each kind of problem once, then at most once per ``interval`` with a count.

    A stream of garbage must not become a stream of log lines; the counters say how much.
    """

    def __init__(self, logger: logging.Logger, *, interval: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.logger, self.interval, self.clock = logger, interval, clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, kind: str, msg: str, *args) -> bool:
        """Log ``msg`` under ``kind`` unless one was logged within ``interval``; True when logged."""
        now = self.clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return False
        n = self._suppressed.pop(kind, 0)
        self._last[kind] = now
        suffix = f" ({n} more like this since the last report)" if n else ""
        self.logger.warning(msg + suffix, *args)
        return True


class Registry:
    """Named metric families whose values are read from callables at scrape time."""

    def __init__(self) -> None:
        self._families: list[tuple[str, str, str, Callable[[], list[Sample]]]] = []
        self._hists: list = []

    def add(self, name: str, kind: str, help_text: str, read: Callable[[], list[Sample] | float]) -> None:
        """Register a family; ``read`` returns a number or ``[(labels, value), ...]``."""
        self._families.append((name, kind, help_text, read))

    def add_histogram(self, name: str, help_text: str,
                      read: Callable[[], list[tuple[dict[str, str], list[tuple[float | str, int]], float, int]]]) -> None:
        """Register a histogram; ``read`` returns ``[(labels, cumulative buckets [(le, n)], sum, count)]``."""
        self._hists.append((name, help_text, read))

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        out = self._render_families()
        for name, help_text, read in self._hists:
            try:
                series = read()
            except Exception as e:  # a broken reader must not break the scrape
                out.append(f"# {name}: read failed: {type(e).__name__}")
                continue
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
            for labels, buckets, total, count in series:
                for le, n in buckets:
                    le_s = "+Inf" if le in ("+Inf", float("inf")) else f"{float(le):g}"
                    out.append(f"{name}_bucket{{{_labels({**labels, 'le': le_s})}}} {n}")
                lab = _labels(labels)
                out.append(f"{name}_sum{{{lab}}} {total:g}" if lab else f"{name}_sum {total:g}")
                out.append(f"{name}_count{{{lab}}} {count}" if lab else f"{name}_count {count}")
        return "\n".join(out) + "\n"

    def _render_families(self) -> list[str]:
        out = []
        for name, kind, help_text, read in self._families:
            try:
                val = read()
            except Exception as e:  # a broken reader must not break the scrape
                out.append(f"# {name}: read failed: {type(e).__name__}")
                continue
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            samples = [({}, val)] if isinstance(val, (int, float)) else val
            for labels, v in samples:
                lab = _labels(labels)
                out.append(f"{name}{{{lab}}} {float(v):g}" if lab else f"{name} {float(v):g}")
        return out


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f'{k}="{_esc(str(x))}"' for k, x in sorted(labels.items()))


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class MetricsServer:
    """``/metrics`` (Prometheus) and ``/healthz`` (200 when ready, 503 otherwise) on a thread."""

    def __init__(self, host: str, port: int, registry: Registry, health: Callable[[], tuple[bool, dict]]):
        import json

        reg, hl = registry, health

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                if self.path.startswith("/metrics"):
                    body, code, ctype = reg.render().encode(), 200, "text/plain; version=0.0.4"
                elif self.path.startswith("/healthz"):
                    ok, info = hl()
                    body, code, ctype = json.dumps(info).encode(), (200 if ok else 503), "application/json"
                else:
                    body, code, ctype = b"not found\n", 404, "text/plain"
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
