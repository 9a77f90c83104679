#!/usr/bin/env bash
# The install and the ONNX Runtime serving path on aarch64 (Jetson's CPU), emulated on x86-64.
#
#   scripts/check-arm64.sh [WORK_DIR]          (default WORK_DIR: /tmp/edge-arm64; ~3 minutes)
#
# Needs root (a private mount namespace), Debian's qemu-user and apt access to the Debian
# arm64 archive (it runs `dpkg --add-architecture arm64 && apt-get update` once).
#  1. an aarch64 Python 3.11 from Debian's arm64 packages, unpacked (no chroot, no binfmt):
#     `qemu-aarch64 -L ROOT ROOT/usr/bin/python3.11`;
#  2. install: pip itself, under that aarch64 Python, installs this package's wheel and its
#     dependencies but torch (see below; EDGE_ARM64_TORCH=1 also resolves torch);
#  3. serving, with the installed package and no torch (scripts/arm64_ort_check.py): on the
#     host a tiny model, its exported ONNX graph and the torch reference; on aarch64 the
#     formats int8_formats picks (s8s8), built by the project's own ONNX Runtime build
#     (quantization on aarch64), loaded and parity-gated.
# ONNX Runtime's cpuinfo reads /proc/cpuinfo and /sys/devices/system/cpu and crashes on the
# host's x86 ones, so an Orin-like cpuinfo and cpu tree are bind-mounted in a private mount
# namespace for the emulated runs (and EDGE_CPUINFO is not needed: /proc/cpuinfo is that one).
set -euo pipefail
ROOT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
W="${1:-/tmp/edge-arm64}"
HOSTPY="${PYTHON:-$ROOT_DIR/.venv/bin/python}"
mkdir -p "$W/debs" "$W/root" "$W/site" "$W/pip" "$W/sys/cpu" "$W/out"
command -v qemu-aarch64 >/dev/null || { echo "qemu-aarch64 missing: apt-get install qemu-user" >&2; exit 2; }

if [ ! -x "$W/root/usr/bin/python3.11" ]; then
  dpkg --print-foreign-architectures | grep -qx arm64 || { dpkg --add-architecture arm64; apt-get update -qq; }
  (cd "$W/debs" && apt-get download -qq python3.11-minimal:arm64 libpython3.11-minimal:arm64 \
     libpython3.11-stdlib:arm64 libc6:arm64 zlib1g:arm64 libexpat1:arm64 libffi8:arm64 libssl3:arm64 \
     libstdc++6:arm64 libgcc-s1:arm64 libbz2-1.0:arm64 liblzma5:arm64 libsqlite3-0:arm64 libuuid1:arm64 \
     libncursesw6:arm64 libtinfo6:arm64 libreadline8:arm64 libcrypt1:arm64 libnsl2:arm64 libtirpc3:arm64 \
     libdb5.3:arm64)
  for d in "$W"/debs/*.deb; do dpkg -x "$d" "$W/root"; done
fi
printf 'processor\t: 0\nBogoMIPS\t: 62.50\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x1\nCPU part\t: 0xd42\nCPU revision\t: 1\n\n' >"$W/cpuinfo"
(cd "$W/sys/cpu" && echo 0-1 >possible && echo 0-1 >present && echo 0-1 >online && for i in 0 1; do
   mkdir -p cpu$i/regs/identification cpu$i/topology; echo 0x00000000411fd420 >cpu$i/regs/identification/midr_el1
   echo 0 >cpu$i/topology/physical_package_id; echo $i >cpu$i/topology/core_id; echo 1 >cpu$i/online; done)
arm() {  # run the aarch64 Python with the Orin-like CPU view
  unshare --mount bash -c 'mount --bind "$0/cpuinfo" /proc/cpuinfo && mount --bind "$0/sys/cpu" /sys/devices/system/cpu && shift && exec "$@"' \
    "$W" _ env PYTHONPATH="$PYTHONPATH_ARM" qemu-aarch64 -L "$W/root" "$W/root/usr/bin/python3.11" "$@"
}

# 2. install, by pip itself under the aarch64 Python (markers are the target's; pip's
#    --platform on the host evaluates them for x86-64 and asks for x86-only CUDA wheels):
#    this package's wheel (from a clean export of HEAD) without torch, and every dependency
#    but torch, installed for real into $W/site. torch is resolved only with
#    EDGE_ARM64_TORCH=1 (--dry-run; PyPI's aarch64 torch pulls the CUDA 13 stack, GBs, and
#    Jetson takes NVIDIA's wheel anyway: Dockerfile.jetson).
rm -rf "$W/src" "$W/whl" && mkdir -p "$W/src" && git -C "$ROOT_DIR" archive HEAD | tar -x -C "$W/src"
"$HOSTPY" -m pip wheel -q --no-deps --no-build-isolation -w "$W/whl" "$W/src"
cp -r "$("$HOSTPY" -c 'import pip, os; print(os.path.dirname(pip.__file__))')" "$W/pip/"
"$HOSTPY" -c "import tomllib,sys; deps=tomllib.load(open(sys.argv[1],'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if not d.startswith('torch')))" \
  "$ROOT_DIR/pyproject.toml" >"$W/requirements-no-torch.txt"
PYTHONPATH_ARM="$W/pip" arm -m pip install -q --upgrade --only-binary=:all: --target "$W/site" \
  -r "$W/requirements-no-torch.txt" sympy
PYTHONPATH_ARM="$W/pip" arm -m pip install -q --upgrade --no-deps --target "$W/site" "$W"/whl/edge_runtime-*.whl
PYTHONPATH_ARM="$W/site" arm -c "import importlib.metadata as m, platform; print('aarch64 install:', platform.machine(), ', '.join(sorted(d.metadata['Name'] + ' ' + d.version for d in m.distributions(path=['$W/site']))))"
if [ "${EDGE_ARM64_TORCH:-0}" = 1 ]; then
  PYTHONPATH_ARM="$W/pip" arm -m pip install --dry-run --ignore-installed --only-binary=:all: --target "$W/dry" \
    --report "$W/out/install-report.json" "$W"/whl/edge_runtime-*.whl
fi

# 3. the serving path without torch: the installed package from $W/site, not the tree
"$HOSTPY" "$ROOT_DIR/scripts/arm64_ort_check.py" host "$W/out"
PYTHONPATH_ARM="$W/site" arm "$ROOT_DIR/scripts/arm64_ort_check.py" device "$W/out"
