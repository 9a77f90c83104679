"""Serving backends of the backbone, registered by type key (``torch``, ``onnxruntime``, ``tensorrt``).

Each backend module imports its library softly: a missing library is logged and the
backend stays registered but unavailable, so asking for it raises
``BackendUnavailable`` naming what to install instead of an ``ImportError`` from deep
inside. Third-party backends register with ``register_backend``.
"""
from __future__ import annotations

import logging

from edge.errors import BackendUnavailable
from edge.serve.backends.base import Backend

log = logging.getLogger("edge.serve")

_REGISTRY: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Add a backend class under its ``key`` (usable as a class decorator)."""
    if not cls.key:
        raise ValueError(f"{cls.__name__} has no key")
    _REGISTRY[cls.key] = cls
    return cls


def backend_keys() -> list[str]:
    """Every registered key, available here or not."""
    return sorted(_REGISTRY)


def availability() -> dict[str, tuple[bool, str]]:
    """key -> (available, reason) for every registered backend."""
    out = {}
    for key, cls in _REGISTRY.items():
        try:
            out[key] = cls.availability()
        except Exception as e:  # noqa: BLE001  a probe must never take the daemon down
            log.warning("probing backend %s failed: %s: %s", key, type(e).__name__, e)
            out[key] = (False, f"probe failed: {type(e).__name__}: {e}")
    return out


def get_backend(key: str) -> type[Backend]:
    """The backend class for ``key``; ``BackendUnavailable`` naming the fix if it cannot run here."""
    cls = _REGISTRY.get(key)
    if cls is None:
        raise BackendUnavailable(f"unknown backend {key!r}; known: {', '.join(backend_keys())}")
    ok, why = availability()[key]
    if not ok:
        raise BackendUnavailable(f"backend {key!r} is unavailable: {why}; to use it: {cls.install_hint}")
    return cls


def _register_builtin() -> None:
    from edge.serve.backends.ort import OnnxRuntimeBackend
    from edge.serve.backends.torch_eager import TorchBackend
    from edge.serve.backends.trt import TensorRTBackend

    for cls in (TorchBackend, OnnxRuntimeBackend, TensorRTBackend):
        register_backend(cls)


_register_builtin()

__all__ = ["Backend", "register_backend", "get_backend", "backend_keys", "availability"]
