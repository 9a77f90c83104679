#!/usr/bin/env bash
# The suite as on an AVX2-only x86-64 CPU (AVX2 and FMA; no AVX-512, no VNNI), emulated.
#
#   scripts/check-avx2.sh [--shard K/N] [PYTEST ARGS...]
#
# With no test paths: the whole suite (pyproject's testpaths). --shard K/N runs the K-th of N
# round-robin slices of tests/test_*.py as listed when it starts (a file added meanwhile moves
# the others; shard 1 also takes the doctests in edge/ and
# firmware_bridge/), so that the slow emulated suite can be split across runs or machines.
# Needs Debian's qemu-user (`apt-get install qemu-user`). Every Python process of the run is
# emulated, not only pytest's: scripts/avx2-env.sh makes a view of the venv whose bin/python
# runs the interpreter under `qemu-x86_64 -cpu Haswell`, and that is sys.executable, the
# shebang of its bin/edge and the first python and edge on PATH, so `edge run` processes, bench
# workers and `sys.executable -c` children see the emulated CPUID too. Processes that are not
# Python (mosquitto, podman, cc, sh) run natively. ONNX Runtime then picks its AVX2 kernels,
# whose u8s8 / s8s8 dot product can saturate (edge/serve/cpu.py); numba (edge/adapt/kernels.py)
# compiles for LLVM's "haswell". numba's cache index is keyed by CPU name and features, so
# native entries would not be reused, but the run still gets a fresh NUMBA_CACHE_DIR so that
# it neither writes into the tree's __pycache__ nor races native runs on the same index files.
# qemu-user shows the host's /proc/cpuinfo, so EDGE_CPUINFO names a Haswell one.
# TCG is several times slower than the host: not part of .ci/run (README, Development).
# EDGE_AVX2_DIR=DIR keeps the emulated venv view and numba cache in DIR (else a temp folder).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
if [ -n "${EDGE_AVX2_DIR:-}" ]; then
  WORK="$EDGE_AVX2_DIR"; mkdir -p "$WORK"
else
  WORK="$(mktemp -d)"; trap 'rm -rf "$WORK"' EXIT
fi
"$ROOT/scripts/avx2-env.sh" "$WORK/env" "$VENV"
export VIRTUAL_ENV="$WORK/env" PATH="$WORK/env/bin:$PATH"
# bounds on waiting (timeout marks, tests.helpers.poll) are for the host; TCG is about 5-10x slower
export EDGE_TEST_SLOWDOWN="${EDGE_TEST_SLOWDOWN:-10}"
unset PYTHONHOME NUMBA_CPU_NAME NUMBA_CPU_FEATURES EDGE_CPUINFO NUMBA_CACHE_DIR NPY_DISABLE_CPU_FEATURES
PY="$WORK/env/bin/python"
cd "$ROOT"

# The emulation must reach the CPU that code sees (CPUID, as ONNX Runtime and LLVM read it),
# in this process and in a child started the way the tests start theirs: fail loudly if not.
"$PY" - <<'PYCHECK'
import subprocess, sys
PROBE = ("import llvmlite.binding as ll; f = ll.get_host_cpu_features(); "
         "print(ll.get_host_cpu_name(), int(f['avx2']), int(f['fma']), int(f['avx512f']), "
         "int(f.get('avxvnni', 0) or f.get('avx512vnni', 0)))")
mine = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
child = subprocess.run(["edge", "--version"], capture_output=True, text=True, check=True)
from edge.serve.cpu import cpu_features, int8_formats
c = cpu_features()
name, avx2, fma, avx512, vnni = mine.stdout.split()
print(f"emulated: {sys.executable} (LLVM: {name}); {c.summary()}; int8 formats "
      f"{[f.name for f in int8_formats(c)]}; child {child.stdout.strip()}")
assert (avx2, fma, avx512, vnni) == ("1", "1", "0", "0"), f"the child is not emulated: {mine.stdout}"
assert not c.vnni and c.avx2, c.summary()
PYCHECK

ARGS=()
if [ "${1:-}" = "--shard" ]; then
  K="${2%/*}"; N="${2#*/}"; shift 2
  [[ "$K" =~ ^[0-9]+$ && "$N" =~ ^[0-9]+$ && "$K" -ge 1 && "$K" -le "$N" ]] \
    || { echo "--shard takes K/N with 1 <= K <= N, not '$K/$N'" >&2; exit 2; }
  i=0
  for f in tests/test_*.py; do
    [ $((i % N + 1)) -eq "$K" ] && ARGS+=("$f")
    i=$((i + 1))
  done
  [ "$K" -eq 1 ] && ARGS+=(edge firmware_bridge)
fi
"$PY" -m pytest -p no:cacheprovider --hypothesis-profile=emulated "${ARGS[@]}" "$@"
