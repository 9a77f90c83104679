"""What the demo shows: a live terminal table, and the report (JSON and PNG) at the end.

It listens to the daemon like any other client would, on the broker: predictions and
events. Each prediction is scored against the simulated device's true fault at the
middle of the window, so the accuracy shown is measured, not assumed.
"""
from __future__ import annotations

import json
import sys
import threading
from collections import deque
from pathlib import Path

import numpy as np
import orjson


class Scoreboard:
    """Per-stream tallies of predictions against the truth; thread-safe."""

    def __init__(self, devices: dict, t_start: float):
        self.devices, self.t_start = devices, t_start
        self.lock = threading.Lock()
        self.streams: dict[str, dict] = {}
        self.events: list[dict] = []
        self.timeline: list[tuple[float, str, int, str]] = []

    def on_prediction(self, payload: bytes, received: float) -> None:
        p = orjson.loads(payload)
        dev = self.devices.get(p["device"])
        key = f"{p['device']}/{p['stream']}"
        truth = dev.true_fault(0.5 * (p["t"] + p["t_start"])) if dev is not None else None
        ok = int(truth == p["prediction"]) if truth is not None else -1
        with self.lock:
            s = self.streams.setdefault(key, {"n": 0, "correct": 0, "recent": deque(maxlen=40), "lat": deque(maxlen=400),
                                              "first": received, "last": received, "pred": "", "truth": "", "head": ""})
            s["n"] += 1
            s["last"] = received
            s["pred"], s["truth"], s["head"] = p["prediction"], truth or "?", p.get("head", "")
            s["lat"].append(received - p["t"])
            if ok >= 0:
                s["correct"] += ok
                s["recent"].append(ok)
            self.timeline.append((received - self.t_start, key, ok, p.get("head", "")))

    def on_event(self, payload: bytes, received: float) -> None:
        e = orjson.loads(payload)
        e["t_rel"] = round(received - self.t_start, 2)
        with self.lock:
            self.events.append(e)

    def rows(self) -> list[dict]:
        out = []
        with self.lock:
            for key, s in sorted(self.streams.items()):
                span = max(1e-6, s["last"] - s["first"])
                lat = np.array(s["lat"]) * 1000 if s["lat"] else np.zeros(1)
                out.append({"stream": key, "windows": s["n"], "windows_per_s": round((s["n"] - 1) / span, 2) if s["n"] > 1 else 0.0,
                            "latency_ms_p50": round(float(np.percentile(lat, 50)), 1),
                            "latency_ms_p99": round(float(np.percentile(lat, 99)), 1),
                            "predicted": s["pred"], "true": s["truth"], "head": s["head"],
                            "accuracy_recent": round(float(np.mean(s["recent"])), 3) if s["recent"] else None,
                            "accuracy_all": round(s["correct"] / s["n"], 3) if s["n"] else None})
        return out


def render(board: Scoreboard, *, elapsed: float, total: float, notes: list[str]) -> str:
    """The live table as text (ANSI home + clear)."""
    head = f"edge demo — {elapsed:5.0f} s" + (f" / {total:.0f} s" if total else "") + "   (Ctrl-C to stop)"
    lines = [head, "", f"{'stream':26} {'win/s':>6} {'lat p50':>8} {'p99':>7}  {'predicted':14} {'true':14} {'acc(last 40)':>12} {'acc(all)':>8}  head"]
    for r in board.rows():
        acc = "" if r["accuracy_recent"] is None else f"{100 * r['accuracy_recent']:.0f}%"
        acc_all = "" if r["accuracy_all"] is None else f"{100 * r['accuracy_all']:.0f}%"
        mark = "" if r["predicted"] == r["true"] else " ✗"
        lines.append(f"{r['stream']:26} {r['windows_per_s']:6.1f} {r['latency_ms_p50']:6.1f}ms {r['latency_ms_p99']:5.1f}ms  "
                     f"{r['predicted'] + mark:14} {r['true']:14} {acc:>12} {acc_all:>8}  {r['head']}")
    with board.lock:
        recent = board.events[-6:]
    lines += ["", "events:"] + [f"  {e['t_rel']:6.1f}s {e.get('type')}: {_brief(e)}" for e in recent] + [""] + notes
    return "\x1b[H\x1b[2J" + "\n".join(lines) + "\n"


def _brief(e: dict) -> str:
    skip = {"type", "t", "node", "t_rel", "metrics"}
    return ", ".join(f"{k}={round(v, 3) if isinstance(v, float) else v}" for k, v in e.items() if k not in skip)[:120]


def write_report(board: Scoreboard, out: Path, *, meta: dict) -> dict:
    """``report.json`` (summary, events, meta) and ``report.png`` (rolling accuracy per stream)."""
    out.mkdir(parents=True, exist_ok=True)
    with board.lock:
        timeline = list(board.timeline)
        events = list(board.events)
    rows = board.rows()
    report = {"meta": meta, "streams": rows, "events": events}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(10, 4.5))
        for key in sorted({k for _, k, _, _ in timeline}):
            pts = [(t, ok) for t, k, ok, _ in timeline if k == key and ok >= 0]
            if len(pts) < 2:
                continue
            t = np.array([p[0] for p in pts])
            ok = np.array([p[1] for p in pts], dtype=float)
            w = min(20, len(ok))
            roll = np.convolve(ok, np.ones(w) / w, mode="valid")
            ax.plot(t[w - 1:], 100 * roll, label=key)
        if meta.get("drift_at") is not None:
            ax.axvline(meta["drift_at"], color="red", ls="--", lw=1, label=f"drift injected ({meta.get('drift')})")
            ax.text(meta["drift_at"], 2, f" drift: {meta.get('drift_device')} ({meta.get('drift')})", color="red", fontsize=8)
        style = {"promotion": ("green", "-", "head promotion"), "refresh": ("green", ":", "head refresh (follows its challenger)"),
                 "rollback": ("orange", "-", "rollback to the global head"),
                 "drift": ("purple", ":", "drift detected by the learner")}
        shown = set()
        for e in events:
            kind = e.get("type")
            if kind in style:  # one legend entry per kind: the legend names every line's meaning
                color, ls, name = style[kind]
                ax.axvline(e["t_rel"], color=color, ls=ls, lw=0.8, alpha=0.7, label=None if kind in shown else name)
                shown.add(kind)
        ax.set_xlabel("seconds since start")
        ax.set_ylabel("accuracy, rolling 20 windows (%)")
        ax.set_ylim(0, 102)
        ax.set_title("edge demo: predictions scored against the simulated truth")
        ax.legend(loc="lower left", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "report.png", dpi=110)
        plt.close(fig)
    except ImportError as e:
        print(f"no plot (matplotlib missing: {e})", file=sys.stderr)
    return report


class LiveView:
    """Redraw the table every second on a TTY, or print a summary line every 5 s otherwise."""

    def __init__(self, board: Scoreboard, *, total: float, live: bool, notes: list[str]):
        self.board, self.total, self.notes = board, total, notes
        self.live = live and sys.stdout.isatty()

    def tick(self, elapsed: float) -> None:
        if self.live:
            sys.stdout.write(render(self.board, elapsed=elapsed, total=self.total, notes=self.notes))
            sys.stdout.flush()
        elif int(elapsed) % 5 == 0:
            parts = [f"{r['stream']} {r['predicted']}/{r['true']} acc={r['accuracy_recent']}" for r in self.board.rows()]
            print(f"[{elapsed:5.0f}s] " + "; ".join(parts), flush=True)
