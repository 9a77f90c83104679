"""The device path: deploy/install.sh in a real Debian chroot, the units checked by systemd's
own tools, and the CPU container built where a Docker daemon is reachable.

The chroot is a minimal Debian bookworm made once with debootstrap and cached outside the
repository (``$EDGE_TEST_CHROOT``, default /var/cache/edge-test-chroot/bookworm; building it
takes a few minutes and needs the Debian mirror); each test installs into a throw-away
overlay of it (a copy where overlayfs cannot be mounted). The installer runs with
``--no-deps`` there: the test proves the layout, the user, the config, the units and
their enablement, not PyPI's torch download.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from edge.errors import BackendUnavailable, ConfigError, ModelError, ParityError

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "deploy" / "systemd"
INSTALL = ROOT / "deploy" / "install.sh"
CHROOT_CACHE = Path(os.environ.get("EDGE_TEST_CHROOT", "/var/cache/edge-test-chroot/bookworm"))
MIRROR = os.environ.get("EDGE_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
pytestmark = pytest.mark.timeout(900)


def _directives(unit: Path) -> dict[str, list[str]]:
    """Key -> values of a unit file (keys may repeat, as SystemCallFilter= does)."""
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


# --- the unit files themselves (no tool needed) --------------------------------------------

@pytest.mark.parametrize("name", ["edge-runtime.service", "edge-fleet.service"])
def test_unit_has_the_required_hardening(name):
    d = _directives(UNITS / name)
    prevent = set(d["RestartPreventExitStatus"][0].split())
    assert {str(ConfigError.exit_code), str(ModelError.exit_code)} <= prevent
    assert {str(BackendUnavailable.exit_code), str(ParityError.exit_code)} <= prevent
    assert d["UMask"] == ["0077"] and d["StateDirectoryMode"] == ["0700"]
    after = d["After"][0].split()
    assert "network-online.target" in after and "time-sync.target" in after
    assert d["SystemCallFilter"][0] == "@system-service" and d["NoNewPrivileges"] == ["yes"]
    assert d["User"] == ["edge"] and d["CapabilityBoundingSet"] == [""]


def _exit_codes_in_code() -> set[int]:
    """Every ``exit_code = N`` an error class of the runtime declares, wherever it lives."""
    codes = set()
    for src in (ROOT / "edge").rglob("*.py"):
        codes |= {int(n) for n in re.findall(r"^\s+exit_code = (\d+)\s*$", src.read_text(), flags=re.M)}
    return codes


@pytest.mark.parametrize("name", ["edge-runtime.service", "edge-fleet.service"])
def test_every_non_transient_exit_code_prevents_a_restart(name):
    """A fault a restart cannot cure (a missing key file: 9) must not restart forever."""
    from edge.cli import TRANSIENT_EXIT_CODES

    codes = _exit_codes_in_code()
    assert {2, 3, 9} <= codes and TRANSIENT_EXIT_CODES <= codes
    prevent = {int(c) for c in _directives(UNITS / name)["RestartPreventExitStatus"][0].split()}
    assert prevent == codes - TRANSIENT_EXIT_CODES


def test_runtime_unit_allows_no_device_until_a_serial_port_is_configured():
    d = _directives(UNITS / "edge-runtime.service")
    assert d["DevicePolicy"] == ["closed"] and "DeviceAllow" not in d
    assert d["SupplementaryGroups"] == ["dialout"]
    # The checks run in the main process, where RestartPreventExitStatus= sees their code.
    assert "ExecStartPre" not in d and d["Type"] == ["notify"]


def test_fleet_unit_runs_the_fleet_server():
    d = _directives(UNITS / "edge-fleet.service")
    assert d["ExecStart"] == ["/opt/edge-runtime/venv/bin/edge fleet-server run --config /etc/edge-runtime/fleet.toml"]
    assert d["PrivateDevices"] == ["yes"]


# --- systemd-analyze security ----------------------------------------------------------------

def _security_score(unit: Path) -> float:
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    r = subprocess.run(["systemd-analyze", "security", "--help"], capture_output=True, text=True, timeout=60)
    if "--offline" not in r.stdout:
        pytest.skip("this systemd-analyze has no --offline (systemd >= 250 needed)")
    from edge.bench.units import score

    return score(unit)["exposure"]


@pytest.mark.parametrize("name", ["edge-runtime.service", "edge-fleet.service"])
def test_unit_security_exposure_is_at_most_2(name):
    assert _security_score(UNITS / name) <= 2.0


# --- deploy/install.sh in a Debian chroot ------------------------------------------------------

def _need_root_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("installing into a chroot needs root")
    for tool in ("chroot", "mount", "systemd-analyze"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed")


def _debian_chroot() -> Path:
    """The cached minimal bookworm tree; built once with debootstrap (minutes)."""
    _need_root_tools()
    if (CHROOT_CACHE / "usr" / "bin" / "systemd-analyze").exists():
        return CHROOT_CACHE
    if not shutil.which("debootstrap"):
        pytest.skip(f"no cached chroot at {CHROOT_CACHE} and debootstrap is not installed (apt-get install debootstrap)")
    tmp = CHROOT_CACHE.with_name(CHROOT_CACHE.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,systemd,adduser,passwd",
                        "bookworm", str(tmp), MIRROR], capture_output=True, text=True, timeout=840)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"debootstrap from {MIRROR} failed (no mirror reachable?): {r.stderr[-300:]}")
    tmp.rename(CHROOT_CACHE)
    return CHROOT_CACHE


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return next(out.glob("*.whl"))


@pytest.fixture
def root(tmp_path):
    """A throw-away Debian root: an overlay on the cached chroot, else a copy of it."""
    base = _debian_chroot()
    upper, work, merged = tmp_path / "upper", tmp_path / "work", tmp_path / "root"
    for p in (upper, work, merged):
        p.mkdir()
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={base},upperdir={upper},workdir={work}", str(merged)],
                       capture_output=True, text=True)
    mounted = r.returncode == 0
    if not mounted:
        merged.rmdir()
        subprocess.run(["cp", "-a", str(base), str(merged)], check=True, timeout=600)
    yield merged
    if mounted:
        subprocess.run(["umount", "-l", str(merged)], check=False)


def _install(root: Path, wheel: Path, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run(["bash", str(INSTALL), "--root", str(root), "--wheel", str(wheel), "--no-deps", *args],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _in(root: Path, *cmd: str) -> subprocess.CompletedProcess:
    # the host's preloaded libraries (libfaketime in a clock-shifted run) are not in the chroot:
    # ld.so would print an error for each on every command's stderr
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    return subprocess.run(["chroot", str(root), *cmd], capture_output=True, text=True, timeout=300, env=env)


def _verify(root: Path) -> subprocess.CompletedProcess:
    return _in(root, "systemd-analyze", "verify", "/etc/systemd/system/edge-runtime.service",
               "/etc/systemd/system/edge-fleet.service")


def test_install_creates_user_code_config_and_enabled_unit(root, wheel):
    _install(root, wheel)
    passwd = (root / "etc/passwd").read_text()
    assert re.search(r"^edge:x:\d+:\d+:[^:]*:/var/lib/edge-runtime:/usr/sbin/nologin$", passwd, re.M)
    assert "dialout" in _in(root, "id", "-nG", "edge").stdout.split()
    cfg = root / "etc/edge-runtime/edge.toml"
    assert cfg.read_bytes() == (ROOT / "deploy/config/edge.toml").read_bytes()
    assert cfg.stat().st_mode & 0o777 == 0o640 and (root / "etc/edge-runtime").stat().st_mode & 0o777 == 0o750
    assert _in(root, "/opt/edge-runtime/venv/bin/edge", "--version").stdout.startswith("edge-runtime ")
    wants = root / "etc/systemd/system/multi-user.target.wants"
    assert (wants / "edge-runtime.service").is_symlink() and not (wants / "edge-fleet.service").exists()


def test_installed_units_pass_systemd_analyze_verify(root, wheel):
    _install(root, wheel)
    r = _verify(root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "edge" not in r.stderr, r.stderr


def test_verify_fails_when_the_binary_is_missing(root, wheel):
    # The check above means something: verify does look for ExecStart='s binary.
    _install(root, wheel)
    (root / "opt/edge-runtime/venv/bin/edge").unlink()
    r = _verify(root)
    assert r.returncode != 0 and "/opt/edge-runtime/venv/bin/edge" in r.stderr


def test_reinstall_keeps_the_edited_config_and_allows_its_serial_port(root, wheel):
    _install(root, wheel)
    cfg = root / "etc/edge-runtime/edge.toml"
    cfg.write_text(cfg.read_text() + '\n[[sources]]\ntype = "serial"\nport = "/dev/ttyACM3"\nstream = "accel"\n')
    edited = cfg.read_bytes()
    r = _install(root, wheel, "--fleet")
    assert "kept the existing" in r.stdout and cfg.read_bytes() == edited
    dropin = root / "etc/systemd/system/edge-runtime.service.d/serial.conf"
    assert "DeviceAllow=/dev/ttyACM3 rw" in dropin.read_text().splitlines()
    assert (root / "etc/passwd").read_text().count("\nedge:") == 1
    assert (root / "etc/systemd/system/multi-user.target.wants/edge-fleet.service").is_symlink()
    v = _verify(root)
    assert v.returncode == 0, v.stderr


def test_uninstall_removes_everything_but_the_state(root, wheel):
    _install(root, wheel)
    state = root / "var/lib/edge-runtime"
    state.mkdir(parents=True, exist_ok=True)
    (state / "head.ckpt").write_bytes(b"learned")
    r = subprocess.run(["bash", str(INSTALL), "--root", str(root), "--uninstall"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    for gone in ("opt/edge-runtime", "etc/edge-runtime", "etc/systemd/system/edge-runtime.service",
                 "etc/systemd/system/edge-fleet.service", "etc/systemd/system/multi-user.target.wants/edge-runtime.service"):
        assert not (root / gone).exists(), gone
    assert "\nedge:" not in (root / "etc/passwd").read_text()
    assert (state / "head.ckpt").read_bytes() == b"learned"


def test_uninstall_keeps_an_edited_config(root, wheel):
    _install(root, wheel)
    cfg = root / "etc/edge-runtime/edge.toml"
    cfg.write_text(cfg.read_text().replace('name = "press-7"', 'name = "press-8"'))
    r = subprocess.run(["bash", str(INSTALL), "--root", str(root), "--uninstall"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "kept /etc/edge-runtime/edge.toml" in r.stdout
    assert 'name = "press-8"' in cfg.read_text() and not (root / "opt/edge-runtime").exists()


# --- containers ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.jetson"])
def test_containerfile_has_health_check_state_volume_and_no_root(name):
    text = (ROOT / "deploy/docker" / name).read_text()
    assert "HEALTHCHECK" in text and 'VOLUME ["/var/lib/edge-runtime"]' in text
    assert re.search(r"^USER edge$", text, re.M)
    assert "scripts/lib/torch.sh" in text  # one torch choice for every install path


def test_compose_runs_the_cpu_image_read_only_with_a_state_volume():
    text = (ROOT / "deploy/docker/compose.yaml").read_text()
    assert "read_only: true" in text and "edge-state:/var/lib/edge-runtime" in text


# The image itself is built and run by tests/test_container.py (podman, where Docker's
# engine is absent, as on these machines), against the health check that means serving.


# --- the installed unit under a real systemd (systemd-nspawn boots the chroot) ----------------

_PROBE_PY = r'''
import json, sys, time
import paho.mqtt.client as mqtt
port, got = int(sys.argv[1]), []
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
c.on_message = lambda cl, u, m: got.append(m.payload)
c.connect("127.0.0.1", port)
c.subscribe("edge/press-7/predictions/#")
c.loop_start()
deadline = time.monotonic() + 120
t0 = time.time()
while not got and time.monotonic() < deadline:
    for _ in range(4):
        c.publish("sensors/m1/accel", json.dumps({"t0": t0, "dt": 0.001, "v": [[0.01 * i, 0.0, 1.0] for i in range(256)]}))
        t0 += 0.256
    time.sleep(1.0)
print("PREDICTION=" + ("1 " + got[0].decode()[:200] if got else "0"))
'''

_PROBE_SH = r'''#!/bin/sh
systemctl start edge-runtime; echo "START_RC=$?"
systemctl show -p ActiveState -p NRestarts edge-runtime | sed 's/^/RUN_/'
/opt/edge-runtime/venv/bin/python /usr/local/sbin/edge-probe.py "$1"
stat -c 'MODE %a %U %n' /var/lib/edge-runtime /var/cache/edge-runtime
systemctl stop edge-runtime; echo "STOP_RC=$?"
systemctl show -p Result -p ExecMainStatus edge-runtime | sed 's/^/STOP_/'
printf '[mqtt]\nport = "not a port"\n' > /etc/edge-runtime/edge.toml
systemctl start edge-runtime; echo "BAD_START_RC=$?"
sleep 8
systemctl show -p ActiveState -p NRestarts -p ExecMainStatus edge-runtime | sed 's/^/BAD_/'
journalctl -u edge-runtime --no-pager | tail -40 | sed 's/^/LOG /'
'''


def _copy_host_network_setup(root: Path) -> dict[str, str]:
    """Let pip in the chroot reach the package index this host reaches (resolver, CA bundle, local wheels)."""
    for f in ("etc/hosts", "etc/resolv.conf", "etc/ssl/certs/ca-certificates.crt"):
        if (Path("/") / f).is_file():
            (root / f).unlink(missing_ok=True)
            shutil.copy(Path("/") / f, root / f)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    wheels = [w for d in os.environ.get("PIP_FIND_LINKS", "").split() if Path(d).is_dir() for w in Path(d).glob("torch-*.whl")]
    if wheels:
        (root / "tmp/wheels").mkdir(parents=True, exist_ok=True)
        for w in wheels:
            shutil.copy(w, root / "tmp/wheels" / w.name)
        env["PIP_FIND_LINKS"] = "/tmp/wheels"
    return env


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_installed_unit_serves_stops_and_does_not_loop_on_a_bad_config(root, wheel, broker, tmp_path):
    if not shutil.which("systemd-nspawn"):
        pytest.skip("systemd-nspawn is not installed (apt-get install systemd-container)")
    nspawn = ["systemd-nspawn", "-q", "--register=no", "--keep-unit", "-D", str(root)]
    r = subprocess.run(nspawn + ["--pipe", "/bin/true"], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        pytest.skip(f"systemd-nspawn cannot run a container here: {r.stderr.strip()[-200:]}")
    env = _copy_host_network_setup(root)
    inst = subprocess.run(["bash", str(INSTALL), "--root", str(root), "--wheel", str(wheel)], capture_output=True,
                          text=True, timeout=1200, env=env)
    if inst.returncode != 0 and ("No matching distribution" in inst.stderr or "Name or service not known" in inst.stderr):
        pytest.skip("the package index is not reachable from the chroot: " + inst.stderr.strip()[-200:])
    assert inst.returncode == 0, inst.stdout[-2000:] + inst.stderr[-3000:]
    cfg = root / "etc/edge-runtime/edge.toml"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        metrics_port = s.getsockname()[1]
    text = cfg.read_text().replace("port = 1883", f"port = {broker.port}").replace("port = 9108", f"port = {metrics_port}")
    cfg.write_text(text)
    (root / "usr/local/sbin/edge-probe.py").write_text(_PROBE_PY)
    (root / "usr/local/sbin/edge-probe.sh").write_text(_PROBE_SH)
    (root / "etc/systemd/system/edge-probe.service").write_text(
        "[Unit]\nAfter=multi-user.target\n[Service]\nType=oneshot\nTimeoutStartSec=900\n"
        f"StandardOutput=append:/probe.out\nExecStart=/bin/sh /usr/local/sbin/edge-probe.sh {broker.port}\n"
        "ExecStartPost=/bin/systemctl poweroff\n[Install]\nWantedBy=multi-user.target\n")
    (root / "etc/systemd/system/multi-user.target.wants/edge-probe.service").symlink_to("/etc/systemd/system/edge-probe.service")

    boot = subprocess.run(nspawn + ["-b"], capture_output=True, text=True, timeout=1200)
    out = (root / "probe.out").read_text() if (root / "probe.out").exists() else ""
    assert out, boot.stdout[-3000:] + boot.stderr[-2000:]
    kv = dict(line.split("=", 1) for line in out.splitlines() if "=" in line and not line.startswith("LOG "))
    assert {"START_RC", "PREDICTION", "STOP_RC", "BAD_NRestarts"} <= set(kv), out[-4000:]
    assert kv["START_RC"] == "0" and kv["RUN_ActiveState"] == "active" and kv["RUN_NRestarts"] == "0", out
    assert kv["PREDICTION"].startswith("1 "), out
    assert "MODE 700 edge /var/lib/edge-runtime" in out and "MODE 700 edge /var/cache/edge-runtime" in out, out
    assert kv["STOP_RC"] == "0" and kv["STOP_Result"] == "success" and kv["STOP_ExecMainStatus"] == "0", out
    # A bad config fails once with exit 2 and is not restarted (RestartPreventExitStatus=).
    assert kv["BAD_START_RC"] != "0" and kv["BAD_ExecMainStatus"] == "2", out
    assert kv["BAD_ActiveState"] == "failed" and kv["BAD_NRestarts"] == "0", out


# --- the shared torch choice (scripts/lib/torch.sh) -----------------------------------------

_FAKE_PY = """#!/bin/sh
# Stands in for a venv's python: torch never imports; pip calls are recorded, and fail
# for the local '+cpu' wheel so that the fallback to PyTorch's CPU index is taken.
if [ "$1" = "-c" ]; then exit 1; fi
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then mkdir -p "$4/bin"; cp "$0" "$4/bin/python"; echo "VENV $*" >> "$LOG"; exit 0; fi
echo "PIP $*" >> "$LOG"
case "$*" in *+cpu*) exit 1 ;; esac
"""


@pytest.mark.parametrize("machine, expected", [
    ("cpu", ["PIP -m pip install torch==2.13.0+cpu",
             "PIP -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"]),
    ("nvidia", ["PIP -m pip install torch>=2.2,<2.15"]),
    ("jetson", ["VENV -m venv --system-site-packages"]),
    ("spec", ["PIP -m pip install torch==2.9.1"]),
])
def test_torch_choice_follows_the_machine(tmp_path, machine, expected):
    # A GPU or a Jetson cannot exist here: their markers (nvidia-smi, /etc/nv_tegra_release) are faked.
    bindir, venv, log = tmp_path / "bin", tmp_path / "venv", tmp_path / "log"
    (venv / "bin").mkdir(parents=True)
    bindir.mkdir()
    fake = venv / "bin" / "python"
    fake.write_text(_FAKE_PY)
    fake.chmod(0o755)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "LOG": str(log), "EDGE_TEGRA_RELEASE": str(tmp_path / "no-tegra")}
    if machine == "nvidia":
        (bindir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: fake'\n")
        (bindir / "nvidia-smi").chmod(0o755)
    if machine == "jetson":
        (tmp_path / "tegra").write_text("# R36 (release)\n")
        env["EDGE_TEGRA_RELEASE"] = str(tmp_path / "tegra")
        keep = bindir / "fake-python"  # the venv (and its python) is removed and made again
        keep.write_text(_FAKE_PY)
        keep.chmod(0o755)
        sys_py = bindir / "python3"  # the system python, which has JetPack's torch
        sys_py.write_text(f"#!/bin/sh\nif [ \"$1\" = -c ]; then exit 0; fi\nexec {keep} \"$@\"\n")
        sys_py.chmod(0o755)
    if machine == "spec":
        env["EDGE_TORCH_SPEC"] = "torch==2.9.1"
    py = "python3" if machine == "jetson" else str(fake)
    r = subprocess.run(["bash", "-c", f'. {ROOT}/scripts/lib/torch.sh && edge_install_torch "{py}" "{venv}"'],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    assert [c[:len(e)] for c, e in zip(calls, expected)] == expected and len(calls) == len(expected), calls
