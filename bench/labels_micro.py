"""Micro-benchmark of LabelMatcher.add_window with 0 and 256 labels waiting, before and after
issue 18's index of waiting labels, in one run (a speed figure, not a test).

    .venv/bin/python bench/labels_micro.py [--before c95e4f8] [--out bench/out/labels_micro.json]

"before" is ``edge/adapt/labels.py`` at that commit (``git show``), imported from a temp
folder; "after" is the working tree's. Each case times ``add_window`` on one stream of a
cache of 512 windows (64 features) with no label waiting, and with 256 labels waiting
ahead of the stream (never reached during the timing); and ``match`` of a label inside the
cache (the ``_find`` scan, which copied the deque before). Medians of 15 interleaved repeats,
in µs per call. The machine is shared: read the ratios, measured in the same run, not the absolutes.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _load_before(rev: str):
    src = subprocess.run(["git", "show", f"{rev}:edge/adapt/labels.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    folder = Path(tempfile.mkdtemp(prefix="labels_before_"))
    path = folder / "labels_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("labels_before", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["labels_before"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod.LabelMatcher


def _matcher(cls, pending: int):
    m = cls(classes=["a", "b"], tolerance_s=0.0, max_windows=512, max_pending=max(pending, 1), max_future_s=1e9)
    z = np.zeros(64, np.float32)
    for i in range(512):
        m.add_window("s", float(i), i + 1.0, z)
    for j in range(pending):
        m.match("s", 1e8 + j, 1)  # far ahead: waits through the whole timing
    return m, z


def _add_window_us(cls, pending: int, n: int = 2000) -> float:
    m, z = _matcher(cls, pending)
    t = 512.0
    t0 = time.perf_counter()
    for _ in range(n):
        m.add_window("s", t, t + 1.0, z)
        t += 1.0
    return (time.perf_counter() - t0) / n * 1e6


def _match_us(cls, n: int = 2000) -> float:
    m, _ = _matcher(cls, 0)
    t0 = time.perf_counter()
    for i in range(n):
        m.match("s", 256.5 + (i % 200), 1)  # middle of the cache; the first of each window matches, the rest are duplicates
    return (time.perf_counter() - t0) / n * 1e6


def _cpu() -> dict:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                flags += line.split(":", 1)[1].strip() + " | "
    except OSError:
        pass
    model, _, rest = flags.partition(" | ")
    want = ("avx2", "avx512f", "avx512_vnni", "avx_vnni")
    return {"model": model, "machine": platform.machine(), "features": [f for f in want if f in rest.split()]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="c95e4f8", help="commit of the matcher before the index (default c95e4f8)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=str(ROOT / "bench/out/labels_micro.json"))
    a = ap.parse_args(argv)
    from edge.adapt.labels import LabelMatcher as After

    Before = _load_before(a.before)
    cases = {"add_window_us_0_pending": (_add_window_us, 0), "add_window_us_256_pending": (_add_window_us, 256),
             "match_us_in_cache": (_match_us,)}
    runs = {name: {c: [] for c in cases} for name in ("before", "after")}
    for _ in range(a.repeats):  # interleaved, so that a burst of load from others falls on both
        for c, (fn, *args) in cases.items():
            for name, cls in (("before", Before), ("after", After)):
                runs[name][c].append(fn(cls, *args))
    res = {name: {c: round(statistics.median(v), 3) for c, v in r.items()} for name, r in runs.items()}
    res["min_of_repeats"] = {name: {c: round(min(v), 3) for c, v in r.items()} for name, r in runs.items()}
    res["repeats"] = a.repeats
    b, f = res["before"], res["after"]
    out = {"command": "python bench/labels_micro.py --before " + a.before, "before_rev": a.before,
           "cpu": _cpu(), "python": platform.python_version(),
           "note": "shared 2-core machine, other engineers' jobs running: ratios from the same run, absolutes are noisy",
           **res,
           "ratios": {"after_256_over_after_0": round(f["add_window_us_256_pending"] / f["add_window_us_0_pending"], 2),
                      "before_256_over_before_0": round(b["add_window_us_256_pending"] / b["add_window_us_0_pending"], 2),
                      "before_over_after_256": round(b["add_window_us_256_pending"] / f["add_window_us_256_pending"], 1),
                      "before_over_after_0": round(b["add_window_us_0_pending"] / f["add_window_us_0_pending"], 2),
                      "before_over_after_match": round(b["match_us_in_cache"] / f["match_us_in_cache"], 2)}}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
