#!/usr/bin/env bash
# Install the edge runtime into ./.venv, picking the right torch build for this machine.
#   scripts/install.sh          runtime (+ the embedded broker the demo falls back on)
#   scripts/install.sh --dev    runtime + test dependencies
# Environment: PYTHON (default python3, >= 3.10), EDGE_TORCH_SPEC to force a torch requirement.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="embedded-broker"
[ "${1:-}" = "--dev" ] && extras="embedded-broker,dev"
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "edge-runtime needs Python >= 3.10 ($PY is older)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=".venv/bin/python -m pip"
$pip install -q --upgrade pip >/dev/null 2>&1 || true

# torch first: a plain 'torch' requirement would pull a multi-GB CUDA build onto a CPU box.
if .venv/bin/python -c 'import torch' 2>/dev/null; then
  echo "torch $(.venv/bin/python -c 'import torch; print(torch.__version__)') already installed"
elif [ -n "${EDGE_TORCH_SPEC:-}" ]; then
  $pip install "$EDGE_TORCH_SPEC"
elif [ -f /etc/nv_tegra_release ]; then
  # Jetson: torch must be NVIDIA's JetPack build (README, "Jetson"); reuse the system one.
  echo "Jetson detected: using the JetPack torch from the system site-packages" >&2
  "$PY" -c 'import torch' || { echo "install NVIDIA's torch wheel for your JetPack first (see README)" >&2; exit 1; }
  rm -rf .venv && "$PY" -m venv --system-site-packages .venv
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  $pip install "torch>=2.2,<2.15"            # PyPI's default Linux build is the CUDA one
else
  # CPU build: a local wheel or mirror first, then PyTorch's CPU index.
  $pip install "torch==2.13.0+cpu" 2>/dev/null \
    || $pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
fi

$pip install -q -e ".[${extras}]"
echo "installed: $(.venv/bin/edge --help >/dev/null && echo .venv/bin/edge)"
