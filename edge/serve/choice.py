"""Which backend to serve: ``auto`` selection and the fallback chain. Pure functions.

``auto`` picks TensorRT on a CUDA device with torch-tensorrt, else ONNX Runtime int8,
else eager torch. Whatever is chosen, a refusal (unavailable, failed build, failed
parity) falls back along tensorrt -> onnxruntime int8 -> onnxruntime fp32 -> torch fp32.
"""
from __future__ import annotations

from edge.errors import ConfigError

DEFAULT_PRECISION = {"tensorrt": "fp16", "onnxruntime": "int8", "torch": "fp32"}
CHAIN = (("tensorrt", "fp16"), ("onnxruntime", "int8"), ("onnxruntime", "fp32"), ("torch", "fp32"))
PRECISIONS = ("int8", "fp16", "fp32")


def choose_auto(available: dict[str, tuple[bool, str]]) -> tuple[str, str, str]:
    """(backend, precision, reason) for ``auto`` given ``{key: (available, why)}``.

    >>> choose_auto({"tensorrt": (False, "no CUDA device"), "onnxruntime": (True, "onnxruntime 1.20"),
    ...              "torch": (True, "")})
    ('onnxruntime', 'int8', 'auto: tensorrt unavailable (no CUDA device); onnxruntime 1.20 -> onnxruntime int8')
    """
    skipped = []
    for key in ("tensorrt", "onnxruntime", "torch"):
        ok, why = available.get(key, (False, "not registered"))
        if ok:
            prefix = f"auto: {'; '.join(skipped)}; " if skipped else "auto: "
            return key, DEFAULT_PRECISION[key], f"{prefix}{why} -> {key} {DEFAULT_PRECISION[key]}"
        skipped.append(f"{key} unavailable ({why})")
    raise ConfigError("no serving backend is available: " + "; ".join(skipped))


def resolve_precision(backend: str, precision: str | None) -> str:
    """The requested precision, or the backend's default (int8 on ONNX Runtime, fp16 on TensorRT)."""
    if precision is None or precision == "auto":
        return DEFAULT_PRECISION.get(backend, "fp32")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return precision


def fallback_chain(backend: str, precision: str) -> list[tuple[str, str]]:
    """Candidates to try in order, starting with the requested one.

    >>> fallback_chain("onnxruntime", "int8")
    [('onnxruntime', 'int8'), ('onnxruntime', 'fp32'), ('torch', 'fp32')]
    >>> fallback_chain("tensorrt", "int8")
    [('tensorrt', 'int8'), ('tensorrt', 'fp16'), ('onnxruntime', 'int8'), ('onnxruntime', 'fp32'), ('torch', 'fp32')]
    """
    first = (backend, precision)
    pos = _ORDER.index(first) if first in _ORDER else next(
        (i for i, c in enumerate(_ORDER) if c[0] == backend), len(_ORDER) - 1)
    return [first] + [c for c in _ORDER[pos + 1:] if c in CHAIN or c == ("tensorrt", "fp16")]


# Every candidate, best first; the chain walks down from the requested one.
_ORDER = (("tensorrt", "int8"), ("tensorrt", "fp16"), ("tensorrt", "fp32"),
          ("onnxruntime", "int8"), ("onnxruntime", "fp32"), ("torch", "fp32"))
