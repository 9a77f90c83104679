"""The backend contract: what every serving backend of the backbone provides.

A backend turns windows ``[B, C, L]`` float32 into features ``[B, D]`` float32. It is
built once into artifact files (``build``, written into a directory the cache hands in)
and loaded from them (``load``); the cache, the parity gate and the fallback chain live
outside, so a backend only knows its library.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

log = logging.getLogger("edge.serve")


class Backend:
    """Base of every backend. Subclasses set the class attributes and the four hooks."""

    key: ClassVar[str] = ""
    #: precisions the backend can build, best first
    precisions: ClassVar[tuple[str, ...]] = ()
    #: what to install when the library is missing
    install_hint: ClassVar[str] = ""
    #: False for the eager reference, which loads straight from the model folder
    needs_artifact: ClassVar[bool] = True
    #: which build of a precision this is (an int8 quantization format); "" when only one
    variant: str = ""

    def __init__(self, *, precision: str, channels: int, window: int, feature_size: int,
                 artifact: Path | None = None, artifact_hash: str | None = None, threads: int = 1):
        self.precision = precision
        self.channels, self.window, self.feature_size = channels, window, feature_size
        self.artifact = artifact
        self.artifact_hash = artifact_hash
        self.threads = threads

    # -- hooks -------------------------------------------------------------------------
    @classmethod
    def availability(cls) -> tuple[bool, str]:
        """(usable here, why not). Cheap; called by ``auto`` and the registry."""
        raise NotImplementedError

    @classmethod
    def platform(cls) -> dict[str, Any]:
        """What makes an artifact non-portable (library versions, device); part of the cache key."""
        raise NotImplementedError

    @classmethod
    def variants(cls, precision: str) -> list[str]:
        """The builds of ``precision`` worth trying on this machine, usual best first ("" = the one build).

        A backend with several (ONNX Runtime int8 formats) also accepts ``variant=`` in ``build``.
        """
        return [""]

    @classmethod
    def build(cls, model, *, precision: str, example: np.ndarray, calibration: np.ndarray | None,
              out_dir: Path, progress=None) -> list[str]:
        """Write the artifact files for ``precision`` into ``out_dir``; return their names."""
        raise NotImplementedError

    @classmethod
    def load(cls, model, *, precision: str, artifact_dir: Path | None, artifact_hash: str | None = None,
             threads: int = 1) -> "Backend":
        """A ready backend from the files ``build`` wrote (or from the model, if no artifact)."""
        raise NotImplementedError

    def _run(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    # -- public ------------------------------------------------------------------------
    def features(self, x: np.ndarray) -> np.ndarray:
        """Features ``[B, D]`` float32 of windows ``[B, C, L]`` float32.

        Bad input is a caller's bug, so it fails loudly here with the shape it expected,
        rather than deep inside a runtime with a message about tensor ranks.
        """
        self.check_input(x)
        z = self._run(np.ascontiguousarray(x))
        return np.asarray(z, dtype=np.float32)

    def check_input(self, x: Any) -> None:
        want = f"[B, {self.channels}, {self.window}] float32"
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{self.key}: windows must be a numpy array {want}, got {type(x).__name__}")
        if x.dtype != np.float32:
            raise TypeError(f"{self.key}: windows must be float32 {want}, got {x.dtype} (use x.astype(np.float32))")
        if x.ndim != 3 or x.shape[1:] != (self.channels, self.window) or x.shape[0] < 1:
            raise ValueError(f"{self.key}: windows must have shape {want}, got {list(x.shape)}")

    def describe(self) -> dict[str, Any]:
        """Plain data for logs, ``edge status`` and metrics labels."""
        return {
            "backend": self.key,
            "precision": self.precision,
            "variant": self.variant,
            "provider": self.provider,
            "artifact": str(self.artifact) if self.artifact else None,
            "artifact_sha256": self.artifact_hash,
            "threads": self.threads,
        }

    @property
    def provider(self) -> str:
        return self.key

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.key} {self.precision} provider={self.provider}>"
