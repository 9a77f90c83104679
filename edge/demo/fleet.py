"""`edge demo --fleet`: a fleet server, a small fleet with their own shifts, a device joining late,
and two model releases: a good one rolling out in waves, a worse one halted in its first.

Starts a broker (or uses the given one), creates keys, runs a ``FleetServer`` on SQLite,
and a few simulated devices, each a real ``AdaptWorker`` (learner thread) with a real
``DeviceSync`` (its own MQTT connection, signed deltas, verified global heads); each
device's sensors have their own shift (``edge.sim``), and their features come from the
shipped backbone, computed once up front so the demo runs on a small box. A third of the
way in, a fresh device joins: it adopts the retained global head before it has seen a
single label, and the live view and the report compare it with the shipped head. From
0.4 of the way, the server releases the shipped model re-versioned, then a worse one, to
every device's deploy part (``edge.demo.fleet_release``); the demo runs on past
``seconds`` until the worse one is halted (at most ``RELEASE_GRACE_S`` more).

Everything it creates (keys, the fleet store, the devices' state, the broker's folder) is
in temporary folders removed at the end, whatever way it ends.
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from edge.demo.fleet_release import (FleetReleases, event_line, plot_releases, release_brief, release_lines,
                                     release_outcome)
from edge.demo.fleet_release import server_section as release_section

log = logging.getLogger("edge.demo")
RELEASE_GRACE_S = 120.0  # how long past --seconds the demo waits for the release part to end


@dataclass(frozen=True)
class _Broker:
    """Where an existing broker (``--broker HOST:PORT``) listens."""

    host: str
    port: int
    protocol: str


def _device_cfg(node, broker, state, keys, interval):
    from edge.config import parse_config

    return parse_config({"node": {"name": node, "state_dir": str(state), "log_level": "warning"},
                         "mqtt": {"host": broker.host, "port": broker.port, "protocol": broker.protocol},
                         "adapt": {"checkpoint_interval_s": 30.0},
                         "fleet": {"enabled": True, "fleet": "demo", "interval_s": interval,
                                   "key_file": str(keys[node].private_path), "server_key": str(keys["server"].public_path)}})


class _Device:
    """One simulated device: learner thread + sync, fed labelled features at ``rate`` per second."""

    def __init__(self, node, cfg, model, data, rate):
        from edge.adapt.heads import HeadSnapshot
        from edge.adapt.worker import AdaptWorker
        from edge.fleet.device import DeviceSync
        from edge.state import learner_store

        m = model.manifest
        _, sd = model.arrays()
        self.shipped = HeadSnapshot.from_arrays(sd, kind="linear", task=m.task, version="shipped")
        self.node, self.data, self.rate, self.classes = node, data, rate, m.classes
        self.worker = AdaptWorker(cfg=cfg, model=model, global_head=self.shipped, publish_event=lambda k, **f: None,
                                  store=learner_store(cfg, model))
        self.sync = DeviceSync(cfg=cfg, worker=self.worker, model=model, on_event=lambda k, **f: None)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._feed, name=f"sim:{node}", daemon=True)

    def start(self):
        self.worker.start()
        self.sync.start()
        self.thread.start()

    def _feed(self):
        from edge.ingest.types import StreamKey

        z, y = self.data["train"]
        key, t = StreamKey(self.node, "vib"), time.time()
        for i in range(len(y)):
            if self._stop.wait(1.0 / self.rate):
                return
            t += 0.5
            self.worker.offer_window(key, t, t + 0.25, z[i], self.shipped.predict(z[i][None])[0])
            self.worker.offer_label(key, t + 0.1, self.classes[int(y[i])])

    def served_scores(self, z):
        """The scores this device publishes: its serving (adapted) head on features ``z``."""
        return self.worker.champion.predict(z)

    def accuracy(self) -> float:
        z, y = self.data["test"]
        return float((self.worker.champion.predict(z).argmax(1) == y).mean())

    def stop(self):
        self._stop.set()
        self.thread.join(5)
        self.sync.stop()
        self.worker.stop()


def run_fleet_demo(*, seconds: float = 0, broker: str = "", out: Path = Path("demo-report"), devices: int = 4,
                   live: bool = True) -> int:
    import torch

    from edge.bench.fleet import _conditions, _device_data
    from edge.broker import BrokerProcess
    from edge.fleet.config import parse_server_config
    from edge.fleet.keys import create_key, export_public
    from edge.fleet.server import FleetServer
    from edge.observe import setup_logging
    from edge.zoo import resolve_model

    setup_logging("warning")  # the view tells what happens; the parts' INFO lines would bury it
    logging.getLogger("edge.deploy").setLevel(logging.ERROR)  # the view shows each refusal, with its reason
    seconds = seconds or 90.0
    torch.set_num_threads(1)
    stack = contextlib.ExitStack()
    root = Path(tempfile.mkdtemp(prefix="edge-fleet-demo-"))  # private keys, fleet.db: removed at the end
    stack.callback(shutil.rmtree, root, ignore_errors=True)
    model = resolve_model("vibration")
    bb, _ = model.build()
    n_labels = int(seconds * 10) + 50
    conds = _conditions(devices + 1, 7)
    shift = {n: f"{name.replace('_', ' ')} x{st:g}" for n, (name, st, _) in
             zip([f"dev-{i}" for i in range(devices)] + ["late"], conds)}
    print(f"simulating {devices + 1} devices' sensors, each with its own shift "
          f"({', '.join(f'{n}: {v}' for n, v in shift.items())}) ...", flush=True)
    data = [dict(zip(("train", "test"), (lambda r: ((r[0], r[1]), (r[2], r[3])))(
        _device_data(bb, c, n_train=n_labels, n_test=200, seed=700 + i, classes=len(model.manifest.classes), alpha=0.5))))
        for i, (_, _, c) in enumerate(conds)]
    parts, rel = [], None
    try:
        if broker:
            host, _, p = broker.rpartition(":")
            proc_b = _Broker(host=host or "127.0.0.1", port=int(p), protocol="5")
        else:
            proc_b = stack.enter_context(BrokerProcess())  # stopped and its folder removed at the end
            print(f"started {proc_b.kind} broker on {proc_b.host}:{proc_b.port}", flush=True)
        nodes = [f"dev-{i}" for i in range(devices)] + ["late"]
        keys = {"server": create_key(root / "keys", "server", role="server")}
        for n in nodes:
            keys[n] = create_key(root / "keys", n)
            export_public(root / "keys", n, to=root / "devices")
        late_at = seconds / 3
        served = {}  # node -> its serving head's scores, for the releases' shadow tests
        rel = FleetReleases(root=root, broker=proc_b, keys=keys, model=model, labelled=set(nodes[:-1]),
                            conditions={n: c for n, (_, _, c) in zip(nodes, conds)}, scores_of=served,
                            good_at=seconds * 0.4)
        scfg = parse_server_config({
            "server": {"fleet": "demo", "model": str(model.path), "store": str(root / "fleet.db"),
                       "key_file": str(keys["server"].private_path), "devices_dir": str(root / "devices"),
                       "k": devices, "t_s": 3.0},
            "mqtt": {"host": proc_b.host, "port": proc_b.port, "client_id": "demo-fleet-server"},
            "release": release_section(rel.key.private_path)})
        server = FleetServer(scfg)
        server.start()
        parts.append(server)
        rel.attach(scfg, nodes)
        fleet = [_Device(n, _device_cfg(n, proc_b, root / "state", keys, 2.0), model, data[i], rate=10.0)
                 for i, n in enumerate(nodes[:-1])]
        for d in fleet:
            d.start()
            parts.append(d)
            served[d.node] = d.served_scores
            rel.join(d.node)
        late = None
        tty = live and sys.stdout.isatty()
        timeline, t0, waited = [], time.monotonic(), False
        while (el := time.monotonic() - t0) < seconds or (not rel.finished(el) and el < seconds + RELEASE_GRACE_S):
            if el >= seconds and not waited:
                waited = True
                print(f"t={el:5.0f} s  the release part is still running: waiting for it "
                      f"(at most {RELEASE_GRACE_S:.0f} s more)", flush=True)
            time.sleep(1.0)
            el = time.monotonic() - t0
            if late is None and el >= late_at:
                late = _Device("late", _device_cfg("late", proc_b, root / "state", keys, 2.0), model, data[-1], rate=0.001)
                late.start()  # it gets no labels: whatever it knows comes from the fleet
                parts.append(late)
                served["late"] = late.served_scores
                rel.join("late")
            events = rel.tick(el, 1.0)
            row = {"t": round(el, 1), "global_version": server.agg.current,
                   "devices": {d.node: {"base": d.sync.client.base_version, "acc": round(d.accuracy(), 3)} for d in fleet}}
            if late is not None:
                zt, yt = late.data["test"]
                row["late"] = {"base": late.sync.client.base_version, "acc": round(late.accuracy(), 3),
                               "shipped_acc": round(float((late.shipped.predict(zt).argmax(1) == yt).mean()), 3)}
            row.update(rel.row())
            timeline.append(row)
            if tty:
                sys.stdout.write(render_fleet(row, shift=shift, total=seconds, late_at=late_at, events=rel.events))
                sys.stdout.flush()
            else:
                for e in events:
                    print(event_line(e), flush=True)
                if int(el) % 5 == 0:
                    print(fleet_line(row), flush=True)
        releases = rel.summary()
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "fleet-report.json").write_text(json.dumps({"devices": [s for s, _, _ in conds], "conditions": shift,
                                                           "late_at": late_at, "releases": releases,
                                                           "release_events": rel.events, "timeline": timeline},
                                                          indent=1))
        _plot(timeline, out / "fleet-report.png", shift=shift, late_at=late_at, events=rel.events)
        for line in release_outcome(releases):
            print(line)
        print(f"report: {out / 'fleet-report.json'}, {out / 'fleet-report.png'}")
        return 0
    finally:
        for p in ([rel] if rel is not None else []) + parts[::-1]:  # release devices, late, fleet, server
            try:
                p.stop()
            except Exception:
                log.exception("stopping %s", p)
        stack.close()


def fleet_line(row: dict) -> str:
    """One line of the fleet's state (the view without a terminal).

    >>> fleet_line({"t": 5.0, "global_version": 3, "devices": {"dev-0": {"base": 2, "acc": 0.5}}})
    't=    5 s  global v3  dev-0 v2 50.0%'
    """
    line = f"t={row['t']:5.0f} s  global v{row['global_version']}  " + "  ".join(
        f"{n} v{v['base']} {v['acc'] * 100:4.1f}%" for n, v in row["devices"].items())
    if "late" in row:
        line += f"  | late v{row['late']['base']} {row['late']['acc'] * 100:4.1f}% (shipped head {row['late']['shipped_acc'] * 100:4.1f}%)"
    return line + release_brief(row)


def render_fleet(row: dict, *, shift: dict, total: float, late_at: float, events: tuple = ()) -> str:
    """The live table, redrawn in place (ANSI home + clear): a row per device with its shift."""
    lines = [f"edge demo --fleet — {row['t']:5.0f} s / {total:.0f} s   global head v{row['global_version']}", "",
             f"{'device':8} {'its sensors':28} {'base':>5} {'accuracy':>9}  note"]
    for n, v in row["devices"].items():
        lines.append(f"{n:8} {shift.get(n, ''):28} {'v' + str(v['base']):>5} {v['acc'] * 100:8.1f}%  learns from its own labels")
    if "late" in row:
        lt = row["late"]
        lines.append(f"{'late':8} {shift.get('late', ''):28} {'v' + str(lt['base']):>5} {lt['acc'] * 100:8.1f}%  "
                     f"no labels: the fleet's head (the shipped head: {lt['shipped_acc'] * 100:.1f}%)")
    else:
        lines.append(f"{'late':8} {shift.get('late', ''):28} {'':>5} {'':>9}  joins at {late_at:.0f} s")
    lines += ["", "accuracy: on each device's own test windows, with the head it serves now", ""]
    lines += release_lines(row, events)
    return "\x1b[H\x1b[2J" + "\n".join(lines) + "\n"


def _plot(timeline, path, *, shift: dict, late_at: float, events: tuple = ()):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t"] for r in timeline]
    fig = plt.figure(figsize=(11, 7.5))
    grid = fig.add_gridspec(2, 2, height_ratios=[1, 0.9])
    ax = [fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])]
    rel_ax = fig.add_subplot(grid[1, :], sharex=ax[0])
    ax[0].step(t, [r["global_version"] for r in timeline], where="post", color="#1f77b4")
    ax[0].set(title="global head version", xlabel="s", ylabel="version")
    ax[0].set_ylim(bottom=0)
    nodes = list(timeline[0]["devices"]) if timeline else []
    colours = ("#1f77b4", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#393b79", "#637939")
    for i, n in enumerate(nodes):
        ax[1].plot(t, [r["devices"][n]["acc"] * 100 for r in timeline], lw=1, color=colours[i % len(colours)],
                   label=f"{n} ({shift.get(n, '')})")
    lt = [r for r in timeline if "late" in r]
    for a in (*ax, rel_ax):  # event lines: grey or black, so they are never read as a series
        a.axvline(late_at, color="#777777", ls=":", lw=1, label="late device joins" if a is ax[1] else None)
    if lt:
        c = colours[len(nodes) % len(colours)]
        ax[1].plot([r["t"] for r in lt], [r["late"]["acc"] * 100 for r in lt], "-", color=c, lw=2,
                   label=f"late ({shift.get('late', '')}): the fleet's head, no labels")
        ax[1].plot([r["t"] for r in lt], [r["late"]["shipped_acc"] * 100 for r in lt], "--", color=c, lw=1,
                   label="late: the shipped head")
    ax[1].set(title="accuracy on each device's own shift", xlabel="s", ylabel="%", ylim=(0, 102))
    ax[1].legend(fontsize=7, loc="lower right")
    for a in ax:
        a.grid(alpha=0.3)
    plot_releases(rel_ax, timeline, list(events))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
