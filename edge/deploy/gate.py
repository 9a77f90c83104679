"""Verify before use, then gate on the device: unpack a verified bundle, compile it with the
device's own serving choice and hold it to the parity gate.

Order matters: the bundle's sha256 (``Download.bundle``) and the folder's content digest
(``digest_files`` over the parsed files, what ``edge pin`` prints) are both checked
before one byte is written under ``model/`` or one line of ``model.py`` runs. The gate
builds the *same* backend and precision (and int8 format) the device serves now, through
``edge.serve.compile.obtain`` (the one path of ``edge compile`` and ``edge run``), so a
bundle whose int8 artifact disagrees with its fp32 reference is refused here
(``parity_failed``), not served after a quiet fallback to another backend.

The tolerances are the device's as a floor: each is the stricter of the bundle's own
``[parity]`` value and those of the configured ``[model]`` and of the model serving now
(defaults filled in: what this device was set up to accept). A release-key holder can
therefore tighten the gate for its bundle, never loosen it below what the device holds
its own model to; the configured model stays in the floor so that a switched release's
own looser table cannot lower the bar for the release after it. Only the gate's copy of
the manifest changes (in memory): the cache key is the folder's content hash, so the
artifact that passed here is the one served after the switch.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import shutil

from edge.deploy.store import Refused
from edge.fleet.release_codec import parse_bundle
from edge.errors import DecodeError, EdgeError, ParityError

log = logging.getLogger("edge.deploy")


def unpack_verified(bundle: bytes, manifest, folder, *, current) -> object:
    """The ``ModelFolder`` of a bundle whose bytes verified: its digest checked in memory, then
    written to ``folder/model`` (temp folder, then rename). ``current`` is the served manifest:
    the new model must take the same windows and give the same outputs (the pipeline's shape)."""
    from edge.zoo import ModelFolder, check_pin, digest_files

    try:
        files = parse_bundle(bundle)
    except DecodeError as e:
        raise Refused("digest_mismatch", f"the bundle does not parse: {e}") from None
    got = digest_files(files)
    if got != manifest.digest:
        raise Refused("digest_mismatch", f"the bundle's files digest to {got[:16]}..., the manifest signed "
                      f"{manifest.digest[:16]}...")
    dest, tmp = folder / "model", folder / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(dest, ignore_errors=True)
    try:
        for rel, data in files.items():
            p = tmp / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        tmp.rename(dest)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # Only a full disk is the device's: any other error writing the verified files (a path
        # the filesystem cannot hold) is the bundle's, refused as the release's fault, which the
        # server counts towards its halt; disk_full is not counted and is tried again later.
        reason = "disk_full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "compile_failed"
        raise Refused(reason, f"unpacking the bundle: {e.strerror or e}") from None
    try:
        model = ModelFolder(dest)
        check_pin(model, manifest.digest)  # what runs is what was verified, read back from disk
    except EdgeError as e:
        raise Refused("compile_failed", str(e)) from None
    check_compatible(model.manifest, current, manifest)
    return model


def check_compatible(new, current, manifest) -> None:
    """Refuse a model the running pipeline cannot serve in place of ``current`` (``compile_failed``)."""
    if new.name != manifest.model or new.version != manifest.version:
        raise Refused("compile_failed", f"the bundle holds {new.name} {new.version}, the manifest says "
                      f"{manifest.model} {manifest.version}")
    mine = (current.channels, current.window, current.task, current.classes, current.outputs)
    theirs = (new.channels, new.window, new.task, new.classes, new.outputs)
    if mine != theirs:
        raise Refused("compile_failed", f"the new model takes or gives other shapes (channels, window, task, classes, "
                      f"outputs {theirs}) than the served one ({mine})")


def floor_tolerances(device: dict, bundle: dict) -> dict[str, float]:
    """Each ``[parity]`` tolerance at the stricter of the device's and the bundle's. Pure.

    A ``max_*`` bound is stricter lower, a ``min_*`` or ``worst_*`` bound higher; a key of
    another kind keeps the device's value where it has one (no direction to compare by).

    >>> floor_tolerances({"int8_min_agreement": 0.97, "fp32_max_abs": 1e-3},
    ...                  {"int8_min_agreement": 0.0, "fp32_max_abs": 1e-4, "int8_min_cosine": 0.99})
    {'fp32_max_abs': 0.0001, 'int8_min_agreement': 0.97, 'int8_min_cosine': 0.99}
    """
    out = {}
    for k in sorted(set(device) | set(bundle)):
        vals = [float(t[k]) for t in (device, bundle) if k in t]
        bound = k.split("_", 1)[-1]
        if bound.startswith("max_"):
            out[k] = min(vals)
        elif bound.startswith(("min_", "worst_")):
            out[k] = max(vals)
        else:
            out[k] = float(device.get(k, bundle.get(k)))
    return out


def held_to_device(model, *floors) -> dict[str, float]:
    """Set ``model``'s tolerances (in memory) to the stricter of its own and every manifest in
    ``floors`` (the configured and the served model), defaults filled in; the result."""
    from edge.serve.parity import DEFAULTS

    tol = {**DEFAULTS, **model.manifest.parity}
    for f in floors:
        tol = floor_tolerances({**DEFAULTS, **f.parity}, tol)
    model.manifest = dataclasses.replace(model.manifest, parity=tol)
    return tol


def gate(model, *, served, floors=(), cache_dir=None, threads: int = 1):
    """(backend, CompileResult) of ``model`` built as ``served`` (the backend serving now) is built,
    parity-checked; ``Refused`` with ``parity_failed`` or ``compile_failed`` otherwise.
    ``floors`` (manifests: the configured and the served model) set the tolerances' floor."""
    from edge.serve.cache import ArtifactCache
    from edge.serve.compile import obtain

    held_to_device(model, *floors)
    try:
        return obtain(model, served.key, served.precision, cache=ArtifactCache(cache_dir), threads=threads,
                      variant=getattr(served, "variant", "") or None)
    except ParityError as e:
        raise Refused("parity_failed", str(e)) from None
    except Exception as e:  # noqa: BLE001  a bundle's model.py or a backend library may fail in any way
        log.warning("compiling release %s failed: %s: %s", model.manifest.version, type(e).__name__, str(e)[:200])
        raise Refused("compile_failed", f"{type(e).__name__}: {e}") from None
