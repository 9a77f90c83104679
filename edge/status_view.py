"""`edge status` as a table a person reads: pure, a status dict in, text out.

The header says ``live`` only when the status came from the running daemon's socket
(``live=True``); a status read back from the file a stopped (or hung) daemon left says
``STALE`` with its age, whatever its ``ready`` flag held then.

>>> st = {"node": "n1", "model": "vibration@1.0.0", "head": "h3", "written": 100.0,
...       "backend": {"backend": "onnxruntime", "precision": "int8"}, "health": {"ready": True, "dead_threads": {}},
...       "streams": {"m1/accel": {"rate_hz": 999.8, "samples": 5000, "windows": 19, "out_of_order": 0,
...                                "filled": 0, "gaps": 0, "flag": None}},
...       "adapt": {"learner_champion_version": "h3", "learner_labels_total": 12, "learner_promotions_total": 1}}
>>> print(render_status(st, now=101.0).splitlines()[0])
node n1 · model vibration@1.0.0 · backend onnxruntime int8 · head h3 · live
>>> print(render_status(st, now=400.0, live=False).splitlines()[0])
node n1 · model vibration@1.0.0 · backend onnxruntime int8 · head h3 · STALE (written 300 s ago; no daemon answers)
>>> print([l for l in render_status(st, now=101.0).splitlines() if l.startswith("learner")][0])
learner: serving head h3 · labels taken 12 · promotions 1
"""
from __future__ import annotations

import time
from typing import Any


def _cut(s: Any, n: int) -> str:
    s = str(s)
    return s if len(s) <= n else s[: n - 1] + "…"


#: the learner's counters as ``edge status`` names them (the status dict keys, not /metrics names)
LEARNER_FIELDS = (("learner_champion_version", "serving head"), ("learner_labels_total", "labels taken"),
                  ("learner_promotions_total", "promotions"), ("learner_refreshes_total", "refreshes"),
                  ("learner_rollbacks_total", "rollbacks"), ("learner_drifts_total", "drifts detected"))


def backend_name(be: dict[str, Any]) -> str:
    """The serving backend's name in a status dict's ``backend`` (the daemon sends ``backend``).

    >>> backend_name({"backend": "tensorrt", "precision": "fp16"}), backend_name({})
    ('tensorrt', '?')
    """
    return str(be.get("backend") or be.get("name") or be.get("key") or "?")


def render_status(st: dict[str, Any], *, now: float | None = None, source: str = "", live: bool = True) -> str:
    """The daemon's status as a few lines and a table of streams; ``live`` is False for a
    status read from the file (the daemon did not answer): the header then says STALE."""
    now = time.time() if now is None else now
    be = st.get("backend") or {}
    health = st.get("health") or {}
    dead = health.get("dead_threads") or {}
    if not live:
        age = f"written {now - float(st['written']):.0f} s ago; " if "written" in st else ""
        state = f"STALE ({age}no daemon answers)"
    else:
        state = "DEAD THREADS: " + ", ".join(dead) if dead else ("live" if health.get("ready") else "starting")
    lines = [f"node {st.get('node', '?')} · model {st.get('model', '?')} · backend {backend_name(be)} "
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
        lines += ["", "learner: " + " · ".join(f"{name} {ad[k]}" for k, name in LEARNER_FIELDS if k in ad)]
    if st.get("fleet"):
        lines += ["", sync_line(st["fleet"])]
    if st.get("deploy"):
        lines += ["", deploy_line(st["deploy"])]
    bad = {**(st.get("bad_input") or {}), **(st.get("internal_errors") or {})}
    if bad:
        lines += ["", "recent errors (counts): " + ", ".join(f"{_cut(k, 40)} {v}" for k, v in sorted(bad.items()))]
    return "\n".join(lines)


_SYNC_SHOWN = ("sync_base_version", "sync_seq", "sync_outbox", "sync_prepared", "sync_acked", "sync_publish_failed",
               "sync_publish_refused", "sync_unreceipted", "sync_receipts_accepted", "sync_receipts_refused",
               "sync_server_latest_version", "sync_rebased", "sync_refused", "sync_errors")


def sync_line(m: dict[str, Any]) -> str:
    """Fleet sync in one line: the base version, the last seq, the outbox, what became of the
    deltas, receipts and heads; counters it does not name follow as ``name value``.

    >>> print(sync_line({"sync_base_version": 7, "sync_seq": 12, "sync_outbox": 1, "sync_acked": 11,
    ...                  "sync_refused": {"bad_signature": 2}, "sync_receipts_accepted": 10,
    ...                  "sync_receipts_refused": {"norm_too_large": 1}, "sync_server_latest_version": 9,
    ...                  "sync_epoch_changes": 1}))
    fleet sync: base version 7 (server at 9) · seq 12 · outbox 1 waiting · deltas prepared 0, acked 11, publish failed 0, refused by the broker 0 · receipts accepted 10, refused 1 (norm_too_large 1), awaited 0 · heads rebased 0, refused 2 (bad_signature 2) · errors 0 · epoch changes 1
    """
    def n(key: str) -> Any:
        return m.get(key, 0)

    def why(d: dict) -> str:
        text = ", ".join(f"{_cut(k, 30)} {v}" for k, v in sorted(d.items()))
        return f"refused {sum(d.values())}" + (f" ({text})" if text else "")

    server = m.get("sync_server_latest_version")
    parts = [f"fleet sync: base version {n('sync_base_version')}" + (f" (server at {server})" if server else ""),
             f"seq {n('sync_seq')}", f"outbox {'1 waiting' if n('sync_outbox') else 'empty'}",
             f"deltas prepared {n('sync_prepared')}, acked {n('sync_acked')}, publish failed {n('sync_publish_failed')}, "
             f"refused by the broker {n('sync_publish_refused')}",
             f"receipts accepted {n('sync_receipts_accepted')}, {why(m.get('sync_receipts_refused') or {})}, "
             f"awaited {n('sync_unreceipted')}",
             f"heads rebased {n('sync_rebased')}, {why(m.get('sync_refused') or {})}", f"errors {n('sync_errors')}"]
    rest = [f"{k.removeprefix('sync_').replace('_', ' ')} {v}" for k, v in sorted(m.items())
            if k not in _SYNC_SHOWN and isinstance(v, (int, float)) and not isinstance(v, bool) and v]
    return " · ".join(parts + rest)


def deploy_line(d: dict[str, Any]) -> str:
    """Model releases in one line: what serves, the release in hand, its step and evidence.

    >>> print(deploy_line({"phase": "shadowing", "release": "00ff00ff00ff00ff", "version": "1.1",
    ...                    "manifest_state": "rolling", "serving_release": None, "serving_version": None,
    ...                    "evidence": {"labels": 40, "mean_diff": -0.2, "e_switch": 7.1, "e_worse": 0.1}}))
    deploy: serving the configured model · release 00ff00ff00ff00ff (1.1, rolling): shadowing · labels 40, mean_diff -0.2, e_switch 7.1, e_worse 0.1
    """
    serving = (f"serving release {d['serving_release']} ({d.get('serving_version')})" if d.get("serving_release")
               else "serving the configured model")
    parts = [f"deploy: {serving}"]
    if d.get("release"):
        step = d.get("phase", "?") + (f" ({d['reason']})" if d.get("reason") else "")
        if d.get("progress"):
            step += f" {d['progress'][0]}/{d['progress'][1]} chunks"
        parts.append(f"release {d['release']} ({_cut(d.get('version'), 40)}, {d.get('manifest_state')}): {step}")
    ev = d.get("evidence") or {}
    if ev:
        parts.append(", ".join(f"{k} {v}" for k, v in ev.items() if v is not None))
    return " · ".join(parts)
