"""Which backend to serve: the measured choice, ``auto``'s preference and the fallback chain. Pure.

``auto`` is decided by measurement (``edge.serve.select`` builds and times, ``decide``
here chooses): every candidate this hardware supports is built, gated on held-out
windows, timed at batch 1, and the fastest that passes serves, except that a reduced
precision (int8, fp16) must beat fp32 and keep accuracy on the labelled check set.
``choose_auto`` is the preference by availability alone, used for a configured backend
without a precision and shown by ``edge status``. A refusal of a configured backend
falls back along tensorrt -> onnxruntime int8 -> onnxruntime fp32 -> torch fp32.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

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
    """The requested precision (or policy), or the backend's default (int8 on ONNX Runtime, fp16 on TensorRT).

    A precision the backend cannot build (the fp32-only torch under an int8 policy) is
    left to ``obtain`` to refuse, so the fallback chain says why.
    """
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


# ---- the measured choice (pure: fed records of what was built and timed) ---------------------
POLICIES = ("auto", "fp32", "fp16", "int8")
#: a reduced precision must beat fp32 by this factor to be worth its accuracy risk
MIN_GAIN = 1.05
#: default for ``[parity] int8_max_accuracy_loss`` (and fp16): percentage points on the [eval] set
MAX_ACCURACY_LOSS = 0.5


@dataclass(frozen=True)
class Candidate:
    """One artifact that could serve: backend, precision and (for ONNX Runtime int8) format."""

    backend: str
    precision: str
    variant: str = ""

    @property
    def label(self) -> str:
        """How reasons and tables name it.

        >>> Candidate("onnxruntime", "int8", "u8s8").label
        'onnxruntime int8 (u8s8)'
        """
        return f"{self.backend} {self.precision}" + (f" ({self.variant})" if self.variant else "")


@dataclass(frozen=True)
class Trial:
    """What happened to one candidate on this device: built and gated, timed, checked."""

    candidate: Candidate
    ok: bool  # built and passed the parity gate on held-out windows
    why: str = ""  # the refusal when not ok
    p50_ms: float | None = None  # batch-1 latency, median
    accuracy: dict[str, float] | None = None  # condition -> accuracy on the labelled [eval] set

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "candidate": asdict(self.candidate)}

    @classmethod
    def from_dict(cls, d: dict) -> "Trial":
        return cls(**{**d, "candidate": Candidate(**d["candidate"])})


@dataclass(frozen=True)
class Decision:
    """The candidate served, why, and every trial behind it (recorded in the cache)."""

    chosen: Candidate | None
    reason: str
    policy: str
    trials: tuple[Trial, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": asdict(self.chosen) if self.chosen else None, "reason": self.reason,
                "policy": self.policy, "trials": [t.to_dict() for t in self.trials]}

    @classmethod
    def from_dict(cls, d: dict) -> "Decision":
        return cls(chosen=Candidate(**d["chosen"]) if d.get("chosen") else None, reason=d["reason"],
                   policy=d["policy"], trials=tuple(Trial.from_dict(t) for t in d.get("trials", ())))


def precision_policy(serve_table: dict, requested: str | None = None) -> str:
    """The precision policy: an explicit request (config or command line) wins, else the manifest's.

    >>> precision_policy({"precision": "fp32"}), precision_policy({}), precision_policy({"precision": "fp32"}, "int8")
    ('fp32', 'auto', 'int8')
    """
    p = str(requested) if requested not in (None, "", "auto") else str(serve_table.get("precision", "auto"))
    if p not in POLICIES:
        raise ConfigError(f"precision {p!r} is not one of {', '.join(POLICIES)}")
    return p


def candidates(available: dict[str, tuple[bool, str]], *, policy: str,
               variants: dict[tuple[str, str], list[str]] | None = None) -> tuple[list[Candidate], list[str]]:
    """(candidates to build and time, what was left out and why) for ``policy``.

    Always includes an fp32 baseline (ONNX Runtime, else torch), which reduced precisions
    must beat. ``variants`` lists the builds of a (backend, precision), e.g. int8 formats.

    >>> avail = {"tensorrt": (False, "no CUDA device"), "onnxruntime": (True, ""), "torch": (True, "")}
    >>> cs, skipped = candidates(avail, policy="auto", variants={("onnxruntime", "int8"): ["u8s8", "s8s8"]})
    >>> [c.label for c in cs]
    ['onnxruntime int8 (u8s8)', 'onnxruntime int8 (s8s8)', 'onnxruntime fp32', 'torch fp32']
    >>> skipped
    ['tensorrt: no CUDA device']
    >>> [c.label for c in candidates(avail, policy="fp32")[0]]
    ['onnxruntime fp32', 'torch fp32']
    """
    variants = variants or {}
    out, skipped = [], []
    for key, prec in _ORDER:
        ok, why = available.get(key, (False, "not registered"))
        if not ok:
            if f"{key}: {why}" not in skipped:
                skipped.append(f"{key}: {why}")
            continue
        if policy != "auto" and prec not in (policy, "fp32"):
            continue
        out.extend(Candidate(key, prec, v) for v in variants.get((key, prec), [""]))
    return out, skipped


def decide(trials: list[Trial], *, policy: str, max_accuracy_loss: dict[str, float] | None = None,
           min_gain: float = MIN_GAIN) -> Decision:
    """Serve the fastest candidate that passed, refusing a reduced precision that is not
    ``min_gain`` x faster than the fastest fp32 one or that loses more than
    ``max_accuracy_loss[precision]`` points (worst condition) on the labelled set.

    >>> c8, c32 = Candidate("onnxruntime", "int8", "u8s8"), Candidate("onnxruntime", "fp32")
    >>> d = decide([Trial(c8, True, p50_ms=0.10), Trial(c32, True, p50_ms=0.101)], policy="auto")
    >>> d.chosen.label, "not faster than fp32" in d.reason
    ('onnxruntime fp32', True)
    """
    max_accuracy_loss = {"int8": MAX_ACCURACY_LOSS, "fp16": MAX_ACCURACY_LOSS, **(max_accuracy_loss or {})}
    passed = [t for t in trials if t.ok and t.p50_ms is not None]
    refused = [f"{t.candidate.label}: {t.why or 'not timed'}" for t in trials if t not in passed]
    fp32 = [t for t in passed if t.candidate.precision == "fp32"]
    base = min(fp32, key=lambda t: t.p50_ms, default=None)
    eligible = []
    for t in passed:
        c = t.candidate
        if c.precision != "fp32":
            if policy not in ("auto", c.precision):
                refused.append(f"{c.label}: precision policy {policy}")
                continue
            if base is not None and not t.p50_ms * min_gain <= base.p50_ms:
                refused.append(f"{c.label}: not faster than fp32 ({t.p50_ms:.4g} ms vs {base.candidate.label} "
                               f"{base.p50_ms:.4g} ms; needs {min_gain:g}x)")
                continue
            loss = _worst_loss(t, base)
            limit = max_accuracy_loss.get(c.precision, MAX_ACCURACY_LOSS)
            if loss is not None and loss[1] > limit:
                refused.append(f"{c.label}: loses {loss[1]:.2f} points on {loss[0]} (limit {limit:g})")
                continue
        eligible.append(t)
    timed = ", ".join(f"{t.candidate.label} {t.p50_ms:.4g} ms" for t in sorted(passed, key=lambda t: t.p50_ms))
    if not eligible:
        return Decision(None, f"nothing can serve: {'; '.join(refused) or 'no candidates'}", policy, tuple(trials))
    best = min(eligible, key=lambda t: t.p50_ms)
    parts = [f"measured batch-1 p50: {timed}"]
    if refused:
        parts.append("refused: " + "; ".join(refused))
    gain = f", {base.p50_ms / best.p50_ms:.2f}x {base.candidate.label}" if base is not None and base is not best else ""
    loss = _worst_loss(best, base) if best is not base else None
    acc = f", worst accuracy loss {loss[1]:+.2f} points ({loss[0]})" if loss is not None else ""
    parts.append(f"-> {best.candidate.label}{gain}{acc}")
    return Decision(best.candidate, "; ".join(parts), policy, tuple(trials))


def _worst_loss(t: Trial, base: Trial | None) -> tuple[str, float] | None:
    """(condition, points lost vs the fp32 baseline) for the worst condition, or None if unmeasured."""
    if base is None or not t.accuracy or not base.accuracy:
        return None
    losses = {k: 100 * (base.accuracy[k] - v) for k, v in t.accuracy.items() if k in base.accuracy}
    if not losses:
        return None
    k = max(losses, key=losses.get)
    return k, losses[k]


def median_seconds(fn, *, clock, rounds: int, warmup: int = 10) -> float:
    """Median duration of ``fn()`` over ``rounds`` calls after ``warmup`` untimed ones.

    >>> t = iter(range(100))
    >>> median_seconds(lambda: None, clock=lambda: next(t), rounds=3, warmup=0)
    1.0
    """
    for _ in range(warmup):
        fn()
    d = []
    for _ in range(rounds):
        t0 = clock()
        fn()
        d.append(clock() - t0)
    d.sort()
    n = len(d)
    return float(d[n // 2] if n % 2 else (d[n // 2 - 1] + d[n // 2]) / 2)


def interleaved_medians(fns: dict, *, clock, rounds: int, block: int = 10, warmup: int = 10) -> dict:
    """Median seconds per call of each ``fns[key]()``, timed in alternating blocks.

    Each round times ``block`` consecutive calls of every function in turn, so a burst
    of load from elsewhere on a shared machine slows all candidates alike instead of
    whichever one happened to be timed during it, while each block runs with its own
    model warm in the caches, as serving does.

    >>> t = [0.0]
    >>> def cost(s):
    ...     def f(): t[0] += s
    ...     return f
    >>> interleaved_medians({"a": cost(1.0), "b": cost(3.0)}, clock=lambda: t[0], rounds=5, block=2, warmup=1)
    {'a': 1.0, 'b': 3.0}
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict = {k: [] for k in fns}
    for _ in range(max(1, rounds)):
        for k, fn in fns.items():
            t0 = clock()
            for _ in range(block):
                fn()
            samples[k].append((clock() - t0) / block)
    out = {}
    for k, d in samples.items():
        d.sort()
        n = len(d)
        out[k] = float(d[n // 2] if n % 2 else (d[n // 2 - 1] + d[n // 2]) / 2)
    return out
