"""Representative windows: for int8 calibration and for the parity gate's golden inputs.

They come from, in order: a file the user passes (``.npy`` array or ``.npz`` with one
array, of recorded windows ``[N, C, L]``), the manifest's ``[calibration] file``
(relative to the model folder) or its ``[calibration] generator`` (``module:function``
called as ``function(n, seed)``). Shapes are checked against the manifest, because a
calibration set of the wrong shape would otherwise fail deep inside the quantizer.

The parity gate must judge an artifact on windows it was not calibrated on: from a
file, ``split_file`` holds out its last windows for the gate and calibrates on the
rest; a generator is called with a different seed for each (``edge.serve.parity``).

A ``module:function`` reference is looked up first as ``<module>.py`` inside the model
folder (imported under a private name, with the folder on ``sys.path`` only while it
executes, so that its own sibling imports work and nothing else is shadowed), then as
an installed module.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import threading
from pathlib import Path

import numpy as np

from edge.errors import ModelError

log = logging.getLogger("edge.serve")

CALIBRATION_N = 256
HELD_OUT_N = 96
_IMPORT_LOCK = threading.Lock()


def split_file(n: int, *, n_calib: int = CALIBRATION_N, n_golden: int = HELD_OUT_N) -> tuple[slice, slice]:
    """(calibration, held-out) slices of ``n`` recorded windows; never overlapping.

    The held-out part is the last ``min(n_golden, n // 3)`` windows (at least one).

    >>> split_file(300)
    (slice(0, 204, None), slice(204, 300, None))
    >>> split_file(1000)
    (slice(0, 256, None), slice(904, 1000, None))
    >>> split_file(3)
    (slice(0, 2, None), slice(2, 3, None))
    """
    if n < 2:
        raise ModelError(f"a calibration file needs at least 2 windows (one to calibrate, one held out), got {n}")
    golden = max(1, min(n_golden, n // 3))
    return slice(0, min(n_calib, n - golden)), slice(n - golden, n)


def load_windows_file(path: str | Path, model=None) -> np.ndarray:
    """Windows ``[N, C, L]`` float32 from a ``.npy`` or ``.npz`` file (key ``X``/``windows`` or the only array)."""
    p = Path(path).expanduser()
    try:
        data = np.load(p, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ModelError(f"{p}: cannot read calibration windows: {e}") from None
    if isinstance(data, np.lib.npyio.NpzFile):
        names = list(data.files)
        name = next((n for n in ("X", "windows", "x") if n in names), names[0] if len(names) == 1 else None)
        if name is None:
            raise ModelError(f"{p}: npz holds {names}; name the windows array 'X' or 'windows'")
        data = data[name]
    x = np.asarray(data)
    return check_windows(x, model, where=str(p)) if model is not None else x.astype(np.float32)


def check_windows(x: np.ndarray, model, *, where: str) -> np.ndarray:
    m = model.manifest
    if x.ndim != 3 or x.shape[1:] != (m.channels, m.window) or len(x) == 0:
        raise ModelError(f"{where}: windows have shape {list(x.shape)}, the model needs [N, {m.channels}, {m.window}]")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise ModelError(f"{where}: windows contain NaN or inf")
    return x


def resolve_ref(model, ref: str, *, what: str):
    """The callable named by ``module:function``, the module looked up in the model folder first."""
    mod_name, _, fn_name = str(ref).partition(":")
    if not mod_name or not fn_name:
        raise ModelError(f"{model.path}: {what} {ref!r} is not of the form module:function")
    try:
        mod = _folder_module(model, mod_name) or importlib.import_module(mod_name)
        return getattr(mod, fn_name)
    except ModelError:
        raise
    except Exception as e:  # ImportError, AttributeError, or anything the user's module raised
        raise ModelError(f"{model.path}: {what} {ref!r} cannot be loaded: {type(e).__name__}: {e}") from None


def _folder_module(model, mod_name: str):
    """``<folder>/<mod/name>.py`` imported under a private name, or None if the folder has none."""
    src = model.path.joinpath(*mod_name.split(".")).with_suffix(".py")
    if not src.is_file() or src.resolve().parent != model.path.joinpath(*mod_name.split(".")[:-1]).resolve():
        return None
    private = f"_edge_model_{model.content_hash[:12]}_{mod_name.replace('.', '_')}"
    if private in sys.modules:
        return sys.modules[private]
    spec = importlib.util.spec_from_file_location(private, src)
    mod = importlib.util.module_from_spec(spec)
    with _IMPORT_LOCK:  # sys.path is process-wide: changed only while this module executes
        sys.path.insert(0, str(model.path))
        try:
            spec.loader.exec_module(mod)
        finally:
            try:
                sys.path.remove(str(model.path))
            except ValueError:
                pass
    sys.modules[private] = mod
    return mod


def generator(model):
    """The manifest's ``module:function`` window generator, or None if it names none."""
    ref = model.manifest.calibration.get("generator")
    if not ref:
        return None
    return resolve_ref(model, ref, what="calibration.generator")


def windows_file(model, file: str | Path | None = None) -> Path | None:
    """The file windows come from: the one passed, else the manifest's ``[calibration] file``."""
    if file is not None:
        return Path(file).expanduser()
    mfile = model.manifest.calibration.get("file")
    return model.path / str(mfile) if mfile else None


def representative_windows(model, n: int, seed: int, file: str | Path | None = None) -> np.ndarray | None:
    """``n`` windows (fewer if a file holds fewer) from the first source available, or None.

    From a file these are its first windows, calibration and held-out alike; use
    ``calibration_windows`` and ``held_out_windows`` to keep them apart.
    """
    path = windows_file(model, file)
    if path is not None:
        return load_windows_file(path, model)[:n]
    gen = generator(model)
    if gen is None:
        return None
    try:
        x = np.asarray(gen(n, seed))
    except Exception as e:  # a generator is user code
        raise ModelError(f"{model.path}: calibration generator failed: {type(e).__name__}: {e}") from e
    return check_windows(x, model, where=f"{model.path} calibration.generator")


def calibration_windows(model, file: str | Path | None = None, n: int = CALIBRATION_N, seed: int = 0) -> np.ndarray:
    """Windows to calibrate int8 on; a ``ModelError`` saying how to provide them if there are none.

    From a file: its windows before the held-out tail (``split_file``).
    """
    path = windows_file(model, file)
    if path is not None:
        x = load_windows_file(path, model)
        return x[split_file(len(x), n_calib=n)[0]]
    x = representative_windows(model, n, seed)
    if x is None:
        raise ModelError(f"{model.path}: int8 needs calibration windows: pass --calibration FILE (.npy/.npz "
                         "[N, C, L]) or set [calibration] generator or file in manifest.toml")
    return x


def held_out_windows(model, file: str | Path | None, n: int, seed: int) -> tuple[np.ndarray | None, str]:
    """(windows the parity gate may use, where they come from): never ones ``calibration_windows`` returns.

    The generator is called with ``seed`` (the gate's own, not calibration's 0).
    """
    path = windows_file(model, file)
    if path is not None:
        x = load_windows_file(path, model)
        held = split_file(len(x), n_golden=n)[1]
        return x[held], f"{path.name}[{held.start}:{held.stop}] (held out; calibration uses [0:{held.start}] at most)"
    x = representative_windows(model, n, seed)
    if x is None:
        return None, "no calibration source"
    return x, f"calibration.generator seed {seed} (calibration uses seed 0)"
