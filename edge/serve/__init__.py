"""Serving the backbone: compiled, quantized, parity-checked, with fallback.

The public face of ``edge.serve``. ``load_backbone`` is what the daemon calls at start.
With ``auto`` it serves the measured choice (``edge.serve.select``): recorded in the
cache at first start (or by ``edge compile``), measured now otherwise. With a configured
backend it builds or loads that artifact, runs the parity gate, and falls back along
tensorrt -> onnxruntime int8 -> onnxruntime fp32 -> torch fp32, saying why at each
step. Both obey the manifest's ``[serve] precision`` policy, as ``compile_model``
(``edge compile``) does, so the two always agree. ``Engine`` batches and times the
calls of the pipeline thread.
"""
from __future__ import annotations

import logging

from edge.errors import EdgeError
from edge.serve.backends import Backend, availability, backend_keys, get_backend, register_backend
from edge.serve.cache import ArtifactCache, default_cache_dir
from edge.serve.choice import choose_auto, fallback_chain, precision_policy, resolve_precision
from edge.serve.compile import CompileResult, compile_model, obtain
from edge.serve.engine import Engine
from edge.serve.parity import ParityReport

log = logging.getLogger("edge.serve")


def load_backbone(model, *, backend: str = "auto", precision: str | None = None, cache_dir=None,
                  threads: int = 1, calibration=None, progress: bool = False) -> tuple[Backend, str]:
    """(backend, reason): the best backbone that passes the parity gate here.

    ``reason`` says what was chosen and why, including every refusal on the way, e.g.
    ``"auto: tensorrt unavailable (no CUDA device); ... -> onnxruntime int8; cache hit;
    parity ok (...)"``; the daemon logs it and ``edge status`` shows it.
    """
    from edge.serve.progress import Progress

    policy = precision_policy(model.manifest.serve, precision)
    cache = ArtifactCache(cache_dir)
    if backend == "auto":
        from edge.serve.select import serve_auto

        served = serve_auto(model, cache=cache, policy=policy, calibration=calibration, threads=threads,
                            progress=Progress() if progress else None)
        b, result, decision, how = served.backend, served.result, served.decision, served.how
        gate = result.parity.summary() if result.parity else "fp32 reference, no gate"
        reason = f"{decision.reason} ({how}); serving {b.key} {b.precision}{' (' + b.variant + ')' if b.variant else ''} " \
                 f"({b.provider}); cache {result.cache}; parity ok: {gate}"
        log.info("backbone: %s", reason)
        return b, reason
    why = f"configured: {backend}" + (f", precision policy {policy}" if policy != "auto" else "")
    precision = resolve_precision(backend, policy)
    refusals = []
    for key, prec in fallback_chain(backend, precision):
        if policy == "fp32" and prec != "fp32":
            continue
        try:
            b, result = obtain(model, key, prec, cache=cache, calibration=calibration, threads=threads,
                               progress=Progress() if progress else None)
        except EdgeError as e:
            refusals.append(f"{key} {prec} refused: {e}")
        except Exception as e:  # noqa: BLE001  a backend library may fail in any way; fall back, loudly
            log.exception("building %s %s failed unexpectedly", key, prec)
            refusals.append(f"{key} {prec} failed: {type(e).__name__}: {e}")
        else:
            gate = result.parity.summary() if result.parity else "fp32 reference, no gate"
            parts = [why] + refusals + [f"serving {key} {prec} ({b.provider}); cache {result.cache}; parity ok: {gate}"]
            reason = "; ".join(parts)
            (log.warning if refusals else log.info)("backbone: %s", reason)
            return b, reason
        log.warning("%s", refusals[-1])
    raise EdgeError("no backbone could be served: " + "; ".join(refusals))


def planned(model, *, backend: str = "auto", precision: str | None = None, cache_dir=None) -> dict:
    """What ``edge run`` would serve for ``model``, without building anything (for ``--check``).

    The same policy and record that ``load_backbone`` and ``compile_model`` use, so the
    three agree: ``{"policy", "backend", "precision", "variant", "source"}``; ``source``
    says whether it is the recorded measured choice or will be measured at first start.
    """
    policy = precision_policy(model.manifest.serve, precision)
    if backend != "auto":
        return {"policy": policy, "backend": backend, "precision": resolve_precision(backend, policy),
                "variant": None, "source": "configured backend (falls back along the chain if refused)"}
    from edge.serve.select import platform_key, read_record, record_path

    path = record_path(ArtifactCache(cache_dir), model, platform_key(availability(), policy))
    rec = read_record(path)
    if rec is None or rec.chosen is None:
        return {"policy": policy, "backend": None, "precision": None, "variant": None,
                "source": f"not measured on this device yet: the first start (or `edge compile`) measures; {path}"}
    c = rec.chosen
    return {"policy": policy, "backend": c.backend, "precision": c.precision, "variant": c.variant,
            "source": f"recorded choice {path}"}


def serve_status(cache_dir=None) -> dict:
    """Plain data for ``edge status``: backends available here and the cached artifacts."""
    from edge.serve.select import records

    cache = ArtifactCache(cache_dir)
    avail = availability()
    try:
        auto = choose_auto(avail)
    except EdgeError as e:
        auto = (None, None, str(e))
    return {
        "backends": {k: {"available": ok, "why": why} for k, (ok, why) in avail.items()},
        # by availability alone; what `auto` serves is the measured choice in "choices"
        "auto": {"backend": auto[0], "precision": auto[1],
                 "reason": f"{auto[2]} (preference by availability; auto serves the measured choice, see choices)"},
        "cache_dir": str(cache.root),
        "artifacts": [{"dir": str(e.dir), "backend": e.meta.get("backend"), "precision": e.meta.get("precision"),
                       "variant": e.meta.get("variant", ""), "model": e.meta.get("model"),
                       "parity": (e.meta.get("parity") or {}).get("reason")}
                      for e in cache.entries()],
        "choices": records(cache),
    }


__all__ = [
    "load_backbone", "compile_model", "serve_status", "planned", "CompileResult", "Engine", "ParityReport", "Backend",
    "ArtifactCache", "default_cache_dir", "register_backend", "get_backend", "backend_keys", "availability",
    "choose_auto", "fallback_chain",
]
