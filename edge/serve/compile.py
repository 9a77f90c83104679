"""Build or load one compiled backbone, with the parity gate at build and at load.

``obtain`` is the one path both ``edge compile`` and the daemon take: look the artifact
up in the cache (re-hashing it), load it and check it against the golden set recorded
with it; on a miss (or a corrupt entry) export, calibrate and build into a staging
directory, check it against freshly computed fp32 reference features, and only then
commit it. An artifact that fails the gate is never committed; the refusal is recorded
so the next start does not pay for the same failed build again.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.errors import BackendUnavailable, ParityError
from edge.serve import parity
from edge.serve.backends import get_backend
from edge.serve.backends.torch_eager import TorchBackend
from edge.serve.cache import ArtifactCache, CacheKey
from edge.serve.calibration import calibration_windows
from edge.serve.export import example_input, no_graph_error, torch_available
from edge.serve.progress import Progress
from edge.zoo import GRAPH_FILE

log = logging.getLogger("edge.serve")

GOLDEN = "golden.npz"
REFUSED = ".refused.json"


@dataclass
class CompileResult:
    """What ``compile_model`` produced: where, how it compares with fp32, how long it took."""

    backend: str
    precision: str
    artifact_dir: Path | None
    artifact_hash: str | None
    cache: str  # "hit", "miss", "corrupt (...); deleted", "reference"
    parity: parity.ParityReport | None
    parity_at_build: dict | None = None
    timings: dict[str, float] = field(default_factory=dict)
    platform: dict[str, Any] = field(default_factory=dict)
    variant: str = ""
    decision: Any = None  # the measured choice (``choice.Decision``) when ``auto`` chose this

    def summary(self) -> str:
        """One line for ``edge compile``'s output."""
        where = self.artifact_dir or "no artifact (eager reference)"
        gate = "parity " + self.parity.summary().split(": ", 1)[1] if self.parity else "reference, not gated"
        took = ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items())
        kind = f"{self.precision} ({self.variant})" if self.variant else self.precision
        line = f"{self.backend} {kind}: cache {self.cache}; {gate}; {where}; {took}"
        return line + (f"\nauto: {self.decision.reason}" if self.decision is not None else "")

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "precision": self.precision,
                "artifact_dir": str(self.artifact_dir) if self.artifact_dir else None,
                "artifact_sha256": self.artifact_hash, "cache": self.cache,
                "parity": self.parity.to_dict() if self.parity else None,
                "parity_at_build": self.parity_at_build, "timings": self.timings, "platform": self.platform,
                "variant": self.variant, "decision": self.decision.to_dict() if self.decision is not None else None}


def _refusal_path(cache: ArtifactCache, key: CacheKey) -> Path:
    d = cache.path(key)
    return d.parent / (d.name + REFUSED)


def obtain(model, key: str, precision: str, *, cache: ArtifactCache, calibration=None, threads: int = 1,
           progress: Progress | None = None, force: bool = False, variant: str | None = None):
    """(backend, CompileResult) for one candidate; raises ``BackendUnavailable`` or ``ParityError``.

    ``variant`` picks one build of ``precision`` (an ONNX Runtime int8 format); default:
    the backend's first for this machine.
    """
    cls = get_backend(key)
    if precision not in cls.precisions:
        raise BackendUnavailable(f"backend {key!r} does not build {precision} (it builds {', '.join(cls.precisions)})")
    variant = cls.variants(precision)[0] if variant is None else variant
    t0 = time.perf_counter()
    if not cls.needs_artifact:
        b = cls.load(model, precision=precision, artifact_dir=None, threads=threads)
        b.variant = variant
        return b, CompileResult(key, precision, None, None, "reference", None,
                                timings={"load_s": time.perf_counter() - t0}, platform=cls.platform(),
                                variant=variant)
    ck = CacheKey(model.manifest.name, model.content_hash, key, precision, cls.platform(), variant=variant)
    refused = _refusal_path(cache, ck)
    if force:
        refused.unlink(missing_ok=True)
        cache.discard(cache.path(ck))
    elif refused.exists():
        why = json.loads(refused.read_text()).get("reason", "?")
        raise ParityError(f"{key} {precision} was refused when built for this model and platform: {why} "
                          f"(run `edge compile --force` to try again; record: {refused})")
    head = parity.head_scores(model)
    entry, state = cache.lookup(ck)
    if entry is not None:
        b, report = _load_checked(model, cls, precision, entry, threads, head, variant)
        if report.passed:
            return b, CompileResult(key, precision, entry.dir, entry.artifact_hash, "hit", report,
                                    entry.meta.get("parity"), {"load_s": time.perf_counter() - t0},
                                    ck.platform, variant)
        log.warning("cached %s %s failed the parity gate on load (%s); rebuilding it", key, precision, report.reason)
        cache.discard(entry.dir)
        state = f"refused on load ({report.reason}); rebuilt"
    timings = _build(model, cls, ck, precision, cache=cache, calibration=calibration, progress=progress, head=head,
                     variant=variant)
    entry, _ = cache.lookup(ck)
    if entry is None:
        raise ParityError(f"{key} {precision}: the artifact just built is missing from the cache at {cache.path(ck)}")
    t1 = time.perf_counter()
    b, report = _load_checked(model, cls, precision, entry, threads, head, variant)
    timings["load_s"] = time.perf_counter() - t1
    report.raise_if_failed()
    return b, CompileResult(key, precision, entry.dir, entry.artifact_hash, state, report,
                            entry.meta.get("parity"), timings, ck.platform, variant)


def _load_checked(model, cls, precision, entry, threads, head, variant=""):
    b = cls.load(model, precision=precision, artifact_dir=entry.dir, artifact_hash=entry.artifact_hash,
                 threads=threads)
    b.variant = variant
    golden = parity.Golden.load(entry.dir / GOLDEN)
    return b, parity.check(model, b, golden, head=head)


def _build(model, cls, ck: CacheKey, precision: str, *, cache, calibration, progress, head,
           variant: str = "") -> dict[str, float]:
    timings: dict[str, float] = {}
    staged = cache.staging()
    try:
        t = time.perf_counter()
        calib = calibration_windows(model, calibration) if precision == "int8" else None
        reference, judged_by = reference_backend(model)
        golden = parity.Golden.make(model, calibration_file=calibration).with_reference(reference)
        del reference
        golden.save(staged / GOLDEN)
        timings["golden_s"] = time.perf_counter() - t
        t = time.perf_counter()
        extra = {"variant": variant} if variant else {}  # third-party backends need not know variants
        files = cls.build(model, precision=precision, example=example_input(model), calibration=calib,
                          out_dir=staged, progress=progress, **extra)
        timings["build_s"] = time.perf_counter() - t
        t = time.perf_counter()
        b = cls.load(model, precision=precision, artifact_dir=staged, threads=1)
        report = parity.check(model, b, golden, head=head)
        timings["parity_s"] = time.perf_counter() - t
        log.info("parity at build: %s", report.summary())
        if not report.passed:
            rec = _refusal_path(cache, ck)
            rec.parent.mkdir(parents=True, exist_ok=True)
            rec.write_text(json.dumps({"reason": report.reason, "report": report.to_dict(), "time": time.time()},
                                      indent=2, default=str))
            report.raise_if_failed()
        cache.commit(ck, staged, files + [GOLDEN], {"parity": report.to_dict(), "timings": timings,
                                                    "golden_source": golden.source, "reference": judged_by})
        return timings
    finally:
        if staged.exists():
            cache.discard(staged)


def reference_backend(model):
    """(fp32 reference backend, what it is): the one every artifact is gated against.

    torch's eager backbone where torch is installed: it judges the folder's ``model.onnx``
    too, so a graph that disagrees with ``model.py`` is refused. Where torch is not
    installed, the folder's own graph run in fp32 by ONNX Runtime: int8 is then judged
    against the fp32 graph it was quantized from. ``BackendUnavailable`` if neither exists.
    """
    if torch_available():
        return TorchBackend.load(model, precision="fp32", threads=None), "torch eager fp32"
    graph = model.graph()
    if graph is None:
        raise no_graph_error(model)
    with tempfile.TemporaryDirectory(prefix="edge-reference-") as d:
        (Path(d) / GRAPH_FILE).write_bytes(graph)  # the session keeps the graph; the file may go
        b = get_backend("onnxruntime").load(model, precision="fp32", artifact_dir=Path(d), threads=1)
    return b, f"onnxruntime fp32 of the folder's {GRAPH_FILE} (torch is not installed)"


def compile_model(model, *, backend: str = "auto", precision: str | None = None, calibration=None,
                  cache_dir=None, progress: bool = True, threads: int = 1, force: bool = False) -> CompileResult:
    """Build (or find in the cache) and gate ``model``'s artifact; with ``auto``, measure the choice.

    What ``edge compile MODEL_DIR`` runs. ``auto`` builds every candidate, times it here,
    records the decision (what ``edge run`` then serves) and returns the chosen one, its
    ``decision`` attached; a named backend builds just that one, with no fallback. Both
    obey the manifest's ``[serve] precision`` unless ``precision`` is given. ``calibration`` is a ``.npy``/``.npz`` file of
    recorded windows ``[N, C, L]``; without it the manifest's generator or file is used.
    Raises ``BackendUnavailable``, ``ModelError`` or ``ParityError`` (saying what differed).
    """
    from edge.serve.choice import precision_policy, resolve_precision

    cache = ArtifactCache(cache_dir)
    policy = precision_policy(model.manifest.serve, precision)
    if backend == "auto":
        from edge.serve.select import serve_auto

        served = serve_auto(model, cache=cache, policy=policy, calibration=calibration, threads=threads,
                            remeasure=True, force=force, progress=Progress() if progress else None)
        served.result.decision = served.decision
        return served.result
    precision = resolve_precision(backend, policy)
    _, result = obtain(model, backend, precision, cache=cache, calibration=calibration,
                       threads=threads, progress=Progress() if progress else None, force=force)
    return result
