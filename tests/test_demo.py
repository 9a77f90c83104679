"""`edge demo` as a user runs it (a real broker, daemons and simulated machines): it cleans up
what it creates, its labeller sends only labels the daemon takes, it prints events in words,
and its report tells the story (issue 21)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.faultkit import ROOT

pytestmark = pytest.mark.timeout(240)


def test_a_short_demo_cleans_up_labels_cleanly_and_reports_the_story(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "report"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp)}
    p = subprocess.run([sys.executable, "-m", "edge.cli", "demo", "--seconds", "18", "--no-live", "--no-serial",
                        "--devices", "2", "--out", str(out)], capture_output=True, text=True, timeout=200, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    left = [q.name for q in tmp.iterdir() if q.name.startswith("edge-")]
    assert left == []  # no /tmp/edge-broker-*, no /tmp/edge-demo-state-* left
    assert "rejected" not in p.stderr and "WARNING" not in p.stderr, p.stderr[-2000:]
    assert "{'" not in p.stdout and "drift injected: machine-1" in p.stdout
    js = json.loads((out / "report.json").read_text())
    learner = js["meta"]["status"]["adapt"]
    assert learner["learner_labels_total"] > 0 and not learner["learner_labels_rejected"]
    assert not js["meta"]["status"].get("bad_input")
    assert js["meta"]["drift_at"] == 7.0 and js["story"]["fault"] == "imbalance"
    assert js["series"]["served"]["machine-1/accel"]["t"] and js["series"]["shipped"]["machine-1/accel"]["t"]
    assert js["segments"][1]["fault"] == "imbalance"  # the confused fault comes up right after the drift
    assert all(e.get("why") for e in js["events"])
    assert (out / "report.png").stat().st_size > 10_000


def test_the_fleet_demo_leaves_no_keys_store_or_broker_folder_behind(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "report"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp)}
    p = subprocess.run([sys.executable, "-m", "edge.cli", "demo", "--fleet", "--seconds", "10", "--devices", "2",
                        "--no-live", "--out", str(out)], capture_output=True, text=True, timeout=200, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    left = [q.name for q in tmp.iterdir() if q.name.startswith("edge-")]
    assert left == []  # no /tmp/edge-fleet-demo-* (private keys, fleet.db), no /tmp/edge-broker-*
    js = json.loads((out / "fleet-report.json").read_text())
    assert set(js["conditions"]) == {"dev-0", "dev-1", "late"}
    assert "dev-0" in p.stdout and "{'" not in p.stdout
