"""The promotion policy: which swap, if any, the evidence calls for. Pure: values in, a decision out.

The learner asks after every label (``Learner._settle``); the evidence is the three
sequential tests of ``edge.adapt.promotion`` (challenger vs champion at the promotion's
margin and at the refresh's, global head vs champion), each read at the level
``level()`` gives, and the margins the next label is tested at come from ``margins()``.
Nothing here changes state: the learner carries out the decision (docs/LEARNING.md,
"Promotions", "Rollbacks", "Refreshes").

>>> from edge.config import AdaptConfig
>>> cfg = AdaptConfig()
>>> decide(cfg, Situation(since_swap=50, plastic=False, adapted=False, guard_ready=True, guard_tripped=False,
...                       promote=True, refresh=False, rollback=False))
'promotion'
>>> decide(cfg, Situation(since_swap=50, plastic=False, adapted=False, guard_ready=True, guard_tripped=True,
...                       promote=True, refresh=False, rollback=False))
'held'
>>> margins(cfg, "classification", champion=0.5, glob=0.5, reference=1.2)
Margins(promote=0.025, refresh=0.005, rollback=0.05, scale=1.0, serve=0.012)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

PROMOTION, REFRESH, ROLLBACK, HELD = "promotion", "refresh", "rollback", "held"

# The level of the library's serving tests (``edge.adapt.evaluator.ServeTests``): a learned
# head replaces the trivial reference in ``predict`` once the paired test of reference loss
# minus learned loss has an e-value of 1 / SERVE_ALPHA, and the reference returns on the
# reverse test at the same level. Chosen by measurement across the 7 streams of ``edge bench
# learning`` (BENCHMARKS.md, "Serving on evidence"), the same for every stream.
SERVE_ALPHA = 0.1


class Margins(NamedTuple):
    """What the next label is tested at: each test's margin, in the loss's unit, and the loss
    scale. A named tuple: it is made after every label (a frozen dataclass costs 5x more)."""

    promote: float
    refresh: float
    rollback: float
    scale: float
    serve: float  # the serving tests' (learned head vs the trivial reference): promote_floor of the reference's loss


NO_MARGINS = Margins(0.0, 0.0, 0.0, 1.0, 0.0)


@dataclass(frozen=True, slots=True)
class Situation:
    """What the decision depends on: the labels since the last swap, whether the learner is
    plastic (after a drift alarm), whether the champion is an adapted head (not the global
    one), the label guard, and whether each test passes at ``level()``."""

    since_swap: int
    plastic: bool
    adapted: bool
    guard_ready: bool
    guard_tripped: bool
    promote: bool
    refresh: bool
    rollback: bool


def level(cfg, plastic: bool) -> float:
    """The tests' alpha: ``promote_alpha``, or ``promote_alpha_drift`` (higher: less evidence
    needed, never none) while plastic after a drift alarm."""
    return cfg.promote_alpha_drift if plastic else cfg.promote_alpha


def rollback_level(cfg) -> float:
    """The rollback test's alpha: always ``promote_alpha``. A rollback throws away what the
    device learned, so a drift alarm does not lower the evidence it needs (a demo run rolled
    back at e-value 5.49 >= 1 / 0.2 a learned head whose mean loss was the lower one)."""
    return cfg.promote_alpha


def needed_labels(cfg, plastic: bool) -> int:
    """Labels since the last swap before another (``eval_min``, half while plastic)."""
    return cfg.eval_min // 2 if plastic else cfg.eval_min


def decide(cfg, s: Situation) -> str | None:
    """``"rollback"``, ``"promotion"``, ``"held"`` (a promotion the label guard holds),
    ``"refresh"`` or ``None``, in that order of precedence.

    A rollback needs an adapted champion; no promotion while the guard cannot judge the
    labels yet (its warm-up: a drift alarm lowers the evidence needed, which a poisoning
    stream from the first label would reach); a refresh needs an adapted champion,
    ``refresh_labels`` labels since the last swap and no hold."""
    if s.since_swap < needed_labels(cfg, s.plastic):
        return None
    if s.adapted and s.rollback:
        return ROLLBACK
    if not s.guard_ready:
        return None
    if s.promote:
        return HELD if s.guard_tripped else PROMOTION
    if cfg.refresh_labels and s.adapted and s.since_swap >= cfg.refresh_labels and not s.guard_tripped and s.refresh:
        return REFRESH
    return None


def margins(cfg, task: str, *, champion: float, glob: float, reference: float) -> Margins:
    """The margins from the windowed losses before the next label (so they are fixed before
    it is scored, as the test needs): promotion ``promote_margin`` of the champion's loss and
    at least ``promote_floor`` of the better of the global head's and the reference's (a fresh
    random global head can be worse than predicting the mean by orders of magnitude); refresh
    the floor alone; rollback ``rollback_margin`` of the global head's loss and at least the
    floor of the reference's; serving (either way) ``promote_floor`` of the reference's. The loss scale: 1 (nats) for classification, the reference's
    loss for regression (its unit is the target's). An empty window counts as 0."""
    fin = math.isfinite  # plain conditionals: this runs after every label
    champion = champion if fin(champion) else 0.0
    glob = glob if fin(glob) else 0.0
    reference = reference if fin(reference) else 0.0
    pf = cfg.promote_floor
    floor = (glob if glob < reference else reference) * pf
    scale = 1.0 if task == "classification" else (reference if reference > 1e-12 else 1.0)
    p, r, rf = champion * cfg.promote_margin, glob * cfg.rollback_margin, reference * pf
    return Margins(p if p > floor else floor, floor, r if r > rf else rf, scale, rf)
