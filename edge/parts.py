"""The parts of a daemon, and the one place each hooks into it (``Parts.add``).

A part (the serving engine, the learner, fleet sync, the pipeline, the node's MQTT link,
the sources, and so on: model releases next) brings, next to its own code, everything the
daemon needs from it, so the daemon itself only wires:

* ``start()``: start its threads; then ``threads()`` names each long-lived thread, and
  the ``Supervisor`` adopts it (a thread the part spawned through the supervisor needs
  no entry).
* three stop phases, run over every part in the reverse order of ``add`` (a part added
  later is stopped earlier; the daemon adds consumers before producers):

  1. ``stop_input()``: take no new input (sources stop reading, the link holds labels);
  2. ``drain()``: serve and learn what is queued (bounded in time), then checkpoint;
  3. ``close()``: close connections, count what was left.

  A hook that raises skips no other hook (every phase of every part still runs: the
  learner's final checkpoint is not lost to a failed drain elsewhere), then the first
  error is raised again.
* ``status()``: its own top-level fields of ``Daemon.status()`` (what `edge status` shows;
  two parts giving one field is an error).
  Each read of shared state is a snapshot under its owner's lock (STYLE 19).
* ``families(reg)``: its metric families, on ``edge.observe.Registry``; state another
  thread owns is read through ``reg.source(name, read)``, one snapshot per scrape, and
  every family of the part is cut from that snapshot.
* ``lanes``: ``(source, pick)`` when the part has bounded lanes: ``pick(snapshot)`` gives
  ``{(thread, lane): stats}`` out of source ``source``'s snapshot, and the lanes of every
  part go into the one set of ``edge_lane_*`` families (``edge.families.LANE_FAMILIES``).

Every hook has a no-op default, so a part implements only what it has.

>>> class Clock(Part):
...     name = "clock"
...     def status(self):
...         return {"clock": "ok"}
>>> parts = Parts()
>>> _ = parts.add(Clock())
>>> parts.status()
{'clock': 'ok'}
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Iterator

log = logging.getLogger("edge.parts")

Lanes = dict[tuple[str, str], dict]


class Part:
    """One part of the daemon; override the hooks it has (see the module's docstring)."""

    name = "part"
    #: ``(source name, pick)``: ``pick(snapshot of source)`` -> ``{(thread, lane): stats}``
    lanes: tuple[str, Callable[[Any], Lanes]] | None = None

    def start(self) -> None:
        """Start the part's threads."""

    def threads(self) -> dict[str, threading.Thread | None]:
        """The part's long-lived threads by name, after ``start``, for the supervisor to adopt."""
        return {}

    def stop_input(self) -> None:
        """Stop phase 1: take no new input."""

    def drain(self) -> None:
        """Stop phase 2: handle what is queued (bounded), then checkpoint."""

    def close(self) -> None:
        """Stop phase 3: close connections; count what was left."""

    def status(self) -> dict[str, Any]:
        """Top-level fields of the daemon's status, each a snapshot."""
        return {}

    def families(self, reg) -> None:
        """Register the part's metric families on ``reg`` (``edge.observe.Registry``)."""


class Parts:
    """The daemon's parts, in the order they were added: started in that order, stopped
    phase by phase in the reverse order."""

    def __init__(self) -> None:
        self._parts: list[Part] = []

    def add(self, part: Part) -> Part:
        """Hook ``part`` into the daemon (the one place a new part is added)."""
        if any(p.name == part.name for p in self._parts):
            raise ValueError(f"a part named {part.name!r} is already added; each part needs its own name")
        self._parts.append(part)
        return part

    def __iter__(self) -> Iterator[Part]:
        return iter(list(self._parts))

    def get(self, name: str) -> Part | None:
        return next((p for p in self._parts if p.name == name), None)

    def start(self, supervisor) -> None:
        """Start every part, in order; the supervisor adopts each part's threads."""
        for part in self._parts:
            part.start()
            for name, thread in part.threads().items():
                supervisor.adopt(name, thread)

    def stop(self) -> None:
        """The three stop phases, each over every part in reverse order."""
        first: BaseException | None = None
        for phase in ("stop_input", "drain", "close"):
            for part in reversed(self._parts):
                try:
                    getattr(part, phase)()
                except Exception as e:  # noqa: BLE001 - one part's failure must not skip another's checkpoint
                    log.critical("part %s failed at %s", part.name, phase, exc_info=True)
                    first = first or e
        if first is not None:
            raise first

    def status(self) -> dict[str, Any]:
        """Every part's status fields, in order."""
        st: dict[str, Any] = {}
        owner: dict[str, str] = {}
        for part in self._parts:
            for key, value in part.status().items():
                if key in owner:
                    raise ValueError(f"status field {key!r}: parts {owner[key]!r} and {part.name!r} both give it; "
                                     "give each part its own fields")
                st[key], owner[key] = value, part.name
        return st

    def families(self, reg) -> None:
        """Every part's families, then the lane families over every part's lanes."""
        from edge.families import add_lane_families

        for part in self._parts:
            part.families(reg)
        add_lane_families(reg, [p.lanes for p in self._parts if p.lanes is not None])
