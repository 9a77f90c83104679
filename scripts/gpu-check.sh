#!/usr/bin/env bash
# GPU check of the serving and training paths, in one prepared run (well under 10 minutes).
#
#   scripts/gpu-check.sh [OUT_DIR]        (default OUT_DIR: bench/out)
#
# On a machine with an NVIDIA GPU (nvidia-smi lists one) it creates its own venv
# ($EDGE_GPU_VENV, default .gpu-venv), installs from PyPI a CUDA build of torch,
# onnxruntime-gpu and this package (without its CPU onnxruntime), plus torch-tensorrt
# and nvidia-modelopt when EDGE_GPU_TRT=1, then runs `python -m edge.bench.gpu` once:
# torch CUDA fp32/fp16, ONNX Runtime CUDA / TensorRT providers, parity against the CPU
# reference, batch-1 latency, best throughput, head training steps on the GPU.
# Without a GPU it runs the CPU-only parts with $PYTHON (default: python3) and records
# every GPU part as skipped, with the reason. Writes OUT_DIR/gpu-check.json and .md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/bench/out}"
VENV="${EDGE_GPU_VENV:-$ROOT/.gpu-venv}"
LIMIT="${EDGE_GPU_TIMEOUT:-480}"   # seconds for the check itself, after installing
mkdir -p "$OUT"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    echo "gpu-check: $(nvidia-smi -L | head -n1)"
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
    fi
    PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
    # PyPI's Linux torch wheels are CUDA builds; onnxruntime-gpu replaces onnxruntime.
    "${PIP[@]}" "torch>=2.2,<2.15" onnxruntime-gpu "numpy>=1.24" "safetensors>=0.4" "onnx>=1.15" \
        "onnxscript>=0.2" "paho-mqtt>=2.0,<3" pyserial orjson matplotlib
    "${PIP[@]}" --no-deps -e "$ROOT"
    if [ "${EDGE_GPU_TRT:-0}" = "1" ]; then
        "${PIP[@]}" torch-tensorrt nvidia-modelopt || echo "gpu-check: torch-tensorrt/modelopt install failed; those parts will be skipped"
    fi
    PY="$VENV/bin/python"
else
    echo "gpu-check: no NVIDIA GPU here (nvidia-smi missing or lists none): running the CPU-only parts; GPU parts are skipped"
    PY="${PYTHON:-python3}"
fi

cd "$ROOT"
exec timeout "$LIMIT" "$PY" -m edge.bench.gpu --out "$OUT/gpu-check.json" "${@:2}"
