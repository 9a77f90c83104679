"""The measured choice, at first start and on ``edge compile``: build, gate, time, check, decide, record.

Every candidate this hardware supports (``choice.candidates``) is obtained through the
same path as any artifact (``compile.obtain``: built or found in the cache, parity-gated
on held-out windows), scored on the model's labelled ``[eval]`` set where it has one,
and then all are timed at batch 1 on this device, in alternation. ``choice.decide`` picks; the decision, with
every trial, is written next to the artifacts as ``choice-<fingerprint>.json`` so that
later starts load the chosen artifact straight away and ``edge status`` can say why.
The fingerprint covers the CPU's features, the available backends (with their
versions and devices) and the precision policy: a change of any of these re-measures.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import EdgeError, ModelError
from edge.serve import parity
from edge.serve.backends import availability, get_backend
from edge.serve.cache import ArtifactCache, fingerprint
from edge.serve.calibration import representative_windows
from edge.serve.choice import Candidate, Decision, Trial, candidates, decide
from edge.serve.paired import median, paired_blocks
from edge.serve.compile import obtain
from edge.serve.cpu import cpu_features
from edge.serve.evaluation import accuracy, eval_sets

log = logging.getLogger("edge.serve")

ROUNDS = 40  # rounds of 10 calls per candidate


@dataclass(frozen=True)
class Served:
    """The outcome of the measured choice: the decision and, unless nothing passed, the
    loaded backend with its ``CompileResult``; ``how`` says whether it was recorded or measured now."""

    decision: Decision
    backend: Any = None
    result: Any = None
    how: str = ""


def platform_key(avail: dict[str, tuple[bool, str]], policy: str) -> dict:
    """What a recorded choice depends on."""
    return {"cpu": cpu_features().to_dict(), "policy": policy,
            "backends": {k: why for k, (ok, why) in sorted(avail.items()) if ok}}


def record_path(cache: ArtifactCache, model, key: dict) -> Path:
    return cache.root / f"{model.manifest.name}-{model.content_hash[:16]}" / f"choice-{fingerprint(key)}.json"


def read_record(path: Path) -> Decision | None:
    """The recorded decision, or None (absent or unreadable: then it is measured again)."""
    try:
        return Decision.from_dict(json.loads(path.read_text())["decision"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("recorded serving choice %s is unreadable (%s: %s); measuring again", path, type(e).__name__, e)
        return None


def write_record(path: Path, decision: Decision, key: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"decision": decision.to_dict(), "platform": key, "time": time.time()}, indent=2,
                              default=str))
    os.replace(tmp, path)


def timing_windows(model) -> np.ndarray:
    """Batch-1 inputs for timing: the model's own calibration source when it has one."""
    m = model.manifest
    x = representative_windows(model, 8, seed=parity.GOLDEN_SEED + 1)
    if x is None:
        x = np.random.default_rng(1).standard_normal((8, m.channels, m.window)).astype(np.float32)
    return np.ascontiguousarray(x[:1])


def measure(model, *, cache: ArtifactCache, policy: str, calibration=None, threads: int = 1,
            clock=time.perf_counter, rounds: int = ROUNDS, force: bool = False, progress=None):
    """``Served``: the decision, and the chosen candidate's backend and result (None if none passed)."""
    avail = availability()
    variants = {}
    for key, (ok, _) in avail.items():
        if ok:
            cls = get_backend(key)
            variants.update({(key, p): cls.variants(p) for p in cls.precisions})
    cands, skipped = candidates(avail, policy=policy, variants=variants)
    x1 = timing_windows(model)
    head = parity.head_scores(model)
    sets, eval_where = eval_sets(model) if head is not None else (None, "accuracy check: not a classification model")
    trials, loaded, scores = [], {}, {}
    model_errors: list[ModelError] = []
    for c in cands:
        try:
            b, result = obtain(model, c.backend, c.precision, variant=c.variant, cache=cache, calibration=calibration,
                               threads=threads, force=force, progress=progress)
        except EdgeError as e:
            if isinstance(e, ModelError):
                model_errors.append(e)
            trials.append(Trial(c, False, why=str(e)[:300]))
            continue
        except Exception as e:  # noqa: BLE001  a backend library may fail in any way; refuse it, loudly
            log.exception("building %s failed unexpectedly", c.label)
            trials.append(Trial(c, False, why=f"{type(e).__name__}: {e}"[:300]))
            continue
        scores[c] = accuracy(b.features, head, sets) if sets else None
        loaded[c] = (b, result)
    if cands and len(model_errors) == len(cands):  # the folder itself is at fault, not a backend: exit code 3
        raise ModelError(f"no backend can serve {model.path}: {model_errors[0]}")
    # timed together, in alternating blocks, once all are loaded; compared per round (edge.serve.paired)
    per_round = paired_blocks({c: (lambda b=b: b.features(x1)) for c, (b, _) in loaded.items()},
                              clock=clock, rounds=rounds, block=10)
    trials += [Trial(c, True, p50_ms=median(per_round[c]) * 1e3, accuracy=scores[c],
                     samples_ms=tuple(s * 1e3 for s in per_round[c])) for c in loaded]
    order = {c: i for i, c in enumerate(cands)}
    trials.sort(key=lambda t: order[t.candidate])
    tol = {p: parity.tolerances(model, p).get("max_accuracy_loss", 0.5) for p in ("int8", "fp16")}
    d = decide(trials, policy=policy, max_accuracy_loss=tol)
    prefix = [f"auto on {cpu_features().summary()}, policy {policy}"] + [f"{s}" for s in skipped] + [eval_where]
    d = Decision(d.chosen, "; ".join(prefix + [d.reason]), d.policy, d.trials, d.confidence)
    b, result = loaded.get(d.chosen, (None, None)) if d.chosen is not None else (None, None)
    loaded.clear()  # the others' sessions go now, not at the next collection
    return Served(d, b, result, "measured now")


def serve_auto(model, *, cache: ArtifactCache, policy: str, calibration=None, threads: int = 1,
               remeasure: bool = False, force: bool = False, progress=None):
    """``Served``: the recorded choice if there is one, else measured now (and recorded)."""
    key = platform_key(availability(), policy)
    path = record_path(cache, model, key)
    rec = None if (remeasure or force) else read_record(path)
    if rec is not None and rec.chosen is not None:
        c = rec.chosen
        try:
            b, result = obtain(model, c.backend, c.precision, variant=c.variant, cache=cache, calibration=calibration,
                               threads=threads, progress=progress)
            served = Served(rec, b, result, f"recorded choice {path.name}")
            _plan_recheck(served, model, cache=cache, policy=policy, calibration=calibration, threads=threads,
                          key=key, path=path)
            return served
        except EdgeError as e:
            log.warning("the recorded choice %s cannot be served (%s); measuring again", c.label, e)
    served = measure(model, cache=cache, policy=policy, calibration=calibration, threads=threads,
                     force=force, progress=progress)
    write_record(path, served.decision, key)
    log.info("serving choice (%s): %s (recorded in %s)", served.decision.confidence, served.decision.reason, path)
    if served.backend is None:
        raise EdgeError(f"no backbone could be served: {served.decision.reason}")
    _plan_recheck(served, model, cache=cache, policy=policy, calibration=calibration, threads=threads,
                  key=key, path=path)
    return Served(served.decision, served.backend, served.result, f"measured now, recorded in {path.name}")


def _plan_recheck(served: Served, model, *, cache, policy, calibration, threads, key, path) -> None:
    """An uncertain choice's backend carries the plan to measure again (with 3x the rounds)
    once the device is idle; the ``Engine`` serving it runs that (``edge.serve.recheck``)."""
    if served.decision.confidence != "uncertain" or served.backend is None:
        return
    from edge.serve.recheck import RecheckPlan

    def remeasure() -> Served:
        again = measure(model, cache=cache, policy=policy, calibration=calibration, threads=threads,
                        rounds=3 * ROUNDS)
        write_record(path, again.decision, key)
        return again

    served.backend.recheck_plan = RecheckPlan(served.decision, remeasure)


def records(cache: ArtifactCache) -> list[dict]:
    """Every recorded choice, for ``edge status``."""
    out = []
    for p in sorted(cache.root.glob("*/choice-*.json")):
        try:
            d = json.loads(p.read_text())
            out.append({"file": str(p), "chosen": d["decision"]["chosen"], "reason": d["decision"]["reason"],
                        "confidence": d["decision"].get("confidence", "sure"), "time": d.get("time")})
        except (OSError, ValueError, KeyError) as e:
            log.warning("unreadable choice record %s: %s", p, e)
    return out


__all__ = ["measure", "serve_auto", "records", "Served", "Candidate"]
