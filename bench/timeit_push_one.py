"""Per-sample cost of ``Windower.push_one`` (the per-message hot path), this tree against a
git revision, interleaved in one process so both see the same machine load.

    PYTHONPATH=. python bench/timeit_push_one.py [REV]   (REV defaults to d1616eb)
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(Windower, n: int = 100_000) -> float:
    w = Windower(length=256, hop=128, channels=3, sample_rate=1000.0)
    push_one, row, t0 = w.push_one, [0.1, 0.2, 0.3], 1.7e9
    start = time.process_time()
    for i in range(n):
        push_one(t0 + i * 0.001, row)
    return (time.process_time() - start) / n


def _run_stamper(n: int = 100_000, per_read: int = 10) -> tuple[float, float]:
    from edge.ingest.timing import Stamper

    out = []
    for t_given in (False, True):
        s = Stamper(sample_rate=1000.0)
        one, r0 = s.stamp_one, 1.7e9
        start = time.process_time()
        for i in range(n):
            r = r0 + (i // per_read) * per_read * 0.001
            one(r if t_given else None, r)
        out.append((time.process_time() - start) / n)
    return out[0], out[1]


def main() -> None:
    rev = sys.argv[1] if len(sys.argv) > 1 else "d1616eb"
    old_src = subprocess.run(["git", "show", f"{rev}:edge/ingest/window.py"], capture_output=True, text=True,
                             check=True).stdout
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "window_old.py"
        p.write_text(old_src)
        old = _load("window_old", p)
    new = _load("window_new", Path(__file__).parent.parent / "edge" / "ingest" / "window.py")
    best = {"old": [], "new": []}
    for _ in range(15):
        best["old"].append(_run(old.Windower))
        best["new"].append(_run(new.Windower))
    o, n = sorted(best["old"]), sorted(best["new"])
    print(f"push_one CPU ns/sample, best and median of 15 interleaved runs of 100k: "
          f"{rev} {o[0] * 1e9:.0f} / {o[7] * 1e9:.0f}, this tree {n[0] * 1e9:.0f} / {n[7] * 1e9:.0f}, "
          f"ratio (best) {n[0] / o[0]:.3f}, (median) {n[7] / o[7]:.3f}")
    runs = sorted(_run_stamper() for _ in range(7))
    untimed, given = min(r[0] for r in runs), min(r[1] for r in runs)
    print(f"Stamper.stamp_one CPU ns/sample (best of 7 x 100k, 10 messages per read, including the loop): "
          f"untimed {untimed * 1e9:.0f}, given time {given * 1e9:.0f}")


if __name__ == "__main__":
    main()
