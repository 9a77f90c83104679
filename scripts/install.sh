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

# shellcheck source=scripts/lib/torch.sh
. scripts/lib/torch.sh
edge_install_torch "$PY" .venv

$pip install -q -e ".[${extras}]"
echo "installed: $(.venv/bin/edge --help >/dev/null && echo .venv/bin/edge)"
