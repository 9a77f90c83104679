#!/usr/bin/env bash
# The serving tests as on an AVX2-only x86-64 CPU (no AVX-512, no VNNI), emulated.
#
#   scripts/check-avx2.sh [PYTEST ARGS...]     (default: tests/test_serve_*.py, less the
#                                               ones that start subprocesses; see below)
#
# Needs Debian's qemu-user (`apt-get install qemu-user`). The interpreter runs under
# `qemu-x86_64 -cpu Haswell`, so ONNX Runtime's CPUID sees AVX2 without VNNI and picks the
# kernels whose u8s8 / s8s8 dot product can saturate (edge/serve/cpu.py). qemu-user shows
# the host's /proc/cpuinfo, so EDGE_CPUINFO names a Haswell one for edge.serve.cpu.
# Limits: processes the tests start (edge run, edge bench serve workers) run natively,
# unqualified by the emulation, so those test files are left out by default; TCG is
# ~5-10x slower than the host, so this is not part of .ci/run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
command -v qemu-x86_64 >/dev/null || { echo "qemu-x86_64 missing: apt-get install qemu-user" >&2; exit 2; }
INFO="$(mktemp)"
trap 'rm -f "$INFO"' EXIT
printf 'processor\t: 0\nmodel name\t: QEMU Haswell (emulated)\nflags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 popcnt avx f16c fma bmi1 bmi2 avx2 movbe\n' >"$INFO"
cd "$ROOT"
if [ $# -eq 0 ]; then
  set -- $(ls tests/test_serve_*.py | grep -v -e test_serve_lean -e test_serve_shipped)
fi
# the emulated CPU must not be the host's: fail loudly if VNNI is still visible to ONNX Runtime's view
EDGE_CPUINFO="$INFO" qemu-x86_64 -cpu Haswell "$PY" -c '
from edge.serve.cpu import cpu_features, int8_formats
c = cpu_features(); print("emulated:", c.summary(), [f.name for f in int8_formats(c)])
assert not c.vnni' 2>&1 | grep -v "TCG doesn.t support"
EDGE_CPUINFO="$INFO" exec qemu-x86_64 -cpu Haswell "$PY" -m pytest -q -p no:cacheprovider "$@" 2> >(grep -v "TCG doesn.t support" >&2)
