#!/usr/bin/env bash
# Build the CPU image (deploy/docker/Dockerfile.cpu) with podman and run it as a device would,
# where Docker is absent and Docker Hub is not reachable:
#
#   sudo scripts/check-container.sh [OUT_JSON]      (default bench/out/container-cpu.json)
#   sudo EDGE_CONTAINER_FRESH=1 scripts/check-container.sh    everything made again, to time it
#
# Needs root and Debian's package mirror (podman, runc, debootstrap are apt-installed when
# missing) and the package index for pip inside the build. What it does:
#  1. a Debian bookworm base with python3 and venv, made once with debootstrap and cached in
#     cache/container/ (ignored by git), imported as localhost/edge-test/bookworm-python:
#     the stand-in for python:3.11-slim-bookworm (this host's CA bundle is copied in, so pip
#     in the build trusts the index this host uses);
#  2. podman with runc and a private containers.conf (nofile and nproc raised: the defaults
#     here stop pip and onnxruntime), `--format docker` (the OCI format has no HEALTHCHECK);
#  3. builds the image from this checkout's files (tracked and untracked-not-ignored, plus
#     deploy/docker/wheels/ if present);
#  4. measures the image and its layers, and looks for any wheel in the image's own layers;
#  5. `edge run --check` read-only with no network; then the daemon read-only, as uid 999,
#     with no capabilities, a 0640 root:<group> config readable only through --group-add,
#     against a mosquitto on the host's loopback: waits for the health check to pass, sends
#     windows and waits for a prediction, stops it and reads its exit code; the health check
#     must fail with the broker stopped, and work through the status socket with
#     [metrics] port = 0.
# Writes every figure to OUT_JSON and prints it; exits non-zero on the first failed step.
set -euo pipefail
ROOT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT_DIR/bench/out/container-cpu.json}"
CACHE="$ROOT_DIR/cache/container"
BASE_TAG=localhost/edge-test/bookworm-python
TAG=localhost/edge-runtime:check-cpu
MIRROR="${EDGE_TEST_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
HOSTPY="${PYTHON:-$ROOT_DIR/.venv/bin/python}"
W=$(mktemp -d /tmp/edge-container.XXXXXX)
NAME="edge-check-$$"
t_start=$(date +%s.%N)
declare -A T
lap() {  # record how long since the start each step ended
  T[$1]=$(python3 -c "import time; print(round(time.time() - $t_start, 1))")
  echo "$1 ${T[$1]}" >>"$W/laps.txt"; echo "check-container: $1 at ${T[$1]} s" >&2
}
die() { echo "check-container: FAILED: $*" >&2; exit 1; }
cleanup() {
  podman rm -f "$NAME" "$NAME-port0" "$NAME-nobroker" >/dev/null 2>&1 || true
  podman volume rm -f "$NAME-state" >/dev/null 2>&1 || true
  [ -n "${MQ_PID:-}" ] && kill "$MQ_PID" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
[ "$(id -u)" = 0 ] || die "run as root (podman builds rootful here)"

# 2. the tools, and podman's private settings
need=()
for t in podman runc debootstrap mosquitto; do command -v "$t" >/dev/null || need+=("$t"); done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# podman's default limits exceed what this host lets a process raise them to, and runc then
# fails with "error setting rlimit type 7" (nofile) or "type 6" (nproc): use this shell's
# hard limit for nofile, and at most 32768 processes (65536 failed here under a hard 96369).
nofile=$(ulimit -Hn); nproc=$(ulimit -Hu)
[ "$nofile" = unlimited ] && nofile=65536
{ [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; } && nproc=32768
cat >"$W/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
export CONTAINERS_CONF="$W/containers.conf"
lap tools

# 1. the base image (EDGE_CONTAINER_FRESH=1: made again, and the build uncached, to time it all)
if [ "${EDGE_CONTAINER_FRESH:-0}" = 1 ]; then
  rm -rf "$CACHE/bookworm"
  podman rmi -f "$TAG" "$BASE_TAG" >/dev/null 2>&1 || true
fi
if [ ! -x "$CACHE/bookworm/usr/bin/python3" ]; then
  rm -rf "$CACHE/bookworm.tmp" && mkdir -p "$CACHE"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm \
    "$CACHE/bookworm.tmp" "$MIRROR" >"$W/debootstrap.log" 2>&1 || { tail -20 "$W/debootstrap.log" >&2; die debootstrap; }
  # what python:slim leaves out too: package caches and lists, docs, manuals, locales
  rm -rf "$CACHE"/bookworm.tmp/var/cache/apt/* "$CACHE"/bookworm.tmp/var/lib/apt/lists/* \
         "$CACHE"/bookworm.tmp/usr/share/{doc,man,locale,info}/*
  mv "$CACHE/bookworm.tmp" "$CACHE/bookworm"
fi
cp /etc/ssl/certs/ca-certificates.crt "$CACHE/bookworm/etc/ssl/certs/ca-certificates.crt"
if ! podman image exists "$BASE_TAG"; then
  tar -C "$CACHE/bookworm" -c . | podman import -q - "$BASE_TAG" >/dev/null
fi
lap base

# 3. the build, from this checkout's files
mkdir -p "$W/ctx"
(cd "$ROOT_DIR" && git ls-files -co --exclude-standard -z | xargs -0 -I{} sh -c '[ -f "{}" ] && cp --parents "{}" "$0"' "$W/ctx")
[ -d "$ROOT_DIR/deploy/docker/wheels" ] && cp -r "$ROOT_DIR/deploy/docker/wheels" "$W/ctx/deploy/docker/"
nocache=(); [ "${EDGE_CONTAINER_FRESH:-0}" = 1 ] && nocache=(--no-cache)
podman build -q "${nocache[@]}" --format docker --network host --build-arg PYTHON_IMAGE="$BASE_TAG" \
  -f deploy/docker/Dockerfile.cpu -t "$TAG" "$W/ctx" >"$W/build.log" 2>&1 || { tail -40 "$W/build.log" >&2; die "podman build"; }
lap build

# 4. the image: size, layers, user, health check, and no wheel in its own layers
size=$(podman image inspect --format '{{.Size}}' "$TAG")
user=$(podman image inspect --format '{{.Config.User}}' "$TAG")
health=$(podman image inspect --format '{{json .Config.Healthcheck}}' "$TAG")
podman history --format '{{.Size}}\t{{.CreatedBy}}' "$TAG" >"$W/history.txt"
base_layers=$(podman image inspect --format '{{len .RootFS.Layers}}' "$BASE_TAG")
podman image save --format docker-archive -o "$W/image.tar" "$TAG"
wheels=$("$HOSTPY" - "$W/image.tar" "$base_layers" <<'EOF'
import json, sys, tarfile
outer = tarfile.open(sys.argv[1])
layers = json.load(outer.extractfile("manifest.json"))[0]["Layers"][int(sys.argv[2]):]  # the image's own layers
found = [f"{name}" for layer in layers for name in tarfile.open(fileobj=outer.extractfile(layer)).getnames()
         if name.endswith(".whl")]
print(json.dumps(found))
EOF
)
rm -f "$W/image.tar"
dists=$(podman run --rm --network none --entrypoint /opt/edge-runtime/venv/bin/python "$TAG" -c '
import importlib.metadata as m, importlib.util as u, json
print(json.dumps({"torch": u.find_spec("torch") is not None, "numba": u.find_spec("numba") is not None,
                  "distributions": sorted(d.metadata["Name"] for d in m.distributions())}))')
lap inspect

# 5. run it: --check without network, then the daemon against a real broker
podman run --rm --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges --network none \
  "$TAG" run --check >"$W/check.txt" 2>&1 || { cat "$W/check.txt" >&2; die "edge run --check in the image"; }
grep -q OK "$W/check.txt" || die "edge run --check said: $(cat "$W/check.txt")"
lap check

MQ_PORT=$("$HOSTPY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
M_PORT=$("$HOSTPY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$MQ_PORT" >"$W/mosquitto.conf"
mosquitto -c "$W/mosquitto.conf" >"$W/mosquitto.log" 2>&1 &
MQ_PID=$!
GID=4242  # no group inside the image has it: the file is readable only through --group-add
sed -e "s/^port = 1883/port = $MQ_PORT/" -e "s/^port = 9108 /port = $M_PORT /" \
  "$ROOT_DIR/deploy/config/edge.toml" >"$W/edge.toml"
grep -q "port = $M_PORT" "$W/edge.toml" || die "could not set [metrics] port in the example config"
chown 0:$GID "$W/edge.toml" && chmod 0640 "$W/edge.toml"   # what deploy/install.sh writes: 0640 root:edge
run_daemon() {  # NAME CONFIG [extra podman args]
  local n=$1 cfg=$2; shift 2
  podman run -d --name "$n" --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
    --network host --group-add $GID -v "$NAME-state:/var/lib/edge-runtime" \
    -v "$cfg:/etc/edge-runtime/edge.toml:ro" "$@" "$TAG" >/dev/null
}
wait_healthy() {  # NAME SECONDS: podman runs the image's HEALTHCHECK command on demand
  local i
  for i in $(seq 1 "$2"); do
    podman healthcheck run "$1" >/dev/null 2>&1 && return 0
    [ "$(podman inspect --format '{{.State.Running}}' "$1")" = true ] || { podman logs "$1" >&2; return 1; }
    sleep 1
  done
  podman logs "$1" 2>&1 | tail -30 >&2; return 1
}
# without the host's group the 0640 config is unreadable, and the daemon says so (exit 2)
set +e
podman run --rm --read-only --tmpfs /tmp --cap-drop ALL --network none -v "$W/edge.toml:/etc/edge-runtime/edge.toml:ro" \
  "$TAG" run --check >"$W/nogroup.txt" 2>&1
nogroup_rc=$?
set -e
[ $nogroup_rc = 2 ] || die "without --group-add the 0640 config should be refused with exit 2, got $nogroup_rc: $(cat "$W/nogroup.txt")"
run_daemon "$NAME" "$W/edge.toml"
wait_healthy "$NAME" 300 || die "the daemon never became healthy"
lap healthy
uid=$(podman exec "$NAME" id -u)
caps=$(podman exec "$NAME" sh -c 'grep CapEff /proc/1/status' | awk '{print $2}')
rootfs_ro=$(podman exec "$NAME" sh -c 'touch /opt/edge-runtime/x 2>/dev/null && echo writable || echo read-only')
"$HOSTPY" - "$MQ_PORT" >"$W/probe.txt" <<'EOF'
import json, sys, time
import paho.mqtt.client as mqtt
got = []
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
c.on_message = lambda cl, u, m: got.append(m.payload)
c.connect("127.0.0.1", int(sys.argv[1]))
c.subscribe("edge/press-7/predictions/#")
c.loop_start()
t0, deadline = time.time(), time.monotonic() + 60
while not got and time.monotonic() < deadline:
    for _ in range(4):
        c.publish("sensors/m1/accel", json.dumps({"t0": t0, "dt": 0.001, "v": [[0.01 * i, 0.0, 1.0] for i in range(256)]}))
        t0 += 0.256
    time.sleep(0.5)
print(json.loads(got[0])["prediction"] if got else "")
EOF
prediction=$(cat "$W/probe.txt")
[ -n "$prediction" ] || { podman logs "$NAME" 2>&1 | tail -30 >&2; die "no prediction from the container"; }
lap served

# the health check means serving: the broker gone, it fails (the daemon itself stays alive)
kill "$MQ_PID"; wait "$MQ_PID" 2>/dev/null || true; MQ_PID=""
unhealthy=0
for _ in $(seq 1 60); do podman healthcheck run "$NAME" >/dev/null 2>&1 || { unhealthy=1; break; }; sleep 1; done
[ $unhealthy = 1 ] || die "the health check still passes with the broker stopped"
alive=$(podman inspect --format '{{.State.Running}}' "$NAME")
mosquitto -c "$W/mosquitto.conf" >>"$W/mosquitto.log" 2>&1 &
MQ_PID=$!
wait_healthy "$NAME" 60 || die "not healthy again after the broker came back"
lap broker_cycle
podman stop -t 30 "$NAME" >/dev/null
exit_code=$(podman inspect --format '{{.State.ExitCode}}' "$NAME")
podman logs "$NAME" >"$W/daemon.log" 2>&1
lap stopped

# [metrics] port = 0 (the default): the health check asks the status socket instead
sed -e "s/^port = $M_PORT /port = 0 /" "$W/edge.toml" >"$W/edge-port0.toml"
chown 0:$GID "$W/edge-port0.toml" && chmod 0640 "$W/edge-port0.toml"
run_daemon "$NAME-port0" "$W/edge-port0.toml"
wait_healthy "$NAME-port0" 120 || die "not healthy through the status socket with [metrics] port = 0"
port0_says=$(podman healthcheck run "$NAME-port0" >/dev/null 2>&1 && podman exec "$NAME-port0" /opt/edge-runtime/venv/bin/python /opt/edge-runtime/healthcheck.py | head -c 300)
podman stop -t 30 "$NAME-port0" >/dev/null
lap port0
t_total=${T[port0]}

layers_json=$("$HOSTPY" -c '
import json, sys
rows = [l.rstrip("\n").split("\t", 1) for l in open(sys.argv[1]) if l.strip()]
print(json.dumps([{"size": s, "created_by": c[:160]} for s, c in rows]))' "$W/history.txt")
mkdir -p "$(dirname "$OUT")"
"$HOSTPY" - "$OUT" <<EOF
import json, os, platform, sys
flags = next((l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags")), [])
doc = {
  "command": "sudo EDGE_CONTAINER_FRESH=${EDGE_CONTAINER_FRESH:-0} scripts/check-container.sh",
  "image": "$TAG", "base": "$BASE_TAG (debootstrap bookworm minbase + python3, python3-venv, ca-certificates)",
  "image_size_bytes": int("$size"), "image_size_mb": round(int("$size") / 1e6, 1),
  "layers": json.loads(r'''$layers_json'''), "wheels_in_image_layers": json.loads(r'''$wheels'''), "installed": json.loads(r'''$dists'''),
  "config_user": "$user", "healthcheck": json.loads(r'''$health'''), "uid_in_container": int("$uid"),
  "effective_capabilities": "$caps", "root_fs": "$rootfs_ro",
  "prediction": "$prediction", "unhealthy_without_broker": bool($unhealthy), "alive_without_broker": "$alive" == "true",
  "exit_code_on_stop": int("$exit_code"), "config_0640_without_group_add": {"rc": $nogroup_rc, "says": r"""$(tail -c 300 "$W/nogroup.txt")"""}, "port0_healthcheck_says": """$port0_says""",
  "seconds_since_start": {k: float(v) for k, v in (l.split() for l in open("$W/laps.txt"))},
  "seconds_total": float("$t_total"),
  "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "avx2": "avx2" in flags,
           "avx512_vnni": "avx512_vnni" in flags, "note": "a shared 2-core machine, loaded by other jobs"},
}
json.dump(doc, open(sys.argv[1], "w"), indent=2)
print(json.dumps(doc, indent=2))
EOF
grep -q "stopped" "$W/daemon.log" || die "the daemon's log has no clean stop: $(tail -5 "$W/daemon.log")"
[ "$exit_code" = 0 ] || die "the daemon exited $exit_code on podman stop"
[ "$wheels" = "[]" ] || die "wheels left in the image's layers: $wheels"
[ "$uid" = 999 ] || die "the daemon runs as uid $uid, not 999"
[ "$caps" = 0000000000000000 ] || die "effective capabilities $caps, not none"
[ "$rootfs_ro" = read-only ] || die "the root file system is writable"
[ "$size" -le 500000000 ] || die "the image is $size bytes, over 500 MB"
case "$dists" in *'"torch": false'*) ;; *) die "torch is installed in the image: $dists" ;; esac
echo "check-container: OK in ${t_total} s" >&2
