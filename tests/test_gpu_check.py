"""``scripts/gpu-check.sh`` here, without a GPU: its CPU parts run, every GPU part is
skipped with the reason, and it writes its JSON and Markdown table."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(300)
GPU_PARTS = ("torch_cuda_fp32", "torch_cuda_fp16", "ort_cuda_fp32", "ort_tensorrt_fp16", "edge_tensorrt_fp16",
             "head_steps_cuda")


def test_gpu_check_runs_its_cpu_parts_and_skips_the_gpu_parts_with_the_reason(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), str(tmp_path), "--iters", "20",
                        "--seconds", "0.02", "--head-steps", "10"], capture_output=True, text=True, env=env, cwd=ROOT)

    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    if "no NVIDIA GPU here" not in r.stdout:
        pytest.skip("this machine has an NVIDIA GPU: the script ran its GPU parts")
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    table = (tmp_path / "gpu-check.md").read_text()
    s = report["sections"]
    for part in ("torch_cpu_fp32", "onnx_export", "ort_cpu_fp32", "head_steps_cpu"):
        assert s[part]["status"] == "ok", (part, s[part])
    for part in GPU_PARTS:
        assert s[part]["status"] == "skipped" and s[part]["reason"], (part, s[part])
    assert report["gpu_parts"].startswith("skipped: ") and "no CUDA device" in s["torch_cuda_fp32"]["reason"]
    assert s["ort_cpu_fp32"]["parity"]["min_cosine"] > 0.9999
    assert "| torch_cuda_fp16 | skipped: " in table and "| torch CPU fp32 (1 thread) | ok |" in table
