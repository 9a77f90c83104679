"""A lean serving process: on the ONNX Runtime path the daemon does not import torch.

Checked in a fresh subprocess (``sys.modules``) after the cache is warm, recording every
module of ``edge`` that imports torch, so a failure names the culprit.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edge.serve import compile_model
from edge.zoo import resolve_model

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(300)

PROBE = textwrap.dedent('''
    import builtins, json, sys, traceback
    importers = set()
    _orig = builtins.__import__

    def _hook(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "torch" or name.startswith(("torch.", "safetensors.torch", "torch_tensorrt")):
            caller = (globals or {}).get("__name__", "?")
            if caller.startswith("edge"):
                importers.add(caller)
        return _orig(name, globals, locals, fromlist, level)

    builtins.__import__ = _hook
    from edge.config import load_config
    from edge.daemon import Daemon

    d = Daemon(load_config(sys.argv[1]))
    d._prepare_state_dir()
    d._load_model()
    d._build()  # the learner, the pipeline and the sources, as start() builds them
    print(json.dumps({"torch": "torch" in sys.modules, "importers": sorted(importers),
                      "backend": [d.engine.backend.key, d.engine.backend.precision], "reason": d.backend_reason}))
''')


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    work = tmp_path_factory.mktemp("lean")
    compile_model(resolve_model("vibration"), cache_dir=work / "cache", progress=False)
    cfg = work / "edge.toml"
    cfg.write_text(f'[node]\nname = "lean"\nstate_dir = "{work / "state"}"\n\n'
                   f'[model]\npath = "vibration"\ncache_dir = "{work / "cache"}"\n')  # the learner on, as by default
    return cfg


def test_the_daemon_on_the_onnxruntime_path_does_not_import_torch(warm):
    r = subprocess.run([sys.executable, "-c", PROBE, str(warm)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])

    assert out["backend"][0] == "onnxruntime" and "recorded choice" in out["reason"]
    assert not out["torch"], f"torch imported by {out['importers']}"
