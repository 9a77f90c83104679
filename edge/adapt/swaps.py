"""Swaps, carried out: the promotion policy decides (``edge.adapt.policy``), the learner swaps
the serving head, restarts the evidence and says why in an event.

Part of ``edge.adapt.learner.Learner`` (a mixin: these methods run on the learner's own
members, ``evaluator``, ``plasticity``, ``guard``, ``counters``, ``champion``), kept apart
so that the learner's own file, the per-label path, reads in one sitting. Events go to
``on_event`` and to a bounded queue drained by ``events()``.
"""
from __future__ import annotations

import logging

from edge.adapt.policy import HELD, PROMOTION, REFRESH, ROLLBACK, Situation, decide, level, needed_labels, rollback_level

log = logging.getLogger("edge.adapt")


class Swaps:
    """The swap the evidence calls for, the swaps themselves and their events (module docstring)."""

    def _maybe_swap(self) -> str | None:
        """Swap if the evidence says so; then fix the margins the next label is tested at."""
        swap = self._decide()
        self.evaluator.update_margins()
        return swap

    def _decide(self) -> str | None:
        cfg, ev, g = self.cfg, self.evaluator, self.guard
        plastic = self.plasticity.plastic
        if self.since_swap < needed_labels(cfg, plastic):
            return None
        alpha, back_alpha = level(cfg, plastic), rollback_level(cfg)
        promote, refresh, rollback = ev.passing(alpha, back_alpha)
        tripped = g is not None and g.tripped
        if not tripped:
            self._anomaly_open = False
        if not (promote or refresh or rollback):  # every decision needs a passing test (policy.decide)
            return None
        d = decide(cfg, Situation(since_swap=self.since_swap, plastic=plastic, adapted=self.champion is not self._global,
                                  guard_ready=g is None or g.seen >= g.warmup, guard_tripped=tripped,
                                  promote=promote, refresh=refresh, rollback=rollback))
        if d == ROLLBACK:
            self._rollback(ev.pairs["rollback"].evidence(back_alpha))
        elif d == PROMOTION:
            self._promote(ev.pairs["promote"].evidence(alpha))
        elif d == REFRESH:
            self._promote(ev.pairs["refresh"].evidence(alpha), refresh=True)
        elif d == HELD:
            self._hold()
        return d

    def _hold(self) -> None:
        """A promotion the label guard holds: counted, and one event per episode."""
        self.counters["promotions_held"] += 1
        if not self._anomaly_open:
            g = self.guard
            self._anomaly_open = True
            self.counters["label_anomalies"] += 1
            self._emit("label_anomaly", held=self.challenger_version(), contradicting_share=round(g.recent_share, 3),
                       history_share=round(g.history, 4), labels=self.counters["labels"],
                       why="recent labels mostly contradict what the serving and global heads are both sure of")

    def challenger_version(self) -> str:
        """The version a promotion would give the challenger now."""
        return f"{self.global_version}+a{self.counters['promotions'] + 1}"

    def _promote(self, evidence: dict, *, refresh: bool = False) -> None:
        kind = "refresh" if refresh else "promotion"
        self.counters["refreshes" if refresh else "promotions"] += 1
        version = f"{self.global_version}+a{self.counters['promotions']}"
        if refresh:
            version += f".r{self.counters['refreshes']}"
        old = self.champion.version
        self.champion = self._snapshot(version)  # the atomic swap
        self.evaluator.promoted()
        self.since_swap = 0
        self._emit(kind, version=version, previous=old, champion_loss=evidence.pop("champion_mean_loss"),
                   challenger_loss=evidence.pop("challenger_mean_loss"), **evidence)

    def _rollback(self, evidence: dict) -> None:
        self.counters["rollbacks"] += 1
        old = self.champion.version
        self.champion = self._global  # the atomic swap
        self.trainer.reset()  # the challenger starts over from the global head too
        self._unshared = None  # ... and with it, what it learned while held is gone
        self.evaluator.rolled_back()
        self.since_swap = 0
        self._emit("rollback", version=self.global_version, previous=old, champion_loss=evidence.pop("champion_mean_loss"),
                   global_loss=evidence.pop("challenger_mean_loss"), **evidence)

    def _emit(self, kind: str, **fields) -> None:
        ev = {"type": kind, "t": self.clock(), **fields}
        self._events.append(ev)
        log.info("adapt %s: %s", kind, {k: v for k, v in fields.items()})
        if self.on_event is not None:
            try:
                self.on_event(ev)
            except Exception:  # a broken sink must not stop learning
                log.exception("adapt: on_event callback failed for a %s event", kind)

    def events(self) -> list[dict]:
        """Drain the events (promotion, rollback, drift, global) since the last call."""
        out = []
        while self._events:
            out.append(self._events.popleft())
        return out
