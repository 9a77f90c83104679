"""Containers that fit a device (issue 19): serving without torch from a model folder's exported
graph, the image's files checked by parsing them, and the CPU image built and run with podman
where the tools are present (``scripts/check-container.sh`` does the whole thing by hand).

"Without torch" is simulated in a real `edge run` process: a ``sitecustomize`` on PYTHONPATH
hides torch from every import finder, so ``import torch`` fails and ``find_spec("torch")``
is None, exactly as where torch is not installed. The image itself has no torch at all.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from edge.errors import ModelError
from edge.zoo import GRAPH_FILE, GRAPH_SOURCE_KEY, ModelFolder, digest_files, folder_digest, shipped_models
from tests.faultkit import ROOT, EdgeRun, metric, scrape
from tests.helpers import Client, batch, poll

pytestmark = pytest.mark.timeout(300)

DOCKER = ROOT / "deploy" / "docker"
NO_TORCH = textwrap.dedent('''
    """Test hook: hide torch from every import finder, as if it were not installed."""
    import sys

    HIDDEN = ("torch", "torchvision", "torchaudio", "torch_tensorrt", "functorch")


    class _Hide:
        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HIDDEN:
                return None
            find = getattr(self.inner, "find_spec", None)
            return find(name, path, target) if find else None

        def __getattr__(self, name):
            return getattr(self.inner, name)


    sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
''')


@pytest.fixture(scope="module")
def no_torch_env(tmp_path_factory) -> dict:
    hook = tmp_path_factory.mktemp("no-torch")
    (hook / "sitecustomize.py").write_text(NO_TORCH)
    return {"PYTHONPATH": f"{hook}{os.pathsep}{ROOT}"}


def _python(env: dict, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env}, cwd=ROOT)


def test_the_hook_really_hides_torch(no_torch_env):
    r = _python(no_torch_env, "import importlib.util as u, sys\nprint(u.find_spec('torch'))\n"
                              "try:\n import torch\nexcept ImportError as e:\n print('refused', e)")
    assert r.returncode == 0 and r.stdout.split() == ["None", "refused", "No", "module", "named", "'torch'"], r


# --- the graph a model folder carries ------------------------------------------------------

@pytest.mark.parametrize("name", sorted(shipped_models()))
def test_every_shipped_model_carries_a_graph_made_from_its_own_weights(name):
    folder = ModelFolder(shipped_models()[name])
    assert folder.graph() is not None, f"run python scripts/export-onnx.py {folder.path}"
    assert folder.source_digest == digest_files({n: folder.files[n] for n in ("model.py", "weights.safetensors")})


def _copy(name: str, dst: Path) -> Path:
    shutil.copytree(shipped_models()[name], dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def test_a_graph_left_stale_by_retraining_is_refused_naming_the_fix(tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = _copy("vibration", tmp_path / "m")
    w = load_file(str(folder / "weights.safetensors"))
    w["head.bias"] = w["head.bias"] + 1.0  # retrained: other weights, the old graph
    save_file(w, str(folder / "weights.safetensors"))

    with pytest.raises(ModelError, match=r"exported from another model.py or weights.*scripts/export-onnx.py"):
        ModelFolder(folder).graph()


def test_a_graph_without_the_source_record_is_refused(tmp_path):
    import onnx

    folder = _copy("vibration", tmp_path / "m")
    g = onnx.load(str(folder / GRAPH_FILE))
    kept = [p for p in g.metadata_props if p.key != GRAPH_SOURCE_KEY]
    del g.metadata_props[:]
    g.metadata_props.extend(kept)
    (folder / GRAPH_FILE).write_bytes(g.SerializeToString())

    with pytest.raises(ModelError, match="missing"):
        ModelFolder(folder).graph()


def test_the_pin_covers_the_graph_and_the_model_identity_does_not_change_with_it(tmp_path):
    folder = _copy("vibration", tmp_path / "m")
    before, identity = folder_digest(folder), ModelFolder(folder).content_hash
    (folder / GRAPH_FILE).write_bytes((folder / GRAPH_FILE).read_bytes() + b"\0")

    assert folder_digest(folder) != before  # what `edge pin` pins: a changed graph is refused
    (folder / GRAPH_FILE).unlink()
    # checkpoints and artifacts are bound to model.py and the weights, which the graph must match
    assert ModelFolder(folder).content_hash == identity


def test_a_folder_without_a_graph_on_a_machine_without_torch_names_both_fixes(tmp_path, no_torch_env):
    folder = _copy("vibration", tmp_path / "m")
    (folder / GRAPH_FILE).unlink()
    r = _python(no_torch_env, f"from edge.serve import compile_model\nfrom edge.zoo import ModelFolder\n"
                              f"compile_model(ModelFolder({str(folder)!r}), backend='onnxruntime', precision='fp32', "
                              f"cache_dir={str(tmp_path / 'cache')!r}, progress=False)")
    assert r.returncode != 0 and "BackendUnavailable" in r.stderr
    assert "torch is not installed" in r.stderr and "scripts/export-onnx.py" in r.stderr


# --- edge run without torch: check, build, gate, serve, learn -------------------------------

def _labelled_windows(c: Client, node: str, n: int, t0: float) -> float:
    """``n`` consecutive windows on m1/accel, each with a label at its middle; the next t0."""
    from edge.sim import Machine

    m = Machine(seed=3, t0=t0)
    for _ in range(n):
        t, v = m.read(256)
        c.publish("sensors/m1/accel", {"t0": float(t[0]), "dt": 0.001, "v": np.round(v, 5).tolist()})
        c.publish(f"edge/{node}/labels", {"t": float(t[128]), "label": "normal", "device": "m1", "stream": "accel"})
    return float(t[-1]) + 0.001


def test_edge_run_checks_builds_serves_and_learns_without_torch(broker, tmp_path, no_torch_env):
    cache = tmp_path / "own-cache"  # nothing compiled before: the first start builds from the graph, without torch
    run = EdgeRun(broker, tmp_path, node="nt", env=no_torch_env, adapt=True, model={"cache_dir": str(cache)})
    try:
        check = subprocess.run([sys.executable, "-m", "edge.cli", "run", "--config", str(run.cfg), "--check"],
                               capture_output=True, text=True, timeout=120, env={**os.environ, **no_torch_env})
        assert check.returncode == 0 and "OK" in check.stdout, check.stdout + check.stderr
        run.wait_healthy(timeout=240)
        c = Client(broker, "edge/nt/predictions/#")
        try:
            _labelled_windows(c, "nt", 12, time.time() - 30)
            c.wait_for(lambda m: len(m) >= 12, timeout=60)
            poll(lambda: metric(scrape(run.port), "edge_adapt_train_steps_total") > 0, 60, 0.2, "a training step")
        finally:
            c.close()
        text = scrape(run.port)
    finally:
        run.close()
    pred = json.loads(c.msgs[0][1])
    assert pred["prediction"] in ("normal", "imbalance", "misalignment", "bearing_wear")
    assert metric(text, "edge_adapt_learned_total") > 0
    metas = [json.loads(p.read_text()) for p in cache.glob("*/*/meta.json")]
    assert metas and all(m["reference"].startswith("onnxruntime fp32 of the folder's model.onnx") for m in metas)
    assert "Traceback" not in run.log_text()


# --- the health check means serving -----------------------------------------------------------

def _healthcheck(conf: Path) -> subprocess.CompletedProcess:
    """deploy/docker/healthcheck.py as the image runs it (``$EDGE_CONFIG``)."""
    return subprocess.run([sys.executable, str(DOCKER / "healthcheck.py")], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT), "EDGE_CONFIG": str(conf)})


def test_healthcheck_url_examples():
    import doctest
    import importlib.util

    spec = importlib.util.spec_from_file_location("healthcheck", DOCKER / "healthcheck.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert doctest.testmod(mod).failed == 0


@pytest.mark.parametrize("metrics", [True, False], ids=["readyz-on-the-metrics-port", "status-socket-with-port-0"])
def test_healthcheck_passes_only_while_serving(broker, tmp_path, metrics):
    down = EdgeRun(broker, tmp_path, node="hc-down", metrics=metrics, mqtt={"port": _free_port()})  # no broker there
    up = EdgeRun(broker, tmp_path, node="hc-up", metrics=metrics)
    try:
        poll(lambda: _healthcheck(up.cfg).returncode == 0, 120, 0.5, "the health check to pass")
        ok = _healthcheck(up.cfg)
        answers = "503" if metrics else "broker_connected"  # the daemon answers, and says it is not serving
        bad = poll(lambda: (lambda r: r if answers in r.stdout else None)(_healthcheck(down.cfg)), 120, 0.5,
                   "the daemon without a broker to answer the health check")
        assert down.proc.poll() is None, down.log_text()[-2000:]  # alive, but not serving anyone
    finally:
        up.close()
        down.close()
    assert '"ready": true' in ok.stdout, ok.stdout
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert ("readyz: 503" in bad.stdout) if metrics else ('"broker_connected": false' in bad.stdout), bad.stdout


def test_healthcheck_says_when_the_config_cannot_be_read(tmp_path):
    r = _healthcheck(tmp_path / "absent.toml")
    assert r.returncode == 2 and "cannot read" in r.stdout, r.stdout + r.stderr


def _free_port() -> int:
    from tests.faultkit import free_port

    return free_port()


# --- the Dockerfiles, parsed (no hadolint here; a Jetson image cannot be built here) ----------

def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile in order, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    """The instructions of each build stage (``FROM`` to ``FROM``)."""
    out: list[list[tuple[str, str]]] = []
    for ins in instructions(path):
        if ins[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.jetson"])
def test_pip_and_the_context_stay_in_the_build_stage(name):
    *build, final = stages(DOCKER / name)
    assert build, "a multi-stage build: the final stage gets installed files, never a wheel"
    final_text = " ".join(a for _, a in final)
    assert "pip install" not in final_text and not any(i == "COPY" and not a.startswith("--from=") for i, a in final)
    assert any(i == "ENV" and "PIP_NO_CACHE_DIR=1" in a for i, a in build[0])
    assert "find /opt/edge-runtime/venv -name '*.whl' -delete" in " ".join(a for _, a in build[0])


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.jetson"])
def test_the_image_runs_as_999_with_a_serving_health_check_from_its_config(name):
    final = stages(DOCKER / name)[-1]
    text = " ".join(a for _, a in final)
    assert ("USER", "edge") in final and "--uid 999 --gid 999" in text and "groupadd --system --gid 999 edge" in text
    health = next(a for i, a in final if i == "HEALTHCHECK")
    assert "/opt/edge-runtime/healthcheck.py" in health and "EDGE_HEALTH_URL" not in (DOCKER / name).read_text()
    env = " ".join(a for i, a in final if i == "ENV")
    assert "EDGE_CONFIG=/etc/edge-runtime/edge.toml" in env and "RUNTIME_DIRECTORY=/tmp/" in env
    assert ("CMD", '["run"]') in final  # edge run reads $EDGE_CONFIG, as the health check does


def test_the_cpu_image_leaves_torch_out_unless_asked():
    build = stages(DOCKER / "Dockerfile.cpu")[0]
    run = next(a for i, a in build if i == "RUN" and "requirements.txt" in a)
    assert 'else EDGE_SKIP="$EDGE_SKIP torch onnxscript"' in run and ("ARG", "EDGE_TORCH=0") in build
    assert run.index("edge_install_torch") < run.index("pip install -q -r /tmp/requirements.txt")


def test_jetson_copies_the_context_before_it_installs_the_wheel_and_installs_its_libraries():
    build, final = stages(DOCKER / "Dockerfile.jetson")
    copy = build.index(("COPY", ". /src"))
    installs = [k for k, (i, a) in enumerate(build) if i == "RUN" and '"$TORCH_WHEEL"' in a and "pip install" in a]
    assert installs and all(k > copy for k in installs), "a TORCH_WHEEL path must be in the image before pip reads it"
    for stage in (build, final):
        assert any(i == "RUN" and "libopenblas0" in a for i, a in stage), "NVIDIA's torch links libopenblas"
    assert any(i == "ARG" and a.startswith("CUSPARSELT_ARCHIVE=") for i, a in build)
    assert ("COPY", "--from=build /opt/cusparselt /opt/cusparselt") in final
    assert "LD_LIBRARY_PATH=/opt/cusparselt/lib" in " ".join(a for i, a in final if i == "ENV")


def _first_run(tmp_path: Path, **args: str) -> subprocess.CompletedProcess:
    """The Jetson build's first RUN, executed as the builder would, with apt-get a stub that records."""
    build = stages(DOCKER / "Dockerfile.jetson")[0]
    run = next(a for i, a in build if i == "RUN")
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    (stub / "apt-get").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/apt.calls\n')
    (stub / "apt-get").chmod(0o755)
    env = {"PATH": f"{stub}:/usr/bin:/bin", "L4T_BASE": "some/base", **args}
    return subprocess.run(["sh", "-c", run], capture_output=True, text=True, timeout=30, env=env)


@pytest.mark.skipif(Path("/etc/nv_tegra_release").exists(), reason="this machine is an L4T one")
def test_jetson_build_refuses_a_base_that_is_not_l4t_unless_forced(tmp_path):
    refused = _first_run(tmp_path, TORCH_WHEEL="torch.whl", EDGE_JETSON="auto")
    assert refused.returncode == 1 and "no /etc/nv_tegra_release" in refused.stderr and "EDGE_JETSON=force" in refused.stderr
    assert not (tmp_path / "apt.calls").exists(), "nothing may be installed before the check"

    forced = _first_run(tmp_path, TORCH_WHEEL="torch.whl", EDGE_JETSON="force")
    assert forced.returncode == 0, forced.stderr
    assert "libopenblas0" in (tmp_path / "apt.calls").read_text()


def test_jetson_build_without_a_wheel_says_how():
    r = subprocess.run(["sh", "-c", next(a for i, a in stages(DOCKER / "Dockerfile.jetson")[0] if i == "RUN")],
                       capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin", "TORCH_WHEEL": ""})
    assert r.returncode == 1 and "--build-arg TORCH_WHEEL=" in r.stderr


def test_compose_joins_the_hosts_edge_group_and_drops_everything():
    text = (DOCKER / "compose.yaml").read_text()
    assert "read_only: true" in text and "cap_drop: [ALL]" in text and "no-new-privileges:true" in text
    assert re.search(r'group_add:\s*\n\s*- "\$\{EDGE_GID:-999\}"', text)


def test_install_sh_config_mode_is_the_one_the_image_documents():
    text = (ROOT / "deploy/install.sh").read_text()
    assert 'install -m 0640 -o root -g "$USER_NAME"' in text  # so the container needs the host's edge group
    assert "--group-add" in text and "--group-add" in (DOCKER / "Dockerfile.cpu").read_text()


# --- the CPU image, built and run with podman ---------------------------------------------------

def _podman_reason() -> str | None:
    if os.geteuid() != 0:
        return "podman builds rootful here: run as root"
    missing = [t for t in ("podman", "runc") if not shutil.which(t)]
    if missing:
        return f"{' and '.join(missing)} not installed (apt-get install -y podman runc; .ci/run does)"
    if not (ROOT / "cache/container/bookworm/usr/bin/python3").exists() and not shutil.which("debootstrap"):
        return "no cached base in cache/container/bookworm and no debootstrap to make it (apt-get install debootstrap)"
    return None


@pytest.mark.timeout(900)
def test_cpu_image_builds_with_podman_fits_and_serves_read_only_as_999(tmp_path):
    reason = _podman_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "container.json"
    r = subprocess.run(["bash", str(ROOT / "scripts/check-container.sh"), str(out)], capture_output=True, text=True,
                       timeout=880)
    assert r.returncode == 0, r.stderr[-4000:]
    d = json.loads(out.read_text())
    assert d["image_size_bytes"] <= 500_000_000 and d["wheels_in_image_layers"] == []
    assert not d["installed"]["torch"] and d["uid_in_container"] == 999 and d["config_user"] == "edge"
    assert d["effective_capabilities"] == "0" * 16 and d["root_fs"] == "read-only"
    assert d["healthcheck"]["Test"][-1] == "/opt/edge-runtime/healthcheck.py"
    assert d["prediction"] and d["unhealthy_without_broker"] and d["alive_without_broker"]
    assert d["exit_code_on_stop"] == 0 and d["config_0640_without_group_add"]["rc"] == 2
    assert '"broker_connected": true' in d["port0_healthcheck_says"]
