#!/usr/bin/env bash
# Make DIR an emulated view of the project's venv: DIR/bin/python runs the venv's interpreter
# under `qemu-x86_64 -cpu Haswell` (AVX2, FMA, no AVX-512, no VNNI), and so does every Python
# process started from it, because it is what they see as sys.executable.
#
#   scripts/avx2-env.sh DIR [VENV]        (VENV defaults to .venv; DIR is created or refreshed)
#
# Why a venv view and not `qemu-x86_64 python`: qemu-user runs only the process it starts; a
# child that execs sys.executable or .venv/bin/edge runs natively, on the host's AVX-512/VNNI.
# Here qemu's -0 sets the guest's argv[0] to DIR/bin/python, so CPython takes that as
# sys.executable and finds DIR/pyvenv.cfg (the venv's own, copied) and DIR/lib (a link to the
# venv's site-packages). `sys.executable -m edge.cli`, DIR/bin/edge (shebang rewritten to
# DIR/bin/python) and `edge` found on PATH all run emulated. No binfmt_misc is needed (it would
# emulate every x86-64 binary on the host, other users' included).
# The CPU model drops the Haswell features TCG cannot give (pcid, x2apic, tsc-deadline, invpcid,
# and TSX: hle, rtm; none is used by user code), so qemu prints no warning on a child's stderr.
# qemu-user shows the host's /proc/cpuinfo: DIR/cpuinfo is a Haswell one, for EDGE_CPUINFO.
set -euo pipefail
DIR="${1:?usage: scripts/avx2-env.sh DIR [VENV]}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(cd "${2:-$ROOT/.venv}" && pwd)"
QEMU="$(command -v qemu-x86_64)" || { echo "qemu-x86_64 missing: apt-get install qemu-user" >&2; exit 2; }
REAL="$(readlink -f "$VENV/bin/python")"
[ -x "$REAL" ] || { echo "no interpreter at $VENV/bin/python: run scripts/install.sh --dev" >&2; exit 2; }
CPU="${EDGE_QEMU_CPU:-Haswell,-pcid,-x2apic,-tsc-deadline,-invpcid,-hle,-rtm}"
mkdir -p "$DIR/bin"
DIR="$(cd "$DIR" && pwd)"
cp "$VENV/pyvenv.cfg" "$DIR/pyvenv.cfg"
for d in lib lib64 include; do
  [ -e "$VENV/$d" ] && ln -sfn "$(readlink -f "$VENV/$d")" "$DIR/$d"
done
# Defaults set here, not only by the caller, so that a child started with a scrubbed environment
# still gets them (a test's own EDGE_CPUINFO or NPY_DISABLE_CPU_FEATURES wins):
# - EDGE_CPUINFO: qemu-user shows the host's /proc/cpuinfo; DIR/cpuinfo is a Haswell one.
# - NUMBA_CACHE_DIR: numba's cache index is keyed by CPU name and features, so native entries
#   are not reused, but a folder of its own keeps the emulated run out of the tree's __pycache__
#   and off the index files a native run on the same tree rewrites.
# - NPY_DISABLE_CPU_FEATURES=X86_V3: qemu 7.2's TCG (Debian bookworm) miscomputes numpy 2.x's
#   AVX2 argselect (x86-simd-sort): np.argpartition returns a wrong partition of an int32 array
#   of 10,240 and segfaults in edge.fleet.codec.encode_tensor, where the same kernel natively
#   (NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL AVX512_SPR" on the host) is right. numpy then
#   runs its X86_V2 (SSE4.2) kernels; ONNX Runtime and numba, whose choice of kernels is what
#   the project promises per CPU, are not affected by it.
cat >"$DIR/bin/python" <<SH
#!/bin/sh
# $REAL under qemu-x86_64 -cpu $CPU (scripts/avx2-env.sh)
export EDGE_CPUINFO="\${EDGE_CPUINFO:-$DIR/cpuinfo}" NUMBA_CACHE_DIR="\${NUMBA_CACHE_DIR:-$DIR/numba-cache}"
export NPY_DISABLE_CPU_FEATURES="\${NPY_DISABLE_CPU_FEATURES-X86_V3}"
# LD_PRELOAD goes to the guest only (qemu's -E): preloaded into qemu too, libfaketime would fake
# the host clock_gettime that qemu answers the guest's with, and the guest would get the offset
# twice (a day ahead became two: tests/test_faults_time.py).
if [ -n "\${LD_PRELOAD:-}" ]; then
  set -- -E "LD_PRELOAD=\$LD_PRELOAD" -0 "$DIR/bin/python" "$REAL" "\$@"
  unset LD_PRELOAD
else
  set -- -0 "$DIR/bin/python" "$REAL" "\$@"
fi
exec "$QEMU" -cpu "$CPU" "\$@"
SH
chmod +x "$DIR/bin/python"
for n in python3 "$(basename "$REAL")"; do ln -sfn python "$DIR/bin/$n"; done
# the venv's console scripts (edge, pytest, ...), their shebang pointed at the emulated python
for f in "$VENV"/bin/*; do
  n="$(basename "$f")"
  case "$n" in python*|activate*|Activate*) continue ;; esac
  [ -f "$f" ] && head -c 2 "$f" | grep -q '#!' || continue
  head -n 1 "$f" | grep -q python || continue
  { echo "#!$DIR/bin/python"; tail -n +2 "$f"; } >"$DIR/bin/$n"
  chmod +x "$DIR/bin/$n"
done
printf 'processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: QEMU Haswell (emulated, scripts/avx2-env.sh)\nflags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 popcnt avx f16c fma bmi1 bmi2 avx2 movbe\n' >"$DIR/cpuinfo"
