"""The parts of the daemon hook in through one interface (``edge.parts.Part``): started in
the order they are added, stopped phase by phase in the reverse one, each with its own
status fields and metric families, each part's state read once per scrape (issue 19: a
smaller ``Daemon``; a new part such as model releases hooks in the same way)."""
from __future__ import annotations

import threading

import pytest

from edge.observe import Registry
from edge.parts import Part, Parts

pytestmark = pytest.mark.timeout(120)


class Recording(Part):
    """A part that records each hook it is called on, and may fail one."""

    def __init__(self, name: str, calls: list, *, fail: str = "", lane: str = ""):
        self.name, self.calls, self.fail = name, calls, fail
        self.reads = 0
        self.thread = threading.Thread(target=lambda: None, name=f"{name}-thread")
        if lane:
            self.lanes = (name, lambda snap: {(name, lane): snap["lane"]})

    def _hook(self, hook: str) -> None:
        self.calls.append((self.name, hook))
        if hook == self.fail:
            raise RuntimeError(f"{self.name} failed at {hook}")

    def start(self):
        self._hook("start")

    def threads(self):
        return {self.thread.name: self.thread}

    def stop_input(self):
        self._hook("stop_input")

    def drain(self):
        self._hook("drain")

    def close(self):
        self._hook("close")

    def status(self):
        return {self.name: {"ok": True}}

    def snapshot(self):
        self.reads += 1
        return {"n": 3, "lane": {"offered": 5, "dropped": 1, "depth": 2}}

    def families(self, reg):
        reg.source(self.name, self.snapshot)
        reg.add(f"edge_{self.name}_things_total", "counter", "things", lambda s: s["n"], source=self.name)
        reg.add(f"edge_{self.name}_others", "gauge", "others", lambda s: s["n"] * 2, source=self.name)


class FakeSupervisor:
    def __init__(self):
        self.adopted = []

    def adopt(self, name, thread):
        self.adopted.append(name)


def _parts(calls, **fail):
    parts = Parts()
    for name in ("learner", "pipeline", "sources"):
        parts.add(Recording(name, calls, fail=fail.get(name, "")))
    return parts


def test_parts_start_in_order_and_stop_phase_by_phase_in_reverse():
    calls: list = []
    parts, sup = _parts(calls), FakeSupervisor()
    parts.start(sup)
    parts.stop()
    assert calls == [("learner", "start"), ("pipeline", "start"), ("sources", "start"),
                     ("sources", "stop_input"), ("pipeline", "stop_input"), ("learner", "stop_input"),
                     ("sources", "drain"), ("pipeline", "drain"), ("learner", "drain"),
                     ("sources", "close"), ("pipeline", "close"), ("learner", "close")]
    assert sup.adopted == ["learner-thread", "pipeline-thread", "sources-thread"]


def test_a_failing_hook_skips_no_other_part_and_its_error_is_raised_after():
    calls: list = []
    parts = _parts(calls, pipeline="drain")
    with pytest.raises(RuntimeError, match="pipeline failed at drain"):
        parts.stop()
    assert ("learner", "drain") in calls and ("learner", "close") in calls and len(calls) == 9


def test_two_parts_may_not_give_the_same_status_field():
    parts = Parts()
    parts.add(Recording("a", []))
    twin = Recording("b", [])
    twin.status = lambda: {"a": 1}
    parts.add(twin)
    with pytest.raises(ValueError, match="status field 'a': parts 'a' and 'b' both give it"):
        parts.status()
    with pytest.raises(ValueError, match="already added"):
        parts.add(Recording("a", []))


def test_each_part_is_read_once_per_scrape_and_lanes_of_every_part_are_one_family():
    parts = Parts()
    a = parts.add(Recording("learner", [], lane="labels"))
    b = parts.add(Recording("pipeline", [], lane="sensor"))
    reg = Registry(process=False)
    parts.families(reg)
    text = reg.render()
    assert (a.reads, b.reads) == (1, 1)
    assert "edge_learner_things_total 3.0" in text and "edge_pipeline_others 6.0" in text
    lines = [ln for ln in text.splitlines() if ln.startswith("edge_lane_items_total{")]
    assert 'edge_lane_items_total{lane="labels",outcome="dropped",thread="learner"} 1.0' in lines
    assert 'edge_lane_items_total{lane="sensor",outcome="offered",thread="pipeline"} 5.0' in lines
    assert text.count("# TYPE edge_lane_items_total counter") == 1
    reg.render()
    assert (a.reads, b.reads) == (2, 2)


def test_a_new_part_hooks_into_a_real_daemon_in_one_place(broker, tmp_path, monkeypatch):
    # what a new part (model releases) does: one parts.add in Daemon._build; its status
    # field, its families on a real /metrics and its stop phases come with it
    from edge.broker import free_port
    from edge.config import parse_config
    from edge.daemon import Daemon
    from tests.test_observe import _get

    calls: list = []
    build = Daemon._build

    def build_with_a_new_part(self):
        build(self)
        self.parts.add(Recording("deploy", calls))
    monkeypatch.setattr(Daemon, "_build", build_with_a_new_part)
    port = free_port()
    cfg = parse_config({"node": {"name": "parts", "state_dir": str(tmp_path / "state")},
                        "mqtt": {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.1},
                        "model": {"cache_dir": str(tmp_path / "cache")}, "metrics": {"port": port}})
    d = Daemon(cfg)
    d.start(connect_timeout=20)
    try:
        assert [p.name for p in d.parts] == ["serving", "adapt", "pipeline", "supervisor", "mqtt", "sources", "deploy"]
        assert calls == [("deploy", "start")] and "deploy-thread" in d.supervisor.alive()
        assert d.status()["deploy"] == {"ok": True}
        code, body = _get(port, "/metrics")
        assert code == 200 and "edge_deploy_things_total 3.0" in body.decode()
    finally:
        d.stop()
    assert calls[1:] == [("deploy", "stop_input"), ("deploy", "drain"), ("deploy", "close")]
