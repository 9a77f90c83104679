"""Topic filters with named levels -> (device, stream). Pure.

A source's ``topic`` is an MQTT filter whose whole levels may be ``{device}`` or
``{stream}`` (each subscribed as ``+``), ``+`` or ``#``. A received topic is mapped to a
``StreamKey`` from those levels; a missing ``{device}`` falls back to the source's
``device`` (else the topic itself), a missing ``{stream}`` to its ``stream`` (else
``"default"``).

>>> r = TopicRoute("sensors/{device}/{stream}")
>>> r.subscription, r.match("sensors/press-7/accel")
('sensors/+/+', StreamKey(device='press-7', stream='accel'))
>>> r.match("other/x/y") is None
True
"""
from __future__ import annotations

from edge.ingest.types import StreamKey


def topic_matches(filt: list[str], levels: list[str]) -> bool:
    """MQTT filter matching (``+`` one level, ``#`` the rest, ``$`` topics not matched by wildcards)."""
    if levels and levels[0].startswith("$") and filt and filt[0] in ("+", "#"):
        return False
    for i, f in enumerate(filt):
        if f == "#":
            return True
        if i >= len(levels):
            return False
        if f != "+" and f != levels[i]:
            return False
    return len(filt) == len(levels)


class TopicRoute:
    """One source's subscription and its mapping of topics to streams."""

    def __init__(self, pattern: str, *, device: str = "", stream: str = ""):
        self.pattern = pattern
        raw = pattern.split("/")
        self._dev_i = raw.index("{device}") if "{device}" in raw else None
        self._str_i = raw.index("{stream}") if "{stream}" in raw else None
        self._filter = ["+" if lv in ("{device}", "{stream}") else lv for lv in raw]
        self.subscription = "/".join(self._filter)
        self.device, self.stream = device, stream

    def match(self, topic: str) -> StreamKey | None:
        """The stream a topic belongs to, or None when it does not match this route."""
        levels = topic.split("/")
        if not topic_matches(self._filter, levels):
            return None
        dev = levels[self._dev_i] if self._dev_i is not None else (self.device or topic)
        stm = levels[self._str_i] if self._str_i is not None else (self.stream or "default")
        return StreamKey(dev, stm)
