"""The server's rollout rule: open the next wave, finish, or halt (``RELEASE_FORMAT.md``,
"Server rollout rule"). Pure: the plan, the registered devices and their last reports in,
one ``Decision`` out; ``edge.fleet.release`` applies it (a new signed manifest).

The devices counted are the registry's devices admitted so far (their wave is the open
one or an earlier one): a device the registry does not know cannot have sent a verified
report, and a registered one that never reports holds its wave back (at most
``1 - switch_ratio`` of a wave may stay silent). A gate refusal (``worse``,
``parity_failed``, ``compile_failed``, or a ``rolled_back`` while rolling) is the
release's fault; a transport or disk refusal is the device's or the path's and is not
counted.

>>> rel, waves = "00ff00ff00ff00ff", (50, 100)
>>> nodes = [f"n{i}" for i in range(6)]
>>> first = [n for n in nodes if wave_of(rel, n, waves) == 0]
>>> d = decide(release=rel, waves=waves, wave=0, state="rolling", forgiven=0, registered=nodes,
...            latest={n: ("switched", "") for n in first}, switch_ratio=0.8, max_refusals=1)
>>> d.action, d.wave
('open', 1)
>>> bad = decide(release=rel, waves=waves, wave=0, state="rolling", forgiven=0, registered=nodes,
...              latest={first[0]: ("refused", "worse")}, switch_ratio=0.8, max_refusals=1)
>>> bad.action, bad.reason
('halt', '1 gate refusal(s) (worse: 1) reach max_refusals 1')
"""
from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Iterable, Mapping

from edge.fleet.release_codec import GATE_REFUSALS, wave_of


@dataclass(frozen=True)
class Decision:
    """What the rule says: ``action`` is ``open`` (to ``wave``), ``done``, ``halt`` or ``""``
    (wait); ``reason`` says why, for the log and ``rollout status``."""

    action: str
    wave: int
    reason: str


def gate_refusal(state: str, reason: str) -> str:
    """The refusal the halt rule counts for a device's last report, or ''.

    >>> gate_refusal("refused", "parity_failed"), gate_refusal("refused", "disk_full"), gate_refusal("rolled_back", "")
    ('parity_failed', '', 'rolled_back')
    """
    if state == "refused" and reason in GATE_REFUSALS:
        return reason
    return "rolled_back" if state == "rolled_back" else ""


def admitted(release: str, waves, wave: int, nodes: Iterable[str]) -> list[str]:
    """The ``nodes`` whose wave is ``wave`` or an earlier one, in name order."""
    return sorted(n for n in nodes if wave_of(release, n, waves) <= wave)


def decide(*, release: str, waves, wave: int, state: str, forgiven: int, registered: Iterable[str],
           latest: Mapping[str, tuple], switch_ratio: float, max_refusals: int) -> Decision:
    """The rollout rule for a ``rolling`` release: ``latest`` is each device's last report
    ``(state, reason)``; ``forgiven`` the gate refusals ``resume`` accepted."""
    if state != "rolling":
        return Decision("", wave, f"state {state}: nothing opens")
    nodes = set(registered)
    refusals = collections.Counter()
    for n in admitted(release, waves, wave, set(latest) & nodes):
        r = gate_refusal(*latest[n])
        if r:
            refusals[r] += 1
    n_ref = sum(refusals.values()) - forgiven
    if n_ref >= max_refusals > 0 or (max_refusals == 0 and n_ref > 0):
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(refusals.items()))
        return Decision("halt", wave, f"{n_ref} gate refusal(s) ({kinds}) reach max_refusals {max_refusals}")
    w = wave
    while True:
        inwave = admitted(release, waves, w, nodes)
        switched = sum(1 for n in inwave if latest.get(n, ("", ""))[0] == "switched")
        worse = sum(1 for n in inwave if tuple(latest.get(n, ("", ""))) == ("refused", "worse"))
        need = math.ceil(switch_ratio * len(inwave) - 1e-9)
        if worse and n_ref > 0:
            return Decision("", wave, f"wave {w}: {worse} device(s) found it worse")
        if switched < need:
            if w == wave:
                return Decision("", wave, f"wave {w}: {switched} of {len(inwave)} switched, {need} needed")
            return Decision("open", w, f"wave {wave} complete: wave {w} is the next that admits a registered device")
        if w == len(waves) - 1:
            return Decision("done", w, f"last wave complete: {switched} of {len(inwave)} switched")
        w += 1
