"""What machine a benchmark ran on: CPU model and the instruction-set features that matter."""
from __future__ import annotations

import os
import platform
from pathlib import Path

FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "fma", "asimddp", "asimd", "sve")


def cpu_info() -> dict:
    """``{"model", "cores", "features": [...]}`` from /proc/cpuinfo (the flags this project cares about)."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model") and not model:
                model = val.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(val.split())
    except OSError:
        pass
    return {"model": model or platform.processor() or platform.machine(), "machine": platform.machine(),
            "cores": os.cpu_count(), "features": [f for f in FEATURES if f in flags]}


def write_result(result: dict, path: str | Path) -> None:
    """Write a benchmark's JSON (making its folder) and say where."""
    import json

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(result, indent=2))
    print(f"written to {p}")
