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

