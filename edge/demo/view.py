"""What the demo shows: a live terminal table, events in words, and the report's numbers.

It listens to the daemon like any other client would, on the broker: predictions and
events. Each prediction is scored against the simulated device's true fault at the
middle of the window, so the accuracy shown is measured, not assumed. The predictions of
a second node that never learns (``shipped``) are scored the same way: what the shipped
head would have scored on the same windows.
"""
from __future__ import annotations

import sys
import threading
from collections import deque
from dataclasses import dataclass

import numpy as np
import orjson

#: one rolling window everywhere: the live view, the report and the plot
ROLL = 40


@dataclass(frozen=True)
class Scored:
    """One prediction, scored: ``t`` is the window's middle, seconds since the demo's start, to
    0.1 ms (a window's middle is a whole number of half samples at 1 kHz: rounded coarser, a
    middle such as 15.9995 s would fall either side of a phase boundary from run to run)."""

    t: float
    stream: str
    ok: int  # 1 right, 0 wrong, -1 no truth (a device the demo does not simulate)
    truth: str
    predicted: str
    head: str
    shipped: bool  # from the node that never learns


class Scoreboard:
    """Per-stream tallies of predictions against the truth; thread-safe.

    ``host_clock`` names the devices whose sample times are this host's clock (the MQTT
    simulators stamp with it); only their latency is shown (a serial device's times are its
    firmware clock mapped at connect, so "now minus t" would measure the mapping, not the node).
    """

    def __init__(self, devices: dict, t_start: float, *, host_clock: set[str] | None = None):
        self.devices, self.t_start = devices, t_start
        self.host_clock = set(devices) if host_clock is None else host_clock
        self.lock = threading.Lock()
        self.streams: dict[str, dict] = {}
        self.events: list[dict] = []
        self.scored: list[Scored] = []
        self.shipped_recent: dict[str, deque] = {}
        self.counts: dict[tuple[str, bool], int] = {}  # (stream, shipped) -> predictions scored

    def on_prediction(self, payload: bytes, received: float, *, shipped: bool = False) -> dict:
        p = orjson.loads(payload)
        dev = self.devices.get(p["device"])
        key = f"{p['device']}/{p['stream']}"
        mid = 0.5 * (p["t"] + p["t_start"])
        truth = dev.true_fault(mid) if dev is not None else None
        ok = int(truth == p["prediction"]) if truth is not None else -1
        rec = Scored(round(mid - self.t_start, 4), key, ok, truth or "?", p["prediction"], p.get("head", ""), shipped)
        with self.lock:
            self.scored.append(rec)
            self.counts[key, shipped] = self.counts.get((key, shipped), 0) + 1
            if shipped:
                if ok >= 0:
                    self.shipped_recent.setdefault(key, deque(maxlen=ROLL)).append(ok)
                return p
            s = self.streams.setdefault(key, {"n": 0, "correct": 0, "recent": deque(maxlen=ROLL), "lat": deque(maxlen=400),
                                              "first": received, "last": received, "pred": "", "truth": "", "head": ""})
            s["n"] += 1
            s["last"] = received
            s["pred"], s["truth"], s["head"] = p["prediction"], truth or "?", p.get("head", "")
            if p["device"] in self.host_clock:
                s["lat"].append(received - p["t"])
            if ok >= 0:
                s["correct"] += ok
                s["recent"].append(ok)
        return p

    def has_all(self, streams: list[str], n: int) -> bool:
        """Both nodes predicted ``n`` windows of each of ``streams`` (the end of a paced run)."""
        with self.lock:
            return all(self.counts.get((k, sh), 0) >= n for k in streams for sh in (False, True))

    def on_event(self, payload: bytes, received: float) -> None:
        e = orjson.loads(payload)
        e["t_rel"] = round(received - self.t_start, 2)
        e["why"] = describe_event(e)
        with self.lock:
            self.events.append(e)

    def rows(self) -> list[dict]:
        out = []
        with self.lock:
            for key, s in sorted(self.streams.items()):
                span = max(1e-6, s["last"] - s["first"])
                lat = np.array(s["lat"]) * 1000 if s["lat"] else None
                shipped = self.shipped_recent.get(key)
                out.append({"stream": key, "windows": s["n"], "windows_per_s": round((s["n"] - 1) / span, 2) if s["n"] > 1 else 0.0,
                            # the window's last sample to its prediction reaching this view
                            "latency_ms_p50": None if lat is None else round(float(np.percentile(lat, 50)), 1),
                            "latency_ms_p99": None if lat is None else round(float(np.percentile(lat, 99)), 1),
                            "predicted": s["pred"], "true": s["truth"], "head": s["head"],
                            "accuracy_recent": round(float(np.mean(s["recent"])), 3) if s["recent"] else None,
                            "accuracy_all": round(s["correct"] / s["n"], 3) if s["n"] else None,
                            "shipped_recent": round(float(np.mean(shipped)), 3) if shipped else None})
        return out


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _g(v) -> str:
    return f"{v:.3g}" if isinstance(v, (int, float)) else str(v)


def _test(e: dict) -> str:
    """The evidence of a swap: the sequential test's e-value against its threshold (issue 18)."""
    if "e_value" in e:
        return (f"on the same {_g(e.get('labels'))} labels since the last swap the sequential test favoured it "
                f"(e-value {_g(e.get('e_value'))} >= {_g(e.get('threshold'))})")
    return f"a paired test favoured it (t = {_g(e.get('t_statistic'))})"  # a learner from before the sequential test


def describe_event(e: dict) -> str:
    """An event of the daemon in words: what changed, and the evidence. The mean losses are
    given as they are: the test is on clipped per-label differences, so it can favour a head
    whose raw mean loss is not the lower one, and the words do not claim otherwise.

    >>> describe_event({"type": "promotion", "version": "1.0.0+a1", "previous": "1.0.0", "champion_loss": 0.91,
    ...                 "challenger_loss": 0.2, "labels": 40, "e_value": 120.0, "threshold": 100.0})
    'head 1.0.0+a1 now serves instead of 1.0.0: on the same 40 labels since the last swap the sequential test favoured it (e-value 120 >= 100); mean loss 0.2 against 0.91'
    >>> describe_event({"type": "rollback", "version": "1.0.0", "previous": "1.0.0+a1", "champion_loss": 0.229,
    ...                 "global_loss": 0.233, "labels": 60, "e_value": 5.5, "threshold": 5.0})
    'back to the shipped head 1.0.0 from 1.0.0+a1: on the same 60 labels since the last swap the sequential test favoured it (e-value 5.5 >= 5); mean loss 0.233 against 0.229'
    >>> describe_event({"type": "drift", "detector": "adwin", "labels": 120})
    'the learner detected a drift (adwin, after 120 labels): it learns faster for a while'
    """
    k = e.get("type")
    if k == "promotion":
        return (f"head {e.get('version')} now serves instead of {e.get('previous')}: {_test(e)}; "
                f"mean loss {_g(e.get('challenger_loss'))} against {_g(e.get('champion_loss'))}")
    if k == "refresh":
        return (f"head {e.get('version')}, the continued training of {e.get('previous')}, now serves: {_test(e)}; "
                f"mean loss {_g(e.get('challenger_loss'))} against {_g(e.get('champion_loss'))}")
    if k == "rollback":
        return (f"back to the shipped head {e.get('version')} from {e.get('previous')}: {_test(e)}; "
                f"mean loss {_g(e.get('global_loss'))} against {_g(e.get('champion_loss'))}")
    if k == "drift":
        return f"the learner detected a drift ({e.get('detector')}, after {e.get('labels')} labels): it learns faster for a while"
    skip = {"type", "t", "node", "t_rel", "metrics", "why"}
    return ", ".join(f"{k2} {_g(v)}" for k2, v in e.items() if k2 not in skip)[:160]


def story(scored: list[Scored], *, stream: str, fault: str, drift_at: float | None, segment_s: float) -> dict:
    """Accuracy on ``fault`` for ``stream``: before the drift, in its first segment after the
    drift (the head has not learned yet), and in its later segments (after adaptation); for
    the served head and for the shipped one, on the same windows.

    >>> s = [Scored(1.0, "m/a", 1, "x", "x", "h", False), Scored(25.0, "m/a", 0, "x", "y", "h", False),
    ...      Scored(41.0, "m/a", 1, "x", "x", "h2", False), Scored(41.0, "m/a", 0, "x", "y", "h0", True)]
    >>> story(s, stream="m/a", fault="x", drift_at=23.0, segment_s=8.0)["served"]
    {'before_drift': 1.0, 'after_drift': 0.0, 'after_adaptation': 1.0}
    """
    out: dict = {"stream": stream, "fault": fault, "drift_at": drift_at}
    if drift_at is None:
        return out
    first_end = drift_at + segment_s + 1.0  # the confused fault's first segment starts just after the drift

    def phase(r: Scored) -> str:
        return "before_drift" if r.t < drift_at else ("after_drift" if r.t < first_end else "after_adaptation")
    for who, shipped in (("served", False), ("shipped", True)):
        acc: dict[str, list[int]] = {"before_drift": [], "after_drift": [], "after_adaptation": []}
        for r in scored:
            if r.stream == stream and r.shipped == shipped and r.truth == fault and r.ok >= 0:
                acc[phase(r)].append(r.ok)
        out[who] = {k: (round(float(np.mean(v)), 3) if v else None) for k, v in acc.items()}
    return out


def render(board: Scoreboard, *, elapsed: float, total: float, notes: list[str]) -> str:
    """The live table as text (ANSI home + clear)."""
    head = f"edge demo — {elapsed:5.0f} s" + (f" / {total:.0f} s" if total else "") + "   (Ctrl-C to stop)"
    lines = [head, "", f"{'stream':22} {'win/s':>6} {'lat p50':>8} {'p99':>7}  {'predicted':13} {'true':13} "
                       f"{'acc':>5} {'shipped':>7} {'all':>5}  head"]
    for r in board.rows():
        pct = lambda v: "" if v is None else f"{100 * v:.0f}%"  # noqa: E731
        lat = lambda v, w: f"{'-':>{w}}" if v is None else f"{v:{w - 2}.1f}ms"  # noqa: E731
        mark = "" if r["predicted"] == r["true"] else " ✗"
        lines.append(f"{r['stream']:22} {r['windows_per_s']:6.1f} {lat(r['latency_ms_p50'], 8)} {lat(r['latency_ms_p99'], 7)}  "
                     f"{r['predicted'] + mark:13} {r['true']:13} {pct(r['accuracy_recent']):>5} "
                     f"{pct(r['shipped_recent']):>7} {pct(r['accuracy_all']):>5}  {r['head']}")
    lines.append(f"acc, shipped: the last {ROLL} windows, served head and the shipped head on the same windows; "
                 "lat: a window's last sample to its prediction here (- where the stream's clock is its firmware's)")
    with board.lock:
        recent = board.events[-6:]
    lines += ["", "events:"] + [f"  {e['t_rel']:6.1f}s {e.get('type')}: {e['why']}" for e in recent] + [""] + notes
    return "\x1b[H\x1b[2J" + "\n".join(lines) + "\n"


class LiveView:
    """Redraw the table every second on a TTY, or print a summary line every 5 s otherwise
    (and each new event once, in words)."""

    def __init__(self, board: Scoreboard, *, total: float, live: bool, notes: list[str]):
        self.board, self.total, self.notes = board, total, notes
        self.live = live and sys.stdout.isatty()
        self._shown = 0

    def tick(self, elapsed: float) -> None:
        if self.live:
            sys.stdout.write(render(self.board, elapsed=elapsed, total=self.total, notes=self.notes))
            sys.stdout.flush()
            return
        with self.board.lock:
            new = self.board.events[self._shown:]
            self._shown += len(new)
        for e in new:
            print(f"[{e['t_rel']:5.1f}s] {e.get('type')}: {e['why']}", flush=True)
        if int(elapsed) % 5 == 0:
            parts = [f"{r['stream']} {r['predicted']}/{r['true']} acc {_pct(r['accuracy_recent'])}" for r in self.board.rows()]
            print(f"[{elapsed:5.0f}s] " + "; ".join(parts), flush=True)
