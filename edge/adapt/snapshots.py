"""The learner's heads as others see them: the snapshots it serves, the fleet's global head,
what the library's ``predict`` serves, and what fleet sync may share.

Part of ``edge.adapt.learner.Learner`` (a mixin: these methods run on the learner's own
members, ``champion``, ``_global``, ``head``, ``evaluator``, ``counters``, ``_unshared``),
kept apart so that the learner's own file, the per-label path, reads in one sitting. The
serving thread reads only ``learner.champion``: every swap assigns a new immutable
``HeadSnapshot`` to it in one step, so it needs no lock and never waits.
"""
from __future__ import annotations

import numpy as np

from edge.adapt.heads import HeadSnapshot
from edge.errors import ConfigError


class Snapshots:
    """Snapshots, the global head, ``serving``/``best`` and the fleet's arrays (module docstring)."""

    def _set_global_snapshot(self, weight, bias, version: str) -> None:
        self.global_version = str(version)
        if self.closed_form:
            if weight is None:
                weight, bias = self.head.base_weight, self.head.base_bias
            self._global = HeadSnapshot.from_arrays({"weight": weight, "bias": bias}, kind="linear", task=self.task, version=self.global_version)
        else:
            self._global = self.head.base_snapshot(task=self.task, version=self.global_version)

    def _snapshot(self, version: str):
        snap = self.head.snapshot(task=self.task, version=version)
        if self.scaler is not None:
            snap = HeadSnapshot.from_arrays(self.scaler.fold(snap.arrays), kind=snap.kind, task=self.task, version=version)
        return snap

    def set_global(self, weights: dict, version: str) -> None:
        """Adopt a new fleet global head: it becomes the anchor and the rollback target.

        A champion that is the old global head is replaced at once; an adapted champion
        keeps serving and is rolled back only if the new global head proves better.
        """
        if not self.closed_form:
            raise ConfigError("a learner over a torch module has no fleet global head")
        was_global = self.champion is self._global
        w, b = np.asarray(weights["weight"], np.float32), np.asarray(weights["bias"], np.float32)
        self.head.set_base(w, b)
        self._set_global_snapshot(w, b, version)
        self.evaluator.new_global()
        self.since_swap = 0
        if was_global:
            self.champion = self._global
        self._emit("global", version=self.global_version)

    def adopt_consolidated(self, suffix: str) -> None:
        """Serve the head as trained now, as version ``<global>+<suffix>`` (the library's
        ``incremental_update``: an explicit request, with no prequential evidence to test),
        and start the learned heads' records and every test afresh, so that the result is
        served until new labels compare it with the reference. The one owner of these
        members: ``edge.learning`` calls this instead of setting them."""
        self._reference_snap = None
        self.champion = self._snapshot(f"{self.global_version}+{suffix}")
        self.evaluator.consolidated()
        self.since_swap = 0
        self.evaluator.update_margins()

    def serving(self) -> str:
        """What ``best()`` serves now: ``"reference"``, ``"champion"`` or ``"challenger"``.

        Do no harm, on evidence: the trivial reference until the serving test (a paired
        betting test of the reference's per-label loss against the learned head's,
        ``edge.adapt.evaluator.ServeTests``) passes at ``policy.SERVE_ALPHA``, and again once
        the reverse test passes; while a learned head serves, the challenger while its
        windowed loss is below the champion's (``ServeTests.live``), else the champion. After
        ``incremental_update`` the consolidated champion serves until the reverse test passes.
        Decided by the labels before (anytime-valid: the library may ask after any label).
        The daemon serves the champion: its promotions need their own paired test."""
        se = self.evaluator.serve
        if not se.learned:
            return "reference"
        return "challenger" if se.live else "champion"

    def best(self) -> HeadSnapshot:
        """The snapshot ``serving()`` names (the library's served head)."""
        which = self.serving()
        if which == "reference":
            if self._reference_snap is None:
                self._reference_snap = self.reference.snapshot(f"{self.global_version}+reference")
            return self._reference_snap
        if which == "challenger":
            n = self.counters["labels"]
            if self._live_snap is None or self._live_snap[0] != n:
                self._live_snap = (n, self._snapshot(f"{self.challenger_version()}~{n}"))
            return self._live_snap[1]
        return self.champion

    def rebase(self, global_arrays: dict, version: str) -> None:
        """Fleet sync (edge.fleet.client): adopt a global head given by all its arrays (an
        ``mlp`` head's too) as the rollback target and the reference champion and
        challenger are measured against. The caller has already set the head itself (new
        global plus the residual not yet sent). Unlike ``set_global``, the global head's
        prequential record and the labels since the last swap carry over: a fleet's
        global head moves often and in small steps, and restarting both at every sync
        would keep a device from ever promoting what it learned."""
        was_global = self.champion is self._global
        self.global_version = str(version)
        self._global = HeadSnapshot.from_arrays(global_arrays, kind=self.head.kind, task=self.task, version=self.global_version)
        if was_global:
            self.champion = self._global
        self._emit("global", version=self.global_version)

    def _arrays_if(self, held: bool) -> dict | None:
        return self.head.arrays() if held and self.closed_form else None

    def _keep_apart(self, before: dict | None) -> None:
        """Add what the head learned since ``before`` (taken while the guard held) to the unshared sum."""
        if before is None:
            return
        now, u = self.head.arrays(), self._unshared
        self._unshared = {k: now[k] - before[k] + (u[k] if u is not None else 0.0) for k in now}

    def fleet_arrays(self) -> dict:
        """The head's arrays that fleet sync may share: the learning head's, less every step it
        took while the label guard held. A held challenger so contributes nothing to the fleet
        (while held, this is the head as it was when the guard tripped, moved by rebases only);
        what it learned stays on the device, where the guard keeps it from serving."""
        a, u = self.head.arrays(), self._unshared
        return a if u is None else {k: a[k] - u[k] for k in a}
