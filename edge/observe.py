"""Logging, rate-limited warnings, Prometheus metrics and the health and readiness endpoints.

Metrics are collected, not pushed: each part keeps plain counters and the registry (a
prometheus-client collector) reads them when ``/metrics`` is scraped, so the hot path
never touches a lock for metrics. A part that another thread owns is read through one
snapshot per scrape (``Registry.source``), taken under its owner's lock, and every family
of that part is cut from the same snapshot. The families a part exports are declared in
tables here (``LANE_FAMILIES``, ``ADAPT_FAMILIES``, ``SYNC_FAMILIES``), not derived from
whatever keys a dict holds, so they exist from the start and the README can list them.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

Sample = tuple[dict[str, str], float]


# Libraries that log their inner workings at INFO (the ONNX exporter's passes, ORT's
# quantizer): an operator sees their warnings, their INFO lines only at debug level.
CHATTY_LOGGERS = ("onnx_ir", "onnxscript", "onnxruntime", "torch.onnx", "torch.export", "torch._export", "torch._dynamo")


# syslog priorities in sd-daemon(3)'s "<N>" line prefix: journald stores them as the
# entry's PRIORITY, so `journalctl -p warning` works, and prints no timestamps of ours
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


class JournalFormatter(logging.Formatter):
    """``<N>logger: message`` for stderr connected to journald (systemd sets ``JOURNAL_STREAM``).

    >>> JournalFormatter().format(logging.LogRecord("edge.x", logging.WARNING, "", 0, "disk full", None, None))
    '<4>edge.x: disk full'
    """

    def format(self, record: logging.LogRecord) -> str:
        p = _PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        text = f"{record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return "\n".join(f"<{p}>{line}" for line in text.splitlines())


def setup_logging(level: str = "info") -> None:
    """One-line logs on stderr, plain text (no colour codes, whatever the terminal). Under
    systemd with journald (``JOURNAL_STREAM`` set) each line carries its syslog priority
    as ``<N>`` and no timestamp (journald adds its own)."""
    lvl = getattr(logging, level.upper())
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(level=lvl, handlers=[handler], force=True)
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
    """Metric families whose values are read from callables at scrape time, on prometheus-client.

    Each ``add`` is one family of one type (``counter`` or ``gauge``); ``read`` returns a
    number or ``[(labels, value), ...]``. prometheus-client renders the exposition format;
    the registry adds the ``process_*`` and ``python_*`` collectors and ``edge_build_info``.

    >>> reg = Registry(process=False)
    >>> reg.add("edge_things_total", "counter", "things seen", lambda: [({"kind": "a"}, 3)])
    >>> [line for line in reg.render().splitlines() if line.startswith("edge_things")]
    ['edge_things_total{kind="a"} 3.0']
    """

    def __init__(self, *, process: bool = True, build_info: dict[str, str] | None = None) -> None:
        from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

        self.registry = CollectorRegistry(auto_describe=False)
        self._families: list[tuple[str, str, str, Callable, str | None]] = []
        self._sources: dict[str, Callable[[], object]] = {}
        self._hists: list = []
        self._failed: dict[str, int] = {}
        if process:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        self._build_info = build_info
        self.registry.register(self)

    def source(self, name: str, read: Callable[[], object]) -> None:
        """A snapshot that families read from: ``read()`` runs once per scrape, at the first
        family that needs it, and every family of ``source=name`` gets the same value."""
        self._sources[name] = read

    def add(self, name: str, kind: str, help_text: str, read: Callable[..., list[Sample] | float], *,
            source: str | tuple[str, ...] | None = None) -> None:
        """Register a family; ``read`` returns a number or ``[(labels, value), ...]``; with
        ``source``, ``read(snapshot)`` gets that source's snapshot of this scrape (with a
        tuple of sources, ``read(*snapshots)``: a family that several parts feed, such as
        the lanes)."""
        if kind not in ("counter", "gauge"):
            raise ValueError(f"metric {name}: kind {kind!r} (counter or gauge)")
        if kind == "counter" and not name.endswith("_total"):
            raise ValueError(f"metric {name}: a counter's name ends in _total")
        sources = () if source is None else (source,) if isinstance(source, str) else tuple(source)
        for src in sources:
            if src not in self._sources:
                raise ValueError(f"metric {name}: unknown source {src!r} (register it with Registry.source first)")
        self._families.append((name, kind, help_text, read, source if source is None or isinstance(source, str)
                               else sources))

    def families(self) -> list[tuple[str, str, str]]:
        """``(name, type, help)`` of every family registered (histograms too), in order."""
        return [(n, k, h) for n, k, h, *_ in self._families] + [(n, "histogram", h) for n, h, _ in self._hists]

    def add_histogram(self, name: str, help_text: str,
                      read: Callable[[], list[tuple[dict[str, str], list[tuple[float | str, int]], float, int]]]) -> None:
        """Register a histogram; ``read`` returns ``[(labels, cumulative buckets [(le, n)], sum, count)]``."""
        self._hists.append((name, help_text, read))

    def collect(self):
        """prometheus-client's collector protocol: every family, read now."""
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                            InfoMetricFamily)

        if self._build_info:
            info = InfoMetricFamily("edge_build", "edge-runtime version and platform")
            info.add_metric([], self._build_info)
            yield info
        snaps: dict[str, object] = {}  # one snapshot per source per scrape
        for name, kind, help_text, read, src in self._families:
            try:
                if src is None:
                    val = read()
                elif isinstance(src, str):
                    val = read(self._snapshot(src, snaps))
                else:
                    val = read(*(self._snapshot(s, snaps) for s in src))
                samples = [({}, val)] if isinstance(val, (int, float)) else list(val)
            except Exception:  # a broken reader must not break the scrape; it is counted instead
                self._failed[name] = self._failed.get(name, 0) + 1
                continue
            keys = sorted({k for labels, _ in samples for k in labels})
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            fam = cls(name[:-6] if kind == "counter" and name.endswith("_total") else name, help_text, labels=keys)
            for labels, v in samples:
                fam.add_metric([str(labels.get(k, "")) for k in keys], float(v))
            yield fam
        for name, help_text, read in self._hists:
            try:
                series = list(read())
            except Exception:
                self._failed[name] = self._failed.get(name, 0) + 1
                continue
            keys = sorted({k for labels, *_ in series for k in labels})
            fam = HistogramMetricFamily(name, help_text, labels=keys)
            for labels, buckets, total, _count in series:
                fam.add_metric([str(labels.get(k, "")) for k in keys],
                               [("+Inf" if le in ("+Inf", float("inf")) else repr(float(le)), n) for le, n in buckets],
                               sum_value=total)
            yield fam
        fail = CounterMetricFamily("edge_metric_read_errors", "metric families whose reader failed at a scrape",
                                   labels=["family"])
        for name, n in self._failed.items():
            fail.add_metric([name], n)
        yield fail

    def _snapshot(self, src: str, snaps: dict[str, object]) -> object:
        """Source ``src``'s snapshot of this scrape: read at the first family that needs it."""
        if src not in snaps:
            snaps[src] = self._sources[src]()
        return snaps[src]

    def render(self) -> str:
        """The Prometheus text exposition format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()


def hist_series(labels: dict[str, str], snap: dict) -> tuple:
    """One series of ``Registry.add_histogram`` out of a ``LatencyHistogram.snapshot()``."""
    return labels, snap["buckets"], snap["sum_s"], snap["count"]


class MetricsServer:
    """HTTP on a thread: ``/metrics`` (Prometheus), ``/healthz`` (liveness), ``/readyz``
    (readiness) and ``/status`` (what `edge status` shows, as JSON).

    ``/healthz`` and ``/readyz`` answer 200 or 503 with a JSON body saying why, which is
    what load balancers, Kubernetes probes and container health checks understand:
    liveness fails when a thread died (restart me), readiness while the model is not
    loaded or a source is not connected (do not count on me now).
    """

    def __init__(self, host: str, port: int, registry: Registry, health: Callable[[], tuple[bool, dict]],
                 ready: Callable[[], tuple[bool, dict]] | None = None, status: Callable[[], dict] | None = None):
        import json

        from prometheus_client import CONTENT_TYPE_LATEST

        reg, hl = registry, health
        rd = ready or health

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                try:
                    if path == "/metrics":
                        body, code, ctype = reg.render().encode(), 200, CONTENT_TYPE_LATEST
                    elif path in ("/healthz", "/readyz"):
                        ok, info = (hl if path == "/healthz" else rd)()
                        body, code, ctype = json.dumps(info, default=str).encode(), (200 if ok else 503), "application/json"
                    elif path == "/status" and status is not None:
                        body, code, ctype = json.dumps(status(), default=str).encode(), 200, "application/json"
                    else:
                        body, code, ctype = b"not found\n", 404, "text/plain"
                except Exception as e:  # a failing reader answers 500, never kills the server thread
                    body, code, ctype = f"internal error: {type(e).__name__}\n".encode(), 500, "text/plain"
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


#: Fleet sync on /metrics (the daemon's registry), declared here, not from what ``SyncClient.metrics()`` holds when the
#: registry is built (its counters appear only once they are non-zero): (family, kind, help,
#: label, {label value: metrics() key}). A dict-valued key gives one series per entry instead.
SYNC_FAMILIES = (
    ("edge_fleet_sync_deltas_total", "counter", "fleet sync: deltas, by what became of them", "outcome",
     {"prepared": "sync_prepared", "skipped": "sync_skipped", "checkpoint_failed": "sync_checkpoint_failed",
      "published": "sync_published", "publish_failed": "sync_publish_failed", "publish_refused": "sync_publish_refused",
      "acked": "sync_acked", "resent_unreceipted": "sync_resent_unreceipted", "returned": "sync_returned",
      "returned_then_accepted": "sync_returned_then_accepted", "evicted_unreceipted": "sync_unreceipted_evicted"}),
    ("edge_fleet_sync_clipped_total", "counter", "fleet sync: deltas sent as a smaller (clipped) step", None,
     "sync_clipped"),
    ("edge_fleet_sync_receipts_total", "counter", "fleet sync: receipts from the server, by outcome", "outcome",
     {"handled": "sync_receipts", "accepted": "sync_receipts_accepted", "bad": "sync_receipts_bad",
      "misaddressed": "sync_receipts_misaddressed", "unmatched": "sync_receipts_unmatched"}),
    ("edge_fleet_sync_receipts_refused_total", "counter", "fleet sync: this device's deltas the server refused, by reason",
     "reason", "sync_receipts_refused"),
    ("edge_fleet_sync_globals_total", "counter", "fleet sync: global heads received, by outcome", "outcome",
     {"rebased": "sync_rebased", "not_newer": "sync_globals_not_newer"}),
    ("edge_fleet_sync_globals_refused_total", "counter", "fleet sync: global heads this device refused, by reason",
     "reason", "sync_refused"),
    ("edge_fleet_sync_head_requests_total", "counter", "fleet sync: requests for the server's latest head", None,
     "sync_requests"),
    ("edge_fleet_sync_epoch_changes_total", "counter", "fleet sync: new store epochs of the server followed", None,
     "sync_epoch_changes"),
    ("edge_fleet_sync_seq_resumed_total", "counter", "fleet sync: seq moved past the server's stored seq", None,
     "sync_seq_resumed"),
    ("edge_fleet_sync_errors_total", "counter", "fleet sync: rounds or steps that failed (logged)", None, "sync_errors"),
    ("edge_fleet_sync_base_version", "gauge", "fleet sync: the global version the head is based on", None,
     "sync_base_version"),
    ("edge_fleet_sync_seq", "gauge", "fleet sync: sequence number of the last delta prepared", None, "sync_seq"),
    ("edge_fleet_sync_outbox", "gauge", "fleet sync: 1 while a delta waits to be handed to the broker", None,
     "sync_outbox"),
    ("edge_fleet_sync_unreceipted", "gauge", "fleet sync: deltas sent and not yet receipted", None, "sync_unreceipted"),
    ("edge_fleet_sync_step_cap", "gauge", "fleet sync: L2 cap of a step after norm_too_large (0: none)", None,
     "sync_step_cap"),
    ("edge_fleet_sync_want_head", "gauge", "fleet sync: 1 while the device asks for the latest head", None,
     "sync_want_head"),
    ("edge_fleet_sync_server_latest_version", "gauge", "fleet sync: the server's latest version (last receipt)", None,
     "sync_server_latest_version"),
    ("edge_fleet_sync_server_stored_seq", "gauge", "fleet sync: this device's highest seq the server stores", None,
     "sync_server_stored_seq"),
    ("edge_fleet_sync_epoch", "gauge", "fleet sync: the server's store epoch (first 8 hex digits as a number)", None,
     "sync_epoch"),
)


def sync_samples(spec, m: dict, *, absent: float | None = 0.0) -> list:
    """The series of one ``SYNC_FAMILIES`` (or ``ADAPT_FAMILIES``) entry from a ``metrics()``
    dict; ``absent`` where a key is missing (``None``: no series for it).

    >>> sync_samples(SYNC_FAMILIES[0], {"sync_acked": 2})[:2]
    [({'outcome': 'prepared'}, 0.0), ({'outcome': 'skipped'}, 0.0)]
    >>> sync_samples(SYNC_FAMILIES[3], {"sync_receipts_refused": {"norm_too_large": 1}})
    [({'reason': 'norm_too_large'}, 1.0)]
    >>> sync_samples(SYNC_FAMILIES[1], {})
    [({}, 0.0)]
    """
    _, _, _, label, keys = spec
    if isinstance(keys, dict):
        return [({label: value}, _num(m.get(key), absent)) for value, key in keys.items()
                if absent is not None or key in m]
    v = m.get(keys)
    if isinstance(v, dict):
        return [({label: str(k)}, _num(n)) for k, n in sorted(v.items())]
    return [({}, _num(v, absent))] if absent is not None or keys in m else []


def sync_keys() -> set[str]:
    """Every ``metrics()`` key ``SYNC_FAMILIES`` exports (a test holds the client's keys to it)."""
    return {k for *_, keys in SYNC_FAMILIES for k in (keys.values() if isinstance(keys, dict) else [keys])}


def add_sync_families(reg: Registry, read) -> None:
    """Every ``SYNC_FAMILIES`` family, cut from one ``read()`` (``SyncClient.metrics``) per scrape."""
    reg.source("sync", read)
    for spec in SYNC_FAMILIES:
        reg.add(spec[0], spec[1], spec[2], lambda m, spec=spec: sync_samples(spec, m), source="sync")


def _num(v, absent: float | None = 0.0) -> float:
    if isinstance(v, (bool, int, float)):
        return float(v) if v == v or absent is None else 0.0  # NaN: a gauge without data yet
    return 0.0 if absent is None else absent

