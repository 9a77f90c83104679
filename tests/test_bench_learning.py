"""`edge bench learning` runs end to end on a small stream and writes its JSON (no timing is checked)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("river")


def test_bench_learning_writes_quality_speed_and_reference(tmp_path):
    from edge.cli import main

    rc = main(["bench", "learning", "--streams", "no_signal", "--pre", "60", "--post", "60", "--repeats", "1",
               "--out", str(tmp_path)])
    assert rc == 0
    r = json.loads((tmp_path / "learning.json").read_text())["streams"]["no_signal"]
    assert r["rows"] == 120 and {"edge", "edge_learn_many32", "river_linear", "reference"} <= set(r)
    assert r["edge"]["mse"] > 0 and r["edge_learn_many32"]["rows_per_s"] > 0
    # learn_many's rows are scored as predict serves them: in the target's units (about the
    # reference's error on this stream, not the target's square)
    assert r["edge_learn_many32"]["after_first_batch"]["mse"] < 2.0 * r["reference"]["mse"]


def test_river_datasets_load_offline():
    from edge.bench.learning import load_stream

    task, X, y, k = load_stream("phishing", seed=0, pre=0, post=0)
    assert task == "binary" and X.shape == (1250, 9) and k == 2
    task, X, y, _ = load_stream("trump_approval", seed=0, pre=0, post=0)
    assert task == "regression" and X.shape == (1001, 6)


def test_rivers_other_bundled_streams_load_offline_with_class_indices():
    from edge.bench.learning import load_stream

    task, X, y, k = load_stream("bananas", seed=0, pre=0, post=0)
    assert task == "binary" and X.shape == (5300, 2) and k == 2 and set(y.tolist()) == {0, 1}
    task, X, y, _ = load_stream("chick_weights", seed=0, pre=0, post=0)
    assert task == "regression" and X.shape == (578, 3)
    task, X, y, k = load_stream("image_segments", seed=0, pre=0, post=0)
    assert task == "multiclass" and X.shape == (2310, 18) and k == 7 and set(y.tolist()) == set(range(7))
