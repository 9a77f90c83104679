"""``edge bench serve MODEL``: every candidate artifact of any model folder, same inputs, one core.

First the measured choice runs, as ``edge compile`` does (every candidate this machine
supports is built, gated on held-out windows and timed; the decision is recorded). Then
each candidate that passed is measured in a fresh subprocess pinned to one thread (so
peak memory and start-up are its own): latency p50/p99 at batch 1 and throughput at the
best batch size on windows from the model's own calibration source, peak RSS, and
accuracy on the model's labelled ``[eval]`` data when the folder has any (it says so
when not). Last, in a fresh process, the served choice is loaded from the cache (parity
gate included) and serves a first window. Targets (issue 11): the served artifact never
slower than ONNX Runtime fp32, >= 1.3x ONNX Runtime fp32 where the CPU has int8
dot-product instructions, >= 4x torch eager, accuracy within 0.5 points of fp32.

    edge bench serve models/vibration --out bench/out/serve-vibration.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

T_START = time.perf_counter()
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
    """In a fresh process: load one candidate from the cache and measure it on the shared inputs."""
    _pin_one_thread(args.backend)
    from edge.serve import parity
    from edge.serve.cache import ArtifactCache
    from edge.serve.compile import obtain
    from edge.serve.evaluation import accuracy
    from edge.zoo import resolve_model

    model = resolve_model(args.model)
    rss0 = peak_rss_mb()
    backend, _ = obtain(model, args.backend, args.precision, variant=args.variant,
                        cache=ArtifactCache(args.cache_dir), threads=1)
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
    sets = {name[2:]: (data[name], data["y_" + name[2:]]) for name in data.files if name.startswith("X_")}
    acc = accuracy(backend.features, parity.head_scores(model), sets) if sets else {}
    best = max(throughput, key=throughput.get)
    return {"backend": args.backend, "precision": args.precision, "variant": backend.variant,
            "provider": backend.provider,
            "p50_ms": float(np.percentile(lat, 50) * 1e3), "p99_ms": float(np.percentile(lat, 99) * 1e3),
            "throughput_wps": {str(k): v for k, v in throughput.items()}, "best_batch": best,
            "best_throughput_wps": throughput[best],
            "peak_rss_mb": peak_rss_mb(), "rss_before_load_mb": rss0, "accuracy": acc,
            "torch_imported": "torch" in sys.modules}


def worker_cold(args) -> dict:
    """In a fresh process: time from interpreter start to the first served window, from the cache."""
    t_imports = time.perf_counter()
    from edge.serve import load_backbone
    from edge.zoo import resolve_model

    model = resolve_model(args.model)
    t0 = time.perf_counter()
    backend, reason = load_backbone(model, backend="auto", cache_dir=args.cache_dir, threads=1)
    x = np.load(args.data)["latency"][:1]
    backend.features(x)
    t1 = time.perf_counter()
    return {"backend": backend.key, "precision": backend.precision, "variant": backend.variant,
            "cache_hit": "cache hit" in reason, "recorded_choice": "recorded choice" in reason,
            "load_and_first_window_s": t1 - t0, "imports_s": t0 - t_imports,
            "peak_rss_mb": peak_rss_mb(), "torch_imported": "torch" in sys.modules}


def _run_worker(mode: str, args, backend: str, precision: str, variant: str) -> dict:
    cmd = [sys.executable, "-m", "edge.bench.serve", args.model, "--worker", mode, "--backend", backend,
           "--precision", precision, "--variant", variant, "--cache-dir", str(args.cache_dir),
           "--data", str(args.data), "--iters", str(args.iters), "--seconds", str(args.seconds)]
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise RuntimeError(f"{mode} worker for {backend} {precision} {variant} failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["process_wall_s"] = wall
    return res


def _prepare(args, model) -> tuple[Path, dict]:
    """Inputs shared by every worker: latency windows and the labelled [eval] sets."""
    from edge.serve.calibration import representative_windows
    from edge.serve.evaluation import eval_sets

    m = model.manifest
    lat = representative_windows(model, 64, seed=9_001)
    lat_source = "the model's calibration source (seed 9001)"
    if lat is None:
        lat = np.random.default_rng(9_001).standard_normal((64, m.channels, m.window)).astype(np.float32)
        lat_source = "random normal windows (the model folder names no calibration source)"
    arrays = {"latency": lat}
    sets, eval_where = eval_sets(model, n=args.n_eval, seed=9_100)
    for name, (X, y) in (sets or {}).items():
        arrays["X_" + name], arrays["y_" + name] = X, y
    Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
    path = Path(args.cache_dir) / "bench_inputs.npz"
    np.savez(path, **arrays)
    return path, {"latency": lat_source, "accuracy": eval_where if sets else eval_where}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edge bench serve", description=__doc__.split("\n\n")[0].replace("`", ""))
    ap.add_argument("model", nargs="?", default="vibration", help="model folder or shipped model name")
    ap.add_argument("--out", default=None, help="JSON results (default bench/out/serve-<model>.json); "
                    "a Markdown table is written next to it")
    ap.add_argument("--cache-dir", default=None, help="artifact cache (default: a fresh temporary one)")
    ap.add_argument("--iters", type=int, default=2000, help="batch-1 calls timed per candidate")
    ap.add_argument("--seconds", type=float, default=1.0, help="seconds per batch size for throughput")
    ap.add_argument("--n-eval", type=int, default=1000, help="labelled windows per [eval] condition")
    ap.add_argument("--write-card", action="store_true",
                    help="write the measured table into the model folder's CARD.md (serving section)")
    ap.add_argument("--worker", choices=["measure", "cold"], help=argparse.SUPPRESS)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    ap.add_argument("--precision", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.worker:
        print(json.dumps(worker_measure(args) if args.worker == "measure" else worker_cold(args)))
        return 0
    from edge.serve import compile_model
    from edge.zoo import resolve_model, write_serving_card

    model = resolve_model(args.model)
    args.model = str(model.path)
    args.out = args.out or f"bench/out/serve-{model.manifest.name}.json"
    args.cache_dir = Path(args.cache_dir or tempfile.mkdtemp(prefix="edge-bench-serve-"))
    args.data, sources = _prepare(args, model)
    print("measuring the serving choice (build, gate, time every candidate) ...", file=sys.stderr)
    chosen = compile_model(model, backend="auto", cache_dir=args.cache_dir, progress=False)
    decision = chosen.decision
    results = []
    for t in decision.trials:
        if not t.ok:
            continue
        c = t.candidate
        print(f"measuring {c.label} ...", file=sys.stderr)
        results.append(_run_worker("measure", args, c.backend, c.precision, c.variant))
    agreement = agree(model, decision, results, args)
    decision = agreement.pop("decision")
    cold = _run_worker("cold", args, "auto", "auto", "")
    report = summarise(model, results, decision, cold, sources, args, argv)
    report["agreement"] = agreement
    report["targets"]["choice_agrees_with_bench"] = {"met": agreement["agree"], "value": agreement["bench_choice"]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    table = markdown(report)
    out.with_suffix(".md").write_text(table)
    print(table)
    if args.write_card:
        write_serving_card(model.path, table)
        print(f"wrote the serving section of {model.path / 'CARD.md'}", file=sys.stderr)
    return 0


def bench_decision(results: list[dict], policy: str, tol: dict, accuracy: dict | None = None):
    """The decision the bench's own timings make, by the same rule as the choice (``decide``).

    ``accuracy`` (candidate label -> accuracy per condition) is the choice's, on its
    labelled set: the question is whether the two measurements of *speed* agree, and a
    short ``--n-eval`` makes the bench's own accuracy too coarse to judge half a point
    (one window of 100 is a point)."""
    from edge.serve.choice import Candidate, Trial, decide

    trials = []
    for r in results:
        c = Candidate(r["backend"], r["precision"], r.get("variant") or "")
        acc = (accuracy or {}).get(c.label, r["accuracy"]) or None
        trials.append(Trial(c, True, p50_ms=r["p50_ms"], accuracy=acc))
    return decide(trials, policy=policy, max_accuracy_loss=tol)


def agree(model, decision, results: list[dict], args) -> dict:
    """Whether the served choice is the one the bench's figures choose; if not, the choice is
    measured again once (3x the rounds, as an idle re-check does) and recorded, so that the
    cold start and the report below serve what the evidence of this run says."""
    from edge.serve import parity
    from edge.serve.cache import ArtifactCache
    from edge.serve.select import ROUNDS, measure, platform_key, record_path, write_record
    from edge.serve.backends import availability

    tol = {p: parity.tolerances(model, p).get("max_accuracy_loss", 0.5) for p in ("int8", "fp16")}
    bench = bench_decision(results, decision.policy, tol,
                           {t.candidate.label: t.accuracy for t in decision.trials if t.ok}).chosen
    first = decision.chosen
    out = {"choice": first.label if first else None, "choice_confidence": decision.confidence,
           "bench_choice": bench.label if bench else None, "remeasured": False}
    if bench != first:
        print(f"the choice ({out['choice']}) and the bench ({out['bench_choice']}) disagree; measuring the choice "
              "again ...", file=sys.stderr)
        cache = ArtifactCache(args.cache_dir)
        again = measure(model, cache=cache, policy=decision.policy, rounds=3 * ROUNDS).decision
        write_record(record_path(cache, model, platform_key(availability(), decision.policy)), again,
                     platform_key(availability(), decision.policy))
        out.update(remeasured=True, first_choice=out["choice"], first_reason=decision.reason,
                   choice=again.chosen.label if again.chosen else None, choice_confidence=again.confidence)
        decision = again
    out["agree"] = out["choice"] == out["bench_choice"]
    out["decision"] = decision
    return out


def _label(r: dict) -> str:
    return f"{r['backend']} {r['precision']}" + (f" ({r['variant']})" if r.get("variant") else "")


def summarise(model, results, decision, cold, sources, args, argv) -> dict:
    import onnxruntime

    from edge.serve.cpu import cpu_features

    cpu = cpu_features()
    by = {_label(r): r for r in results}
    ref = next((r for r in results if r["backend"] == "torch"), None)
    f32 = next((r for r in results if (r["backend"], r["precision"]) == ("onnxruntime", "fp32")), None)
    for r in results:
        r["speedup_vs_torch_p50"] = ref["p50_ms"] / r["p50_ms"] if ref else None
        r["speedup_vs_ort_fp32_p50"] = f32["p50_ms"] / r["p50_ms"] if f32 else None
        base = f32 or ref
        r["accuracy_delta_points"] = ({k: 100 * (v - base["accuracy"][k]) for k, v in r["accuracy"].items()}
                                      if base and r["accuracy"] else {})
    served_label = decision.chosen.label if decision.chosen else None
    served = by.get(served_label)
    targets = {}
    if served:
        if f32:
            s = served["speedup_vs_ort_fp32_p50"]
            targets["served_not_slower_than_ort_fp32"] = {"value": round(s, 2), "met": s >= 1.0}
            if decision.policy == "fp32":
                targets["served_ge_1.3x_ort_fp32_with_int8_dot"] = {"value": round(s, 2), "met": None,
                                                                     "note": "not applicable: manifest precision policy fp32"}
            elif cpu.int8_dot:
                targets["served_ge_1.3x_ort_fp32_with_int8_dot"] = {"value": round(s, 2), "met": s >= 1.3}
            else:
                targets["served_ge_1.3x_ort_fp32_with_int8_dot"] = {"value": round(s, 2), "met": None,
                                                                     "note": "not applicable: no int8 dot-product"}
        if ref:
            s = served["speedup_vs_torch_p50"]
            targets["served_ge_4x_torch"] = {"value": round(s, 2), "met": s >= 4.0}
        deltas = served["accuracy_delta_points"]
        if deltas:
            largest = max(deltas, key=lambda k: abs(deltas[k]))
            targets["accuracy_within_0.5_points_abs"] = {"largest_abs_condition": largest,
                                                         "value": round(deltas[largest], 2),
                                                         "met": abs(deltas[largest]) <= 0.5 + 1e-9}
        else:
            targets["accuracy_within_0.5_points_abs"] = {"met": None, "note": sources["accuracy"]}
        targets["cache_load_first_window_lt_2s"] = {"value": round(cold["process_wall_s"], 3),
                                                    "met": cold["process_wall_s"] < 2.0}
    return {
        "command": "edge bench serve " + shlex.join(argv),
        "model": {"name": model.manifest.name, "version": model.manifest.version, "hash": model.content_hash[:16],
                  "task": model.manifest.task, "input": [model.manifest.channels, model.manifest.window]},
        "machine": {"cpu": _cpu_name(), "cpu_features": cpu.to_dict(), "cpu_summary": cpu.summary(),
                    "cores_visible": os.cpu_count(), "threads_used": 1, "python": platform.python_version(),
                    "torch": _version("torch"), "onnxruntime": onnxruntime.__version__},
        "settings": {"iters_batch1": args.iters, "seconds_per_batch": args.seconds, "n_eval": args.n_eval},
        "inputs": sources,
        "choice": decision.to_dict(), "served": served_label, "results": results, "cold_start": cold,
        "targets": targets, "bench_wall_s": time.perf_counter() - T_START,
    }


def markdown(report: dict) -> str:
    """The report as the Markdown that goes into BENCHMARKS.md and the model's CARD.md."""
    mach, model = report["machine"], report["model"]
    lines = [f"Measured by `{report['command']}` on {mach['cpu']} ({mach['cpu_summary']}), 1 thread, "
             f"onnxruntime {mach['onnxruntime']}, torch {mach['torch']}; model {model['name']} {model['version']} "
             f"({model['hash']}). Latency inputs: {report['inputs']['latency']}. Served: **{report['served']}**.", "",
             _agreement_line(report), "",
             "| candidate | p50 batch 1 | p99 batch 1 | vs ORT fp32 | vs torch | best throughput | peak RSS | served |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        f = r["speedup_vs_ort_fp32_p50"]
        t = r["speedup_vs_torch_p50"]
        lines.append(f"| {_label(r)} | {r['p50_ms']:.4f} ms | {r['p99_ms']:.4f} ms | "
                     f"{'-' if f is None else f'{f:.2f}x'} | {'-' if t is None else f'{t:.1f}x'} | "
                     f"{r['best_throughput_wps']:,.0f} win/s (batch {r['best_batch']}) | {r['peak_rss_mb']:.0f} MB | "
                     f"{'yes' if _label(r) == report['served'] else ''} |")
    refused = [t for t in report["choice"]["trials"] if not t["ok"]]
    for t in refused:
        c = t["candidate"]
        lines.append(f"| {c['backend']} {c['precision']} {c['variant']} | refused: {t['why'][:120]} | | | | | | |")
    accs = [r for r in report["results"] if r["accuracy"]]
    lines.append("")
    if accs:
        conds = list(accs[0]["accuracy"])
        lines += ["Accuracy (%) on the labelled check set, and the change vs fp32 in points:", "",
                  "| condition | " + " | ".join(_label(r) for r in accs) + " |",
                  "|---|" + "---|" * len(accs)]
        for k in conds:
            cells = [f"{100 * r['accuracy'][k]:.1f} ({r['accuracy_delta_points'].get(k, 0):+.1f})" for r in accs]
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
    else:
        lines.append(f"Accuracy: {report['inputs']['accuracy']}.")
    cold = report["cold_start"]
    lines += ["", f"Cold start of the served choice from the cache (fresh process, parity gate on load, first "
              f"window): {cold['process_wall_s']:.2f} s process wall, torch imported: {cold['torch_imported']}.", "",
              "Targets: " + "; ".join(f"{k} {'met' if v.get('met') else ('n/a' if v.get('met') is None else 'MISSED')}"
                                       f"{' (' + str(v['value']) + ')' if 'value' in v else ''}"
                                       for k, v in report["targets"].items()) + ".", ""]
    return "\n".join(lines)


def _agreement_line(report: dict) -> str:
    a = report.get("agreement")
    if not a:
        return ""
    again = (f" The first choice ({a['first_choice']}) disagreed with the bench and was measured again."
             if a["remeasured"] else "")
    return (f"Serving choice: {a['choice']} ({a['choice_confidence']}); the bench's own figures choose "
            f"{a['bench_choice']}: {'they agree' if a['agree'] else 'they DISAGREE'}.{again}")


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:  # noqa: BLE001  informative only
        return None


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
