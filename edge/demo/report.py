"""The demo's report: ``report.json`` (summary, story, events, the time series) and ``report.png``.

The plot is drawn only from the series written to the JSON (``series_of``), so it can be
rebuilt from the file (``plot_report``). Rules that keep it readable at a glance: series
colours are never an event line's (events are black or grey, one style per kind, in the
legend), one rolling window (``view.ROLL``) everywhere, the y-axis starts at 0, each
stream's condition is in its legend entry, and the drifted machine's fault segments are
drawn behind its panel.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from edge.demo.view import ROLL, Scored

#: series colours (matplotlib's tab10 without its red, green, orange, purple and grey,
#: which read as "alarm"/"good" or as an event line)
SERIES_COLOURS = ("#1f77b4", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#393b79", "#637939")
#: the fault segments' boundaries: background, lighter than every event line
SEGMENT_EDGE = "#dddddd"
#: event kinds: (colour, line style, legend text); only black and greys
EVENT_STYLES = {"drift_injected": ("#000000", "-", "drift injected"),
                "promotion": ("#555555", "--", "promotion: the test favoured a learned head"),
                "refresh": ("#555555", ":", "refresh: the serving head follows its continued training"),
                "rollback": ("#000000", "-.", "rollback: the test favoured the shipped head"),
                "drift": ("#999999", (0, (3, 1, 1, 1, 1, 1)), "drift detected by the learner")}


def rolling(ok: list[int], w: int = ROLL) -> list[float]:
    """Mean of the last ``w`` values at each point (fewer at the start).

    >>> rolling([1, 0, 1, 1], w=2)
    [1.0, 0.5, 0.5, 1.0]
    """
    c = np.cumsum(np.r_[0, np.asarray(ok, float)])
    i = np.arange(1, len(ok) + 1)
    lo = np.maximum(0, i - w)
    return [round(float(x), 4) for x in (c[i] - c[lo]) / (i - lo)]


def series_of(scored: list[Scored]) -> dict:
    """``{"served": {stream: {"t", "accuracy"}}, "shipped": {...}}``: rolling accuracy (%) per stream."""
    out: dict = {"window": ROLL, "served": {}, "shipped": {}}
    for who, shipped in (("served", False), ("shipped", True)):
        for key in sorted({r.stream for r in scored if r.shipped == shipped}):
            pts = sorted((r.t, r.ok) for r in scored if r.stream == key and r.shipped == shipped and r.ok >= 0)
            if len(pts) >= 2:
                out[who][key] = {"t": [p[0] for p in pts], "accuracy": [round(100 * a, 2) for a in rolling([p[1] for p in pts])]}
    return out


def write_report(board, out: Path, *, meta: dict, story: dict, segments: list[dict], conditions: dict) -> dict:
    """Write ``report.json`` and ``report.png`` into ``out``; the report dict."""
    out.mkdir(parents=True, exist_ok=True)
    with board.lock:
        scored = list(board.scored)
        events = list(board.events)
    report = {"meta": meta, "story": story, "streams": board.rows(), "conditions": conditions, "events": events,
              "segments": segments, "series": series_of(scored)}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    try:
        plot_report(report, out / "report.png")
    except ImportError as e:
        print(f"no plot (matplotlib missing: {e})", file=sys.stderr)
    return report


def _events(ax, report: dict, shown: set) -> None:
    meta = report["meta"]
    if meta.get("drift_at") is not None:
        c, ls, name = EVENT_STYLES["drift_injected"]
        ax.axvline(meta["drift_at"], color=c, ls=ls, lw=1.6, label=None if "drift_injected" in shown else
                   f"{name}: {meta['drift_device']} ({meta['drift_words']})")
        shown.add("drift_injected")
    for e in report["events"]:
        kind = e.get("type")
        if kind in EVENT_STYLES:  # one legend entry per kind
            c, ls, name = EVENT_STYLES[kind]
            ax.axvline(e["t_rel"], color=c, ls=ls, lw=1.0, label=None if kind in shown else name)
            shown.add(kind)


def plot_report(report: dict, path: Path) -> None:
    """Draw ``report.png`` from a report dict (the one ``write_report`` wrote, or its JSON)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ser, cond, meta = report["series"], report["conditions"], report["meta"]
    drift_key = meta.get("drift_device")
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 8), sharex=True, gridspec_kw={"height_ratios": [1.2, 1]})
    # top: the drifted machine, served vs shipped head, over its fault segments
    for seg in report["segments"]:
        if seg["fault"] == report["story"].get("fault"):
            top.axvspan(seg["t0"], seg["t1"], color="#fff2b3", lw=0, zorder=0)
        top.axvline(seg["t0"], color=SEGMENT_EDGE, lw=0.5, zorder=0)  # a segment boundary, fainter than any event
        top.text((seg["t0"] + seg["t1"]) / 2, 103, seg["fault"].replace("_", " "), ha="center", va="bottom", fontsize=7)
    keys = sorted(ser["served"])
    colour = {k: SERIES_COLOURS[i % len(SERIES_COLOURS)] for i, k in enumerate(keys)}  # one colour per stream, both panels
    if drift_key in ser["served"]:
        s = ser["served"][drift_key]
        top.plot(s["t"], s["accuracy"], color=colour[drift_key], lw=1.8, label=f"{drift_key}: served head")
    if drift_key in ser["shipped"]:
        s = ser["shipped"][drift_key]
        top.plot(s["t"], s["accuracy"], color=SERIES_COLOURS[len(keys) % len(SERIES_COLOURS)], lw=1.2, ls="--",
                 label=f"{drift_key}: shipped head, same windows")
    _events(top, report, set())
    top.set_ylim(0, 110)
    top.set_ylabel(f"accuracy, last {ser['window']} windows (%)")
    top.set_title(f"{drift_key}: {meta['drift_words']} at {meta['drift_at']} s; shaded: {report['story'].get('fault')}, "
                  "the fault it confuses", fontsize=10)
    top.legend(loc="lower left", fontsize=7, framealpha=0.9)
    # bottom: every stream the node served, with its condition
    for key in keys:
        s = ser["served"][key]
        bottom.plot(s["t"], s["accuracy"], color=colour[key], lw=1.2,
                    label=f"{key} ({cond.get(key, 'nominal')})")
    _events(bottom, report, {"promotion", "refresh", "rollback", "drift"})  # their legend is in the top panel
    bottom.set_ylim(0, 105)
    bottom.set_xlabel("seconds since start (each point: a window's middle)")
    bottom.set_ylabel(f"accuracy, last {ser['window']} windows (%)")
    bottom.set_title("every stream, served head", fontsize=10)
    bottom.legend(loc="lower left", fontsize=7, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
