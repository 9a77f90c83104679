"""Which backend to serve: the measured choice, ``auto``'s preference and the fallback chain. Pure.

``auto`` is decided by measurement (``edge.serve.select`` builds and times, ``decide``
here chooses): every candidate this hardware supports is built, gated on held-out
windows, timed at batch 1, and the fastest that passes serves, except that a reduced
precision (int8, fp16) must beat fp32 and keep accuracy on the labelled check set.
"Faster" is judged on paired ratios over alternating blocks with a confidence interval
(``edge.serve.paired``), and the decision says how sure it is: ``sure`` when every
speed verdict's interval lies on one side of ``MIN_GAIN``, else ``uncertain`` (then
``edge.serve.recheck`` measures again when the device is idle).
``choose_auto`` is the preference by availability alone, used for a configured backend
without a precision and shown by ``edge status``. A refusal of a configured backend
falls back along tensorrt -> onnxruntime int8 -> onnxruntime fp32 -> torch fp32.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from edge.errors import ConfigError
from edge.serve.paired import Speedup, paired_speedup

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
    # ms per call in each round of alternating blocks, the same rounds for every trial of one
    # measurement: what the paired speedups are computed from (None: compared by p50 alone)
    samples_ms: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "candidate": asdict(self.candidate)}

    @classmethod
    def from_dict(cls, d: dict) -> "Trial":
        samples = d.get("samples_ms")
        return cls(**{**d, "candidate": Candidate(**d["candidate"]),
                      "samples_ms": tuple(samples) if samples is not None else None})


@dataclass(frozen=True)
class Decision:
    """The candidate served, why, and every trial behind it (recorded in the cache)."""

    chosen: Candidate | None
    reason: str
    policy: str
    trials: tuple[Trial, ...] = ()
    # "sure": every speed verdict's confidence interval lay on one side of the gain needed;
    # "uncertain": one straddled it (the point estimate decided; re-checked when idle)
    confidence: str = "sure"

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": asdict(self.chosen) if self.chosen else None, "reason": self.reason,
                "policy": self.policy, "trials": [t.to_dict() for t in self.trials], "confidence": self.confidence}

    @classmethod
    def from_dict(cls, d: dict) -> "Decision":
        return cls(chosen=Candidate(**d["chosen"]) if d.get("chosen") else None, reason=d["reason"],
                   policy=d["policy"], trials=tuple(Trial.from_dict(t) for t in d.get("trials", ())),
                   confidence=d.get("confidence", "sure"))


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


def speedup(t: Trial, base: Trial) -> Speedup:
    """``t``'s speedup over ``base``: paired over their rounds where both have them, else the
    ratio of their p50s (an interval of one point: no evidence of how sure it is).

    >>> c8, c32 = Candidate("onnxruntime", "int8", "u8s8"), Candidate("onnxruntime", "fp32")
    >>> speedup(Trial(c8, True, p50_ms=1.0, samples_ms=(1.0, 2.0, 1.0)),
    ...         Trial(c32, True, p50_ms=2.0, samples_ms=(2.0, 4.0, 2.0))).median
    2.0
    """
    a, b = t.samples_ms, base.samples_ms
    if a and b and len(a) == len(b):
        return paired_speedup(a, b)
    r = base.p50_ms / t.p50_ms
    return Speedup(r, r, r, 0)


def decide(trials: list[Trial], *, policy: str, max_accuracy_loss: dict[str, float] | None = None,
           min_gain: float = MIN_GAIN) -> Decision:
    """Serve the fastest candidate that passed, refusing a reduced precision that is not
    ``min_gain`` x faster than the fastest fp32 one or that loses more than
    ``max_accuracy_loss[precision]`` points (worst condition) on the labelled set.

    Speeds are compared by ``speedup`` over the fp32 baseline (paired rounds, with an
    interval), so a load that slows one round slows both sides of its ratio; the fastest
    is the one with the greatest median speedup. A verdict whose interval straddles
    ``min_gain`` is decided by the median and makes the decision ``uncertain``.

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
    eligible, unsure, gains = [], [], {}
    for t in passed:
        c = t.candidate
        if base is not None:
            gains[c] = speedup(t, base) if t is not base else Speedup(1.0, 1.0, 1.0, 0)
        if c.precision != "fp32":
            if policy not in ("auto", c.precision):
                refused.append(f"{c.label}: precision policy {policy}")
                continue
            if base is not None:
                g = gains[c]
                faster, sure = g.verdict(min_gain) if g.rounds else (t.p50_ms * min_gain <= base.p50_ms, True)
                if not sure:
                    unsure.append(f"{c.label} {g.describe()} vs {base.candidate.label}, needs {min_gain:g}x")
                if not faster:
                    refused.append(f"{c.label}: not faster than fp32 ({t.p50_ms:.4g} ms vs {base.candidate.label} "
                                   f"{base.p50_ms:.4g} ms; needs {min_gain:g}x"
                                   + (f"; paired speedup {g.describe()}" if g.rounds else "") + ")")
                    continue
            loss = _worst_loss(t, base)
            limit = max_accuracy_loss.get(c.precision, MAX_ACCURACY_LOSS)
            if loss is not None and loss[1] > limit:
                refused.append(f"{c.label}: loses {loss[1]:.2f} points on {loss[0]} (limit {limit:g})")
                continue
        eligible.append(t)
    timed = ", ".join(f"{t.candidate.label} {t.p50_ms:.4g} ms" for t in sorted(passed, key=lambda t: t.p50_ms))
    confidence = "uncertain" if unsure else "sure"
    if not eligible:
        return Decision(None, f"nothing can serve: {'; '.join(refused) or 'no candidates'}", policy, tuple(trials),
                        confidence)
    best = (max(eligible, key=lambda t: gains[t.candidate].median) if base is not None
            else min(eligible, key=lambda t: t.p50_ms))
    parts = [f"measured batch-1 p50: {timed}"]
    if refused:
        parts.append("refused: " + "; ".join(refused))
    g = gains.get(best.candidate)
    gain = ""
    if base is not None and base is not best:
        gain = f", {g.median:.2f}x {base.candidate.label}" + (f" ({g.describe()})" if g.rounds else "")
    loss = _worst_loss(best, base) if best is not base else None
    acc = f", worst accuracy loss {loss[1]:+.2f} points ({loss[0]})" if loss is not None else ""
    parts.append(f"-> {best.candidate.label}{gain}{acc}")
    parts.append("choice sure" if not unsure else "choice uncertain: " + "; ".join(unsure) + " (re-checked when idle)")
    return Decision(best.candidate, "; ".join(parts), policy, tuple(trials), confidence)


def _worst_loss(t: Trial, base: Trial | None) -> tuple[str, float] | None:
    """(condition, points lost vs the fp32 baseline) for the worst condition, or None if unmeasured."""
    if base is None or not t.accuracy or not base.accuracy:
        return None
    losses = {k: 100 * (base.accuracy[k] - v) for k, v in t.accuracy.items() if k in base.accuracy}
    if not losses:
        return None
    k = max(losses, key=losses.get)
    return k, losses[k]
