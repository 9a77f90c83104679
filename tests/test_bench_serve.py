"""``edge bench serve`` on every shipped model and on a model folder made here (its own
calibration module; a calibration file and a labelled eval file). Short settings: these
check that it runs and what it records, not speed (speed is in BENCHMARKS.md)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge.serve.testing import make_tiny_model, synthetic_dataset
from edge.zoo import shipped_models

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["--iters", "30", "--seconds", "0.02", "--n-eval", "60"]
pytestmark = pytest.mark.timeout(600)


def _bench(args, tmp_path):
    out = tmp_path / "serve.json"
    r = subprocess.run([sys.executable, "-m", "edge.cli", "bench", "serve", *args, *QUICK, "--out", str(out),
                        "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text()), out.with_suffix(".md").read_text(), r


def test_the_bench_judges_its_own_figures_by_the_choices_rule():
    from edge.bench.serve import bench_decision

    rows = [{"backend": "onnxruntime", "precision": "int8", "variant": "u8s8-rr", "p50_ms": 0.045,
             "accuracy": {"nominal": 0.95}},
            {"backend": "onnxruntime", "precision": "fp32", "variant": "", "p50_ms": 0.0997,
             "accuracy": {"nominal": 0.951}},
            {"backend": "torch", "precision": "fp32", "variant": "", "p50_ms": 0.5, "accuracy": {"nominal": 0.951}}]

    assert bench_decision(rows, "auto", {}).chosen.label == "onnxruntime int8 (u8s8-rr)"
    assert bench_decision(rows, "fp32", {}).chosen.label == "onnxruntime fp32"
    # the bench's own accuracy (a short --n-eval) says int8 loses 2 points; the choice's set says 0.1
    rows[0]["accuracy"] = {"nominal": 0.931}
    assert bench_decision(rows, "auto", {}).chosen.label == "onnxruntime fp32"
    assert bench_decision(rows, "auto", {}, {"onnxruntime int8 (u8s8-rr)": {"nominal": 0.95}}).chosen.label \
        == "onnxruntime int8 (u8s8-rr)"


def test_bench_serve_has_its_own_help():
    r = subprocess.run([sys.executable, "-m", "edge.cli", "bench", "serve", "--help"], capture_output=True,
                       text=True, cwd=ROOT)

    assert r.returncode == 0 and r.stdout.startswith("usage: edge bench serve") and "--write-card" in r.stdout


@pytest.mark.parametrize("name", sorted(shipped_models()))
def test_bench_serve_runs_on_every_shipped_model(name, tmp_path):
    report, table, _ = _bench([name], tmp_path)

    labels = [f"{r['backend']} {r['precision']}" for r in report["results"]]
    assert "onnxruntime fp32" in labels and "torch fp32" in labels
    assert report["command"] == f"edge bench serve {name} " + " ".join(QUICK) + \
        f" --out {tmp_path / 'serve.json'} --cache-dir {tmp_path / 'cache'}"
    assert report["served"] == report["choice"]["chosen"]["backend"] + " " + report["choice"]["chosen"]["precision"] \
        + (f" ({report['choice']['chosen']['variant']})" if report["choice"]["chosen"]["variant"] else "")
    assert report["machine"]["cpu_summary"] in table and "calibration source" in report["inputs"]["latency"]
    for r in report["results"]:
        assert r["torch_imported"] == (r["backend"] == "torch"), r
    assert report["cold_start"]["recorded_choice"] and not report["cold_start"]["torch_imported"]
    # the choice and the bench agree in the same run, or the choice was measured again (and says so)
    a = report["agreement"]
    assert a["choice"] == report["served"] and a["choice_confidence"] in ("sure", "uncertain")
    assert a["agree"] == (a["choice"] == a["bench_choice"]) and (a["agree"] or a["remeasured"])
    assert report["targets"]["choice_agrees_with_bench"]["met"] == a["agree"] and "Serving choice: " in table
    if name == "forecast":
        assert report["choice"]["policy"] == "fp32" and report["served"] == "onnxruntime fp32"
        assert "accuracy not measured" in report["inputs"]["accuracy"]
    if name == "vibration":
        assert set(report["results"][0]["accuracy"]) >= {"nominal", "gain_offset", "noise"}


GEN = '''from edge.serve.testing import synthetic_dataset


def windows(n, seed=0):
    return synthetic_dataset(n, seed + 3)[0]


def labelled(n, seed=0):
    return {"quiet": synthetic_dataset(n, seed + 100), "loud": synthetic_dataset(n, seed + 200)}
'''


def test_bench_serve_on_a_model_folder_with_its_own_generator_module(tmp_path):
    model = make_tiny_model(tmp_path / "mine", name="mine")
    (model.path / "mygen.py").write_text(GEN)
    mp = model.path / "manifest.toml"
    mp.write_text(mp.read_text().replace('generator = "edge.serve.testing:calibration_windows"',
                                         'generator = "mygen:windows"\n[eval]\ngenerator = "mygen:labelled"'))

    report, table, _ = _bench([str(model.path)], tmp_path)

    assert set(report["results"][0]["accuracy"]) == {"quiet", "loud"} and "| quiet |" in table
    assert "mygen:labelled" in report["inputs"]["accuracy"]


def test_bench_serve_on_a_model_folder_with_a_calibration_file_writes_the_card(tmp_path):
    model = make_tiny_model(tmp_path / "filed", name="filed")
    np.save(model.path / "recorded.npy", synthetic_dataset(200, seed=5)[0])
    X, y = synthetic_dataset(80, seed=6)
    np.savez(model.path / "eval.npz", X=X, y=y)
    mp = model.path / "manifest.toml"
    mp.write_text(mp.read_text().replace('generator = "edge.serve.testing:calibration_windows"',
                                         'file = "recorded.npy"\n[eval]\nfile = "eval.npz"'))
    (model.path / "CARD.md").write_text("# Card\n\n## int8 (filled by `edge bench serve`)\nNot measured yet.\n\n"
                                        "## Limitations\n- hand-written\n")

    report, table, _ = _bench([str(model.path), "--write-card"], tmp_path)
    card = (model.path / "CARD.md").read_text()

    assert "eval.npz" in report["inputs"]["accuracy"] and set(report["results"][0]["accuracy"]) == {"eval"}
    assert "Not measured yet" not in card and "<!-- serving:start" in card and "## Limitations\n- hand-written" in card
    assert table.strip() in card
    _bench([str(model.path), "--write-card"], tmp_path)  # a second write replaces the block, not appends
    assert (model.path / "CARD.md").read_text().count("<!-- serving:start") == 1
