"""The rule for device and stream names that come from outside. Pure.

A name taken from a topic level, a label payload or a serial HELLO becomes a level of
the topics the daemon publishes (``edge/<node>/predictions/<device>/<stream>``), a
metric label and a key in memory. So it must be short and harmless everywhere:

**1 to 64 characters, each one of ``A-Z a-z 0-9 _ . : -``** (ASCII letters, digits,
underscore, dot, colon, hyphen), **and not ``.`` or ``..``**.

That excludes every character MQTT gives a meaning to (``/`` level separator, ``+`` and
``#`` wildcards, NUL) and the leading ``$`` of broker topics, forbids the empty level,
and bounds the length, so every topic built from valid names and a valid prefix is a
valid MQTT topic name well under the 65,535-byte limit. ``.`` and ``..`` are refused
because a node name is also a folder (``<state_dir>/<node>``): ``..`` would make the
state folder's parent the daemon's, which is then made private (0700). Colons and dots allow MAC
addresses (``aa:bb:cc:dd:ee:ff``) and dotted ids (``line1.press7``). Names are not
changed (no case folding, no trimming): a name either fits or is rejected with
``DecodeError("bad_name", ...)``, whose message shows the value cut to a few dozen
characters.

>>> check_name("press-7", what="device")
'press-7'
>>> is_valid_name("aa:bb:cc:dd:ee:ff"), is_valid_name("a/b"), is_valid_name("+"), is_valid_name("")
(True, False, False, False)
>>> is_valid_name(".."), is_valid_name("."), is_valid_name("...")
(False, False, True)
>>> check_name("x#", what="stream")
Traceback (most recent call last):
...
edge.errors.DecodeError: stream 'x#' is not a valid name (1-64 of A-Z a-z 0-9 _ . : -, not . or ..)
"""
from __future__ import annotations

import re

from edge.errors import DecodeError, brief

MAX_NAME = 64
NAME_CHARS = "A-Z a-z 0-9 _ . : -"
NAME_RULE = f"1-{MAX_NAME} of {NAME_CHARS}, not . or .."
_DOTS = frozenset((".", ".."))  # path components with a meaning: a node name is a folder
_NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,%d}" % MAX_NAME)
_fullmatch = _NAME.fullmatch


def is_valid_name(value: object) -> bool:
    """True when ``value`` is a str that fits the name rule."""
    return (isinstance(value, str) and str.__len__(value) <= MAX_NAME and _fullmatch(value) is not None
            and value not in _DOTS)


def check_name(value: object, *, what: str) -> str:
    """``value`` as a plain str when it fits the name rule; else ``DecodeError("bad_name")``.

    ``what`` says which name it was (``"device"``, ``"stream"``) for the message.
    """
    if is_valid_name(value):
        return str.__str__(value)  # a plain str even for a str subclass
    raise DecodeError("bad_name", f"{what} {brief(value, 40)} is not a valid name ({NAME_RULE})")


def name_from_levels(levels: list[str], *, what: str = "device") -> str:
    """A name made of topic levels joined by ``.`` (for a topic that names no device), checked.

    >>> name_from_levels(["sensors", "press7", "accel"])
    'sensors.press7.accel'
    """
    return check_name(".".join(levels), what=what)
