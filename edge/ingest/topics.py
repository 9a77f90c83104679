"""Topic filters with named levels -> (device, stream). Pure.

A source's ``topic`` is an MQTT filter whose whole levels may be ``{device}`` or
``{stream}`` (each subscribed as ``+``), ``+`` or ``#``. A received topic is mapped to a
``StreamKey`` from those levels; a missing ``{device}`` falls back to the source's
``device`` (else the topic's levels joined by ``.``), a missing ``{stream}`` to its
``stream`` (else ``"default"``). A name taken from the topic must fit the name rule of
``edge.ingest.names``; one that does not raises ``DecodeError("bad_name")``, so the
message is counted and skipped.

>>> r = TopicRoute("sensors/{device}/{stream}")
>>> r.subscription, r.match("sensors/press-7/accel")
('sensors/+/+', StreamKey(device='press-7', stream='accel'))
>>> r.match("other/x/y") is None
True
>>> TopicRoute("plant/#").match("plant/line1/press7")
StreamKey(device='plant.line1.press7', stream='default')
"""
from __future__ import annotations

from edge.ingest.names import check_name, name_from_levels
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
        """The stream a topic belongs to, or None when it does not match this route.

        Raises ``DecodeError("bad_name")`` when the device or stream it would take from
        the topic breaks the name rule (``edge.ingest.names``).
        """
        levels = topic.split("/")
        if not topic_matches(self._filter, levels):
            return None
        if self._dev_i is not None:
            dev = check_name(levels[self._dev_i], what="device")
        else:
            dev = self.device or name_from_levels(levels)
        if self._str_i is not None:
            stm = check_name(levels[self._str_i], what="stream")
        else:
            stm = self.stream or "default"
        return StreamKey(dev, stm)
