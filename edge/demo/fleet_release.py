"""The release part of `edge demo --fleet`: the demo's fleet server releases a good model and
then a worse one, in waves, to every device, and the live view and report follow it.

Each demo device also runs the daemon's deploy part (``edge.deploy.sim.SimDevice``, the one
`edge bench deploy` drives): its own MQTT connection, download, verify, gate, shadow test,
switch. Its shadow windows come from the device's own shifted sensors (``edge.sim``),
``SHADOW_RATE`` a second, each labelled (but the late device's), and the scores it publishes
are those of the head it has adapted; the shadow test compares a release with the shipped head on the same backbone
(``edge.deploy.shadow``), so a learning device still takes a good release. The late device
has no labels: it decides by the documented fallback (agreement and confidence over
``SHADOW_MAX_WINDOWS`` windows). The releases (``edge.deploy.sim.release_folders``):

* **good**: the shipped model re-versioned (same weights): every device must switch, wave by wave;
* **worse**: its head's class rows rotated (a mislabelled head, parity intact): the first
  wave's device must find it worse on its labels, and the server halts it there.

A shortcut of the demo, said here: a device's learner is not rebuilt at a switch (the good
release has the same backbone); a daemon restarts and sets the adapted head aside.
"""
from __future__ import annotations

import threading
from pathlib import Path

WAVES = (34, 67, 100)
MIN_LABELS, MARGIN, SHADOW_MAX_WINDOWS = 40, 0.25, 80
SHADOW_RATE = 20  # shadow windows a second per device: a wave decides in a few seconds
SETTLE_S = 3.0  # after the halt, the demo goes on this long: nobody takes the halted release
#: the release event lines: black and greys only (never a series colour), one style per kind
EVENT_STYLES = {"published": ("#000000", "-", "release published"),
                "wave_opened": ("#555555", "--", "next wave opened"),
                "done": ("#999999", (0, (3, 1, 1, 1)), "rollout done"),
                "halted": ("#000000", "-.", "rollout halted by the server")}
WHAT = {"good": "the shipped model re-versioned", "worse": "its head's class rows rotated (mislabelled)"}


def pick_release_id(nodes, first: set, *, avoid: tuple = ()) -> str:
    """The first id ``000000000000000N`` whose wave 0 holds exactly one device, one of ``first``,
    and whose every wave holds a device (wave selection: RELEASE_FORMAT.md), so the demo shows
    each wave opening; with fewer devices than waves, or none in ``first``, what of that can be.

    >>> pick_release_id(["a", "b", "c"], {"a", "b"})
    '0000000000000007'
    >>> pick_release_id(["late"], set())
    '0000000000000003'
    """
    from edge.fleet.release_codec import wave_of

    every = len(nodes) >= len(WAVES)
    for i in range(1, 100_000):
        rid = f"{i:016x}"
        waves = {n: wave_of(rid, n, WAVES) for n in nodes}
        w0 = [n for n, w in waves.items() if w == 0]
        if (rid not in avoid and len(w0) == 1 and (w0[0] in first or not set(first) & set(nodes))
                and (not every or set(waves.values()) == set(range(len(WAVES))))):
            return rid
    raise ValueError(f"no release id gives the waves {WAVES} one first device among {list(nodes)}")


def server_section(key_file) -> dict:
    """The fleet server's ``[release]`` settings for the demo."""
    return {"key_file": str(key_file), "waves": ",".join(map(str, WAVES)), "min_labels": MIN_LABELS,
            "margin": MARGIN, "check_s": 0.2}


def device_state(st: dict) -> str:
    """A device's release step in words, from its deploy status.

    >>> device_state({"phase": "shadowing", "evidence": {"labels": 12, "mean_diff": 0.0, "mean_diff_served": 0.31}})
    'shadowing: 12 labels, vs shipped head +0.00 (vs its adapted head +0.31)'
    >>> device_state({"phase": "refused", "reason": "worse"})
    'refused: worse'
    """
    ph, ev = st.get("phase", "idle"), st.get("evidence") or {}
    if ph == "downloading" and st.get("progress"):
        return "downloading {}/{} chunks".format(*st["progress"])
    if ph == "gating":
        return "verified; compile and parity gate"
    if ph == "shadowing":
        if not ev.get("labels"):
            return f"shadowing: {ev.get('windows', 0)} windows, no labels (agreement {ev.get('agreement') or 0:.2f})"
        s = f"shadowing: {ev['labels']} labels, vs shipped head {ev.get('mean_diff') or 0:+.2f}"
        return s + (f" (vs its adapted head {ev['mean_diff_served']:+.2f})" if ev.get("mean_diff_served") is not None else "")
    if ph in ("refused", "stopped", "rolled_back"):
        return f"{ph.replace('_', ' ')}: {st.get('reason') or '?'}"[:60]
    return {"idle": "-", "switching": "switching", "switched": "switched"}.get(ph, ph)


class FleetReleases:
    """The two releases of the demo: devices (``join``), the schedule and the record (``tick``)."""

    def __init__(self, *, root: Path, broker, keys: dict, model, labelled: set, conditions: dict, scores_of: dict,
                 good_at: float):
        from edge.deploy.sim import release_folders
        from edge.fleet.keys import create_key, export_public
        from edge.zoo import ModelFolder

        self.root, self.broker, self.model, self.good_at = Path(root), broker, model, good_at
        self.labelled, self.conditions, self.scores_of = set(labelled), conditions, scores_of
        self.folders = release_folders(self.root / "releases", model=model.manifest.name,
                                       base_version=model.manifest.version)
        self.key = create_key(self.root / "keys", "ops", role="release")
        export_public(self.root / "keys", "ops", role="release", to=self.root / "release-keys")
        self.keys = {**keys, "model": model.path, "release_dir": self.root / "release-keys"}
        self.versions = {w: ModelFolder(f).manifest.version for w, f in self.folders.items()}
        self.devices: dict = {}
        self.backends, self.lock = {}, threading.Lock()
        self.plan: list[tuple[str, str]] = []  # (what, release id), in order
        self.published: dict = {}  # what -> t
        self.last: dict = {}  # release id -> (state, wave)
        self.events: list[dict] = []
        self.cfg = self.store = None
        self.feeds = 0

    def attach(self, cfg, nodes) -> None:
        """Once the fleet server runs: its config, its store and the release ids for ``nodes``."""
        from edge.fleet.store import open_store

        self.cfg, self.store = cfg, open_store(cfg.server.store)
        good = pick_release_id(nodes, self.labelled)
        self.plan = [("good", good), ("worse", pick_release_id(nodes, self.labelled, avoid=(good,)))]

    def join(self, node: str) -> None:
        from edge.deploy.sim import SimDevice

        self.devices[node] = SimDevice(node, root=self.root / "deploy" / node, broker=self.broker, keys=self.keys,
                                       cache=self.root / "cache", backends=self.backends, lock=self.lock,
                                       fleet=self.cfg.server.fleet, deploy={"shadow_max_windows": SHADOW_MAX_WINDOWS})

    # ---- the schedule ----------------------------------------------------------------
    def finished(self, t: float) -> bool:
        """The worse release halted (or ended otherwise) ``SETTLE_S`` ago, after the good one."""
        rid = self.plan[-1][1] if self.plan else None
        return bool(rid and rid in self.last and self.last[rid][0] in ("halted", "done", "aborted")
                    and t >= self._event_t("halted", "done", "aborted") + SETTLE_S)

    def _due(self, t: float) -> str | None:
        if "good" not in self.published:
            return "good" if t >= self.good_at else None
        if "worse" not in self.published:
            good = self.last.get(self.plan[0][1], ("", 0))[0]
            return "worse" if good in ("done", "halted", "aborted") and t >= self._event_t("done", "halted") + 2 else None
        return None

    def _event_t(self, *kinds) -> float:
        return max((e["t"] for e in self.events if e["kind"] in kinds), default=0.0)

    def _publish(self, what: str, t: float) -> None:
        from edge.fleet.keys import load_private
        from edge.fleet.release import make_release, publish_manifest_once

        rid = dict(self.plan)[what]
        make_release(self.cfg, self.store, self.folders[what], load_private(self.key.private_path), release_id=rid,
                     note=f"demo: {WHAT[what]}")
        publish_manifest_once(self.cfg, self.store, self.model.manifest.name)
        self.published[what] = t

    # ---- one step of the demo's loop ----------------------------------------------------
    def tick(self, t: float, dt: float) -> list[dict]:
        """Restart switched devices, feed shadowing ones ``dt`` seconds of windows, publish what is
        due, note the server's rollout steps; the new events."""
        n0 = len(self.events)
        what = self._due(t)
        if what is not None:
            self._publish(what, t)
        for node, d in self.devices.items():
            d.maybe_restart()
            if d.phase == "shadowing":
                self._feed(node, d, max(1, round(SHADOW_RATE * dt)))
        for what, rid in self.plan:
            rec = self.store.release(rid) if what in self.published else None
            if rec is not None and (rec.state, rec.wave) != self.last.get(rid):
                self._note(t, what, rec)
        return self.events[n0:]

    def _feed(self, node: str, d, n: int) -> None:
        from edge.sim import make_dataset

        self.feeds += 1
        x, y = make_dataset(n, seed=900_000 + self.feeds, condition=self.conditions[node])
        d.feed(x, y if node in self.labelled else None, scores_of=self.scores_of.get(node))

    def _note(self, t: float, what: str, rec) -> None:
        before = self.last.get(rec.release)
        self.last[rec.release] = (rec.state, rec.wave)
        waves = rec.plan["waves"]
        kind = ("published" if before is None else rec.state if rec.state in ("done", "halted", "aborted")
                else "wave_opened")
        self.events.append({"t": round(t, 1), "kind": kind, "what": what, "release": rec.release,
                            "version": rec.version, "wave": rec.wave, "percent": waves[rec.wave],
                            "note": rec.note})

    def row(self) -> dict:
        """The timeline's release part: the release now out, and each device's step and model."""
        cur = None
        for what, rid in self.plan:
            if rid in self.last:
                state, wave = self.last[rid]
                cur = {"what": what, "release": rid, "version": self.versions[what], "state": state,
                       "wave": wave, "percent": WAVES[wave]}
        from edge.fleet.release_codec import wave_of

        devs = {}
        for node, d in self.devices.items():
            st = d.status()
            ev = st.get("evidence") or {}
            devs[node] = {"phase": st.get("phase", "idle"), "state": device_state(st), "release": st.get("release"),
                          "wave": wave_of(cur["release"], node, WAVES) if cur else None,
                          "serving": d.model.manifest.version, "labels": ev.get("labels"),
                          "mean_diff": ev.get("mean_diff"), "mean_diff_served": ev.get("mean_diff_served")}
        return {"release": cur, "deploy": devs}

    def summary(self) -> dict:
        """Per release: its outcome, every device's last report and what each ever reported."""
        from edge.fleet.release_codec import wave_of

        out = {}
        for what, rid in self.plan:
            rec = self.store.release(rid) if what in self.published else None
            if rec is None:
                out[what] = {"release": rid, "published": False}
                continue
            reps = self.store.release_reports(rid)
            out[what] = {"release": rid, "version": rec.version, "what": WHAT[what], "published_at": self.published[what],
                         "state": rec.state, "wave": rec.wave, "waves": list(WAVES), "note": rec.note,
                         "devices": {p.node: {"state": p.state, "reason": p.reason, "wave": p.wave, "ever": list(p.ever),
                                              "evidence": p.evidence} for p in reps},
                         "waves_of": {n: wave_of(rid, n, WAVES) for n in self.devices},
                         "switched": sorted(p.node for p in reps if "switched" in p.ever),
                         "served_by": sorted(n for n, d in self.devices.items() if rec.digest in d.served)}
        return out

    def stop(self) -> None:
        for d in self.devices.values():
            d.stop()
        if self.store is not None:
            self.store.close()


def event_line(e: dict) -> str:
    """A release event in words (printed as it happens).

    >>> event_line({"t": 41.0, "kind": "wave_opened", "version": "1.0.1", "wave": 1, "percent": 67, "note": ""})
    't=   41 s  release 1.0.1: wave 2 of 3 open (67% of devices)'
    """
    head = f"t={e['t']:5.0f} s  release {e['version']}: "
    if e["kind"] == "published":
        return head + f"published ({WHAT.get(e.get('what'), '')}), waves {','.join(map(str, WAVES))}%"
    if e["kind"] == "wave_opened":
        return head + f"wave {e['wave'] + 1} of {len(WAVES)} open ({e['percent']}% of devices)"
    return head + f"{e['kind']} ({e.get('note') or ''})"


def release_brief(row: dict) -> str:
    """The release part of a ``fleet_line``: the release out, and each device's model and step.

    >>> release_brief({"release": {"version": "1.0.1", "state": "rolling", "wave": 0, "percent": 34},
    ...                "deploy": {"dev-0": {"serving": "1.0.0", "phase": "shadowing"}}})
    '  | release 1.0.1 rolling wave 1 (34%): dev-0 1.0.0 shadowing'
    """
    r = row.get("release")
    if not r:
        return ""
    return (f"  | release {r['version']} {r['state']} wave {r['wave'] + 1} ({r['percent']}%): "
            + "  ".join(f"{n} {v['serving']} {v['phase']}" for n, v in row.get("deploy", {}).items()))


def release_lines(row: dict, events) -> list[str]:
    """The live view's release table: the release out and its wave, a row per device, the last events."""
    r = row.get("release")
    head = ("releases: none yet (the good one goes out at 40% of the run)" if not r else
            f"release {r['version']} ({WHAT[r['what']]}): {r['state']}, wave {r['wave'] + 1} of {len(WAVES)} "
            f"open ({r['percent']}% of devices)")
    lines = [head, f"{'device':8} {'serves':>7}  release step"]
    for n, v in row.get("deploy", {}).items():
        waits = r and v["state"] == "-" and r["state"] == "rolling" and v.get("wave") is not None and v["wave"] > r["wave"]
        lines.append(f"{n:8} {v['serving']:>7}  " + (f"waits for wave {v['wave'] + 1}" if waits else v["state"]))
    lines += [event_line(e) for e in list(events)[-4:]]
    return lines


def release_outcome(summary: dict) -> list[str]:
    """The releases' outcome in words, printed at the end.

    >>> release_outcome({"good": {"published": False}})
    ['release good: not published (the run ended first)']
    """
    out = []
    for what, s in summary.items():
        if not s.get("published", True):
            out.append(f"release {what}: not published (the run ended first)")
            continue
        refused = ", ".join(f"{n} ({d['reason']})" for n, d in s["devices"].items() if d["state"] == "refused")
        switched = ", ".join(s["switched"])
        out.append(f"release {s['version']} ({what}: {s['what']}): {s['state']} at wave {s['wave'] + 1} of "
                   f"{len(s['waves'])}; switched: {switched or 'none'}; refused: {refused or 'none'}")
    return out


def plot_releases(ax, timeline: list[dict], events: list[dict]) -> None:
    """Devices serving each model version, and devices shadowing a release, over time; the
    release events as black/grey lines; the y-axis from 0."""
    from matplotlib.ticker import MaxNLocator

    from edge.demo.report import SERIES_COLOURS

    rows = [r for r in timeline if r.get("deploy")]
    t = [r["t"] for r in rows]
    versions = sorted({v["serving"] for r in rows for v in r["deploy"].values()} | {e["version"] for e in events})
    for i, ver in enumerate(versions):
        n = [sum(v["serving"] == ver for v in r["deploy"].values()) for r in rows]
        ax.step(t, n, where="post", color=SERIES_COLOURS[i % len(SERIES_COLOURS)], lw=1.6,
                label=f"devices serving {ver}" + ("" if any(n) else ": none, ever"))
    ax.step(t, [sum(v["phase"] == "shadowing" for v in r["deploy"].values()) for r in rows], where="post",
            color=SERIES_COLOURS[len(versions) % len(SERIES_COLOURS)], lw=1.2, ls="--",
            label="devices shadowing a release")
    shown = set()
    for e in events:
        c, ls, name = EVENT_STYLES[e["kind"]] if e["kind"] in EVENT_STYLES else EVENT_STYLES["halted"]
        ax.axvline(e["t"], color=c, ls=ls, lw=1.0, label=None if e["kind"] in shown else name)
        ax.text(e["t"], 0.02, f" {e['version']}" + (f" w{e['wave'] + 1}" if e["kind"] == "wave_opened" else ""),
                transform=ax.get_xaxis_transform(), fontsize=6, rotation=90, va="bottom", color="#333333")
        shown.add(e["kind"])
    n = max((len(r["deploy"]) for r in rows), default=1)
    ax.set(title="model releases: good (shipped re-versioned), then worse (head rows rotated)", xlabel="s",
           ylabel="devices", ylim=(0, n + 0.5))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
