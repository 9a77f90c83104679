"""``python -m edge.bench.gpu``: the GPU checks of ``scripts/gpu-check.sh``, in one process.

On a machine with an NVIDIA GPU: torch CUDA fp32 and fp16 serving of the backbone,
ONNX Runtime's CUDA and (where present) TensorRT execution providers, and the
torch-tensorrt backend where it is installed; each checked for parity against the CPU
fp32 reference on the model's own calibration windows, timed at batch 1 (p50/p99, with
``torch.cuda.synchronize``) and for the best throughput over batch sizes; then head
training steps (a linear head on the backbone's features, cross-entropy, Adam) on the
GPU against the same steps on the CPU. Without a GPU, the CPU parts run (reference,
ONNX Runtime CPU, head steps on the CPU) and every GPU part is recorded as skipped
with the reason. Writes a JSON and a Markdown table.

    python -m edge.bench.gpu --model vibration --out bench/out/gpu-check.json
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

BATCHES = (1, 8, 32, 128, 512, 1024)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.where(den == 0, 1.0, den)


def parity(ref: np.ndarray, got: np.ndarray) -> dict:
    """Agreement of features with the CPU fp32 reference.

    >>> parity(np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32))["min_cosine"]
    1.0
    """
    c = _cos(ref, got)
    return {"mean_cosine": float(c.mean()), "min_cosine": float(c.min()),
            "max_abs_err": float(np.abs(ref.astype(np.float64) - got).max())}


def timing(run, x_for_batch, *, iters: int, seconds: float, sync=lambda: None) -> dict:
    """p50/p99 at batch 1 and throughput per batch size of ``run(x)``."""
    x1 = x_for_batch(1)
    for _ in range(20):
        run(x1)
    sync()
    lat = []
    for _ in range(iters):
        t = time.perf_counter()
        run(x1)
        sync()
        lat.append(time.perf_counter() - t)
    thr = {}
    for b in BATCHES:
        xb = x_for_batch(b)
        run(xb)
        sync()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            run(xb)
            n += b
        sync()
        thr[str(b)] = n / (time.perf_counter() - t0)
    best = max(thr, key=thr.get)
    return {"p50_ms": float(np.percentile(lat, 50) * 1e3), "p99_ms": float(np.percentile(lat, 99) * 1e3),
            "throughput_wps": thr, "best_batch": int(best), "best_throughput_wps": thr[best]}


class Skip(Exception):
    """Raised by a part that finds, only when it runs, that it cannot run here (not a failure)."""


class Report:
    """Sections, each ok (with figures), skipped (with the reason) or failed (with the error)."""

    def __init__(self):
        self.sections: dict[str, dict] = {}

    def run(self, name: str, fn, *, skip: str | None = None):
        if skip:
            self.sections[name] = {"status": "skipped", "reason": skip}
            print(f"[gpu-check] {name}: SKIPPED ({skip})", file=sys.stderr)
            return None
        t = time.perf_counter()
        try:
            out = fn()
        except Skip as e:
            self.sections[name] = {"status": "skipped", "reason": str(e)}
            print(f"[gpu-check] {name}: SKIPPED ({e})", file=sys.stderr)
            return None
        except Exception as e:  # noqa: BLE001  one failing part must not hide the others
            self.sections[name] = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                                   "traceback": traceback.format_exc()[-2000:]}
            print(f"[gpu-check] {name}: FAILED ({type(e).__name__}: {e})", file=sys.stderr)
            return None
        self.sections[name] = {"status": "ok", "wall_s": time.perf_counter() - t, **out}
        print(f"[gpu-check] {name}: ok", file=sys.stderr)
        return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="python -m edge.bench.gpu", description=__doc__.split("\n\n")[0].replace("`", ""))
    ap.add_argument("--model", default="vibration", help="model folder or shipped model name")
    ap.add_argument("--out", default="bench/out/gpu-check.json", help="JSON; the Markdown table goes next to it")
    ap.add_argument("--iters", type=int, default=1000, help="batch-1 calls timed per variant")
    ap.add_argument("--seconds", type=float, default=0.5, help="seconds per batch size for throughput")
    ap.add_argument("--head-steps", type=int, default=300, help="head training steps per device")
    ap.add_argument("--cpu-only", action="store_true", help="skip the GPU parts even if a GPU is present")
    args = ap.parse_args(argv)

    import torch

    from edge.serve.calibration import representative_windows
    from edge.serve.cpu import cpu_features
    from edge.serve.evaluation import eval_sets
    from edge.zoo import resolve_model

    model = resolve_model(args.model)
    m = model.manifest
    cuda = torch.cuda.is_available() and not args.cpu_only
    if args.cpu_only:
        no_gpu = "--cpu-only given"
    elif not torch.cuda.is_available():
        no_gpu = (f"no CUDA device: torch {torch.__version__} "
                  f"({'a CPU-only build' if torch.version.cuda is None else 'CUDA ' + torch.version.cuda}) "
                  "reports torch.cuda.is_available() False")
    else:
        no_gpu = None
    rep = Report()
    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "cpu": cpu_features().summary(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import onnxruntime as ort

        if cuda and hasattr(ort, "preload_dlls"):
            # onnxruntime-gpu >= 1.21 can use the CUDA/cuDNN libraries of torch's nvidia-* wheels
            try:
                ort.preload_dlls()
            except Exception as e:  # noqa: BLE001  then the CUDA provider's own loading reports it
                env["ort_preload_dlls"] = f"{type(e).__name__}: {e}"
        env["onnxruntime"], env["ort_providers"] = ort.__version__, ort.get_available_providers()
    except ImportError as e:
        ort = None
        env["onnxruntime"] = f"not importable: {e}"
    x = representative_windows(model, 256, seed=4_242)
    if x is None:
        x = np.random.default_rng(4_242).standard_normal((256, m.channels, m.window)).astype(np.float32)

    def batch_of(b):
        return np.ascontiguousarray(np.resize(x, (b,) + x.shape[1:]))

    torch.set_num_threads(1)
    backbone, _ = model.build()
    with torch.inference_mode():
        ref = backbone(torch.from_numpy(x)).numpy()

    def cpu_reference():
        def run(xb):
            with torch.inference_mode():
                return backbone(torch.from_numpy(xb))
        return {"variant": "torch CPU fp32 (1 thread)", **timing(run, batch_of, iters=args.iters, seconds=args.seconds)}

    rep.run("torch_cpu_fp32", cpu_reference)

    def torch_cuda(dtype):
        def go():
            mod = model.build()[0].cuda().to(dtype).eval()

            def run(xb, _mod=mod):
                with torch.inference_mode():
                    return _mod(torch.from_numpy(xb).cuda().to(dtype))
            with torch.inference_mode():
                got = mod(torch.from_numpy(x).cuda().to(dtype)).float().cpu().numpy()
            return {"variant": f"torch CUDA {dtype}", "parity": parity(ref, got),
                    **timing(run, batch_of, iters=args.iters, seconds=args.seconds, sync=torch.cuda.synchronize)}
        return go

    rep.run("torch_cuda_fp32", torch_cuda(torch.float32), skip=no_gpu)
    rep.run("torch_cuda_fp16", torch_cuda(torch.float16), skip=no_gpu)

    onnx_path = Path(tempfile.mkdtemp(prefix="edge-gpu-check-")) / "backbone.onnx"

    def export():
        from edge.serve.export import export_onnx

        return {"exporter": export_onnx(model, onnx_path)}

    exported = rep.run("onnx_export", export, skip=None if ort is not None else env["onnxruntime"])

    def ort_session(provider, options=None):
        def go():
            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            so.log_severity_level = 3
            sess = ort.InferenceSession(str(onnx_path), so, providers=[(provider, options or {}), "CPUExecutionProvider"])
            used = sess.get_providers()[0]
            if used != provider and provider == "TensorrtExecutionProvider":
                # onnxruntime-gpu lists it even without the TensorRT libraries, then falls back
                raise Skip(f"TensorrtExecutionProvider is listed but could not load (session runs on {used}); "
                           "install TensorRT (pip install tensorrt) for this part")
            if used != provider:
                raise RuntimeError(f"{provider} was requested but the session runs on {used}")
            name = sess.get_inputs()[0].name

            def run(xb):
                return sess.run(None, {name: xb})[0]
            got = np.concatenate([run(x[i:i + 64]) for i in range(0, len(x), 64)])
            return {"variant": f"ONNX Runtime {provider}" + (f" {options}" if options else ""),
                    "parity": parity(ref, got), **timing(run, batch_of, iters=args.iters, seconds=args.seconds)}
        return go

    providers = env.get("ort_providers", [])
    not_exported = None if exported else "ONNX export failed or onnxruntime missing"
    rep.run("ort_cpu_fp32", ort_session("CPUExecutionProvider"), skip=not_exported)
    rep.run("ort_cuda_fp32", ort_session("CUDAExecutionProvider"),
            skip=no_gpu or not_exported or (None if "CUDAExecutionProvider" in providers
                                            else f"onnxruntime {env['onnxruntime']} has no CUDAExecutionProvider "
                                                 "(install onnxruntime-gpu)"))
    trt_skip = no_gpu or not_exported or (None if "TensorrtExecutionProvider" in providers
                                          else "onnxruntime has no TensorrtExecutionProvider (needs TensorRT libraries)")
    rep.run("ort_tensorrt_fp16", ort_session("TensorrtExecutionProvider",
                                             {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                                              "trt_engine_cache_path": str(onnx_path.parent)}), skip=trt_skip)

    def torch_tensorrt_backend():
        from edge.serve import compile_model, load_backbone

        cache = onnx_path.parent / "cache"
        compile_model(model, backend="tensorrt", precision="fp16", cache_dir=cache, progress=False)
        b, reason = load_backbone(model, backend="tensorrt", precision="fp16", cache_dir=cache)
        got = b.features(x)
        return {"variant": f"edge tensorrt backend {b.precision}", "reason": reason[:400], "parity": parity(ref, got),
                **timing(b.features, batch_of, iters=args.iters, seconds=args.seconds, sync=torch.cuda.synchronize)}

    from edge.serve.backends import availability

    trt_ok, trt_why = availability()["tensorrt"]
    rep.run("edge_tensorrt_fp16", torch_tensorrt_backend, skip=no_gpu or (None if trt_ok else trt_why))

    sets, where = eval_sets(model, n=500) if m.task == "classification" else (None, "not a classification model")
    if sets:
        X = np.concatenate([v[0] for v in sets.values()])
        Y = np.concatenate([v[1] for v in sets.values()])
    else:
        X, Y = x, np.random.default_rng(0).integers(0, max(2, m.outputs), len(x))

    with torch.inference_mode():
        Z = np.concatenate([backbone(torch.from_numpy(X[i:i + 256])).numpy() for i in range(0, len(X), 256)])

    def head_steps(device):
        def go():
            z = torch.from_numpy(Z).to(device)
            y = torch.from_numpy(Y.astype(np.int64)).to(device)
            head = torch.nn.Linear(Z.shape[1], int(Y.max()) + 1).to(device)
            opt = torch.optim.Adam(head.parameters(), lr=1e-2)
            sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
            rng = np.random.default_rng(0)
            idx = [torch.from_numpy(rng.integers(0, len(Z), 64)).to(device) for _ in range(args.head_steps)]
            sync()
            t = time.perf_counter()
            for i in idx:
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(head(z[i]), y[i])
                loss.backward()
                opt.step()
            sync()
            dt = time.perf_counter() - t
            with torch.no_grad():
                acc = float((head(z).argmax(1) == y).float().mean())
            return {"variant": f"linear head, Adam, batch 64, on {device}", "steps": args.head_steps,
                    "ms_per_step": 1e3 * dt / args.head_steps, "final_loss": float(loss.item()),
                    "train_accuracy": acc, "labels": where if sets else "random labels (no [eval] data)"}
        return go

    rep.run("head_steps_cpu", head_steps("cpu"))
    rep.run("head_steps_cuda", head_steps("cuda"), skip=no_gpu)

    report = {"command": "python -m edge.bench.gpu " + shlex.join(argv), "model": m.name,
              "environment": env, "gpu_parts": "skipped: " + no_gpu if no_gpu else "run",
              "sections": rep.sections}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    table = markdown(report)
    out.with_suffix(".md").write_text(table)
    print(table)
    failed = [k for k, v in rep.sections.items() if v["status"] == "failed"]
    return 1 if failed else 0


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"`{report['command']}`: model {report['model']}; GPU {env['gpu'] or 'none'}; torch {env['torch']} "
             f"(CUDA {env['torch_cuda']}); onnxruntime {env.get('onnxruntime')}; CPU {env['cpu']}. "
             f"GPU parts: {report['gpu_parts']}.", "",
             "| part | status | p50 batch 1 | p99 batch 1 | best throughput | parity vs CPU fp32 (mean / min cosine, max abs) |",
             "|---|---|---|---|---|---|"]
    for name, s in report["sections"].items():
        if name.startswith("head_steps") or name == "onnx_export":
            continue
        if s["status"] != "ok":
            lines.append(f"| {name} | {s['status']}: {s.get('reason') or s.get('error')} | | | | |")
            continue
        p = s.get("parity")
        par = f"{p['mean_cosine']:.5f} / {p['min_cosine']:.5f}, {p['max_abs_err']:.3g}" if p else "reference"
        lines.append(f"| {s['variant']} | ok | {s['p50_ms']:.4f} ms | {s['p99_ms']:.4f} ms | "
                     f"{s['best_throughput_wps']:,.0f} win/s (batch {s['best_batch']}) | {par} |")
    lines += ["", "| head training | status | ms per step | final loss | train accuracy |", "|---|---|---|---|---|"]
    for name in ("head_steps_cpu", "head_steps_cuda"):
        s = report["sections"].get(name, {})
        if s.get("status") == "ok":
            lines.append(f"| {s['variant']} | ok | {s['ms_per_step']:.3f} | {s['final_loss']:.3f} | "
                         f"{s['train_accuracy']:.3f} |")
        else:
            lines.append(f"| {name} | {s.get('status')}: {s.get('reason') or s.get('error')} | | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
