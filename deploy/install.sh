#!/usr/bin/env bash
# Install the edge runtime as a system service on Debian, Ubuntu or JetPack. Idempotent:
# run it again to upgrade the code; an existing /etc/edge-runtime/edge.toml is kept.
#
#   sudo deploy/install.sh                 install into /opt/edge-runtime, enable edge-runtime.service
#   sudo systemctl start edge-runtime      (README, "Deploying on a device")
#   sudo deploy/install.sh --uninstall     remove everything but the state (/var/lib/edge-runtime)
#                                          and a config you edited
#
# Options:
#   --root DIR     install into the Debian tree DIR (a chroot or an image) instead of /
#   --wheel FILE   install this wheel instead of building the package from this checkout
#   --no-deps      install the package alone (its dependencies come from elsewhere, e.g. a test)
#   --fleet        also enable edge-fleet.service (needs /etc/edge-runtime/fleet.toml)
#   --no-enable    install the units without enabling them
# Environment: PYTHON (default python3, >= 3.10), EDGE_TORCH_SPEC to force a torch
# requirement, EDGE_NO_APT=1 to never call apt-get.
set -euo pipefail

SRC=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=/opt/edge-runtime
VENV=$PREFIX/venv
ETC=/etc/edge-runtime
UNITS=/etc/systemd/system
STATE=/var/lib/edge-runtime
CACHE=/var/cache/edge-runtime
USER_NAME=edge

root="" wheel="" nodeps=0 fleet=0 enable=1 uninstall=0
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root=${2:?--root needs a directory}; shift 2 ;;
    --wheel) wheel=${2:?--wheel needs a file}; shift 2 ;;
    --no-deps) nodeps=1; shift ;;
    --fleet) fleet=1; shift ;;
    --no-enable) enable=0; shift ;;
    --uninstall) uninstall=1; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

say() { echo "edge-install: $*"; }
die() { echo "edge-install: error: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (sudo $0)"

# --root: copy this checkout (and the wheel) into the tree and run there under chroot, so
# that the venv, the user and the units are made by the tree's own python, useradd and
# systemctl (systemctl enables units offline when no systemd runs in the tree).
if [ -n "$root" ] && [ "$root" != / ]; then
  [ -x "$root/bin/bash" ] || die "$root does not look like a Debian root (no /bin/bash)"
  stage=$(mktemp -d "$root/tmp/edge-install.XXXXXX")
  trap 'rm -rf "$stage"' EXIT
  tar -C "$SRC" --exclude=.git --exclude=.venv --exclude='*.egg-info' --exclude=build \
      --exclude=__pycache__ --exclude=.pytest_cache --exclude=.hypothesis -cf - . | tar -C "$stage" -xf -
  args=()
  [ -n "$wheel" ] && { cp "$wheel" "$stage/"; args+=(--wheel "/tmp/${stage##*/}/$(basename "$wheel")"); }
  [ $nodeps = 1 ] && args+=(--no-deps)
  [ $fleet = 1 ] && args+=(--fleet)
  [ $enable = 0 ] && args+=(--no-enable)
  [ $uninstall = 1 ] && args+=(--uninstall)
  chroot "$root" /bin/bash "/tmp/${stage##*/}/deploy/install.sh" "${args[@]}"
  exit $?
fi

have_systemd() { [ -d /run/systemd/system ]; }  # false in a chroot or an image

if [ $uninstall = 1 ]; then
  for unit in edge-runtime.service edge-fleet.service; do
    if [ -f "$UNITS/$unit" ]; then
      if have_systemd; then systemctl disable --now "$unit" || true; else systemctl disable "$unit" || true; fi
      rm -f "$UNITS/$unit"
    fi
    rm -rf "$UNITS/$unit.d"
  done
  have_systemd && systemctl daemon-reload
  rm -rf "$PREFIX" "$CACHE"
  # An edited config is the operator's work (and may hold the only copy of a setting):
  # keep it, as dpkg keeps a changed conffile. An untouched one goes.
  if [ -f "$ETC/edge.toml" ] && ! cmp -s "$ETC/edge.toml" "$SRC/deploy/config/edge.toml"; then
    say "kept $ETC/edge.toml (it differs from the shipped example)"
  else
    rm -f "$ETC/edge.toml"
    rmdir "$ETC" 2>/dev/null || say "kept $ETC (it holds other files)"
  fi
  if getent passwd "$USER_NAME" >/dev/null; then
    # systemd re-owns StateDirectory= on start, so a later reinstall's new uid gets the state back.
    userdel "$USER_NAME"
    getent group "$USER_NAME" >/dev/null && groupdel "$USER_NAME" 2>/dev/null || true
  fi
  say "uninstalled; the state in $STATE is kept (remove it by hand if it is not wanted)"
  exit 0
fi

# 1. Python with venv.
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || { [ "${EDGE_NO_APT:-0}" = 1 ] && die "$PY not found"; apt-get install -y python3 python3-venv; }
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die "edge-runtime needs Python >= 3.10 ($PY is older)"
if ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then
  [ "${EDGE_NO_APT:-0}" = 1 ] && die "$PY has no venv module: apt-get install python3-venv"
  apt-get install -y python3-venv
fi

# 2. The service user, in dialout for the serial ports.
getent group dialout >/dev/null || groupadd --system dialout
if getent passwd "$USER_NAME" >/dev/null; then
  id -nG "$USER_NAME" | tr ' ' '\n' | grep -qx dialout || usermod -aG dialout "$USER_NAME"
else
  useradd --system --user-group --groups dialout --home-dir "$STATE" --no-create-home \
          --shell /usr/sbin/nologin --comment "edge runtime" "$USER_NAME"
  say "created system user $USER_NAME (groups: $(id -nG "$USER_NAME"))"
fi

# 3. The code: a venv in /opt/edge-runtime with the right torch for this machine.
install -d -m 0755 "$PREFIX"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip="$VENV/bin/python -m pip"
pkg=${wheel:-$SRC}
if [ $nodeps = 1 ]; then
  $pip install -q --no-deps --force-reinstall "$pkg"
else
  $pip install -q --upgrade pip >/dev/null 2>&1 || true
  # shellcheck source=../scripts/lib/torch.sh
  . "$SRC/scripts/lib/torch.sh"
  edge_install_torch "$PY" "$VENV"
  $pip install -q "$pkg"
  # Same version number, newer code: replace the package itself, not its dependencies.
  $pip install -q --no-deps --force-reinstall "$pkg"
fi
install -m 0644 "$SRC/README.md" "$SRC/LICENSE" "$PREFIX/"
say "installed $("$VENV/bin/edge" --version) into $VENV"

# 4. The config: root-owned, readable by the service group only (it may hold secrets). The
# container image's user (uid/gid 999) reads it by joining this group: --group-add GID, or
# compose's group_add (README, "Containers").
install -d -m 0750 -o root -g "$USER_NAME" "$ETC"
if [ -e "$ETC/edge.toml" ]; then
  say "kept the existing $ETC/edge.toml"
else
  install -m 0640 -o root -g "$USER_NAME" "$SRC/deploy/config/edge.toml" "$ETC/edge.toml"
  say "wrote $ETC/edge.toml from deploy/config/edge.toml: edit it, then check it with"
  say "  sudo -u $USER_NAME $VENV/bin/edge run --config $ETC/edge.toml --check"
fi
say "a container reads $ETC/edge.toml (0640 root:$USER_NAME) with --group-add $(getent group "$USER_NAME" | cut -d: -f3)"

# 5. The units, and a DeviceAllow= line per serial port the config uses.
install -m 0644 "$SRC/deploy/systemd/edge-runtime.service" "$SRC/deploy/systemd/edge-fleet.service" "$UNITS/"
ports=$("$VENV/bin/python" -c '
import sys
from edge.config import load_config
for s in load_config(sys.argv[1]).sources:
    if s.type == "serial" and s.port.startswith("/dev/"):
        print(s.port)
' "$ETC/edge.toml" 2>/dev/null) || ports="?"
dropin=$UNITS/edge-runtime.service.d/serial.conf
if [ "$ports" = "?" ]; then
  say "warning: $ETC/edge.toml does not load; serial ports left as they were (run edge run --check)"
elif [ -n "$ports" ]; then
  install -d -m 0755 "${dropin%/*}"
  { echo "# Written by deploy/install.sh from the serial sources of $ETC/edge.toml; rerun it after editing them."
    echo "[Service]"
    for p in $ports; do echo "DeviceAllow=$p rw"; done; } > "$dropin"
  say "serial ports allowed: $(echo $ports)"
else
  rm -f "$dropin"
  rmdir "${dropin%/*}" 2>/dev/null || true
fi
have_systemd && systemctl daemon-reload
if [ $enable = 1 ]; then
  systemctl enable edge-runtime.service
  [ $fleet = 1 ] && systemctl enable edge-fleet.service
fi
say "done. Start it with: systemctl start edge-runtime   (logs: journalctl -u edge-runtime)"
