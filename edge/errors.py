"""The project's exceptions: one root, a few kinds, each with a CLI exit code.

The CLI maps every ``EdgeError`` to a one-line message and its ``exit_code``; anything
else is a bug and gets a traceback.
"""
from __future__ import annotations


class EdgeError(Exception):
    """Root of every error the runtime raises on purpose."""

    exit_code = 1


class ConfigError(EdgeError):
    """A configuration file or value is invalid; the message names section, key, value and fix."""

    exit_code = 2


class ModelError(EdgeError):
    """A model folder is missing, malformed or inconsistent with its manifest."""

    exit_code = 3


class BackendUnavailable(EdgeError):
    """A serving backend cannot be used here (library missing, no device); names what to install."""

    exit_code = 4


class ParityError(EdgeError):
    """A compiled artifact disagrees with the fp32 reference beyond the model's tolerance."""

    exit_code = 5



class DecodeError(EdgeError):
    """A payload, frame or label could not be decoded. ``kind`` is a short counter key."""

    exit_code = 6

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class StateError(EdgeError):
    """A checkpoint cannot be read or written."""

    exit_code = 7


class BrokerError(EdgeError):
    """The MQTT broker cannot be reached or started."""

    exit_code = 8


class DataError(EdgeError, ValueError):
    """Data the incremental-learning library cannot take: an empty dataset, a sample of the
    wrong shape, a label outside the model's classes (``edge.learning``; the CLI never
    raises it, so it keeps the generic exit code)."""

    exit_code = 1


# -- describing untrusted values -------------------------------------------------------------

def brief(value: object, limit: int = 80) -> str:
    """A short description of an untrusted value for a message: at most ``limit`` (>= 4) characters.

    It never raises and never recurses: nested lists, tuples, dicts and sets are walked with
    an explicit stack and the walk stops once ``limit`` characters are written, so a
    100,000-deep nesting, a huge int (``str`` of one raises past 4,300 digits), a str or
    bytes subclass that overrides its methods, or an object whose ``__repr__`` raises all
    give a bounded string. Text is cut and marked with ``...``.

    >>> brief([1, "a", {"k": None}])
    "[1, 'a', {'k': None}]"
    >>> brief("x" * 100, limit=12)
    "'xxxxxxxx..."
    >>> deep = []
    >>> for _ in range(100_000):
    ...     deep = [deep]
    >>> brief(deep, limit=10)
    '[[[[[[[...'
    >>> brief(10 ** 5000)
    '<int of 16610 bits>'
    """
    limit = max(int(limit), 4)
    try:
        text = _describe(value, limit + 1)
    except Exception:  # a hostile __len__/__iter__ etc.: say only what it is
        text = f"<{_type_name(value)}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _type_name(value: object) -> str:
    try:
        name = type(value).__name__
        return name[:40] if type(name) is str else "object"
    except Exception:
        return "object"


def _scalar(value: object, room: int) -> str | None:
    """repr of a leaf value cut near ``room`` chars, or None when ``value`` is a container."""
    if isinstance(value, str):
        return repr(str.__getitem__(value, slice(0, room)))  # base method: ignores overrides
    if isinstance(value, bytes):
        return repr(bytes.__getitem__(value, slice(0, room)))
    if isinstance(value, bytearray):
        return repr(bytes(bytearray.__getitem__(value, slice(0, room))))
    if isinstance(value, bool) or value is None:
        return "True" if value is True else "False" if value is False else "None"
    if isinstance(value, int):
        bits = int.bit_length(value)
        return int.__repr__(value) if bits <= 3 * room else f"<int of {bits} bits>"
    if isinstance(value, float):
        return float.__repr__(value)
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        return None
    if isinstance(value, memoryview):
        return f"<memoryview of {value.nbytes} bytes>"
    try:
        text = repr(value)
    except Exception:
        return f"<{_type_name(value)}>"
    return str.__getitem__(text, slice(0, room)) if isinstance(text, str) else f"<{_type_name(value)}>"


def _open(value: object) -> tuple[str, str, object, bool]:
    """(opening, closing, iterator, is_dict) for a container, using the base types' methods."""
    if isinstance(value, dict):
        return "{", "}", iter(dict.items(value)), True
    if isinstance(value, list):
        return "[", "]", list.__iter__(value), False
    if isinstance(value, tuple):
        return "(", ")", tuple.__iter__(value), False
    if isinstance(value, set):
        return "{", "}", set.__iter__(value), False
    return "frozenset({", "})", frozenset.__iter__(value), False


def _describe(value: object, room: int) -> str:
    out: list[str] = []
    n = 0
    # each frame: [closing, iterator, is_dict, first]
    stack: list[list] = []
    pending: object = value
    have = True
    while n < room:
        if have:
            have = False
            leaf = _scalar(pending, room - n)
            if leaf is not None:
                out.append(leaf)
                n += len(leaf)
            else:
                opening, closing, it, is_dict = _open(pending)
                out.append(opening)
                n += len(opening)
                stack.append([closing, it, is_dict, True])
            continue
        if not stack:
            break
        frame = stack[-1]
        try:
            item = next(frame[1])
        except StopIteration:
            stack.pop()
            out.append(frame[0])
            n += len(frame[0])
            continue
        if not frame[3]:
            out.append(", ")
            n += 2
        frame[3] = False
        if frame[2]:
            key, pending = item
            k = _scalar(key, room - n)
            k = k if k is not None else f"<{_type_name(key)}>"
            out.append(k + ": ")
            n += len(k) + 2
        else:
            pending = item
        have = True
    return "".join(out)
