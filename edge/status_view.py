"""`edge status` as a table a person reads: pure, a status dict in, text out.

>>> print(render_status({"node": "n1", "model": "vibration@1.0.0", "head": "h3", "written": 100.0,
...     "backend": {"name": "onnxruntime", "precision": "int8"}, "health": {"ready": True, "dead_threads": {}},
...     "streams": {"m1/accel": {"rate_hz": 999.8, "samples": 5000, "windows": 19, "out_of_order": 0,
...                              "filled": 0, "gaps": 0, "flag": None}}}, now=101.0).splitlines()[0])
node n1 · model vibration@1.0.0 · backend onnxruntime int8 · head h3 · live
"""
from __future__ import annotations

import time
from typing import Any


def _cut(s: Any, n: int) -> str:
    s = str(s)
    return s if len(s) <= n else s[: n - 1] + "…"


def render_status(st: dict[str, Any], *, now: float | None = None, source: str = "") -> str:
    """The daemon's status as a few lines and a table of streams."""
    now = time.time() if now is None else now
    be = st.get("backend") or {}
    health = st.get("health") or {}
    dead = health.get("dead_threads") or {}
    state = "DEAD THREADS: " + ", ".join(dead) if dead else ("live" if health.get("ready") else "starting")
    lines = [f"node {st.get('node', '?')} · model {st.get('model', '?')} · backend {be.get('name', be.get('key', '?'))} "
             f"{be.get('precision', '')} · head {st.get('head', '?')} · {state}"]
    if st.get("backend_reason"):
        lines.append(f"backend choice: {_cut(st['backend_reason'], 160)}")
    if "written" in st:
        lines.append(f"as of {now - float(st['written']):.0f} s ago{f' ({source})' if source else ''}")
    h = health
    if "broker_connected" in h:
        lines.append(f"broker connected: {'yes' if h['broker_connected'] else 'NO'} · uptime {h.get('uptime_s', 0):.0f} s")
    p = st.get("pipeline") or {}
    if p:
        lines.append(f"windows served {p.get('windows_served', 0)} · published {p.get('published', 0)} · "
                     f"publish failed {p.get('publish_failed', 0) + p.get('publish_errors', 0)} · "
                     f"serve errors {p.get('serve_errors', 0)}")
    lanes = st.get("lanes") or {}
    if lanes:
        lines.append("lanes: " + " · ".join(f"{n} {v.get('depth_bytes', 0) // 1024} KiB queued, {v.get('dropped', 0)} dropped"
                                            f"{', ' + str(v['stale']) + ' stale' if v.get('stale') else ''}"
                                            for n, v in lanes.items()))
    streams = st.get("streams") or {}
    if streams:
        lines += ["", f"{'stream':<32} {'rate Hz':>9} {'samples':>10} {'windows':>8} {'out of order':>12} "
                      f"{'filled':>7} {'gaps':>5}  flag"]
        for name, s in sorted(streams.items()):
            lines.append(f"{_cut(name, 32):<32} {s.get('rate_hz', 0):>9.1f} {s.get('samples', 0):>10} "
                         f"{s.get('windows', 0):>8} {s.get('out_of_order', 0):>12} {s.get('filled', 0):>7} "
                         f"{s.get('gaps', 0):>5}  {s.get('flag') or '-'}")
    ad = st.get("adapt") or {}
    if ad:
        lines += ["", "learner: " + " · ".join(f"{k} {ad[k]}" for k in (
            "learner_champion_version", "learner_labels_total", "learner_promotions_total", "learner_refreshes_total",
            "learner_rollbacks_total", "learner_drifts_total") if k in ad)]
    bad = {**(st.get("bad_input") or {}), **(st.get("internal_errors") or {})}
    if bad:
        lines += ["", "recent errors (counts): " + ", ".join(f"{_cut(k, 40)} {v}" for k, v in sorted(bad.items()))]
    return "\n".join(lines)
