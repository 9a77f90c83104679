"""The README's first session runs as pasted (issue 21): its config, the mosquitto_sub and
mosquitto_pub commands, the topics table's sample payload, the label forms, `edge label
sign` and the Python signing snippet, against a real broker and a real `edge run`.

The only changes made to the text are the broker's and the metrics' port numbers (the
test broker listens on a free port)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from edge.config import Config, SourceConfig, load_config
from tests.faultkit import ROOT, free_port, healthz, poll, shared_cache
from tests.helpers import Client

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(not shutil.which("mosquitto_pub"), reason="mosquitto clients not installed")]

README = (ROOT / "README.md").read_text()


def blocks() -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r"<!-- session: (\S+) -->\n```\w+\n(.*?)```", README, re.S)}


def test_the_readme_has_every_session_block():
    assert set(blocks()) == {"config", "watch", "publish", "labels", "signed", "signed-python"}


def _env(tmp: Path) -> dict:
    home = tmp / "home"
    (home / ".cache").mkdir(parents=True, exist_ok=True)
    return {**os.environ, "HOME": str(home), "EDGE_CACHE_DIR": str(shared_cache(tmp)), "PYTHONPATH": str(ROOT),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _port(text: str, broker_port: int, metrics_port: int = 0) -> str:
    return text.replace("1883", str(broker_port)).replace("9108", str(metrics_port))


def _status(env, cwd) -> dict:
    p = subprocess.run([sys.executable, "-m", "edge.cli", "status", "--config", "first.toml", "--json"], cwd=cwd,
                       env=env, capture_output=True, text=True, timeout=60)
    return json.loads(p.stdout)["daemon"] or {}


def test_the_first_session_runs_as_pasted(broker, tmp_path):
    b = blocks()
    env, mport = _env(tmp_path), free_port()
    (tmp_path / "first.toml").write_text(_port(b["config"], broker.port, mport))
    log = tmp_path / "run.log"
    daemon = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", "--config", "first.toml"], cwd=tmp_path, env=env,
                              stderr=open(log, "wb"), stdout=subprocess.DEVNULL)
    watch = subprocess.Popen(["bash", "-c", _port(b["watch"], broker.port)], stdout=subprocess.PIPE, text=True)
    try:
        def healthy():
            assert daemon.poll() is None, log.read_text()[-3000:]
            try:
                return healthz(mport) == 200
            except OSError:
                return False
        poll(healthy, 120, 0.2, "edge run to become healthy")
        script = _port(b["publish"] + b["labels"], broker.port)
        p = subprocess.run(["bash", "-euc", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr

        def taken():
            st = _status(env, tmp_path)
            s = (st.get("streams") or {}).get("m1/accel") or {}
            ad = st.get("adapt") or {}
            return s.get("windows", 0) >= 3 and s.get("samples", 0) >= 1001 and ad.get("learner_labels_total", 0) >= 3 and st
        st = poll(taken, 60, 0.5, "3 windows, 1001 samples and 3 labels")
        assert st["streams"]["m1/accel"]["gaps"] == 0  # the single sample follows the batch: no gap shown
        sample = re.search(r"JSON sample `(\{[^`]*\})`", README).group(1)  # the topics table's sample, as printed
        subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-t", "sensors/m1/accel", "-m", sample],
                       check=True, timeout=30)
        st = poll(lambda: (s := _status(env, tmp_path))["streams"]["m1/accel"]["samples"] >= 1002 and s, 60, 0.5,
                  "the topics table's sample")
        assert not st["adapt"]["learner_labels_rejected"], st["adapt"]["learner_labels_rejected"]
        assert not st.get("bad_input"), st.get("bad_input")  # the single sample too: no absurd_time
        table = subprocess.run([sys.executable, "-m", "edge.cli", "status", "--config", "first.toml"], cwd=tmp_path,
                               env=env, capture_output=True, text=True, timeout=60).stdout
        assert "labels taken 3" in table
    finally:
        daemon.terminate()
        daemon.wait(30)
        watch.terminate()
    said = watch.communicate(timeout=10)[0]
    assert "edge/first/predictions/m1/accel" in said


def test_signed_labels_from_edge_label_sign_and_the_python_snippet_pass_the_gate(broker, tmp_path):
    from edge.ingest.labelauth import LabelGate, load_label_keys

    b, env = blocks(), _env(tmp_path)
    c = Client(broker, "edge/first/labels")
    try:
        p = subprocess.run(["bash", "-euc", _port(b["signed"], broker.port)], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        c.wait_for(lambda m: len(m) >= 1, timeout=30)
        published = c.msgs[0][1]
    finally:
        c.close()
    gate = LabelGate(keys=load_label_keys(tmp_path / "labellers"), node="first")
    raw, by = gate.open(published, target=None, now=time.time())
    assert by == "operator" and json.loads(raw)["label"] == "imbalance"
    py = subprocess.run([sys.executable, "-c", b["signed-python"]], cwd=tmp_path, capture_output=True, text=True,
                        timeout=60, check=True).stdout.strip().encode()
    raw, by = gate.open(py, target=None, now=time.time())
    assert by == "operator" and json.loads(raw)["device"] == "m1"


# ---- deploy/config/edge.toml states the defaults truthfully: every key it sets has the value
# edge/config.py gives it, unless its line says "not the default" and names the default
EXAMPLE = Path(__file__).parent.parent / "deploy" / "config" / "edge.toml"


def _toml_value(v) -> str:
    return {True: "true", False: "false"}.get(v, str(v)) if isinstance(v, bool) else str(v)


def test_every_value_set_is_the_default_or_says_it_is_not():
    text = EXAMPLE.read_text()
    data = tomllib.loads(text)
    lines = {m.group(1): m.group(0) for m in re.finditer(r"^(\w+) = .*$", text, re.M)}
    c, wrong = Config(), []
    for sec, body in data.items():
        items = [(k, v, getattr(SourceConfig(), k)) for src in body for k, v in src.items()] if sec == "sources" else \
            [(k, v, getattr(getattr(c, sec), k)) for k, v in body.items()]
        for k, v, default in items:
            if v == default:
                continue
            line = next((ln for key, ln in lines.items() if key == k), "")
            if "not the default" not in line or _toml_value(default) not in line:
                wrong.append(f"[{sec}] {k} = {v!r}: the default is {default!r} and the line does not say so")
    assert not wrong, wrong


def test_the_example_loads():
    assert load_config(EXAMPLE).node.name == "press-7"


def test_the_docs_stand_alone():
    """No reference to files a user does not have, no notes to the team."""
    docs = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
    for p in docs:
        text = p.read_text()
        for bad in ("../shared", "DESIGN.md", "README-ready", "the lead may"):
            assert bad not in text, f"{p.name}: {bad!r}"
