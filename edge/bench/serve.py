"""``edge bench serve MODEL_DIR``: the backbone on every backend, same inputs, one core.

Compared in one run: torch eager fp32 (the reference), ONNX Runtime fp32, ONNX Runtime
int8 (and TensorRT fp16 / int8 where present). For each, in a fresh subprocess pinned
to one thread (so peak memory and start-up are its own): latency p50/p99 at batch 1,
throughput at the best batch size, peak RSS (``ru_maxrss``), and accuracy on held-out
simulated data, nominal and under each shift of ``edge.sim.SHIFTS``. Then, again in a
fresh process, the time to load the compiled artifact from the cache (parity gate
included) and serve a first window. Targets (issue): int8 >= 5x faster than eager fp32
at batch 1, accuracy within 0.5 points of fp32, cache load + first window < 2 s.

    edge bench serve models/vibration --out bench/out/serve.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

T_START = time.perf_counter()
VARIANTS = [("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("tensorrt", "fp16"),
            ("tensorrt", "int8")]
BATCHES = (1, 8, 32, 128)


def peak_rss_mb() -> float:
    """Peak RSS of this process's own address space (``VmHWM``).

    ``ru_maxrss`` is not used: Linux carries it across fork and exec, so a worker would
    report the (torch-laden) parent's peak instead of its own.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _pin_one_thread(backend: str) -> None:
    """One core for every backend: ORT gets ``threads=1`` from ``obtain``; torch here.

    torch is imported only for the backends that run on it, so that the peak memory of
    the ONNX Runtime workers is that of a daemon serving ONNX Runtime.
    """
    if backend in ("torch", "tensorrt"):
        import torch

        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)


def worker_measure(args) -> dict:
    """In a fresh process: load one variant from the cache and measure it on the shared inputs."""
    _pin_one_thread(args.backend)
    from edge.serve import parity
    from edge.serve.cache import ArtifactCache
    from edge.serve.compile import obtain
    from edge.zoo import resolve_model

    model = resolve_model(args.model)
    rss0 = peak_rss_mb()
    backend, _ = obtain(model, args.backend, args.precision, cache=ArtifactCache(args.cache_dir), threads=1)
    data = np.load(args.data)
    x1 = data["latency"]
    for i in range(30):
        backend.features(x1[i % len(x1)][None])
    lat = []
    for i in range(args.iters):
        w = x1[i % len(x1)][None]
        t = time.perf_counter()
        backend.features(w)
        lat.append(time.perf_counter() - t)
    throughput = {}
    for b in BATCHES:
        xb = np.ascontiguousarray(np.resize(x1, (b,) + x1.shape[1:]))
        backend.features(xb)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            backend.features(xb)
            n += b
        throughput[b] = n / (time.perf_counter() - t0)
    head = parity.head_scores(model)
    accuracy = {}
    for name in data.files:
        if name.startswith("X_"):
            cond = name[2:]
            z = np.concatenate([backend.features(data[name][i:i + 256]) for i in range(0, len(data[name]), 256)])
            accuracy[cond] = float((head(z).argmax(1) == data["y_" + cond]).mean())
    best = max(throughput, key=throughput.get)
    return {"backend": args.backend, "precision": args.precision, "provider": backend.provider,
            "p50_ms": float(np.percentile(lat, 50) * 1e3), "p99_ms": float(np.percentile(lat, 99) * 1e3),
            "throughput_wps": {str(k): v for k, v in throughput.items()}, "best_batch": best,
            "best_throughput_wps": throughput[best],
            "peak_rss_mb": peak_rss_mb(), "rss_before_load_mb": rss0, "accuracy": accuracy}


def worker_cold(args) -> dict:
    """In a fresh process: time from interpreter start to the first served window, from the cache."""
    t_imports = time.perf_counter()
    from edge.serve import load_backbone
    from edge.zoo import resolve_model

    model = resolve_model(args.model)
    t0 = time.perf_counter()
    backend, reason = load_backbone(model, backend=args.backend, precision=args.precision,
                                    cache_dir=args.cache_dir, threads=1)
    x = np.load(args.data)["latency"][:1]
    backend.features(x)
    t1 = time.perf_counter()
    return {"backend": backend.key, "precision": backend.precision, "cache_hit": "cache hit" in reason,
            "load_and_first_window_s": t1 - t0, "imports_s": t0 - t_imports,
            "torch_imported": "torch" in sys.modules}


def _run_worker(mode: str, args, backend: str, precision: str) -> dict:
    cmd = [sys.executable, "-m", "edge.bench.serve", args.model, "--worker", mode, "--backend", backend,
           "--precision", precision, "--cache-dir", str(args.cache_dir), "--data", str(args.data),
           "--iters", str(args.iters), "--seconds", str(args.seconds)]
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise RuntimeError(f"{mode} worker for {backend} {precision} failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["process_wall_s"] = wall
    return res


def _prepare(args, model) -> Path:
    from edge.sim import SHIFTS, make_dataset

    arrays = {"latency": make_dataset(64, seed=9_001)[0]}
    for name, cond in SHIFTS.items():
        X, y = make_dataset(args.n_eval, seed=9_100, condition=cond, window=model.manifest.window)
        arrays["X_" + name], arrays["y_" + name] = X, y
    path = Path(args.cache_dir) / "bench_inputs.npz"
    np.savez(path, **arrays)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="edge bench serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="vibration", help="model folder or shipped model name")
    ap.add_argument("--out", default="bench/out/serve.json", help="JSON results")
    ap.add_argument("--cache-dir", default=None, help="artifact cache (default: a fresh temporary one)")
    ap.add_argument("--iters", type=int, default=2000, help="batch-1 calls timed per backend")
    ap.add_argument("--seconds", type=float, default=1.0, help="seconds per batch size for throughput")
    ap.add_argument("--n-eval", type=int, default=1000, help="held-out windows per condition")
    ap.add_argument("--worker", choices=["measure", "cold"], help=argparse.SUPPRESS)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    ap.add_argument("--precision", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker_measure(args) if args.worker == "measure" else worker_cold(args)))
        return 0
    from edge.serve import compile_model
    from edge.serve.backends import availability
    from edge.zoo import resolve_model

    model = resolve_model(args.model)
    args.model = str(model.path)
    args.cache_dir = Path(args.cache_dir or tempfile.mkdtemp(prefix="edge-bench-serve-"))
    args.data = _prepare(args, model)
    avail = availability()
    results, compiles, skipped = [], {}, {}
    for key, prec in VARIANTS:
        if not avail[key][0]:
            skipped[f"{key}-{prec}"] = avail[key][1]
            continue
        try:
            r = compile_model(model, backend=key, precision=prec, cache_dir=args.cache_dir, progress=False)
        except Exception as e:  # noqa: BLE001  a variant that cannot build is reported, not fatal
            skipped[f"{key}-{prec}"] = f"{type(e).__name__}: {e}"
            continue
        compiles[f"{key}-{prec}"] = {"cache": r.cache, "timings": r.timings,
                                     "parity": r.parity.summary() if r.parity else "reference"}
        print(f"measuring {key} {prec} ...", file=sys.stderr)
        m = _run_worker("measure", args, key, prec)
        m["cold_start"] = _run_worker("cold", args, key, prec)
        results.append(m)
    report = _summarise(model, results, compiles, skipped, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report["targets"], indent=2))
    return 0


def _summarise(model, results, compiles, skipped, args) -> dict:
    import onnxruntime
    import torch

    ref = next(r for r in results if r["backend"] == "torch")
    for r in results:
        r["speedup_vs_torch_p50"] = ref["p50_ms"] / r["p50_ms"]
        r["accuracy_delta_points"] = {k: 100 * (v - ref["accuracy"][k]) for k, v in r["accuracy"].items()}
    int8 = next((r for r in results if (r["backend"], r["precision"]) == ("onnxruntime", "int8")), None)
    targets = {}
    if int8:
        deltas = int8["accuracy_delta_points"]
        worst = min(deltas, key=deltas.get)
        largest = max(deltas, key=lambda k: abs(deltas[k]))
        cold = int8["cold_start"]
        targets = {
            "int8_speedup_ge_5x": {"value": round(int8["speedup_vs_torch_p50"], 2),
                                   "met": int8["speedup_vs_torch_p50"] >= 5},
            # "within 0.5 points" is read as "loses at most 0.5 points"; the largest
            # difference either way is reported too.
            "int8_accuracy_within_0.5_points": {"worst_loss_condition": worst, "value": round(deltas[worst], 2),
                                                "nominal": round(deltas["nominal"], 2),
                                                "largest_abs_condition": largest,
                                                "largest_abs": round(deltas[largest], 2),
                                                "met": deltas[worst] >= -0.5 - 1e-9},
            "cache_load_first_window_lt_2s": {"value": round(cold["load_and_first_window_s"], 3),
                                              "process_wall_s": round(cold["process_wall_s"], 3),
                                              "met": cold["process_wall_s"] < 2.0},
        }
    return {
        "command": "edge bench serve " + " ".join(sys.argv[1:]),
        "model": {"name": model.manifest.name, "version": model.manifest.version, "hash": model.content_hash[:16]},
        "machine": {"cpu": _cpu_name(), "cores_visible": os.cpu_count(), "threads_used": 1,
                    "python": platform.python_version(), "torch": torch.__version__,
                    "onnxruntime": onnxruntime.__version__},
        "settings": {"iters_batch1": args.iters, "seconds_per_batch": args.seconds, "n_eval": args.n_eval},
        "compile": compiles, "results": results, "skipped": skipped, "targets": targets,
        "bench_wall_s": time.perf_counter() - T_START,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
