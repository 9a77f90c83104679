# Choosing the right torch build for this machine, shared by scripts/install.sh (a
# checkout's ./.venv) and deploy/install.sh (/opt/edge-runtime/venv). Source it, then
#   edge_install_torch PYTHON VENV
# installs torch into VENV (which must exist) unless it already imports there. On a
# Jetson the venv is recreated with the system site-packages so that NVIDIA's JetPack
# torch is used (README, "Jetson"). EDGE_TORCH_SPEC forces a requirement.

edge_is_jetson() {
  [ -f "${EDGE_TEGRA_RELEASE:-/etc/nv_tegra_release}" ]
}

edge_install_torch() {
  local py=$1 venv=$2
  local pip="$venv/bin/python -m pip"
  # torch first: a plain 'torch' requirement would pull a multi-GB CUDA build onto a CPU box.
  if "$venv/bin/python" -c 'import torch' 2>/dev/null; then
    echo "torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)') already installed"
  elif [ -n "${EDGE_TORCH_SPEC:-}" ]; then
    $pip install "$EDGE_TORCH_SPEC"
  elif edge_is_jetson; then
    echo "Jetson detected: using the JetPack torch from the system site-packages" >&2
    "$py" -c 'import torch' || { echo "install NVIDIA's torch wheel for your JetPack first (see README)" >&2; return 1; }
    rm -rf "$venv" && "$py" -m venv --system-site-packages "$venv"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $pip install "torch>=2.2,<2.15"            # PyPI's default Linux build is the CUDA one
  else
    # CPU build: a local wheel or mirror first, then PyTorch's CPU index.
    $pip install "torch==2.13.0+cpu" 2>/dev/null \
      || $pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  fi
}
