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

pytestmark = pytest.mark.timeout(300)


DEMO = ["demo", "--seconds", "32", "--drift-at", "6", "--no-live", "--no-serial", "--devices", "2"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same short demo twice, at once (on a machine the other loads too): each run's own
    TMPDIR, report folder and output. Drift at 7 s, just before imbalance (8-16 s), which comes
    back at 24-32 s."""
    runs = []
    for i in range(2):
        base = tmp_path_factory.mktemp(f"demo{i}")
        (base / "tmp").mkdir()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(base / "tmp")}
        proc = subprocess.Popen([sys.executable, "-m", "edge.cli", *DEMO, "--out", str(base / "report")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        runs.append((base, proc))
    out = []
    for base, proc in runs:
        stdout, stderr = proc.communicate(timeout=200)
        assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
        out.append({"base": base, "stdout": stdout, "stderr": stderr,
                    "report": json.loads((base / "report" / "report.json").read_text())})
    return out


def test_a_short_demo_cleans_up_labels_cleanly_and_reports_the_story(two_runs):
    run = two_runs[0]
    left = [q.name for q in (run["base"] / "tmp").iterdir() if q.name.startswith("edge-")]
    assert left == []  # no /tmp/edge-broker-*, no /tmp/edge-demo-state-* left
    assert "rejected" not in run["stderr"] and "WARNING" not in run["stderr"], run["stderr"][-2000:]
    assert "{'" not in run["stdout"] and "drift injected: machine-1" in run["stdout"]
    js = run["report"]
    learner = js["meta"]["status"]["adapt"]
    assert learner["learner_labels_total"] > 0 and not learner["learner_labels_rejected"]
    assert not js["meta"]["status"].get("bad_input")
    assert js["meta"]["drift_at"] == 7.0 and js["story"]["fault"] == "imbalance"
    assert js["series"]["served"]["machine-1/accel"]["t"] and js["series"]["shipped"]["machine-1/accel"]["t"]
    assert js["segments"][1]["fault"] == "imbalance"  # the confused fault comes up right after the drift
    assert all(e.get("why") for e in js["events"])
    assert (run["base"] / "report" / "report.png").stat().st_size > 10_000


def test_the_demo_shows_drift_then_learning_on_the_fault_that_drifted(two_runs):
    for run in two_runs:
        st = run["report"]["story"]
        served, shipped = st["served"], st["shipped"]
        assert served["before_drift"] >= 0.9, st
        assert served["after_drift"] <= served["before_drift"] - 0.15, st  # the dip (learning starts inside it)
        assert served["after_adaptation"] >= max(served["before_drift"] - 0.25, served["after_drift"] + 0.1), st  # learned back
        assert shipped["after_drift"] <= 0.3 and shipped["after_adaptation"] <= 0.3, st  # the drift is real, and stays


def test_the_same_seed_tells_the_same_story_on_every_run(two_runs):
    a, b = (r["report"] for r in two_runs)
    assert a["meta"]["pacing"]["lockstep"] and b["meta"]["pacing"]["lockstep"], (a["meta"]["pacing"], b["meta"]["pacing"])
    assert a["story"] == b["story"]
    for who in ("served", "shipped"):
        assert a["series"][who].keys() == b["series"][who].keys()
        for key, s in a["series"][who].items():
            assert s["accuracy"] == b["series"][who][key]["accuracy"], (who, key)
    versions = lambda js: [(e["type"], e.get("version")) for e in js["events"]]  # noqa: E731
    assert versions(a) == versions(b)


@pytest.fixture(scope="module")
def fleet_run(tmp_path_factory):
    """One short fleet demo (20 s, two devices and the late one; it runs on until the worse
    release is halted): its TMPDIR, report and output."""
    base = tmp_path_factory.mktemp("fleet-demo")
    tmp, out = base / "tmp", base / "report"
    tmp.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp)}
    p = subprocess.run([sys.executable, "-m", "edge.cli", "demo", "--fleet", "--seconds", "20", "--devices", "2",
                        "--no-live", "--out", str(out)], capture_output=True, text=True, timeout=280, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return {"tmp": tmp, "out": out, "stdout": p.stdout, "stderr": p.stderr,
            "report": json.loads((out / "fleet-report.json").read_text())}


def test_the_fleet_demo_leaves_no_keys_store_or_broker_folder_behind(fleet_run):
    left = [q.name for q in fleet_run["tmp"].iterdir() if q.name.startswith("edge-")]
    assert left == []  # no /tmp/edge-fleet-demo-* (private keys, fleet.db, releases), no /tmp/edge-broker-*
    js = fleet_run["report"]
    assert set(js["conditions"]) == {"dev-0", "dev-1", "late"}
    assert "dev-0" in fleet_run["stdout"] and "{'" not in fleet_run["stdout"]


def test_the_fleet_demo_rolls_a_good_release_out_and_halts_a_worse_one_in_its_first_wave(fleet_run):
    js = fleet_run["report"]
    good, worse = js["releases"]["good"], js["releases"]["worse"]
    nodes = {"dev-0", "dev-1", "late"}
    assert good["state"] == "done" and set(good["switched"]) == nodes, good  # every device, the late one too
    assert sorted(good["waves_of"].values()) == [0, 1, 2]  # one device per wave: each wave opened in turn
    opened = [e["wave"] for e in js["release_events"] if e["release"] == good["release"]]
    assert opened == [0, 1, 2, 2], js["release_events"]  # published, wave 2, wave 3, done
    first = [n for n, w in worse["waves_of"].items() if w == 0]
    assert worse["state"] == "halted" and worse["wave"] == 0, worse
    assert worse["switched"] == [] and worse["served_by"] == []
    assert {n: (d["state"], d["reason"]) for n, d in worse["devices"].items()} == {first[0]: ("refused", "worse")}
    assert worse["devices"][first[0]]["evidence"]["reference"] == "shipped"
    # the release series: each device's step and model over time, as the PNG draws them
    rows = [r for r in js["timeline"] if r.get("deploy")]
    assert {v["phase"] for r in rows for v in r["deploy"].values()} >= {"shadowing", "switched", "refused"}
    assert [r["deploy"][n]["serving"] for r in rows[-1:] for n in sorted(nodes)] == [good["version"]] * 3
    assert "halted" in fleet_run["stdout"] and (fleet_run["out"] / "fleet-report.png").stat().st_size > 10_000
